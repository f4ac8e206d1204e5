"""The index-based training stream: batches computed from a position of a few integers.

`data.pipeline="indexed"` trains from this stream instead of SeqIO's tf.data
pipeline (`ift_jax.data.pipeline`). At start-up every task of the mixture is
read once to the end of its preprocessing (rendered and tokenized, or read from
`data.cache_dir`; trimmed, EOS appended) for this host's shard, and kept as flat
int32 token arrays. From then on the stream is a pure function of its position:

- example k of the stream comes from the task drawn for k: draws are made in
  blocks of `BLOCK` with a generator seeded by (seed, block), with the mixture's
  rates (examples-proportional with caps, as SeqIO's mixture samples);
- the c-th example drawn from a task of n examples is index c mod n of the
  permutation seeded by (seed, task, c // n): every example once per epoch, a
  new order each epoch (or the split's order with `shuffle=False`);
- a batch packs examples in stream order, each into the first of its
  `batch_size` rows with room for both its inputs and targets (first fit), and
  ends at the first example no row has room for; that example starts the next
  batch. Without packing a row holds one example.

The position after a batch is the index of the next example and how many
examples each task has given so far: `Position`, a few integers, written per
host beside each checkpoint (`ift_jax.data.positions`), so a resume at step N
restores it instead of producing and dropping N batches.

Features are those of SeqIO's `EncDecFeatureConverter` (t5x names, int32):
`decoder_input_tokens` are the targets shifted right within each segment, and
the loss weights mark the target tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from ift_jax import errors
from ift_jax.data import cache
from ift_jax.data.pipeline import BatchSpec

BLOCK = 4096  # Task draws per seeded block.
_MIX, _ORDER = 0, 1  # Seed namespaces: the task draws, the per-epoch permutations.


@dataclasses.dataclass(frozen=True)
class TaskExamples:
    """One task's examples for this host: token arrays concatenated, with offsets."""

    name: str
    rate: float
    inputs: np.ndarray  # int32, all examples' inputs end to end.
    input_offsets: np.ndarray  # [n + 1]: example i is inputs[off[i]:off[i + 1]].
    targets: np.ndarray
    target_offsets: np.ndarray

    @property
    def size(self) -> int:
        return len(self.input_offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return (self.inputs[self.input_offsets[i]:self.input_offsets[i + 1]],
                self.targets[self.target_offsets[i]:self.target_offsets[i + 1]])


@dataclasses.dataclass
class Position:
    """Where the stream is: the next example's index and each task's draws so far."""

    next_example: int
    drawn: list[int]

    def to_json(self) -> dict:
        return {"next_example": self.next_example, "drawn": list(self.drawn)}

    @classmethod
    def from_json(cls, value: dict) -> "Position":
        return cls(int(value["next_example"]), [int(c) for c in value["drawn"]])


def load_tasks(spec: BatchSpec, shard_info: Optional[seqio.ShardInfo] = None
               ) -> list[TaskExamples]:
    """The tasks of `spec.mixture_or_task` with a positive rate and examples in the
    split, each read to the end of its preprocessing for this shard."""
    provider = seqio.get_mixture_or_task(spec.mixture_or_task)
    if isinstance(provider, seqio.Mixture):
        weighted = [(t, float(provider.get_rate(t))) for t in provider.tasks]
    else:
        weighted = [(provider, 1.0)]
    tasks = [_read_task(task, rate, spec, shard_info)
             for task, rate in weighted if rate > 0 and spec.split in task.splits]
    tasks = [t for t in tasks if t.size]
    if not tasks:
        raise errors.DataError(f"{spec.mixture_or_task!r} has no examples in split "
                               f"{spec.split!r} for this host")
    return tasks


def _read_task(task: seqio.Task, rate: float, spec: BatchSpec,
               shard_info: Optional[seqio.ShardInfo]) -> TaskExamples:
    if cache.cache_dir() and _eos_after_trim_only(task):
        return _read_cached(task, rate, spec, shard_info)
    dataset = task.get_dataset(spec.feature_lengths, split=spec.split, shuffle=False,
                               num_epochs=1, shard_info=shard_info,
                               use_cached=bool(cache.cache_dir()))
    dataset = dataset.map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"]})
    columns: dict[str, list] = {"inputs": [], "targets": []}
    for chunk in dataset.ragged_batch(4096):  # RaggedTensors: values + row splits.
        for name in columns:
            columns[name].append(chunk[name])
    flat = {name: _concatenate(chunks) for name, chunks in columns.items()}
    return TaskExamples(task.name, rate, flat["inputs"][0], flat["inputs"][1],
                        flat["targets"][0], flat["targets"][1])


def _eos_after_trim_only(task: seqio.Task) -> bool:
    """Whether all `task` does after its cache point is SeqIO's `append_eos_after_trim`
    on inputs and targets (every instruction task), which `_read_cached` does itself."""
    steps = list(task.preprocessors)
    cut = [i for i, p in enumerate(steps) if isinstance(p, seqio.CacheDatasetPlaceholder)]
    features = task.output_features
    return (bool(cut) and steps[cut[0] + 1:] == [seqio.preprocessors.append_eos_after_trim]
            and set(features) == {"inputs", "targets"}
            and all(f.add_eos for f in features.values()))


def _read_cached(task: seqio.Task, rate: float, spec: BatchSpec,
                 shard_info: Optional[seqio.ShardInfo]) -> TaskExamples:
    """The cached records of `task` read in one pass (no per-task SeqIO pipeline, whose
    construction costs more than the reading), trimmed and given EOS as SeqIO does."""
    cached = cache.read_split(task, spec.split)
    records = tf.data.TFRecordDataset(cached.files)
    if shard_info and shard_info.num_shards > 1:  # As `cache.CachedSource` shards.
        records = records.shard(shard_info.num_shards, shard_info.index)
    features = {name: tf.io.RaggedFeature(tf.int64) for name in ("inputs", "targets")}
    columns: dict[str, list] = {"inputs": [], "targets": []}
    for chunk in records.batch(4096):
        parsed = tf.io.parse_example(chunk, features)
        for name in columns:
            columns[name].append(parsed[name])
    out = []
    for name in ("inputs", "targets"):
        values, offsets = _concatenate(columns[name])
        eos = task.output_features[name].vocabulary.eos_id
        out += _trim_append(values, offsets, spec.feature_lengths[name] - 1, eos)
    return TaskExamples(task.name, rate, *out)


def _trim_append(values: np.ndarray, offsets: np.ndarray, keep: int, eos: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Each example cut to its first `keep` tokens, then `eos` appended (SeqIO's
    `append_eos_after_trim`), on concatenated examples."""
    lengths = np.diff(offsets)
    kept = np.minimum(lengths, keep)
    within = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
    new_offsets = np.concatenate([[0], np.cumsum(kept + 1)]).astype(np.int64)
    out = np.full(new_offsets[-1], eos, np.int32)
    starts = np.repeat(new_offsets[:-1], lengths)
    mask = within < keep
    out[(starts + within)[mask]] = values[mask]
    return out, new_offsets


def _concatenate(chunks: Sequence[tf.RaggedTensor]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged chunks -> (values, offsets) of all their rows."""
    values = [c.flat_values.numpy().astype(np.int32) for c in chunks]
    lengths = [np.diff(c.row_splits.numpy()) for c in chunks]
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths or [[]]))])
    return (np.concatenate(values or [np.zeros(0, np.int32)]), offsets.astype(np.int64))


class IndexedStream(Iterator[dict[str, np.ndarray]]):
    """Numpy batches of `spec` from `tasks`, reproducible from any `position`."""

    def __init__(self, tasks: Sequence[TaskExamples], spec: BatchSpec,
                 host_rows: Optional[slice] = None):
        self.tasks = list(tasks)
        self.spec = spec
        self._rows = host_rows  # Hosts that build whole global batches keep these rows.
        self._seed = 0 if spec.seed is None else int(spec.seed)
        rates = np.asarray([t.rate for t in self.tasks], np.float64)
        self._probabilities = rates / rates.sum()
        self.position = Position(0, [0] * len(self.tasks))
        self._block: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def identity(self) -> dict:
        """What a saved position is only valid for: the spec and every task's size."""
        return {"spec": dataclasses.asdict(self.spec),
                "tasks": {t.name: [t.size, t.rate] for t in self.tasks}}

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._features(self._next_rows())
        if self._rows is None:
            return batch
        return {k: v[self._rows] for k, v in batch.items()}

    def skip(self, batches: int) -> None:
        """Moves past `batches` batches without building their arrays."""
        for _ in range(batches):
            self._next_rows()

    # ------------------------------------------------------------------
    # Drawing examples.

    def _task_of(self, k: int) -> int:
        block, offset = divmod(k, BLOCK)
        if self._block[0] != block:
            rng = np.random.default_rng([self._seed, _MIX, block])
            self._block = (block, rng.choice(len(self.tasks), BLOCK, p=self._probabilities))
        return int(self._block[1][offset])

    def _index_in_task(self, task: int, drawn: int) -> int:
        size = self.tasks[task].size
        epoch, i = divmod(drawn, size)
        if not self.spec.shuffle:
            return i
        key = (task, epoch)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != task}
            rng = np.random.default_rng([self._seed, _ORDER, task, epoch])
            self._orders[key] = rng.permutation(size)
        return int(self._orders[key][i])

    def _peek(self) -> tuple[int, np.ndarray, np.ndarray]:
        task = self._task_of(self.position.next_example)
        index = self._index_in_task(task, self.position.drawn[task])
        return (task, *self.tasks[task].example(index))

    def _take(self, task: int) -> None:
        self.position.next_example += 1
        self.position.drawn[task] += 1

    # ------------------------------------------------------------------
    # Packing.

    def _next_rows(self) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """The next batch as rows of (inputs, targets), advancing the position."""
        size = self.spec.batch_size
        rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
        if not self.spec.pack:
            for _ in range(size):
                task, inputs, targets = self._peek()
                rows.append([(inputs, targets)])
                self._take(task)
            return rows
        used = np.zeros((size, 2), np.int64)  # Tokens taken in each row: inputs, targets.
        room = np.asarray([self.spec.inputs_length, self.spec.targets_length])
        while True:
            task, inputs, targets = self._peek()
            fits = np.flatnonzero((used + (len(inputs), len(targets)) <= room).all(axis=1))
            if not len(fits):
                return rows
            row = int(fits[0])
            if row == len(rows):
                rows.append([])
            rows[row].append((inputs, targets))
            used[row] += (len(inputs), len(targets))
            self._take(task)

    def _features(self, rows: list[list[tuple[np.ndarray, np.ndarray]]]
                  ) -> dict[str, np.ndarray]:
        lengths = self.spec.feature_lengths
        size = self.spec.batch_size
        out = {
            "encoder_input_tokens": np.zeros((size, lengths["inputs"]), np.int32),
            "decoder_target_tokens": np.zeros((size, lengths["targets"]), np.int32),
            "decoder_input_tokens": np.zeros((size, lengths["targets"]), np.int32),
        }
        if self.spec.pack:
            for name, side in (("encoder", "inputs"), ("decoder", "targets")):
                out[f"{name}_segment_ids"] = np.zeros((size, lengths[side]), np.int32)
                out[f"{name}_positions"] = np.zeros((size, lengths[side]), np.int32)
        for r, row in enumerate(rows):
            at = [0, 0]
            for segment, (inputs, targets) in enumerate(row, start=1):
                spans = ((inputs, "encoder", 0), (targets, "decoder", 1))
                for tokens, name, side in spans:
                    span = slice(at[side], at[side] + len(tokens))
                    if self.spec.pack:
                        out[f"{name}_segment_ids"][r, span] = segment
                        out[f"{name}_positions"][r, span] = np.arange(len(tokens))
                    at[side] = span.stop
                out["encoder_input_tokens"][r, at[0] - len(inputs):at[0]] = inputs
                out["decoder_target_tokens"][r, at[1] - len(targets):at[1]] = targets
        # Targets shifted right by one, as SeqIO's `autoregressive_inputs`: packed, a
        # token after another segment's (or before padding) is 0.
        targets = out["decoder_target_tokens"]
        out["decoder_input_tokens"][:, 1:] = targets[:, :-1]
        if self.spec.pack:
            segments = out["decoder_segment_ids"]
            out["decoder_input_tokens"][:, 1:] *= segments[:, 1:] == segments[:, :-1]
        out["decoder_loss_weights"] = (out["decoder_target_tokens"] != 0).astype(np.int32)
        return out
