"""Fault injection: real `ift-jax` processes killed, damaged, starved and fed bombs.

Every training trial runs the same tiny run (`fault_runs.RUN`: `python -m ift_jax
train`, 1 CPU device, 12 steps, a checkpoint every 2, evaluation every 4) and
checks what a user leaving it on preemptible machines expects, against one
uninterrupted reference run. Every trial must end in one of three outcomes: a
bit-exact resume, an untouched earlier state, or one clear line.

- `sigkill`: SIGKILL in a state drawn on purpose, in turn: while an asynchronous
  save is being written (an orbax temporary folder exists), while an
  evaluation runs (its step was logged and its `eval/step_N.json` is not
  written), or between steps. From a random step on, the run is frozen with
  SIGSTOP whenever it may be in that state, the state is checked on disk, and
  the kill comes only in that state (`fault_runs.freeze_when`). Expected: the
  restart resumes from the newest checkpoint committed at the kill, ends with
  exit 0 and `finished: true`, final params bit-exact with the reference, every
  evaluation point present with the reference's results, and the metrics rows
  those of the reference (no step lost or repeated).
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
- `export_kill`, `copied_live_run`, `input_bomb`: see `fault_inputs.py` (an
  export killed while gathering or while writing, a `cp -a` of a live run
  trained in the copy, files someone else wrote through the commands that read
  them).

    nice -n 10 python benchmarks/fault_injection.py --kills=6 --seed=0

Writes `benchmarks/results/fault_injection_cpu.json` (every trial with its
kill point, what was on disk at the kill, each expectation's outcome, and the
tally of outcomes; `bad` lists any trial that failed a check).
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
import fault_inputs
import results_file
from fault_runs import (
    CHECKPOINT_EVERY,
    EVAL_POINTS,
    HERE,
    RUN,
    STEPS,
    Context,
    Train,
    committed,
    disk_state,
    env_for,
    error_lines,
    eval_results,
    evaluated,
    final_params,
    freeze_when,
    metrics,
    poll,
    resumed_from,
    saving,
)

KILL_STATES = {"async_save": "during an asynchronous save",
               "evaluation": "during an evaluation", "between_steps": "between steps"}


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


def logged_step(run: Train) -> int:
    """The last `step N/12` line the run printed (0 before the first)."""
    found = re.findall(rf"^step (\d+)/{STEPS} ", run.text("out"), re.MULTILINE)
    return int(found[-1]) if found else 0


def kill_state(workdir: str, logged: int) -> str:
    """Where a run is, from its disk and its last logged step: an asynchronous save
    being written (an orbax temporary folder), an evaluation whose point was logged but
    whose `eval/step_N.json` is not written, or between steps."""
    disk = disk_state(workdir)
    if disk["saving"]:
        return KILL_STATES["async_save"]
    if any(p <= logged and p not in disk["evaluated"] for p in EVAL_POINTS):
        return KILL_STATES["evaluation"]
    return KILL_STATES["between_steps"]


def sigkill_trial(ctx: Context, rng: random.Random, kind: str) -> dict:
    """SIGKILL in the state `kind` names, drawn on purpose: from a random step on, the
    run is frozen (SIGSTOP) whenever it may be in that state, the state is checked, and
    the kill comes only in that state (`fault_runs.freeze_when`)."""
    workdir = ctx.workdir(f"sigkill_{kind}")
    run = Train(workdir, ctx.env, workdir)
    step = {"async_save": lambda: rng.choice(range(CHECKPOINT_EVERY, STEPS, CHECKPOINT_EVERY)),
            "evaluation": lambda: rng.choice(EVAL_POINTS[:-1]),
            "between_steps": lambda: rng.randrange(1, STEPS)}[kind]()
    frozen_at = freeze_when(
        run, lambda: step <= logged_step(run) < STEPS,
        lambda: kill_state(workdir, logged_step(run)) == KILL_STATES[kind])
    at_kill = disk_state(workdir)
    state = kill_state(workdir, logged_step(run))
    run.signal(signal.SIGKILL)
    run.close()
    restart, code = ctx.finish(workdir)
    last = at_kill["committed"][-1] if at_kill["committed"] else 0
    checks = {"killed_in_the_state_drawn": frozen_at is not None and state == KILL_STATES[kind],
              "restart_exit_0": code == 0,
              "resumed_from_the_last_committed_checkpoint": resumed_from(restart.text()) == last,
              **ctx.complete(workdir)}
    return {"kind": "sigkill", "target": kind, "from_step": step,
            "frozen_at_s": None if frozen_at is None else round(frozen_at, 3),
            "state_at_kill": state, "on_disk_at_kill": at_kill, "checks": checks}


def sigterm_trial(ctx: Context, rng: random.Random) -> dict:
    workdir = ctx.workdir("sigterm_eval")
    run = Train(workdir, ctx.env, workdir)
    step = rng.choice(EVAL_POINTS[:-1])
    ready = poll(lambda: step in committed(workdir)
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
    poll(lambda: step in committed(workdir), run, every=0.001)
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
        poll(lambda: 4 in committed(workdir), run, every=0.001)
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


# What a trial that passes its checks ends in, besides a bit-exact resume.
OUTCOMES = {"all_damaged": "one clear line", "disk_full": "one clear line",
            "two_writers": "one clear line", "read_only": "one clear line"}


def _name(trial: dict) -> str:
    detail = [trial.get(k) for k in ("target", "damage", "when", "bomb") if trial.get(k)]
    return "/".join([trial["kind"], *map(str, detail)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=6,
                        help="SIGKILL trials, in turn during a save, an evaluation and "
                             "between steps")
    parser.add_argument("--sigterms", type=int, default=2, help="SIGTERM-during-eval trials")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--keep", action="store_true", help="keep the trials' workdirs")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    machine = environment.describe("cpu")
    root = tempfile.mkdtemp(prefix="ift_jax_faults_")
    cache = os.path.join(root, "jit_cache")
    env = env_for(cache)
    started = time.monotonic()
    try:
        reference = reference_run(root, env)
        ctx = Context(root, env, reference)
        trials = []
        kinds = list(KILL_STATES)
        for i in range(args.kills):  # Each state in turn: drawn on purpose, not by chance.
            trials.append(sigkill_trial(ctx, rng, kinds[i % len(kinds)]))
            print(json.dumps(trials[-1]), flush=True)
        for _ in range(args.sigterms):
            trials.append(sigterm_trial(ctx, rng))
            print(json.dumps(trials[-1]), flush=True)
        for trial in [*damage_trials(ctx), disk_full_trial(ctx), two_writers_trial(ctx),
                      read_only_trial(ctx), *fault_inputs.run_all(ctx, rng)]:
            trials.append(trial)
            print(json.dumps(trial), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    run_trials = [t for t in trials if "checks" in t]
    ok = [all(v is True for k, v in t["checks"].items() if k != "error") for t in run_trials]
    for trial, good in zip(run_trials, ok):
        trial["ok"] = good
        trial.setdefault("outcome", OUTCOMES.get(trial["kind"], "bit-exact resume"))
    states = [t["state_at_kill"] for t in trials if t["kind"] == "sigkill"]
    outcomes = [t["outcome"] for t, good in zip(run_trials, ok) if good]
    record = {
        "benchmark": "fault_injection", "machine": machine, "seed": args.seed,
        "run": {"args": RUN, "eval_points": EVAL_POINTS,
                "reference_wall_s": round(reference["wall_s"], 1),
                "reference_eval_s": round(reference["eval_s"], 3)},
        "summary": {"trials": len(run_trials), "ok": sum(ok),
                    "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
                    "bad": [_name(t) for t, good in zip(run_trials, ok) if not good],
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
