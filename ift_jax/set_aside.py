"""Moving a run's files aside, never deleting them.

- A damaged checkpoint: `checkpoints/<step>` -> `checkpoints_damaged/<step>-<UTC time>`
  (`checkpoint`), so a restart resumes from the newest readable one and the
  damaged files stay for inspection.
- `ift-jax train --start_over`: everything an earlier run wrote in the workdir
  (checkpoints, damaged ones, metrics, evaluation, config) ->
  `start_over-<UTC time>/` (`earlier_run`), and training starts from
  `init_from` or scratch.

`damaged(workdir)` lists what was set aside as damaged since the last start
over: while it is not empty and no readable checkpoint is left, training
refuses to start from scratch (that would silently drop the run's progress).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

from ift_jax import fileio

DAMAGED = "checkpoints_damaged"
START_OVER = "start_over-"
# What a run writes into its workdir (run.lock is the live run's own).
RUN_FILES = ("checkpoints", DAMAGED, "eval", "predictions", "report", "tb",
             "train_metrics.jsonl", "summary.json", "config.json", "config_changes.jsonl",
             "model-info.txt")


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _unused(path: str) -> str:
    candidate, n = path, 1
    while fileio.exists(candidate):
        candidate, n = f"{path}.{n}", n + 1
    return candidate


def checkpoint(workdir: str, step_dir: str, reason: str) -> str:
    """Moves a damaged checkpoint folder to `checkpoints_damaged/` with one warning
    naming it and why; returns where it went."""
    name = os.path.basename(step_dir.rstrip("/"))
    target = _unused(os.path.join(workdir, DAMAGED, f"{name}-{_stamp()}"))
    fileio.move(step_dir, target)
    logging.warning("checkpoint %s of %s cannot be read (%s); skipped and moved to %s", name,
                    workdir, reason, target)
    return target


def damaged(workdir: str) -> list[str]:
    """Names in `checkpoints_damaged/` (damaged checkpoints set aside since the last
    start over)."""
    path = os.path.join(workdir, DAMAGED)
    return fileio.listdir(path) if fileio.isdir(path) else []


def earlier_run(workdir: str) -> Optional[str]:
    """Moves an earlier run's files into `start_over-<UTC time>/`; returns that folder,
    or None when the workdir held none."""
    present = [name for name in RUN_FILES if fileio.exists(os.path.join(workdir, name))]
    if not present:
        return None
    target = _unused(os.path.join(workdir, START_OVER + _stamp()))
    for name in present:
        fileio.move(os.path.join(workdir, name), os.path.join(target, name))
    logging.warning("start over: moved the earlier run's %s to %s", ", ".join(present),
                    target)
    return target
