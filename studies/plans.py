"""What a study is made of: steps (one `ift-jax` command each) and the plan that
lists them.

A `Step` is an `ift-jax` command line (`train`, `eval`, `tasks train-spm`)
with the workdir it fills and how to tell that it is done: a training run is
done when its `summary.json` says `finished`; an evaluation or a vocabulary
when the files it writes exist. Steps are named across studies
(`base/train`), so a study that needs the base model lists the base's steps
too and the runner runs them once under the same root.

A `Plan` is a study's steps for one preset and root; its `record()` (every
step's command and flags) is what a resumed study is compared against.
Reading the steps' results back is `ift_jax.studies.readout`.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from typing import Any, Sequence

from ift_jax import fileio, sweeps

PRESETS = ("smoke", "cpu", "gpu")


def flag_value(value: Any) -> str:
    """A flag value as `ift-jax` parses it back (ml_collections: Python literals)."""
    if isinstance(value, float):
        return repr(value)
    return str(value)


@dataclasses.dataclass(frozen=True)
class Step:
    """One `ift-jax` command of a study.

    Attributes:
      name: unique over all studies, `<study>/<run>` (e.g. `forgetting/full`).
      command: the subcommand words, e.g. `("train",)`, `("tasks", "train-spm", "x")`.
      flags: `--key=value` flags in order (`config.train.steps` -> `--config.train.steps=`).
      workdir: the run directory the step fills (or the folder of its output).
      outputs: files whose presence means the step is done; empty for `train`
        steps, which are done when their `summary.json` says `finished`.
    """

    name: str
    command: tuple[str, ...]
    flags: tuple[tuple[str, Any], ...]
    workdir: str
    outputs: tuple[str, ...] = ()

    @property
    def argv(self) -> list[str]:
        """The `ift-jax` arguments (without `ift-jax` itself)."""
        return [*self.command, *(f"--{k}={flag_value(v)}" for k, v in self.flags)]

    def shell(self) -> str:
        return shlex.join(["ift-jax", *self.argv])

    def done(self) -> bool:
        if self.outputs:
            return all(fileio.exists(path) for path in self.outputs)
        return sweeps.finished(self.workdir)

    def record(self) -> dict:
        return {"command": " ".join(self.command), "flags": dict(self.flags)}


def train_step(name: str, workdir: str, config: dict[str, Any]) -> Step:
    """`ift-jax train --workdir=W --config.k=v ...` on the embedded default config."""
    flags = (("workdir", workdir), *((f"config.{k}", v) for k, v in config.items()))
    return Step(name, ("train",), flags, workdir)


def eval_step(name: str, workdir: str, outputs: Sequence[str], **flags: Any) -> Step:
    """`ift-jax eval --workdir=W --flag=v ...`, done when `outputs` (under W) exist."""
    return Step(name, ("eval",), (("workdir", workdir), *flags.items()), workdir,
                 tuple(os.path.join(workdir, p) for p in outputs))


def vocab_step(name: str, mixture: str, prefix: str, vocab_size: int) -> Step:
    """`ift-jax tasks train-spm MIXTURE --output=PREFIX`: a SentencePiece vocabulary."""
    return Step(name, ("tasks", "train-spm", mixture),
                (("output", prefix), ("vocab_size", vocab_size)),
                os.path.dirname(prefix), (prefix + ".model",))


@dataclasses.dataclass
class Plan:
    """A study's steps for one preset and root, and the settings it states."""

    study: str
    preset: str
    root: str
    steps: list[Step]
    settings: dict[str, Any]  # What the page states up front (model sizes, methods, ...).
    init_from: str = ""

    @property
    def directory(self) -> str:
        """`ROOT/<study>`: the study's record, timings and default page folder."""
        return os.path.join(self.root, self.study)

    def record(self) -> dict:
        """What a resumed study must match: preset, init_from and every step's flags."""
        return {"study": self.study, "preset": self.preset, "init_from": self.init_from,
                "steps": {s.name: s.record() for s in self.steps}}

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)


def unique(steps: Sequence[Step]) -> list[Step]:
    """`steps` without repeats (a study listing another's steps may list one twice)."""
    seen: dict[str, Step] = {}
    for step in steps:
        seen.setdefault(step.name, step)
    return list(seen.values())
