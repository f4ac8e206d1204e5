"""Randomized fault injection: real `ift-jax train` processes killed, damaged and starved.

Every trial runs the same tiny run (`python -m ift_jax train`, 1 CPU device,
12 steps, a checkpoint every 2, evaluation every 4) and checks what a user
leaving it on preemptible machines expects, against one uninterrupted
reference run:

- `sigkill`: SIGKILL at a random point of a random kind — while an
  asynchronous save is being written (an orbax temporary folder exists), while
  an evaluation runs (a checkpoint of an evaluation step exists and its
  `eval/step_N.json` does not), or between steps — then a restart. Expected:
  the restart resumes from the newest checkpoint committed at the kill, ends
  with exit 0 and `finished: true`, final params bit-exact with the reference,
  every evaluation point present with the reference's results, and the
  metrics rows those of the reference (no step lost or repeated).
- `sigterm_during_eval`: SIGTERM during an evaluation: exit 0 well before
  the evaluation would have ended, the point missing, then redone by the
  restart (same expectations as above).
- `damage`: a run killed after its checkpoint 6 committed, one copy per kind
  of damage to its newest checkpoint (truncated or deleted array file, empty
  folder, zeroed bytes, missing item, an interrupted copy of a newer step).
  Expected: the damaged one named and moved to `checkpoints_damaged/`, the
  previous one used, the rest as above.
- `all_damaged`: every checkpoint damaged: restarts refused in one line
  naming `--start_over` (twice: a resume loop stays refused), then
  `--start_over` trains a fresh run bit-exact with the reference.
- `disk_full`: the workdir on a tmpfs filled after checkpoint 4 (where this
  machine allows mounting one; recorded as not run otherwise): exit 2 with one
  line naming the step and "No space left on device", the earlier
  checkpoints fully readable; once space is freed a restart finishes as above.
- `two_writers`: two trainers started at once on one workdir: one refused in
  one line naming the holder, the other finishes as above.
- `read_only`: a finished run's workdir mounted read-only: training refused in
  one line, `ift-jax export` still works.

    nice -n 10 python benchmarks/fault_injection.py --kills=10 --seed=0

Writes `benchmarks/results/fault_injection_cpu.json` (every trial with its
kill point, what was on disk at the kill, and each expectation's outcome).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import environment
import results_file

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


def _env(cache: str) -> dict:
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


def _poll(condition, run: Train, timeout: float = TIMEOUT_S, every: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if run.process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def reference_run(root: str, env: dict) -> dict:
    """The uninterrupted run, with when each save and evaluation started and ended."""
    workdir = os.path.join(root, "reference")
    run = Train(workdir, env, workdir)
    seen: dict[str, float] = {}
    while run.process.poll() is None:
        now = time.monotonic() - run.started
        for name in saving(workdir):
            seen.setdefault(f"save_started_{name.split('.')[0]}", now)
        for step in committed(workdir):
            seen.setdefault(f"committed_{step}", now)
        for step in evaluated(workdir):
            seen.setdefault(f"evaluated_{step}", now)
        time.sleep(0.002)
    code = run.close()
    if code != 0:
        raise SystemExit(f"the reference run failed ({code}):\n{run.text()[-3000:]}")
    eval_s = [seen[f"evaluated_{s}"] - seen.get(f"save_started_{s}", seen[f"committed_{s}"])
              for s in EVAL_POINTS if f"evaluated_{s}" in seen]
    return {"workdir": workdir, "params": final_params(workdir), "eval": eval_results(workdir),
            "metrics": metrics(workdir), "wall_s": time.monotonic() - run.started,
            "events_s": seen, "eval_s": min(eval_s) if eval_s else 1.0}


def sigkill_trial(ctx: Context, rng: random.Random, kind: str) -> dict:
    workdir = ctx.workdir(f"sigkill_{kind}")
    run = Train(workdir, ctx.env, workdir)
    if kind == "async_save":
        step = rng.choice(range(CHECKPOINT_EVERY, STEPS, CHECKPOINT_EVERY))
        ready = _poll(lambda: any(n.startswith(f"{step}.") for n in saving(workdir))
                      or step in committed(workdir), run)
        delay = rng.uniform(0.0, 0.05)
    elif kind == "evaluation":
        step = rng.choice(EVAL_POINTS[:-1])
        ready = _poll(lambda: step in committed(workdir)
                      or any(n.startswith(f"{step}.") for n in saving(workdir)), run)
        delay = rng.uniform(0.0, 0.9) * ctx.reference["eval_s"]
    else:
        step = rng.randrange(1, STEPS)
        ready = _poll(lambda: f"step {step}/{STEPS}" in run.text("out"), run)
        delay = rng.uniform(0.0, 0.3)
    time.sleep(delay)
    at_kill = disk_state(workdir)
    run.signal(signal.SIGKILL)
    run.close()
    due = [s for s in EVAL_POINTS if s <= (at_kill["committed"] or [0])[-1]]
    state = ("during an asynchronous save" if at_kill["saving"] else
             "during an evaluation" if set(due) - set(at_kill["evaluated"]) else
             "between steps")
    restart, code = ctx.finish(workdir)
    last = at_kill["committed"][-1] if at_kill["committed"] else 0
    checks = {"target_reached_before_the_end": ready,
              "restart_exit_0": code == 0,
              "resumed_from_the_last_committed_checkpoint": resumed_from(restart.text()) == last,
              **ctx.complete(workdir)}
    return {"kind": "sigkill", "target": kind, "target_step": step,
            "delay_s": round(delay, 4), "state_at_kill": state, "on_disk_at_kill": at_kill,
            "checks": checks}


def sigterm_trial(ctx: Context, rng: random.Random) -> dict:
    workdir = ctx.workdir("sigterm_eval")
    run = Train(workdir, ctx.env, workdir)
    step = rng.choice(EVAL_POINTS[:-1])
    ready = _poll(lambda: step in committed(workdir)
                  or any(n.startswith(f"{step}.") for n in saving(workdir)), run)
    time.sleep(rng.uniform(0.0, 0.5) * ctx.reference["eval_s"])
    at_signal = disk_state(workdir)
    sent = time.monotonic()
    run.signal(signal.SIGTERM)
    code = run.wait()
    exit_s = time.monotonic() - sent
    stopped = run.text()
    run.close()
    in_eval = step not in at_signal["evaluated"]
    restart, restart_code = ctx.finish(workdir)
    checks = {"target_reached_before_the_end": ready, "exit_0_after_sigterm": code == 0,
              "stopped_message": "stopped at step" in stopped,
              "restart_exit_0": restart_code == 0, **ctx.complete(workdir)}
    if in_eval:
        checks["evaluation_stopped_within_a_batch"] = (
            f"evaluation at step {step} stopped" in stopped)
        checks["point_redone_at_restart"] = (
            f"evaluation point {step} has no eval/step_{step}.json" in restart.text())
    return {"kind": "sigterm_during_eval", "target_step": step, "in_evaluation": in_eval,
            "exit_s_after_sigterm": round(exit_s, 3), "eval_s_reference": ctx.reference[
                "eval_s"], "on_disk_at_signal": at_signal, "checks": checks}


def _data_file(step_dir: str) -> tuple[str, int]:
    """(path, bytes the checkpoint reads of it) of the array data file read most."""
    from ift_jax import checkpoint_scan
    _, needed = checkpoint_scan.array_index(os.path.join(step_dir, "state"))
    name = max((n for n in needed if n.startswith("ocdbt.process_")), key=needed.get)
    return os.path.join(step_dir, "state", name), needed[name]


def _truncate(step_dir):
    path, needed = _data_file(step_dir)
    os.truncate(path, needed // 2)


def _zero(step_dir):
    path, _ = _data_file(step_dir)
    with open(path, "r+b") as f:
        f.write(b"\0" * os.path.getsize(path))


def _empty(step_dir):
    shutil.rmtree(step_dir)
    os.mkdir(step_dir)


DAMAGE = {
    "truncated_array_file": _truncate,
    "deleted_array_file": lambda d: os.remove(_data_file(d)[0]),
    "empty_step_folder": _empty,
    "zeroed_bytes_same_size": _zero,
    "missing_meta_item": lambda d: shutil.rmtree(os.path.join(d, "meta")),
}


def killed_after(ctx: Context, step: int) -> str:
    """A run SIGKILLed as soon as checkpoint `step` committed."""
    workdir = ctx.workdir(f"killed_after_{step}")
    run = Train(workdir, ctx.env, workdir)
    _poll(lambda: step in committed(workdir), run, every=0.001)
    run.signal(signal.SIGKILL)
    run.close()
    return workdir


def damage_trials(ctx: Context) -> list[dict]:
    source = killed_after(ctx, 6)
    base = committed(source)
    trials = []
    for name, hurt in [*DAMAGE.items(), ("interrupted_copy_of_a_newer_step", None)]:
        workdir = ctx.workdir(f"damage_{name}")
        shutil.copytree(source, workdir)
        latest = base[-1]
        if hurt is None:
            os.mkdir(os.path.join(workdir, "checkpoints", str(latest + 2)))
            damaged, expected = latest + 2, latest
        else:
            hurt(os.path.join(workdir, "checkpoints", str(latest)))
            damaged, expected = latest, base[-2] if len(base) > 1 else 0
        restart, code = ctx.finish(workdir)
        moved = os.listdir(os.path.join(workdir, "checkpoints_damaged")) if os.path.isdir(
            os.path.join(workdir, "checkpoints_damaged")) else []
        warned = [line for line in restart.text().splitlines()
                  if f"checkpoint {damaged} of" in line and "cannot be read" in line]
        checks = {"restart_exit_0": code == 0,
                  "damaged_named_in_one_warning": len(warned) == 1,
                  "damaged_moved_aside_not_deleted": [m.split("-")[0] for m in moved] == [
                      str(damaged)],
                  "previous_checkpoint_used": resumed_from(restart.text()) == expected,
                  **ctx.complete(workdir)}
        trials.append({"kind": "damage", "damage": name, "checkpoints_before": base,
                       "damaged_step": damaged, "expected_resume": expected,
                       "checks": checks})
    trials.append(all_damaged_trial(ctx, source))
    return trials


def all_damaged_trial(ctx: Context, source: str) -> dict:
    workdir = ctx.workdir("all_damaged")
    shutil.copytree(source, workdir)
    for step in committed(workdir):
        _truncate(os.path.join(workdir, "checkpoints", str(step)))
    refusals = []
    for _ in range(2):
        run, code = ctx.finish(workdir)
        lines = error_lines(run.text())
        refusals.append(code == 2 and len(lines) == 1 and "--start_over" in lines[0])
    run, code = ctx.finish(workdir, ["--start_over"])
    earlier = [n for n in os.listdir(workdir) if n.startswith("start_over-")]
    checks = {"refused_in_one_line_naming_start_over": all(refusals),
              "start_over_exit_0": code == 0,
              "earlier_run_kept_aside": len(earlier) == 1 and os.path.isdir(
                  os.path.join(workdir, earlier[0], "checkpoints_damaged")),
              **ctx.complete(workdir)}
    return {"kind": "all_damaged", "checks": checks}


def _mount_tmpfs(path: str, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True).returncode == 0


def disk_full_trial(ctx: Context) -> dict:
    mount = ctx.workdir("disk_full_tmpfs")
    if not _mount_tmpfs(mount, "64m"):
        return {"kind": "disk_full", "not_run": "this machine does not allow mounting a tmpfs"}
    try:
        workdir = os.path.join(mount, "run")
        run = Train(workdir, ctx.env, mount + ".first")
        _poll(lambda: 4 in committed(workdir), run, every=0.001)
        filler = os.path.join(mount, "filler")
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        filled_at = disk_state(workdir)
        code = run.wait()
        stderr = run.text()
        run.close()
        lines = error_lines(stderr)
        from ift_jax import checkpoint_scan
        kept = committed(workdir)
        checks = {"exit_2": code == 2, "one_error_line": len(lines) == 1,
                  "names_no_space_left": bool(lines) and "No space left on device" in lines[0],
                  "earlier_checkpoints_fully_readable": bool(kept) and all(
                      checkpoint_scan.unreadable(os.path.join(workdir, "checkpoints", str(s)))
                      is None for s in kept)}
        os.remove(filler)
        restart, restart_code = ctx.finish(workdir)
        checks.update(restart_exit_0=restart_code == 0, **ctx.complete(workdir))
        return {"kind": "disk_full", "filled_after": filled_at, "error": lines,
                "stderr_lines": len(stderr.splitlines()), "checks": checks}
    finally:
        subprocess.run(["umount", mount], capture_output=True)


def two_writers_trial(ctx: Context) -> dict:
    workdir = ctx.workdir("two_writers")
    runs = [Train(workdir, ctx.env, f"{workdir}.{i}") for i in range(2)]
    codes = [run.wait() for run in runs]
    texts = [run.text() for run in runs]
    for run in runs:
        run.close()
    refused = [i for i, c in enumerate(codes) if c == 2]
    lines = error_lines(texts[refused[0]]) if len(refused) == 1 else []
    checks = {"one_refused_one_finished": sorted(codes) == [0, 2],
              "refusal_one_line_naming_the_holder": len(lines) == 1 and "is in use by "
              "another ift-jax run: host" in lines[0], **ctx.complete(workdir)}
    return {"kind": "two_writers", "exit_codes": codes, "checks": checks}


def read_only_trial(ctx: Context) -> dict:
    workdir = ctx.workdir("read_only")
    shutil.copytree(ctx.reference["workdir"], workdir)
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", workdir, workdir],
                             capture_output=True).returncode == 0
    if not mounted:
        return {"kind": "read_only", "not_run": "bind-mounting read-only is not allowed here"}
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", workdir], check=True)
        before = sorted(os.listdir(workdir))
        run, code = ctx.finish(workdir)
        lines = error_lines(run.text())
        export = Train(workdir, ctx.env, f"{workdir}.export", command=("export",),
                       extra=["--format=hf", f"--output={workdir}_hf"])
        export_code = export.wait()
        export.close()
        checks = {"train_refused_in_one_line": code == 2 and len(lines) == 1
                  and "is not writable" in lines[0],
                  "nothing_written": sorted(os.listdir(workdir)) == before,
                  "export_works": export_code == 0 and os.path.exists(
                      os.path.join(f"{workdir}_hf", "model.safetensors"))}
        return {"kind": "read_only", "error": lines, "checks": checks}
    finally:
        subprocess.run(["umount", workdir], capture_output=True)


# ----------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILL trials")
    parser.add_argument("--sigterms", type=int, default=2, help="SIGTERM-during-eval trials")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--keep", action="store_true", help="keep the trials' workdirs")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    machine = environment.describe("cpu")
    root = tempfile.mkdtemp(prefix="ift_jax_faults_")
    cache = os.path.join(root, "jit_cache")
    env = _env(cache)
    started = time.monotonic()
    try:
        reference = reference_run(root, env)
        ctx = Context(root, env, reference)
        trials = []
        kinds = ["async_save", "evaluation", "between_steps"]
        for i in range(args.kills):
            trials.append(sigkill_trial(ctx, rng, kinds[i % 3] if i < 3 else rng.choice(kinds)))
            print(json.dumps(trials[-1]), flush=True)
        for _ in range(args.sigterms):
            trials.append(sigterm_trial(ctx, rng))
            print(json.dumps(trials[-1]), flush=True)
        for trial in [*damage_trials(ctx), disk_full_trial(ctx), two_writers_trial(ctx),
                      read_only_trial(ctx)]:
            trials.append(trial)
            print(json.dumps(trial), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    run_trials = [t for t in trials if "checks" in t]
    ok = [all(v is True for k, v in t["checks"].items() if k != "error") for t in run_trials]
    for trial, good in zip(run_trials, ok):
        trial["ok"] = good
    states = [t["state_at_kill"] for t in trials if t["kind"] == "sigkill"]
    record = {
        "benchmark": "fault_injection", "machine": machine, "seed": args.seed,
        "run": {"args": RUN, "eval_points": EVAL_POINTS,
                "reference_wall_s": round(reference["wall_s"], 1),
                "reference_eval_s": round(reference["eval_s"], 3)},
        "summary": {"trials": len(run_trials), "ok": sum(ok),
                    "not_run": [t for t in trials if "not_run" in t],
                    "sigkill_states": {s: states.count(s) for s in sorted(set(states))},
                    "wall_s": round(time.monotonic() - started, 1)},
        "trials": trials}
    results_file.write(record, args.output_dir, "fault_injection_cpu", "fault_injection.py",
                       argv, quiet=True)
    print(json.dumps(record["summary"], indent=2))
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
