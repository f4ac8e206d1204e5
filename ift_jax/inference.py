"""A model with its params on a mesh, run over many rows: generate, score, rank choices.

Evaluation, `ift-jax predict` and `ift-jax score` hand lists of token rows to
an `Inference`; it batches them, runs the jitted decoding/scoring functions
of `ift_jax.decoding` on the mesh the params live on, and returns one result
per row, in the rows' order, on every host.

- **Length buckets.** Rows are sorted by length and padded to the smallest
  bucket that fits (`bucket_lengths`: `max_length / 2^k` for a few k, rounded
  up to a multiple of 8), not always to the longest length: short inputs cost
  short-input compute. Each bucket is one compiled shape.
- **Global batches over the mesh.** Every batch has `batch_size` rows (rounded
  up to a multiple of the mesh's batch shards, padded with empty rows), is
  placed with `partitioning.batch_sharding` (batch over `data` × `fsdp`),
  and the params keep the shardings they were given (as in training: fsdp /
  tensor sharded). Each host supplies the rows of its shard
  (`jax.make_array_from_process_local_data`) and gets back every row's
  result (`process_allgather`): on a multi-host job every host must call the
  same methods with the same rows, as all do in training's evaluation.
- **Cancellable.** `should_stop` (optional) is asked before every batch; when
  it says true the call raises `Cancelled` (training's SIGTERM stops an
  evaluation within one batch). On a multi-host job it must answer alike on
  every host (`evaluator.RunEvaluator` asks all hosts).
- **Rank classification in one call.** `score_choices` encodes each input
  once and scores all of its answer choices against that encoding
  (`decoding.score_choices`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from ift_jax import decoding, partitioning

Rows = Sequence[Sequence[int]]

_MIN_BUCKET = 8


def bucket_lengths(max_length: int, num_buckets: int) -> list[int]:
    """Padded lengths, shortest first: `max_length / 2^k` for k < num_buckets, rounded
    up to a multiple of 8 and at least 8; `max_length` itself is always one."""
    lengths = {max_length}
    for k in range(1, max(num_buckets, 1)):
        length = max(_MIN_BUCKET, math.ceil(max_length / 2 ** k / 8) * 8)
        if length < max_length:
            lengths.add(length)
    return sorted(lengths)


def _bucket(length: int, buckets: Sequence[int]) -> int:
    return next((b for b in buckets if b >= length), buckets[-1])


class Cancelled(Exception):
    """`should_stop` said true before a batch; the call's results are incomplete."""


def _pow2_at_least(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


class Inference:
    """`model` with `params` (arrays placed on `mesh`) over lists of token rows.

    Args:
      model: a `t5.Transformer` or PEFT-wrapped one built for evaluation.
      params: its full param tree on `mesh` (any sharding).
      batch_size: rows per global batch (rounded up to the batch shards).
      inputs_length / targets_length: the usual longest input and target; the
        buckets are fractions of these (or of the longest row, if longer).
      num_buckets: how many padded lengths each of inputs and targets may take.
      should_stop: asked before every batch; true raises `Cancelled`.
      on_batch: called with the number of rows of each batch once it is done
        (progress over many rows).
    """

    def __init__(self, model: Any, params: Any, mesh: jax.sharding.Mesh, *, batch_size: int,
                 inputs_length: int, targets_length: int, num_beams: int = 1,
                 length_penalty: float = 1.0, num_buckets: int = 4,
                 should_stop: Optional[Callable[[], bool]] = None,
                 on_batch: Optional[Callable[[int], None]] = None):
        self.model, self.params, self.mesh = model, params, mesh
        self.should_stop = should_stop
        self.sharding = partitioning.batch_sharding(mesh)
        shards = math.prod(mesh.shape[a] for a in _batch_axes(self.sharding))
        self.batch_size = math.ceil(max(batch_size, 1) / shards) * shards
        self.inputs_length, self.targets_length = inputs_length, targets_length
        self.num_buckets = num_buckets
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.on_batch = on_batch
        self._rows = _process_rows(self.sharding, self.batch_size)

    # ------------------------------------------------------------------
    # Batching.

    def _batches(self, inputs: Rows) -> Iterator[tuple[list[int], int]]:
        """(indices of the rows, padded input length) per batch; rows of one batch
        share a bucket."""
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        buckets = self._input_buckets(len(inputs[order[-1]]) if order else 0)
        groups: dict[int, list[int]] = {}
        for i in order:
            groups.setdefault(_bucket(len(inputs[i]), buckets), []).append(i)
        for length, members in sorted(groups.items()):
            for start in range(0, len(members), self.batch_size):
                if self.should_stop is not None and self.should_stop():
                    raise Cancelled("stop requested")
                batch = members[start:start + self.batch_size]
                yield batch, length
                if self.on_batch:  # Resumed for the next batch: this one is done.
                    self.on_batch(len(batch))

    def _input_buckets(self, longest: int) -> list[int]:
        """Buckets up to `inputs_length`, or up to the longest row when rows are longer
        (a benchmark suite's prompts)."""
        return bucket_lengths(max(self.inputs_length, longest), self.num_buckets)

    def _target_bucket(self, longest: int) -> int:
        return _bucket(longest, bucket_lengths(max(self.targets_length, longest),
                                               self.num_buckets))

    def _global(self, array: np.ndarray) -> jax.Array:
        """A `[batch_size, ...]` host array (identical on every host) -> a global array
        over the mesh, each host supplying the rows of its devices."""
        local = array[self._rows[0]:self._rows[1]]
        return jax.make_array_from_process_local_data(
            self._sharding_for(array.ndim), local, array.shape)

    def _sharding_for(self, ndim: int) -> jax.sharding.NamedSharding:
        spec = tuple(self.sharding.spec) + (None,) * (ndim - len(self.sharding.spec))
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec[:ndim]))

    def _run(self, fn: Callable, *arrays: np.ndarray) -> list[np.ndarray]:
        with partitioning.mesh_context(self.mesh):
            outputs = fn(*(self._global(a) for a in arrays))
        return [_to_host(x) for x in jax.tree.leaves(outputs)]

    def _padded(self, rows: Sequence[Sequence[int]], indices: Sequence[int], length: int
                ) -> np.ndarray:
        batch = np.zeros((self.batch_size, length), np.int32)
        for slot, i in enumerate(indices):
            tokens = list(rows[i])[:length]
            batch[slot, :len(tokens)] = tokens
        return batch

    # ------------------------------------------------------------------
    # The three uses.

    def generate(self, inputs: Rows, max_decode_length: int) -> list[np.ndarray]:
        """Greedy (or beam search with `num_beams` > 1) tokens per input row,
        `[max_decode_length]` each, 0 after EOS."""
        out: list[Optional[np.ndarray]] = [None] * len(inputs)
        for indices, length in self._batches(inputs):
            tokens, = self._run(lambda enc: self._decode(enc, max_decode_length)[0],
                                self._padded(inputs, indices, length))
            for slot, i in enumerate(indices):
                out[i] = tokens[slot]
        return out  # type: ignore[return-value]

    def _decode(self, encoder_input_tokens: jax.Array, max_decode_length: int):
        if self.num_beams > 1:
            return decoding.beam_search(self.model, self.params, encoder_input_tokens,
                                        num_beams=self.num_beams,
                                        max_decode_length=max_decode_length,
                                        length_penalty=self.length_penalty)
        return decoding.greedy(self.model, self.params, encoder_input_tokens,
                               max_decode_length=max_decode_length)

    def score(self, inputs: Rows, targets: Rows) -> np.ndarray:
        """`[rows, 3]`: summed target log-likelihood, argmax hits and target tokens
        per (input, EOS-terminated target) pair (`decoding.score_targets`)."""
        out = np.zeros((len(inputs), 3), np.float64)
        for indices, length in self._batches(inputs):
            target_length = self._target_bucket(max(len(targets[i]) for i in indices))
            results = self._run(
                lambda enc, dec: decoding.score_targets(self.model, self.params, enc, dec),
                self._padded(inputs, indices, length),
                self._padded(targets, indices, target_length))
            columns = np.stack([np.asarray(r, np.float64) for r in results], axis=1)
            out[indices] = columns[:len(indices)]
        return out

    def score_choices(self, inputs: Rows, choices: Sequence[Sequence[Sequence[int]]]
                      ) -> list[np.ndarray]:
        """Per input, the summed log-likelihood of each of its (EOS-terminated) answer
        choices, all choices of a batch scored against one encoding per input."""
        out: list[np.ndarray] = [np.zeros((len(c),)) for c in choices]
        for indices, length in self._batches(inputs):
            most = max(len(choices[i]) for i in indices)
            num = _pow2_at_least(most, 2)
            longest = max((len(c) for i in indices for c in choices[i]), default=1)
            target_length = self._target_bucket(longest)
            batch = np.zeros((self.batch_size, num, target_length), np.int32)
            for slot, i in enumerate(indices):
                for j, tokens in enumerate(choices[i]):
                    tokens = list(tokens)[:target_length]
                    batch[slot, j, :len(tokens)] = tokens
            ll, = self._run(
                lambda enc, dec: decoding.score_choices(self.model, self.params, enc, dec),
                self._padded(inputs, indices, length), batch)
            for slot, i in enumerate(indices):
                out[i] = np.asarray(ll[slot, :len(choices[i])], np.float64)
        return out


def _batch_axes(sharding: jax.sharding.NamedSharding) -> tuple[str, ...]:
    first = sharding.spec[0] if len(sharding.spec) else None
    if first is None:
        return ()
    return (first,) if isinstance(first, str) else tuple(first)


def _process_rows(sharding: jax.sharding.NamedSharding, batch_size: int) -> tuple[int, int]:
    """The rows `[start, stop)` of a global batch held by this process's devices."""
    indices = sharding.addressable_devices_indices_map((batch_size, 1))
    starts = [s[0].start or 0 for s in indices.values()]
    stops = [batch_size if s[0].stop is None else s[0].stop for s in indices.values()]
    return min(starts), max(stops)


def _to_host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
