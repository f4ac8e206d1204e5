"""Looking at tasks: listing, previews of rendered examples, and token-length statistics.

Backs `ift-jax tasks list | preview | stats`. Everything here reads the
registries that `import ift_jax.tasks` fills.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from typing import Iterable, Optional

import numpy as np
import seqio

from ift_jax import errors
from ift_jax.data.instructions import InstructionDataSource

PERCENTILES = (50, 90, 95, 99, 100)


@dataclasses.dataclass(frozen=True)
class TaskSummary:
    name: str
    source: str
    splits: tuple[str, ...]
    num_templates: int
    mode: str
    metrics: tuple[str, ...]


def get(name: str) -> seqio.Task | seqio.Mixture:
    """The registered task or mixture `name`.

    Raises:
      DataError: no such name, with the closest registered ones.
    """
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        known = [*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise errors.DataError(f"no task or mixture is registered as {name!r}; {hint}"
                               f"`ift-jax tasks list` lists the tasks") from None


def tasks_of(name: str) -> list[seqio.Task]:
    """The task itself, or every task of a mixture (recursively).

    Raises:
      DataError: no such task or mixture.
    """
    provider = get(name)
    if isinstance(provider, seqio.Mixture):
        return list(provider.tasks)
    return [provider]


def summarize(task: seqio.Task) -> TaskSummary:
    source = task.source
    metrics = tuple(getattr(fn, "__name__", str(fn)) for fn in task.metric_fns)
    if isinstance(source, InstructionDataSource):
        rendering = source.rendering
        mode = rendering.mode + (f", {rendering.num_shots}-shot" if rendering.num_shots else "")
        return TaskSummary(task.name, source.records.description, tuple(source.splits),
                           len(source.templates), mode, metrics)
    return TaskSummary(task.name, type(source).__name__, tuple(source.splits), 0, "-", metrics)


def list_tasks() -> list[TaskSummary]:
    return [summarize(seqio.get_mixture_or_task(n)) for n in sorted(seqio.TaskRegistry.names())]


def preview(name: str, split: str = "validation", n: int = 3) -> list[dict[str, str]]:
    """The first `n` rendered examples of a task: template, id, inputs, targets."""
    source = tasks_of(name)[0].source
    if not isinstance(source, InstructionDataSource):
        raise errors.DataError(f"{name!r} is not an instruction task; cannot preview it")
    columns = source.rendered(split)
    keys = ("template", "id", "inputs", "targets", "references")
    return [{k: columns[k][i] for k in keys} for i in range(min(n, len(columns["inputs"])))]


@dataclasses.dataclass(frozen=True)
class LengthStats:
    """Token lengths of one feature (EOS included) against its feature length."""

    feature: str
    max_length: int
    count: int
    percentiles: dict[int, int]
    truncated: int

    @property
    def truncated_share(self) -> float:
        return self.truncated / self.count if self.count else 0.0


def length_stats(task: seqio.Task, split: str, feature_lengths: dict[str, int],
                 max_examples: Optional[int] = None) -> list[LengthStats]:
    """Percentiles of token lengths and how many examples the feature lengths truncate."""
    dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False,
                               trim_output_features=False)
    lengths: dict[str, list[int]] = {k: [] for k in feature_lengths}
    examples: Iterable[dict] = dataset.as_numpy_iterator()
    for example in itertools.islice(examples, max_examples):
        for feature in feature_lengths:
            lengths[feature].append(len(example[feature]))
    return [_stats(f, np.asarray(v), feature_lengths[f]) for f, v in lengths.items()]


def _stats(feature: str, values: np.ndarray, max_length: int) -> LengthStats:
    if values.size == 0:
        return LengthStats(feature, max_length, 0, {p: 0 for p in PERCENTILES}, 0)
    percentiles = {p: int(np.percentile(values, p, method="higher")) for p in PERCENTILES}
    return LengthStats(feature, max_length, int(values.size), percentiles,
                       int((values > max_length).sum()))
