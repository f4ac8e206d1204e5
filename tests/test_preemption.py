"""Preemption: a killed run resumes to the same params; SIGTERM saves, exits 0 and resumes;
on two processes a SIGTERM to one stops both at the same step.

Each run is `python -m ift_jax train` in a subprocess on one CPU device. The
batch is large enough (~0.3 s a step on a 2-core CPU) that a signal sent on a
progress line lands a few steps before the end of the run.
"""

import functools
import re
import signal

import pytest

import train_runs

STEPS = 12
RUN = train_runs.overrides(train__batch_size=128, train__steps=STEPS, train__log_every=1)
ENV = train_runs.env(1)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """An uninterrupted run of the same steps (started now, awaited on first use)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run = train_runs.Run(workdir, RUN + train_runs.overrides(train__checkpoint_every=STEPS),
                         ENV, workdir / "run")

    @functools.cache
    def final_params():
        run.finish()
        assert train_runs.committed_steps(workdir)[-1] == STEPS
        return train_runs.checkpoint_state(workdir, STEPS)["params"]

    yield final_params
    run.close()


def _resumed_step(run: train_runs.Run) -> int:
    found = re.search(r"start-up: resumed from \S+ step (\d+)", run.stderr)
    assert found, f"the restarted run did not resume; stderr:\n{run.stderr[-3000:]}"
    return int(found.group(1))


def _resume_to_the_end(workdir, args, log, expected_step: int, uninterrupted) -> None:
    run = train_runs.Run(workdir, args, ENV, log)
    try:
        run.finish()
    finally:
        run.close()
    assert _resumed_step(run) == expected_step
    assert train_runs.committed_steps(workdir)[-1] == STEPS
    # Rows logged after the restored step by the stopped run were dropped, then logged again.
    assert [r["step"] for r in train_runs.metrics_rows(workdir)] == list(range(1, STEPS + 1))
    train_runs.assert_trees_equal(train_runs.checkpoint_state(workdir, STEPS)["params"],
                                  uninterrupted(), rtol=0)


def test_killed_run_resumes_from_its_last_checkpoint_to_the_same_params(tmp_path,
                                                                         uninterrupted):
    args = RUN + train_runs.overrides(train__checkpoint_every=2)
    run = train_runs.Run(tmp_path, args, ENV, tmp_path / "killed")
    try:
        # Kill as soon as step 2 is committed (orbax renames its temp dir on commit).
        train_runs.wait_for(lambda: 2 in train_runs.committed_steps(tmp_path), run,
                            "committed checkpoint 2")
        run.signal(signal.SIGKILL)  # No handler, no final save.
        assert run.process.wait(60) == -signal.SIGKILL
    finally:
        run.close()
    last = train_runs.committed_steps(tmp_path)[-1]
    assert 2 <= last < STEPS, f"the run was killed too late (last checkpoint {last})"

    _resume_to_the_end(tmp_path, args, tmp_path / "resumed", last, uninterrupted)


def test_sigterm_saves_the_current_step_exits_0_and_resumes(tmp_path, uninterrupted):
    args = RUN + train_runs.overrides(train__checkpoint_every=6)
    run = train_runs.Run(tmp_path, args, ENV, tmp_path / "stopped")
    try:
        # Step 7 is reported once step 8 is dispatched: the stop lands on 8 to 11.
        train_runs.wait_for(lambda: f"step 7/{STEPS}" in run.stdout, run,
                            "progress line of step 7")
        run.signal(signal.SIGTERM)
        rc = run.wait()
    finally:
        run.close()
    assert rc == 0, f"exit code {rc} after SIGTERM; stderr:\n{run.stderr[-3000:]}"
    found = re.search(r"stopped at step (\d+); checkpoint saved", run.stderr)
    assert found, f"no stop message; stderr:\n{run.stderr[-3000:]}"
    stopped = int(found.group(1))
    assert 6 < stopped < STEPS, f"stopped at step {stopped}, expected between 6 and {STEPS}"
    assert train_runs.committed_steps(tmp_path) == [6, stopped]
    assert train_runs.metrics_rows(tmp_path)[-1]["step"] == stopped

    _resume_to_the_end(tmp_path, args, tmp_path / "resumed", stopped, uninterrupted)


def test_sigterm_on_a_step_just_checkpointed_still_exits_0(tmp_path):
    # Every step is a periodic checkpoint, so the stop save meets an existing step.
    args = RUN + train_runs.overrides(train__checkpoint_every=1)
    run = train_runs.Run(tmp_path, args, ENV, tmp_path / "stopped")
    try:
        train_runs.wait_for(lambda: f"step 2/{STEPS}" in run.stdout, run, "progress line of step 2")
        run.signal(signal.SIGTERM)
        rc = run.wait()
    finally:
        run.close()
    assert rc == 0, f"exit code {rc} after SIGTERM; stderr:\n{run.stderr[-3000:]}"
    stopped = int(re.search(r"stopped at step (\d+)", run.stderr).group(1))
    assert stopped < STEPS and train_runs.committed_steps(tmp_path)[-1] == stopped


def _pair(workdir, args, log, coordinator: str) -> list[train_runs.Run]:
    """Two processes × 1 CPU device training one run in `workdir`."""
    return [train_runs.Run(workdir, args, train_runs.env(
        1, IFT_JAX_COORDINATOR=coordinator, IFT_JAX_NUM_PROCESSES="2",
        IFT_JAX_PROCESS_ID=str(i)), f"{log}{i}") for i in range(2)]


def test_sigterm_on_one_host_stops_both_at_the_same_step_and_resumes_bit_exactly(tmp_path):
    args = RUN + train_runs.overrides(train__checkpoint_every=STEPS)
    whole, stopped_dir = tmp_path / "uninterrupted", tmp_path / "stopped"
    runs = []
    try:
        # The uninterrupted pair runs beside the stopped one (they mostly wait on each other).
        runs += _pair(whole, args, tmp_path / "whole", f"127.0.0.1:{train_runs.free_port()}")
        stopped = _pair(stopped_dir, args, tmp_path / "stop",
                        f"127.0.0.1:{train_runs.free_port()}")
        runs += stopped
        # Only process 0 prints progress; only process 1 is signalled.
        train_runs.wait_for(lambda: f"step 3/{STEPS}" in stopped[0].stdout, stopped[0],
                            "progress line of step 3")
        stopped[1].signal(signal.SIGTERM)
        train_runs.finish_all(runs)
        steps = [int(re.search(r"stopped at step (\d+); checkpoint saved", run.stderr).group(1))
                 for run in stopped]
        assert steps[0] == steps[1] < STEPS, steps
        assert train_runs.committed_steps(stopped_dir) == [steps[0]]

        resumed = _pair(stopped_dir, args, tmp_path / "resumed",
                        f"127.0.0.1:{train_runs.free_port()}")
        runs += resumed
        train_runs.finish_all(resumed)
    finally:
        for run in runs:
            run.close()
    assert [_resumed_step(run) for run in resumed] == steps
    losses = [[(r["step"], r["loss"]) for r in train_runs.metrics_rows(d)]
              for d in (stopped_dir, whole)]
    assert losses[0] == losses[1] and len(losses[0]) == STEPS
    train_runs.assert_trees_equal(train_runs.checkpoint_state(stopped_dir, STEPS)["params"],
                                  train_runs.checkpoint_state(whole, STEPS)["params"], rtol=0)
