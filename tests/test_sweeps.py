"""Sweeps: override lists, dry runs, and the tiny presets run end to end."""

import csv
import io
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from ift_jax import cli, sweep_points, sweeps

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


def test_a_point_process_reports_its_exit_code_and_why_it_failed():
    import sys
    assert sweep_points.run_point([sys.executable, "-c", "raise SystemExit(3)"]) == (
        3, False, "exit code 3")
    said = ("import sys; print('step 1', file=sys.stderr); print('ift-jax train: error: "
            "no such mixture', file=sys.stderr); print('after', file=sys.stderr); sys.exit(2)")
    assert sweep_points.run_point([sys.executable, "-c", said]) == (2, False,
                                                                    "no such mixture")
    crash = "raise StopIteration"
    code, _, reason = sweep_points.run_point([sys.executable, "-c", crash])
    assert code == 1 and reason == "StopIteration"


# In process: the same points and files as with a process per point, without the
# ~8 s start-up of each (`sweep_points.run_point` is the process path).
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
        def __init__(self, argv, **kwargs):
            started.append(argv)
            self.stderr = io.BytesIO(b"")

        def send_signal(self, signum):
            forwarded.append(signum)

        def wait(self):
            if len(started) == 2:  # Preempted during the second point.
                signal.raise_signal(signal.SIGTERM)
            return 0

    monkeypatch.setattr(sweep_points.subprocess, "Popen", FakePoint)
    previous = signal.getsignal(signal.SIGTERM)
    assert sweeps.run(f"{LORA_RANK}:tiny", str(tmp_path)) == 0
    assert len(started) == 2 and forwarded == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is previous  # Handler restored.
    rows = _rows(f"{tmp_path}/sweep_summary.csv")
    assert [r["status"] for r in rows] == ["not run"] * 2


SWEEP_FILE = """
from ift_jax.configs import default

def get_config(arg=None):
    return default.get_config()

def get_sweep(arg=None):
    return [{"name": "typo", "data.mixture": "ift_synthetc"},
            {"name": "fine", "train.steps": 2}]
"""


def test_a_failed_point_is_failed_in_the_summary_with_its_reason(tmp_path, capsys):
    spec = tmp_path / "sweep.py"
    spec.write_text(SWEEP_FILE)
    root = tmp_path / "root"
    assert cli.main(["sweep", f"--config={spec}", f"--workdir={root}", "--in_process",
                     "--points=typo"]) == 1
    assert "1 point(s) failed" in capsys.readouterr().err
    row, = _rows(root / "sweep_summary.csv")
    reason = ("no task or mixture is registered as 'ift_synthetc'; did you mean "
              "ift_synthetic? `ift-jax tasks list` lists the tasks")
    assert (row["status"], row["reason"]) == ("failed", reason)
    assert f"| typo | ift_synthetc | failed | {reason} |" in (
        root / "sweep_summary.md").read_text()
    assert json.loads((root / sweeps.POINTS_FILE).read_text())["typo"]["exit_code"] == 2


# The parent-death signal: a point whose sweep is SIGKILLed gets SIGTERM. The point asks
# for it as `ift-jax` does first thing (`sweep_points.die_with_sweep`).
SUPERVISED = """
import sys
from ift_jax import sweep_points
child = "import signal, sys, time, pathlib; from ift_jax import sweep_points; " \\
    "sweep_points.die_with_sweep(); " \\
    "signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path(sys.argv[1]).write_text('term'), " \\
    "sys.exit(0))); pathlib.Path(sys.argv[2]).write_text('ready'); time.sleep(120)"
sweep_points.run_point([sys.executable, "-c", child, sys.argv[1], sys.argv[2]])
"""


def test_a_killed_sweep_stops_its_running_point(tmp_path):
    import signal
    stopped, ready = tmp_path / "stopped", tmp_path / "ready"
    sweep = subprocess.Popen([sys.executable, "-c", SUPERVISED, str(stopped), str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline and sweep.poll() is None, "the point never started"
        time.sleep(0.05)
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    while not stopped.exists():
        assert time.monotonic() < deadline, "the orphaned point was never stopped"
        time.sleep(0.05)
    assert stopped.read_text() == "term"


# An earlier sweep's run of a point, still going: it finishes while the rerun waits.
ORPHAN = """
import json, os, sys, time
from ift_jax import run_lock
with run_lock.hold(sys.argv[1], process_index=0, heartbeat_s=0.05):
    print("held", flush=True)
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.02)
    with open(os.path.join(sys.argv[1], "summary.json"), "w") as f:
        json.dump({"finished": True, "step": 2}, f)
"""


def test_a_rerun_adopts_a_point_still_running_instead_of_failing_it(tmp_path, monkeypatch,
                                                                   capsys):
    spec = tmp_path / "sweep.py"
    spec.write_text(SWEEP_FILE)
    root, stop = tmp_path / "root", tmp_path / "stop"
    orphan = subprocess.Popen([sys.executable, "-c", ORPHAN, str(root / "fine"), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    assert orphan.stdout.readline() == "held\n"
    points = sweeps.select(sweeps.load_points(str(spec)), ["fine"], str(spec))
    assert [r["status"] for r in sweeps.summary_rows(str(root), points)] == ["running"]
    monkeypatch.setattr(sweep_points, "ADOPT_POLL_S", 0.05)
    threading.Timer(1.0, stop.touch).start()
    started = []
    assert sweeps.run(str(spec), str(root), only=["fine"],
                      in_process=lambda argv: started.append(argv) or 2) == 0
    assert orphan.wait(timeout=60) == 0
    assert not started  # The orphan finished it: nothing was started, nothing failed.
    assert "sweep point fine: still running from an earlier launch" in capsys.readouterr().out
    assert [r["status"] for r in _rows(root / "sweep_summary.csv")] == ["finished"]
