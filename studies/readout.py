"""Numbers out of finished steps, and their cells on a page.

Everything here reads a workdir's files (`eval/*.json`, `summary.json`) and
tolerates a missing one (None, shown as "–"): a page can be written for a
study that is not finished, saying what is missing.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

from ift_jax import fileio, report

MISSING = "–"

# Where a study's tasks are scored; ROUGE-L is the DialogSum lab's headline metric.
TARGET_METRICS = ("rouge1", "rouge2", "rougeL", "loss")


def load(workdir: str) -> dict:
    """`report.load_eval`, or empty points when the workdir is missing."""
    if not fileio.isdir(os.path.join(workdir, "eval")):
        return {"steps": {}, "incontext": {}, "guard_tasks": []}
    return report.load_eval(workdir)


def at_step(workdir: str, step: Optional[int] = None) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` at `step` (default: the last evaluated step)."""
    steps = load(workdir)["steps"]
    if not steps:
        return {}
    return steps.get(max(steps) if step is None else step, {})


def eval_steps(workdir: str) -> list[int]:
    return sorted(load(workdir)["steps"])


def incontext(workdir: str, shots: int) -> dict:
    """`eval/incontext_<k>shot.json` as written ({} when missing)."""
    path = os.path.join(workdir, "eval", f"incontext_{shots}shot.json")
    if not fileio.exists(path):
        return {}
    with fileio.open(path) as f:
        return json.load(f)


def summary(workdir: str) -> dict:
    path = os.path.join(workdir, "summary.json")
    if not fileio.exists(path):
        return {}
    with fileio.open(path) as f:
        return json.load(f)


def params(workdir: str) -> dict:
    """`{"trainable": n, "total": n}` of a finished run ({} when missing)."""
    return summary(workdir).get("params", {})


def train_loss(workdir: str) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in report.load_train_metrics(workdir)
            if "loss" in row] if fileio.isdir(workdir) else []


def primary(metrics: dict[str, float]) -> Optional[str]:
    return report.primary_metric(metrics)


def pick(tasks: dict, task: str, metric: str) -> Optional[float]:
    return (tasks.get(task) or {}).get(metric)


def scores(metrics: dict[str, float]) -> dict[str, float]:
    """The higher-is-better metrics of a task (no loss, ECE or counts)."""
    return {m: v for m, v in metrics.items() if m not in report.NON_SCORE_METRICS}


def deltas(now: dict[str, dict[str, float]], reference: dict[str, dict[str, float]],
           tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per task, every metric's change from `reference` (loss included: up is worse)."""
    out = {}
    for task in tasks:
        if task in now and task in reference:
            out[task] = {m: now[task][m] - v for m, v in reference[task].items()
                         if m in now[task] and m not in report.COUNT_METRICS}
    return out


def mean(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def mean_primary_delta(task_deltas: dict[str, dict[str, float]],
                       reference: dict[str, dict[str, float]]) -> Optional[float]:
    """Mean over tasks of the change of each task's primary metric."""
    return mean([d.get(primary(scores(reference[t]))) for t, d in task_deltas.items()])


def mean_loss_delta(task_deltas: dict[str, dict[str, float]]) -> Optional[float]:
    return mean([d.get("loss") for d in task_deltas.values()])


def cell(value: Any, digits: int = 2, signed: bool = False) -> str:
    """A table cell: numbers rounded, ints with separators, None as "–"."""
    if value is None:
        return MISSING
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; cells that are not strings go through `cell`."""
    return report.markdown_table(list(header), [[c if isinstance(c, str) else cell(c)
                                                 for c in row] for row in rows])


def verdict(holds: Optional[bool]) -> str:
    return {True: "reproduced", False: "not reproduced", None: "not measured"}[holds]
