"""The best checkpoint by an evaluation metric, and early stopping.

- `checkpoint.keep_best = "<task>/<metric>"` (or `"<suite>/<aggregate>"`, e.g.
  `"mmlu_5shot/score"`): besides the last `train.keep_checkpoints`, the
  checkpoint whose evaluation scored best is kept (`checkpoint.keep_best_mode`:
  `max`, `min`, or `auto` = `min` for loss-like metrics, else `max`), and
  `best_checkpoint.json` in the workdir names it.
- `train.early_stopping.metric` (same form), `.patience` (evaluations without
  an improvement of more than `.min_delta` before the run stops) and `.mode`:
  the run ends cleanly, checkpointed, with `summary.json` saying why.

The record of the best so far is recomputed from the workdir's own
`eval/step_<N>.json` files, so a resumed run remembers it without any state
of its own: `Tracker.from_workdir`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from ift_jax import errors, fileio

MODES = ("auto", "max", "min")
# Lower is better for these; everything else (accuracy, ROUGE, BLEU, F1, ...) is higher.
LOWER_IS_BETTER = ("loss", "calibration_ece", "perplexity", "invalid_utf8_predictions")


def parse(spec: str, key: str) -> tuple[str, str]:
    source, _, metric = spec.rpartition("/")
    if not source or not metric:
        raise errors.ConfigError(f"{key}={spec!r}: give <task>/<metric> (e.g. "
                                 f"synthetic_sentiment/accuracy) or <suite>/<aggregate> "
                                 f"(e.g. mmlu_5shot/score)")
    return source, metric


def _higher_is_better(metric: str, mode: str, key: str) -> bool:
    if mode not in MODES:
        raise errors.ConfigError(f"{key}={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "auto":
        return metric not in LOWER_IS_BETTER
    return mode == "max"


@dataclasses.dataclass
class Tracker:
    """Follows one metric across evaluation points: the best step and value, and
    how many evaluations in a row did not improve on the best by `min_delta`."""

    source: str
    metric: str
    higher_is_better: bool
    min_delta: float = 0.0
    best_step: Optional[int] = None
    best_value: Optional[float] = None
    since_best: int = 0
    # The value patience is measured against: like Keras' EarlyStopping, it moves
    # only on an improvement of more than `min_delta` (best_value moves on any).
    reference: Optional[float] = None

    @classmethod
    def from_spec(cls, spec: str, mode: str = "auto", min_delta: float = 0.0,
                  key: str = "checkpoint.keep_best") -> Optional["Tracker"]:
        """A tracker for `"<task>/<metric>"`, or None for an empty spec."""
        if not spec:
            return None
        source, metric = parse(spec, key)
        if min_delta < 0:
            raise errors.ConfigError(f"train.early_stopping.min_delta={min_delta}: must be "
                                     f">= 0")
        return cls(source, metric, _higher_is_better(metric, mode, key), float(min_delta))

    @property
    def name(self) -> str:
        return f"{self.source}/{self.metric}"

    def value(self, point: dict) -> Optional[float]:
        """The metric in an eval JSON payload (`tasks`, then `suites`), or None."""
        for section in ("tasks", "suites"):
            entry = point.get(section, {}).get(self.source)
            if entry is not None and self.metric in entry:
                return float(entry[self.metric])
        return None

    def _better(self, value: float, than: Optional[float], delta: float) -> bool:
        if than is None:
            return True
        return value > than + delta if self.higher_is_better else value < than - delta

    def update(self, step: int, point: dict) -> bool:
        """Takes evaluation point `step` (its eval JSON payload); returns whether it is
        the new best.

        Raises:
          ConfigError: the point has no such task/suite or metric (naming what it has).
        """
        value = self.value(point)
        if value is None:
            have = sorted(point.get("tasks", {})) + sorted(point.get("suites", {}))
            raise errors.ConfigError(
                f"{self.name}: step {step} was evaluated without it (tasks and suites: "
                f"{', '.join(have) or 'none'}); name an evaluated task or suite and one of "
                f"its metrics")
        if self._better(value, self.reference, self.min_delta):
            self.reference, self.since_best = value, 0
        else:
            self.since_best += 1
        if self._better(value, self.best_value, 0.0):
            self.best_step, self.best_value = step, value
            return True
        return False

    def replay(self, workdir: str, up_to: Optional[int] = None) -> "Tracker":
        """Updates with every `eval/step_<N>.json` of `workdir` (N <= `up_to`), in order:
        a resumed run's best so far and patience count."""
        for step, point in _eval_points(workdir):
            if up_to is None or step <= up_to:
                if self.value(point) is not None:
                    self.update(step, point)
        return self

    def record(self) -> dict:
        return {"metric": self.name, "mode": "max" if self.higher_is_better else "min",
                "step": self.best_step, "value": self.best_value}


def _eval_points(workdir: str) -> list[tuple[int, dict]]:
    directory = os.path.join(workdir, "eval")
    if not fileio.isdir(directory):
        return []
    points = []
    for name in fileio.listdir(directory):
        if name.startswith("step_") and name.endswith(".json"):
            with fileio.open(os.path.join(directory, name)) as f:
                points.append((int(name[len("step_"):-len(".json")]), json.load(f)))
    return sorted(points, key=lambda p: p[0])


def write_record(workdir: str, tracker: Tracker) -> None:
    """`best_checkpoint.json`: which checkpoint is the best so far, by what."""
    path = os.path.join(workdir, "best_checkpoint.json")
    with fileio.open(path + ".tmp", "w") as f:
        json.dump(tracker.record(), f, indent=2)
    fileio.replace(path + ".tmp", path)


@dataclasses.dataclass
class EarlyStopping:
    """`train.early_stopping`: stop after `patience` evaluations without improvement."""

    tracker: Tracker
    patience: int

    @classmethod
    def from_config(cls, cfg) -> Optional["EarlyStopping"]:
        if cfg is None or not cfg.get("metric"):
            return None
        if int(cfg.get("patience", 0)) < 1:
            raise errors.ConfigError(f"train.early_stopping.patience="
                                     f"{cfg.get('patience')}: must be >= 1 evaluations when "
                                     f"train.early_stopping.metric is set")
        tracker = Tracker.from_spec(cfg.metric, cfg.get("mode", "auto"),
                                    cfg.get("min_delta", 0.0), "train.early_stopping.metric")
        return cls(tracker, int(cfg.patience))

    def should_stop(self) -> bool:
        return self.tracker.since_best >= self.patience

    def reason(self) -> str:
        t = self.tracker
        return (f"early stopping: {t.name} did not improve by more than {t.min_delta} for "
                f"{t.since_best} evaluations (best {t.best_value:.6g} at step {t.best_step})")


@dataclasses.dataclass
class Follower:
    """What a training run does with its evaluation points: the best checkpoint to
    keep (`checkpoint.keep_best`) and the early stop (`train.early_stopping`).

    Both trackers are replayed from the workdir's eval files up to the step the
    run starts from, so a resumed run goes on where it was."""

    keep: Optional[Tracker]
    early: Optional[EarlyStopping]

    @classmethod
    def from_config(cls, config, workdir: str, start: int) -> Optional["Follower"]:
        """None when neither is configured."""
        checkpoint = config.get("checkpoint") or {}
        keep = Tracker.from_spec(checkpoint.get("keep_best", ""),
                                 checkpoint.get("keep_best_mode", "auto"))
        early = EarlyStopping.from_config(config.train.get("early_stopping"))
        if keep is None and early is None:
            return None
        for tracker in (keep, early and early.tracker):
            if tracker is not None:
                tracker.replay(workdir, up_to=start)
        return cls(keep, early)

    def update(self, step: int, point: dict) -> dict:
        """Takes evaluation point `step` ({"tasks": ..., "suites": ...}); returns the
        decisions: `new_best` (the point is the best kept so far), `best_step`, and
        `stop` (the early stop's reason, or "")."""
        new_best = self.keep.update(step, point) if self.keep else False
        if self.early:
            self.early.tracker.update(step, point)
        return {"new_best": new_best, **self.state()}

    def state(self) -> dict:
        return {"best_step": self.keep.best_step if self.keep else None,
                "stop": self.early.reason() if self.early and self.early.should_stop() else ""}
