"""Faults a run on preemptible machines meets, each with what must happen.

One tiny 4-step run (checkpoints 2 and 4) is trained once per module and
copied per case; cases that need no training call the start-up itself
(`runs.start`). The long randomized version (real SIGKILLs at random points,
including during asynchronous saves and evaluations) is
`benchmarks/fault_injection.py`; SIGKILL/SIGTERM resumes of a real process
are `tests/test_preemption.py`.

Expectations: a damaged checkpoint is named, moved aside (never deleted) and
the previous one restored bit-exactly; a run with none readable is refused
in one line until `--start_over`; a failed save stops the run in one line
naming the step and keeps the earlier checkpoints; a stop during an
evaluation ends it within a batch and the point is evaluated at the restart;
a second writer, a read-only workdir and a refused architecture change are
one-line errors that change nothing.
"""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

import train_runs
from test_train import tiny_config
from ift_jax import (checkpoint_scan, checkpointing, errors, evaluation, evaluator, export,
                     inference, partitioning, run_lock, runs, train)


def _config(**overrides):
    return tiny_config(**{"steps": 4, "checkpoint_every": 2, "log_every": 1, **overrides})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(workdir, {step: saved state}) of an uninterrupted 4-step run."""
    workdir = tmp_path_factory.mktemp("faults") / "base"
    train.train_and_evaluate(_config(), str(workdir))
    return workdir, {s: train_runs.checkpoint_state(workdir, s) for s in (2, 4)}


@pytest.fixture(scope="module")
def setup_and_mesh():
    config = _config()
    return runs.build_setup(config), partitioning.make_mesh(dict(config.mesh))


def _copy(base, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(base[0], workdir)
    return workdir


def _start(workdir, setup_and_mesh):
    """The training start-up on `workdir`: (step, trainable params on the host)."""
    ckpt = checkpointing.Checkpointer(str(workdir))
    try:
        ckpt.set_aside_damaged()
        init, step = runs.start(*setup_and_mesh, ckpt)
    finally:
        ckpt.close()
    return step, jax.device_get(init.state.params)


def _assert_same(params, saved):
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved["params"]), strict=True):
        np.testing.assert_array_equal(a, b)


def _data_file(step_dir):
    """(path, bytes its checkpoint reads of it) of the array data file read most."""
    _, needed = checkpoint_scan.array_index(str(step_dir / "state"))
    name = max((n for n in needed if n.startswith("ocdbt.process_")), key=needed.get)
    return step_dir / "state" / name, needed[name]


def _truncate(step_dir):
    path, needed = _data_file(step_dir)
    os.truncate(path, needed // 2)


def _empty(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


DAMAGE = {
    "truncated array file": (_truncate, "is truncated"),
    "deleted array file": (lambda d: _data_file(d)[0].unlink(), "is missing"),
    "empty step folder (an interrupted copy)": (_empty, "the folder is empty"),
    "missing item folder": (lambda d: shutil.rmtree(d / "meta"), "item folder meta/ is missing"),
    "missing array metadata": (lambda d: (d / "state" / "_METADATA").unlink(),
                               "state/_METADATA cannot be read"),
    "truncated array index": (lambda d: (d / "state" / "manifest.ocdbt").write_bytes(b"\0" * 9),
                              "the array index cannot be read"),
    "no commit marker": (lambda d: (d / "commit_success.txt").unlink(), "commit marker"),
}


# ----------------------------------------------------------------------------
# Damaged checkpoints.


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_checkpoint_is_named_moved_aside_and_the_previous_one_restored(
        damage, base, setup_and_mesh, tmp_path, caplog):
    workdir = _copy(base, tmp_path)
    hurt, problem = DAMAGE[damage]
    hurt(workdir / "checkpoints" / "4")
    files = sorted(p.relative_to(workdir / "checkpoints" / "4")
                   for p in (workdir / "checkpoints" / "4").rglob("*"))
    with caplog.at_level(logging.WARNING):
        step, params = _start(workdir, setup_and_mesh)
    assert step == 2
    _assert_same(params, base[1][2])
    warnings = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoint 4 of" in warnings[0] and problem in warnings[0]
    [moved] = (workdir / "checkpoints_damaged").iterdir()
    assert moved.name.startswith("4-")
    assert sorted(p.relative_to(moved) for p in moved.rglob("*")) == files  # Nothing deleted.


def test_an_interrupted_copy_or_save_newer_than_the_latest_is_passed_over(
        base, setup_and_mesh, tmp_path):
    workdir = _copy(base, tmp_path)
    (workdir / "checkpoints" / "6").mkdir()  # A copy cut off before any file.
    # What a SIGKILL during an asynchronous save leaves: orbax's temporary folder.
    shutil.copytree(workdir / "checkpoints" / "4",
                    workdir / "checkpoints" / "8.orbax-checkpoint-tmp-1796000000")
    _truncate(workdir / "checkpoints" / "8.orbax-checkpoint-tmp-1796000000")
    step, params = _start(workdir, setup_and_mesh)
    assert step == 4
    _assert_same(params, base[1][4])
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints_damaged").iterdir()] == ["6"]


def test_wrong_bytes_of_the_right_size_fail_the_restore_then_fall_back(
        base, setup_and_mesh, tmp_path, caplog):
    workdir = _copy(base, tmp_path)
    path, _ = _data_file(workdir / "checkpoints" / "4")
    path.write_bytes(b"\0" * path.stat().st_size)  # Bit rot: only a full read shows it.
    assert checkpoint_scan.problem(str(workdir / "checkpoints" / "4")) is None
    assert "cannot be read" in checkpoint_scan.unreadable(str(workdir / "checkpoints" / "4"))
    with caplog.at_level(logging.WARNING):
        step, params = _start(workdir, setup_and_mesh)
    assert step == 2
    _assert_same(params, base[1][2])
    assert "restoring it failed" in caplog.text


def test_a_restore_failure_that_is_not_damage_keeps_the_checkpoint(
        base, setup_and_mesh, tmp_path, monkeypatch):
    workdir = _copy(base, tmp_path)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while restoring")
    monkeypatch.setattr(runs, "restore", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        _start(workdir, setup_and_mesh)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert not (workdir / "checkpoints_damaged").exists()


def test_a_resume_after_damage_reaches_the_uninterrupted_params_and_metrics(base, tmp_path):
    workdir = _copy(base, tmp_path)
    _truncate(workdir / "checkpoints" / "4")
    with open(workdir / "train_metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.')  # A row cut off by a kill.
    train.train_and_evaluate(_config(), str(workdir))
    _assert_same(train_runs.checkpoint_state(workdir, 4)["params"], base[1][4])
    assert [r["step"] for r in train_runs.metrics_rows(workdir)] == [1, 2, 3, 4]
    assert json.loads((workdir / "summary.json").read_text())["finished"] is True


def test_no_readable_checkpoint_is_refused_in_one_line_until_start_over(base, tmp_path):
    workdir = _copy(base, tmp_path)
    _truncate(workdir / "checkpoints" / "2")
    _empty(workdir / "checkpoints" / "4")
    for _ in range(2):  # A resume loop's second attempt is refused the same way.
        with pytest.raises(runs.NoReadableCheckpointError) as refused:
            train.train_and_evaluate(_config(), str(workdir))
        message = str(refused.value)
        assert "\n" not in message and "no readable checkpoint left" in message
        assert "--start_over" in message and "checkpoints_damaged" in message
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")
    train.train_and_evaluate(_config(), str(workdir), start_over=True)
    _assert_same(train_runs.checkpoint_state(workdir, 4)["params"], base[1][4])  # A fresh run.
    [earlier] = workdir.glob("start_over-*")
    assert len(os.listdir(earlier / "checkpoints_damaged")) == 2
    assert (earlier / "train_metrics.jsonl").exists() and not (workdir / "checkpoints_damaged"
                                                               ).exists()


def test_eval_skips_damaged_checkpoints_and_never_counts_them_evaluated(
        base, tmp_path, monkeypatch):
    workdir = _copy(base, tmp_path)
    _truncate(workdir / "checkpoints" / "4")
    evaluated = []

    def step(self, step, params):  # The decoding itself is tested elsewhere.
        evaluated.append(step)
        evaluation.write_step(self.workdir, step, {}, {})
        return {}
    monkeypatch.setattr(evaluator.RunEvaluator, "step", step)
    outcome = evaluator.evaluate_checkpoints(str(workdir), "latest")
    assert (outcome.evaluated, outcome.unreadable) == ([2], [4]) and evaluated == [2]
    assert "could not read checkpoints [4]" in outcome.summary()
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints_damaged").iterdir()] == ["4"]


# ----------------------------------------------------------------------------
# Failures while running.


def _tmpfs(path) -> bool:
    """Mounts a 32 MB tmpfs at `path` if this machine lets us (root in a container that
    allows it); whether it did."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def _fill(path) -> None:
    """Writes zeros into `path` until the filesystem is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def _disk_full_at(mount, mounted: bool, monkeypatch):
    """`() -> None` making the disk full from now on: the tmpfs at `mount` filled, or
    (without one; the test prints so) orbax's write of a checkpoint's meta raising
    ENOSPC in its background thread."""
    def fill():
        if mounted:
            _fill(mount / "filler")
            return
        print("no tmpfs here: simulating ENOSPC in orbax's meta write")
        from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler

        async def no_space(self, x, directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", no_space)
    return fill


def test_a_failed_async_save_is_noticed_at_the_next_step_boundary(tmp_path, monkeypatch):
    mount = tmp_path / "disk"
    mounted = _tmpfs(mount)
    try:
        ckpt = checkpointing.Checkpointer(str(mount / "run"))
        state = {"w": np.arange(50_000, dtype=np.float32)}
        ckpt.save(1, state, {})
        ckpt.wait()
        _disk_full_at(mount, mounted, monkeypatch)()
        with pytest.raises(checkpointing.SaveFailedError) as failed:
            ckpt.save(2, state, {})  # Starts, or already fails to start.
            for _ in range(1000):  # Step boundaries, no further save.
                ckpt.check_saves()
                time.sleep(0.01)
        assert str(failed.value).startswith("checkpoint 2 could not be saved")
        assert "No space left on device" in str(failed.value)
        ckpt.close()
        assert checkpoint_scan.unreadable(str(mount / "run" / "checkpoints" / "1")) is None
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=True)


# TensorStore writes still running when orbax abandons the failed save report "Event loop
# is closed" when they end (the CLI's console drops those reports).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_failed_save_stops_the_run_naming_the_step_and_keeps_the_earlier_checkpoints(
        base, tmp_path, monkeypatch):
    """Disk full before checkpoint 6 of a resumed run: one line, 2 and 4 intact, and the
    earlier summary no longer says the run is done."""
    mount = tmp_path / "disk"
    mounted = _tmpfs(mount)
    workdir = mount / "run"
    shutil.copytree(base[0], workdir)
    fill, save = _disk_full_at(mount, mounted, monkeypatch), checkpointing.Checkpointer.save

    def save_on_a_full_disk(self, step, *args, **kwargs):
        if step == 6:
            fill()
        return save(self, step, *args, **kwargs)
    monkeypatch.setattr(checkpointing.Checkpointer, "save", save_on_a_full_disk)
    config = _config(log_every=100)  # No metrics file writes meanwhile: the save fails first.
    config.train.steps = 10
    try:
        with pytest.raises(checkpointing.SaveFailedError) as failed:
            train.train_and_evaluate(config, str(workdir),
                                     allow_config_changes=["train.steps", "train.log_every"])
        message = str(failed.value)
        assert "\n" not in message and message.startswith("checkpoint 6 could not be saved")
        assert "No space left on device" in message and "checkpoints 2, 4 are intact" in message
        assert train_runs.committed_steps(workdir) == [2, 4]
        assert json.loads((workdir / "summary.json").read_text())["finished"] is False
        if mounted:
            (mount / "filler").unlink()
        for step in (2, 4):
            assert checkpoint_scan.unreadable(str(workdir / "checkpoints" / str(step))) is None
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=True)


def test_sigterm_during_evaluation_stops_within_a_batch_and_the_point_is_redone(
        base, tmp_path, monkeypatch, caplog):
    """The 4-step run resumed with evaluation on: point 4, due at the restored step and
    never evaluated (as after a kill during it), is evaluated first; a SIGTERM during
    it stops it at the next batch; the restart evaluates it."""
    workdir = _copy(base, tmp_path)
    config = _config()
    config.eval.every, config.eval.max_examples, config.eval.batch_size = 2, 16, 8
    config.eval.tasks, config.eval.incontext_shots = "synthetic_sentiment", ""
    batches, sigterm = [], [True]

    def run_without_decoding(self, fn, *arrays):  # Shapes only: the stop is what is tested.
        batches.append(len(batches))
        if sigterm[0]:
            signal.raise_signal(signal.SIGTERM)
        shapes = jax.eval_shape(fn, *(self._global(a) for a in arrays))
        return [np.zeros(s.shape, s.dtype) for s in jax.tree.leaves(shapes)]
    monkeypatch.setattr(inference.Inference, "_run", run_without_decoding)
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(config, str(workdir), allow_config_changes=["eval"])
    assert "evaluation point 4 has no eval/step_4.json (it was cut off)" in caplog.text
    assert len(batches) == 1  # Stopped before the point's second batch (of 2 per task).
    assert "evaluation at step 4 stopped by the stop request" in caplog.text
    assert "stopped at step 4" in caplog.text and evaluation.finished_steps(workdir) == []
    assert json.loads((workdir / "summary.json").read_text())["finished"] is False
    sigterm[0] = False
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(config, str(workdir), allow_config_changes=["eval"])
    assert "evaluation point 4 has no eval/step_4.json" in caplog.text
    assert evaluation.finished_steps(workdir) == [4] and len(batches) > 2
    assert json.loads((workdir / "summary.json").read_text())["finished"] is True
    _assert_same(train_runs.checkpoint_state(workdir, 4)["params"], base[1][4])


# ----------------------------------------------------------------------------
# Refusals that change nothing.


def test_a_second_writer_is_refused_before_it_writes(base, tmp_path):
    workdir = _copy(base, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    with run_lock.hold(str(workdir)):
        with pytest.raises(errors.WorkdirInUseError, match=f"workdir {workdir} is in use by "
                           f"another ift-jax run: host .*, pid {os.getpid()}"):
            train.train_and_evaluate(_config(), str(workdir))
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


def _read_only(workdir) -> bool:
    """Makes `workdir` read-only for this process: a read-only bind mount for root (whom
    permissions do not stop), else permissions; whether it could."""
    if os.geteuid() != 0:
        for path in [workdir, *workdir.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        return True
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(workdir), str(workdir)],
                          capture_output=True)
    if done.returncode == 0:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(workdir)], check=True)
    return done.returncode == 0


def test_a_read_only_workdir_is_refused_for_training_and_eval_and_still_exports(
        base, tmp_path):
    workdir = _copy(base, tmp_path)
    if not _read_only(workdir):
        pytest.skip("root without permission to bind-mount: cannot make a read-only workdir")
    try:
        with pytest.raises(errors.ConfigError, match=r"is not writable \(Read-only file system"
                           r"|is not writable \(Permission denied"):
            train.train_and_evaluate(_config(), str(workdir))
        with pytest.raises(errors.ConfigError, match="is not writable"):
            evaluator.evaluate_checkpoints(str(workdir))
        summary = export.export_hf(str(workdir), str(tmp_path / "hf"))
        assert summary.startswith(f"wrote HF model of {workdir} step 4")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(workdir)], check=True)


def test_a_refused_architecture_change_leaves_config_json_and_export_intact(base, tmp_path):
    workdir = _copy(base, tmp_path)
    config_json = (workdir / "config.json").read_bytes()
    other = _config()
    other.model.d_model = 48
    with pytest.raises(checkpointing.CheckpointMismatchError) as refused:
        train.train_and_evaluate(other, str(workdir))
    assert "delete" not in str(refused.value) and "--start_over" in str(refused.value)
    assert (workdir / "config.json").read_bytes() == config_json
    assert export.export_hf(str(workdir), str(tmp_path / "hf")).startswith(
        f"wrote HF model of {workdir} step 4")
