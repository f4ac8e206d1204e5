"""Model-ready numpy batches from a task or mixture, for this host's shard.

SeqIO does the work: `seqio.get_dataset` with `EncDecFeatureConverter`
(packed or padded), sharded by `seqio.ShardInfo` so each host reads a
disjoint part of every split. Arrays come out as numpy with the t5x feature
names (`encoder_input_tokens`, `decoder_input_tokens`,
`decoder_target_tokens`, `decoder_loss_weights`, and with packing the
`*_segment_ids` / `*_positions`), ready for
`jax.make_array_from_process_local_data`.

With a cache dir set (`ift_jax.data.cache`, `data.cache_dir`), the tasks
read their tokenized examples from it; everything after (trimming, EOS,
packing, shuffling, sharding, mixing) is the same.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Optional

import numpy as np
import seqio
import tensorflow as tf

from ift_jax import errors
from ift_jax.data import cache, inspection


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """What the model is fed: names, lengths, batch size and packing."""

    mixture_or_task: str
    split: str
    inputs_length: int
    targets_length: int
    batch_size: int  # Per host.
    pack: bool = True
    shuffle: bool = True
    seed: Optional[int] = 0
    num_epochs: Optional[int] = None  # None repeats forever (training).

    @property
    def feature_lengths(self) -> dict[str, int]:
        return {"inputs": self.inputs_length, "targets": self.targets_length}


def check_training_data(name: str, split: str = "train") -> None:
    """Refuses, before a run writes anything, a task or mixture it could not train on:
    a mixture with no task of positive rate (seqio's sampler would end the stream at
    once: a bare `StopIteration` at the first step) or with a negative or non-finite
    rate, and, for live (uncached) tasks, one whose templates fail on a record or that
    has no examples in `split`. Live tasks are rendered here, once: the run's pipeline
    reads the same rendered examples.

    Raises:
      DataError: naming the mixture and every task's rate, or the task (and template).
    """
    task_or_mixture = inspection.get(name)
    if isinstance(task_or_mixture, seqio.Mixture):
        tasks = _sampled_tasks(task_or_mixture)
    else:
        tasks = [task_or_mixture]
    if cache.cache_dir():
        return  # Cached tasks were rendered and counted when the cache was written.
    for task in tasks:
        if not task.num_input_examples(split):
            raise errors.DataError(f"task {task.name!r}: split {split!r} has no examples")


def _sampled_tasks(mixture: seqio.Mixture) -> list[seqio.Task]:
    rates = {task.name: float(mixture.get_rate(task)) for task in mixture.tasks}
    shown = ", ".join(f"{task}={rate:g}" for task, rate in rates.items())
    if any(not rate >= 0 or rate == float("inf") for rate in rates.values()):
        raise errors.DataError(f"mixture {mixture.name!r}: rates must be finite and >= 0; got "
                               f"{shown}")
    if not any(rates.values()):
        raise errors.DataError(
            f"mixture {mixture.name!r} gives every task a rate of 0 ({shown}): nothing to "
            f"sample from; give at least one task a positive rate (a task with no training "
            f"examples gets 0 from examples-proportional mixing)")
    return [task for task in mixture.tasks if rates[task.name] > 0]


def host_shard_info() -> seqio.ShardInfo:
    """This process's shard: index `jax.process_index()` of `jax.process_count()`."""
    import jax
    return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())


def get_dataset(spec: BatchSpec, shard_info: Optional[seqio.ShardInfo] = None
                ) -> tf.data.Dataset:
    """Batched, feature-converted `tf.data.Dataset` for one shard."""
    _hide_gpus_from_tensorflow()
    return seqio.get_dataset(
        spec.mixture_or_task, task_feature_lengths=spec.feature_lengths,
        feature_converter=seqio.EncDecFeatureConverter(pack=spec.pack),
        dataset_split=spec.split, shuffle=spec.shuffle, num_epochs=spec.num_epochs,
        shard_info=shard_info, seed=spec.seed, batch_size=spec.batch_size, verbose=False,
        use_cached=bool(cache.cache_dir()))


def numpy_batches(spec: BatchSpec, shard_info: Optional[seqio.ShardInfo] = None
                  ) -> Iterator[Mapping[str, np.ndarray]]:
    """Iterator of numpy batches `[batch_size, length]` (the last one may be short)."""
    return get_dataset(spec, shard_info).as_numpy_iterator()


def _hide_gpus_from_tensorflow() -> None:
    # tf.data only needs the CPU; leave accelerator memory to JAX.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # Already initialized; nothing to do.
        pass
