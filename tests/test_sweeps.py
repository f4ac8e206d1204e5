"""Sweeps: override lists, dry runs, and the tiny presets run end to end."""

import csv
import json
import os

import pytest

from ift_jax import cli, sweeps

LORA_RANK = "configs/sweeps/lora_rank.py"
PEFT_METHODS = "configs/sweeps/peft_methods.py"


def test_product_multiplies_dicts_and_zip_pairs_values():
    points = sweeps.product({"a": [1, 2]}, {"b": [3, 4], "c": ["x", "y"]})
    assert points == [{"a": 1, "b": 3, "c": "x"}, {"a": 1, "b": 4, "c": "y"},
                      {"a": 2, "b": 3, "c": "x"}, {"a": 2, "b": 4, "c": "y"}]
    with pytest.raises(ValueError, match="equal lengths"):
        sweeps.zip_({"a": [1, 2], "b": [3]})


def test_point_names_and_overrides():
    point = {"config.peft.lora_rank": 8, "optimizer.learning_rate": 0.001}
    assert sweeps.point_name(point) == "lora_rank=8,learning_rate=0.001"
    assert sweeps.overrides(point) == ["--config.peft.lora_rank=8",
                                       "--config.optimizer.learning_rate=0.001"]
    assert sweeps.point_name({"name": "my run/1", "peft.method": "full"}) == "my_run_1"


def test_lora_rank_sweep_covers_1_to_512_and_dry_run_prints_the_commands(tmp_path, capsys):
    assert [p["peft.lora_rank"] for p in sweeps.load_points(LORA_RANK)] == [
        1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    root = str(tmp_path / "sweep")
    assert cli.main(["sweep", f"--config={LORA_RANK}:tiny", f"--workdir={root}", "--dry_run",
                     "--config.train.steps=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"ift-jax train --config={LORA_RANK}:tiny --workdir={root}/lora_rank={r} "
                     f"--config.train.steps=3 --config.peft.lora_rank={r}" for r in (1, 4)]
    assert not os.path.exists(root)  # A dry run runs nothing.


def test_a_bad_override_fails_before_anything_runs(tmp_path, capsys):
    assert cli.main(["sweep", f"--config={LORA_RANK}:tiny", f"--workdir={tmp_path}",
                     "--config.peft.lora_rnak=3"]) == 2
    assert "lora_rnak" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_a_file_without_get_sweep_is_named(tmp_path):
    with pytest.raises(ValueError, match="defines no get_sweep"):
        sweeps.load_points("configs/default.py")


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_point_process_reports_its_exit_code():
    import sys
    assert sweeps.run_point([sys.executable, "-c", "raise SystemExit(3)"]) == (3, False)


# In process: the same points and files as with a process per point, without the
# ~8 s start-up of each (`sweeps.run_point` is the process path).
# The methods' sweep runs one of its points (`--points`): each method trains on its
# own in test_train_peft_methods.py; here the sweep machinery is what is tested.
@pytest.mark.parametrize("config, names, points", [
    (LORA_RANK, ["lora_rank=1", "lora_rank=4"], []),
    (PEFT_METHODS, ["prompt"], ["--points=prompt"]),
])
def test_tiny_presets_run_and_summarize_and_skip_finished_points(config, names, points,
                                                                 tmp_path, capsys):
    root = str(tmp_path / "sweep")
    assert cli.main(["sweep", f"--config={config}:tiny", f"--workdir={root}",
                     "--in_process", *points]) == 0
    rows = _rows(f"{root}/sweep_summary.csv")
    assert [r["point"] for r in rows] == names
    assert all(r["status"] == "finished" and r["step"] == "6" for r in rows)
    for row in rows:
        last = json.load(open(f"{root}/{row['point']}/eval/step_6.json"))["tasks"][
            "synthetic_support_summary"]
        assert float(row["synthetic_support_summary/loss"]) == pytest.approx(last["loss"])
        assert float(row["peak_host_rss_gib"]) > 0
    trainable = {r["point"]: int(r["trainable_params"]) for r in rows}
    if config == LORA_RANK:
        assert trainable["lora_rank=1"] * 4 == trainable["lora_rank=4"]  # Linear in r.
        assert "synthetic_support_summary/bleu" in rows[0]
    else:  # The prompt's embeddings only: prompt_length x d_model.
        from ift_jax.configs.sweeps import peft_methods
        tiny = peft_methods.get_config("tiny")
        assert trainable["prompt"] == tiny.peft.prompt_length * tiny.model.d_model
    assert os.path.exists(f"{root}/sweep_summary.md") and os.path.exists(
        f"{root}/sweep_summary.png")
    lines = capsys.readouterr().out.splitlines()  # One progress line per point, with an ETA.
    progress = [line for line in lines if line.startswith("sweep: ")]
    assert len(progress) == len(names) and progress[0].startswith(
        f"sweep: 1/{len(names)} points ({100 // len(names)}%), {names[0]} done, elapsed ")
    assert (", ETA " in progress[0]) == (len(names) > 1) and ", ETA " not in progress[-1]
    assert cli.main(["sweep", f"--config={config}:tiny", f"--workdir={root}", "--dry_run",
                     *points]) == 0
    assert all(line.endswith("# finished, skipped")
               for line in capsys.readouterr().out.splitlines())
    if points:  # The points left out are still to run.
        assert cli.main(["sweep", f"--config={config}:tiny", f"--workdir={root}",
                         "--dry_run"]) == 0
        pending = [line for line in capsys.readouterr().out.splitlines()
                   if not line.endswith("# finished, skipped")]
        assert len(pending) == len(sweeps.load_points(f"{config}:tiny")) - len(names)


def test_an_unknown_point_name_lists_the_points(tmp_path, capsys):
    assert cli.main(["sweep", f"--config={LORA_RANK}:tiny", f"--workdir={tmp_path}",
                     "--points=lora_rank=3", "--dry_run"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "--points: configs/sweeps/lora_rank.py has no point lora_rank=3; its points: "
        "lora_rank=1, lora_rank=4")


def test_a_signal_is_passed_to_the_running_point_and_ends_the_sweep(tmp_path, monkeypatch):
    import signal
    started, forwarded = [], []

    class FakePoint:  # Stands in for the `ift-jax train` process of a point.
        def __init__(self, argv):
            started.append(argv)

        def send_signal(self, signum):
            forwarded.append(signum)

        def wait(self):
            if len(started) == 2:  # Preempted during the second point.
                signal.raise_signal(signal.SIGTERM)
            return 0

    monkeypatch.setattr(sweeps.subprocess, "Popen", FakePoint)
    previous = signal.getsignal(signal.SIGTERM)
    assert sweeps.run(f"{LORA_RANK}:tiny", str(tmp_path)) == 0
    assert len(started) == 2 and forwarded == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is previous  # Handler restored.
    rows = _rows(f"{tmp_path}/sweep_summary.csv")
    assert [r["status"] for r in rows] == ["not run"] * 2
