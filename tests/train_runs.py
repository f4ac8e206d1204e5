"""`ift-jax train` in subprocesses, for the multi-host and preemption tests.

Every run gets a timeout and is killed (its whole process group) when the test
fails, so a hung collective or a stuck save never hangs CI.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300

# The tiny model of `test_train.tiny_config`, as command-line overrides.
TINY = ("--config.model.d_model=32", "--config.model.d_ff=64", "--config.model.d_kv=8",
        "--config.model.num_layers=1", "--config.model.num_decoder_layers=1",
        "--config.data.mixture=synthetic_sentiment", "--config.data.inputs_length=96",
        "--config.data.targets_length=16", "--config.optimizer.warmup_steps=1",
        "--config.mesh.fsdp=-1", "--config.eval.every=0")


def overrides(**values) -> list[str]:
    """`train__steps=3` -> `--config.train.steps=3`."""
    return [f"--config.{key.replace('__', '.')}={value}" for key, value in values.items()]


def env(devices: int, **extra: str) -> dict:
    """The test environment with `devices` fake CPU devices and no multi-process settings."""
    multi_process = ("IFT_JAX_COORDINATOR", "IFT_JAX_NUM_PROCESSES", "IFT_JAX_PROCESS_ID")
    result = {k: v for k, v in os.environ.items() if k not in multi_process}
    result.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                  XLA_FLAGS=_xla_flags(devices), **extra)
    return result


def _xla_flags(devices: int) -> str:
    """This session's XLA flags (conftest's) with `devices` fake CPU devices."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])


class Run:
    """One `python -m ift_jax train` process; output goes to `<log>.out` / `<log>.err`."""

    def __init__(self, workdir, args, environ: dict, log):
        self.out_path, self.err_path = f"{log}.out", f"{log}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ift_jax", "train", f"--workdir={workdir}", *TINY, *args],
            cwd=REPO, env=environ, stdout=self._out, stderr=self._err,
            start_new_session=True)

    @property
    def stdout(self) -> str:
        with open(self.out_path) as f:
            return f.read()

    @property
    def stderr(self) -> str:
        with open(self.err_path) as f:
            return f.read()

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"ift-jax train ran over {timeout}s; stderr:\n"
                                 f"{self.stderr[-3000:]}") from None

    def finish(self, timeout: float = TIMEOUT_S) -> "Run":
        """Waits and asserts a clean exit."""
        rc = self.wait(timeout)
        assert rc == 0, f"ift-jax train exited {rc}; stderr:\n{self.stderr[-3000:]}"
        return self

    def signal(self, signum: int) -> None:
        os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def close(self) -> None:
        self.kill()
        self._out.close()
        self._err.close()


def finish_all(runs: list[Run], timeout: float = TIMEOUT_S) -> None:
    """Waits for every run; the first that fails fails the test (its peers may never end)."""
    deadline = time.monotonic() + timeout
    while any(run.process.poll() is None for run in runs):
        for run in runs:
            if run.process.returncode not in (None, 0):
                run.finish()
        if time.monotonic() > deadline:
            raise AssertionError(f"ift-jax train ran over {timeout}s; stderr:\n"
                                 f"{runs[0].stderr[-3000:]}")
        time.sleep(0.1)
    for run in runs:
        run.finish()


def wait_for(condition, run: Run, what: str, timeout: float = TIMEOUT_S, poll_s: float = 0.01):
    """Polls `condition()` until true; fails if `run` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if run.process.poll() is not None:
            raise AssertionError(f"the run exited ({run.process.returncode}) before {what}; "
                                 f"stderr:\n{run.stderr[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout}s")
        time.sleep(poll_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def committed_steps(workdir) -> list[int]:
    """Finished checkpoints: orbax writes `<step>.orbax-checkpoint-tmp*` and renames on commit."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def metrics_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_state(workdir, step: int) -> dict:
    """The saved train state of `step` as host numpy arrays (any saving topology)."""
    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def assert_trees_equal(actual, expected, rtol: float, atol: float = 0.0) -> None:
    """Same structure, and every leaf equal within tolerance (bitwise when both are 0)."""
    flat_a = dict(jax.tree_util.tree_flatten_with_path(actual)[0])
    flat_e = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    assert flat_a.keys() == flat_e.keys()
    for path, value in flat_e.items():
        name = jax.tree_util.keystr(path)
        if rtol == atol == 0:
            np.testing.assert_array_equal(flat_a[path], value, err_msg=name)
        else:
            np.testing.assert_allclose(flat_a[path], value, rtol=rtol, atol=atol, err_msg=name)
