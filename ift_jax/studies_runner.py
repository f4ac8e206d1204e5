"""`ift-jax study NAME`: run a study's steps, then write its page.

A study (`ift_jax.studies`) is a list of steps, each an ordinary `ift-jax`
command (`train`, `eval`, `tasks train-spm`). The runner:

1. plans the study for the preset and root, and checks the plan against the
   one recorded in `ROOT/<study>/study.json` by an earlier run: a changed
   flag of any step is refused, naming the fields (`ift_jax.config_diff`);
2. runs each step that is not done yet as its own `python -m ift_jax`
   process (memory and start-up per step, as sweeps do; `in_process` runs
   them in this process), printing its command first, and appends its wall
   time, CPU time (of the process and its children), load average, exit code
   and git commit to `ROOT/study_steps.jsonl`. Finished steps are skipped, so
   a preempted study resumes where it stopped; SIGTERM/SIGINT are passed on
   to the running step (it checkpoints) and stop the study;
3. when every step is done, writes the page (`ift_jax.study_pages`) into
   `page_dir` (default `ROOT/<study>/`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import resource
import sys
import time
from typing import Callable, Optional, Sequence

from ift_jax import config_diff, errors, fileio, study_pages, sweep_points
from ift_jax import studies
from ift_jax.studies import plans

RECORD = "study.json"
TIMINGS = "study_steps.jsonl"
InProcess = Callable[[list[str]], int]


def make_plan(name: str, preset: str, root: str, init_from: str = "",
              page_only: bool = False) -> plans.Plan:
    """The study's plan, after checking the name, preset and required `init_from`."""
    study = studies.get(name)
    if preset not in plans.PRESETS:
        raise errors.ConfigError(f"--preset={preset!r}; presets: {', '.join(plans.PRESETS)}")
    needs = getattr(study, "NEEDS_INIT_FROM", "")
    if needs and not init_from and not page_only:
        raise errors.ConfigError(f"study {name} needs --init_from=DIR: {needs}; --page_only "
                                 f"writes its page without running it")
    if init_from and not needs:
        takers = [n for n, s in studies.STUDIES.items() if getattr(s, "NEEDS_INIT_FROM", "")]
        raise errors.ConfigError(f"study {name} starts from its own base model; --init_from "
                                 f"goes with {', '.join(takers)}")
    return study.plan(preset, root, init_from)


def check_record(plan: plans.Plan) -> None:
    """Refuses a plan that differs from the one recorded in the study's folder (naming
    the changed fields); records it on the first run."""
    path = os.path.join(plan.directory, RECORD)
    new = plan.record()
    if fileio.exists(path):
        with fileio.open(path) as f:
            changes = config_diff.diff(json.load(f), new)
        if changes:
            raise errors.ConfigError(
                f"study {plan.study} in {plan.root} was run with another config: "
                f"{'; '.join(map(str, changes))}; use another --workdir (or delete {path} "
                f"and the steps' workdirs to start over)")
        return
    fileio.makedirs(plan.directory)
    with fileio.open(path, "w") as f:
        json.dump(new, f, indent=2)


def read_timings(root: str) -> dict[str, list[dict]]:
    """Attempts per step name from `ROOT/study_steps.jsonl`, in the order run."""
    path = os.path.join(root, TIMINGS)
    out: dict[str, list[dict]] = {}
    if not fileio.exists(path):
        return out
    with fileio.open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out.setdefault(row["step"], []).append(row)
    return out


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_step(step: plans.Step, in_process: Optional[InProcess] = None) -> dict:
    """Runs one step; returns its timing row (exit code, wall and CPU seconds, ...)."""
    who = resource.RUSAGE_SELF if in_process else resource.RUSAGE_CHILDREN
    row = {"step": step.name, "started": _now(), "commit": study_pages.git_commit(),
           "load_before": os.getloadavg()[0]}
    cpu, wall = _cpu_seconds(who), time.perf_counter()
    if in_process:
        code, stopped = in_process(step.argv), False
    else:
        code, stopped, _ = sweep_points.run_point([sys.executable, "-m", "ift_jax",
                                                   *step.argv])
    # A step that exits 0 without being done was stopped (SIGTERM/SIGINT: the run saved
    # its state and returned); in process, this is how the runner learns of the stop.
    stopped = stopped or (code == 0 and not step.done())
    row.update({"wall_s": round(time.perf_counter() - wall, 1),
                "cpu_s": round(_cpu_seconds(who) - cpu, 1), "exit_code": code,
                "stopped": stopped, "load_after": os.getloadavg()[0],
                "in_process": bool(in_process)})
    return row


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _append_timing(root: str, row: dict) -> None:
    fileio.makedirs(root)
    fileio.append_text(os.path.join(root, TIMINGS), json.dumps(row) + "\n")


def run(name: str, preset: str, root: str, *, init_from: str = "", page_dir: str = "",
        dry_run: bool = False, page_only: bool = False,
        in_process: Optional[InProcess] = None, command: Sequence[str] = ()) -> int:
    """Runs (or, with `dry_run`, prints) the study's pending steps, then writes its page.

    Returns 0 when every step is done and the page written, 1 when a step failed
    (the study stops there: later steps need its result), 130 when stopped by a
    signal (a re-run resumes).

    Args:
      page_only: run nothing; write the page from the steps done so far.
      command: the `ift-jax study ...` words to show on the page.
    """
    plan = make_plan(name, preset, root, init_from, page_only)
    if dry_run:
        for step in plan.steps:
            print(step.shell() + ("  # done, skipped" if step.done() else ""))
        return 0
    check_record(plan)
    if not page_only:
        for step in plan.steps:
            if step.done():
                logging.info("study %s: step %s done already; skipped", name, step.name)
                continue
            print(f"study {name} step {step.name}: {step.shell()}", flush=True)
            row = run_step(step, in_process)
            _append_timing(root, row)
            if row["stopped"]:
                print(f"study {name} stopped during step {step.name}; run the same command "
                      f"again to resume", file=sys.stderr)
                return 130
            if row["exit_code"]:
                print(f"study {name}: step {step.name} failed with exit code "
                      f"{row['exit_code']}; later steps need it, stopping", file=sys.stderr)
                return 1
    path = study_pages.write(studies.get(name), plan, read_timings(root),
                             page_dir or plan.directory, command)
    print(f"study {name}: page {path}")
    return 0
