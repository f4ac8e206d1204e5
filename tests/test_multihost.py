"""Two processes × 2 CPU devices train and evaluate exactly like one process × 4 devices.

Both runs go through `python -m ift_jax train`; the two-process one joins the
runtime through `IFT_JAX_COORDINATOR` / `IFT_JAX_NUM_PROCESSES` /
`IFT_JAX_PROCESS_ID` (gloo collectives on CPU) and shares one workdir.
`data.host_sharding=global_batch` gives both topologies the same global batches.
Evaluation at the last step runs inside the training mesh on every process
(each decodes its shard of each batch; process 0 writes the files).
"""

import json

import pytest

import train_runs

STEPS = 3
ARGS = train_runs.overrides(train__batch_size=8, train__steps=STEPS, train__log_every=1,
                            data__host_sharding="global_batch", eval__every=STEPS,
                            eval__at_start=False, eval__max_examples=6,
                            eval__max_decode_length=4, eval__batch_size=4)


def test_two_processes_train_and_evaluate_like_one_process_with_the_same_devices(tmp_path):
    single_dir, multi_dir = tmp_path / "one_process", tmp_path / "two_processes"
    coordinator = f"127.0.0.1:{train_runs.free_port()}"
    runs = []
    try:
        # All three at once: the pair spends much of its time waiting on each other.
        runs.append(train_runs.Run(single_dir, ARGS, train_runs.env(4), tmp_path / "single"))
        for process_id in range(2):
            environ = train_runs.env(2, IFT_JAX_COORDINATOR=coordinator,
                                     IFT_JAX_NUM_PROCESSES="2",
                                     IFT_JAX_PROCESS_ID=str(process_id))
            runs.append(train_runs.Run(multi_dir, ARGS, environ, tmp_path / f"process{process_id}"))
        train_runs.finish_all(runs)
    finally:
        for run in runs:
            run.close()
    single, main, other = runs

    # Only process 0 reports: one row per step, and no progress lines from process 1.
    rows, expected = train_runs.metrics_rows(multi_dir), train_runs.metrics_rows(single_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == [1, 2, 3]
    assert "step 1/3" in main.stdout and "step 1/3" not in other.stdout
    for row, want in zip(rows, expected):
        assert abs(row["loss"] - want["loss"]) <= 1e-5 * abs(want["loss"]), (row, want)

    # The checkpoint written by both processes together holds the same params.
    assert train_runs.committed_steps(multi_dir) == [STEPS]
    train_runs.assert_trees_equal(train_runs.checkpoint_state(multi_dir, STEPS)["params"],
                                  train_runs.checkpoint_state(single_dir, STEPS)["params"],
                                  rtol=1e-5, atol=1e-7)

    # Evaluated in the training mesh by both processes: the same files as one process.
    point = f"eval/step_{STEPS}.json"
    multi, single = (json.loads((d / point).read_text()) for d in (multi_dir, single_dir))
    assert multi["tasks"].keys() == single["tasks"].keys() == {"synthetic_sentiment"}
    for metric, value in single["tasks"]["synthetic_sentiment"].items():
        assert multi["tasks"]["synthetic_sentiment"][metric] == pytest.approx(value, rel=1e-4)
    rows = f"predictions/step_{STEPS}/synthetic_sentiment.jsonl"
    multi_rows, single_rows = ([json.loads(line) for line in (d / rows).open()]
                               for d in (multi_dir, single_dir))
    assert len(multi_rows) == len(single_rows) == 6
    for got, want in zip(multi_rows, single_rows):
        assert {k: got[k] for k in ("inputs", "prediction", "choice_prediction")} == {
            k: want[k] for k in ("inputs", "prediction", "choice_prediction")}
        assert got["target_log_likelihood"] == pytest.approx(want["target_log_likelihood"],
                                                             rel=1e-4)
    assert "eval step 3" in main.stdout and "eval step 3" not in other.stdout
