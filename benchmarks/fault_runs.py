"""The runs fault injection works on: `ift-jax` processes and what they leave on disk.

Shared by `fault_injection.py` (kills, damage, starvation of training runs) and
`fault_inputs.py` (export kills, copied live runs, input bombs): one tiny run
(`RUN`, 1 CPU device, 12 steps, a checkpoint every 2, evaluation every 4), the
process wrapper (`Train`), what is on disk (`disk_state`), a kill drawn on
purpose (`freeze_when`: the process is stopped with SIGSTOP in the state wanted,
checked, then killed), and the checks every finished run must pass against the
uninterrupted reference (`Context.complete`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

STEPS, CHECKPOINT_EVERY, EVAL_EVERY = 12, 2, 4
RUN = ["--config.model.d_model=32", "--config.model.d_ff=64", "--config.model.d_kv=8",
       "--config.model.num_layers=1", "--config.model.num_decoder_layers=1",
       "--config.data.mixture=synthetic_sentiment", "--config.data.inputs_length=96",
       "--config.data.targets_length=16", "--config.optimizer.warmup_steps=1",
       "--config.mesh.fsdp=-1", f"--config.train.steps={STEPS}", "--config.train.batch_size=64",
       f"--config.train.checkpoint_every={CHECKPOINT_EVERY}", "--config.train.log_every=1",
       f"--config.eval.every={EVAL_EVERY}", "--config.eval.at_start=False",
       "--config.eval.max_examples=32", "--config.eval.batch_size=8",
       "--config.eval.max_decode_length=8"]
EVAL_POINTS = [s for s in range(1, STEPS + 1) if s % EVAL_EVERY == 0 or s == STEPS]
TIMEOUT_S = 600


def env_for(cache: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("IFT_JAX_COORDINATOR", "IFT_JAX_NUM_PROCESSES", "IFT_JAX_PROCESS_ID")}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=cache,
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return env


class Train:
    """One `python -m ift_jax` process, its output in files beside the workdir."""

    def __init__(self, workdir: str, env: dict, log: str, extra=(), command=("train",)):
        self.out_path, self.err_path = f"{log}.out", f"{log}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        args = [*command, f"--workdir={workdir}", *(RUN if command == ("train",) else []),
                *extra]
        self.started = time.monotonic()
        self.process = subprocess.Popen([sys.executable, "-m", "ift_jax", *args], cwd=REPO,
                                        env=env, stdout=self._out, stderr=self._err,
                                        start_new_session=True)

    def text(self, which: str = "err") -> str:
        with open(self.err_path if which == "err" else self.out_path) as f:
            return f.read()

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait()
            return -999

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def close(self) -> int:
        code = self.process.poll()
        if code is None:
            self.signal(signal.SIGKILL)
            code = self.process.wait()
        self._out.close()
        self._err.close()
        return code


# ----------------------------------------------------------------------------
# What is on disk.


def committed(workdir: str) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def saving(workdir: str) -> list[str]:
    """orbax's temporary folders: saves being written."""
    directory = os.path.join(workdir, "checkpoints")
    return sorted(n for n in os.listdir(directory) if "orbax-checkpoint-tmp" in n
                  ) if os.path.isdir(directory) else []


def evaluated(workdir: str) -> list[int]:
    from ift_jax import evaluation
    return evaluation.finished_steps(workdir)


def disk_state(workdir: str) -> dict:
    return {"committed": committed(workdir), "saving": saving(workdir),
            "evaluated": evaluated(workdir)}


def final_params(workdir: str):
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import train_runs
    return train_runs.checkpoint_state(workdir, STEPS)["params"]


def same_params(a, b) -> bool:
    import jax
    import numpy as np
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def metrics(workdir: str) -> list[tuple[int, float]]:
    path = os.path.join(workdir, "train_metrics.jsonl")
    with open(path) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def eval_results(workdir: str) -> dict:
    out = {}
    for step in evaluated(workdir):
        with open(os.path.join(workdir, "eval", f"step_{step}.json")) as f:
            out[step] = json.load(f)["tasks"]
    return out


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ift-jax train: error:")]


def resumed_from(stderr: str):
    found = re.search(r"start-up: resumed from \S+ step (\d+)", stderr)
    return int(found.group(1)) if found else (0 if "start-up: from scratch" in stderr
                                               else None)


# ----------------------------------------------------------------------------
# Trials.


class Context:
    def __init__(self, root: str, env: dict, reference: dict):
        self.root, self.env, self.reference = root, env, reference
        self.count = 0

    def workdir(self, name: str) -> str:
        self.count += 1
        return os.path.join(self.root, f"{self.count:02d}_{name}")

    def finish(self, workdir: str, extra=()) -> tuple[Train, int]:
        run = Train(workdir, self.env, f"{workdir}.restart{len(os.listdir(self.root))}", extra)
        code = run.wait()
        run.close()
        return run, code

    def complete(self, workdir: str) -> dict:
        """The expectations every run that finished must meet, checked against the reference."""
        checks = {}
        try:
            summary = json.load(open(os.path.join(workdir, "summary.json")))
            checks["finished"] = summary.get("finished") is True
            checks["bit_exact_final_params"] = same_params(final_params(workdir),
                                                           self.reference["params"])
            checks["every_eval_point_with_the_reference_results"] = (
                eval_results(workdir) == self.reference["eval"])
            checks["metrics_rows_as_the_reference"] = metrics(workdir) == self.reference[
                "metrics"]
        except (OSError, ValueError, KeyError) as e:
            checks["readable_results"] = False
            checks["error"] = repr(e)[:300]
        return checks


def poll(condition, run: Train, timeout: float = TIMEOUT_S, every: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if run.process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True




def freeze_when(run: Train, ready: Callable[[], bool], wanted: Callable[[], bool],
                timeout: float = TIMEOUT_S, every: float = 0.001) -> Optional[float]:
    """A kill drawn on purpose: polls until `ready()`, then stops the process (SIGSTOP)
    and looks whether the state is `wanted()`; if not, lets it go on and polls again.
    Returns the seconds since the start at which it was frozen in the wanted state (the
    process stays stopped: kill it), or None if it never was."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.process.poll() is None:
        if ready():
            run.signal(signal.SIGSTOP)
            if wanted():
                return time.monotonic() - run.started
            run.signal(signal.SIGCONT)
        time.sleep(every)
    return None


def one_error_line(stderr: str, command: str) -> bool:
    """Whether stderr is exactly one line: `ift-jax COMMAND: error: ...`."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith(f"ift-jax {command}: error: ")
