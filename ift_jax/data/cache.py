"""Cached tasks: rendered, tokenized examples on disk, read instead of re-rendering.

`write(name, output, splits)` (behind `ift-jax tasks cache`) writes, for
every task of a task or mixture and every split, what the task yields up to
its cache point: the rendered strings tokenized with the run's vocabulary,
before trimming and EOS. The layout is SeqIO's own cache layout, so
`seqio.Task`'s cached reader can open it too:

    DIR/<task>/{split}.tfrecord-00000-of-0000N   tf.train.Example records, in split order
    DIR/<task>/info.{split}.json                 features (dtype, shape), num_shards, plus
                                                 ift_jax's: vocabulary, fingerprint, examples
    DIR/<task>/stats.{split}.json                examples, {inputs,targets}_{tokens,max_tokens}
    DIR/<task>/COMPLETED                         written last

Everything goes through `tf.io.gfile`, so `gs://` paths work.

Reading: with `set_cache_dir(DIR)` (the trainer calls it from
`data.cache_dir`), `CacheableTask` (every instruction task) reads its
examples from DIR when asked for `use_cached=True`, through `CachedSource`,
which shards and shuffles the records exactly as `InstructionDataSource`
shards and shuffles the rendered strings (per example, then a full-split
shuffle with the run's seed). So the cached stream is the uncached one,
example for example; SeqIO's file-level reader would interleave shards
instead. Mixing rates come from `stats.train.json` (SeqIO's
`mixing_rate_num_examples` reads the cached stats), the same counts as
rendering gives.

A cache written with another vocabulary or from another task definition
(its templates and rendering: the fingerprint), or lacking a task or split,
is refused in one line naming the `ift-jax tasks cache` command that
rewrites it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import os
from typing import Iterable, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from ift_jax import errors
from ift_jax.data.vocabularies import TASK_VOCABULARY

FORMAT = "ift_jax.cache/1"
EXAMPLES_PER_SHARD = 50_000
COMPLETED = "COMPLETED"

_cache_dir: Optional[str] = None


class MissingCacheError(errors.DataError):
    """`data.cache_dir` lacks a task or split the run reads."""


def set_cache_dir(path: Optional[str]) -> None:
    """Reads cached tasks from `path` (None or "" = render every task live)."""
    global _cache_dir
    _cache_dir = path or None


def cache_dir() -> Optional[str]:
    return _cache_dir


def use_cached(task: seqio.Task) -> bool:
    """Whether `task` is read from the cache: a cache dir is set and the task can be cached."""
    return bool(_cache_dir) and task.supports_caching


def task_dir(root: str, task_name: str) -> str:
    return os.path.join(root, seqio.utils.get_task_dir_from_name(task_name))


@functools.lru_cache(maxsize=None)
def _model_hash(path: str) -> str:
    with tf.io.gfile.GFile(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def vocabulary_identity() -> str:
    """The run's vocabulary: `byte`, or `sentencepiece:<sha256 of the .model, 16 hex>`."""
    spec = TASK_VOCABULARY.spec
    return "byte" if spec == "byte" else f"sentencepiece:{_model_hash(spec)}"


def fingerprint(task: seqio.Task) -> Optional[str]:
    """The task definition's fingerprint (templates, rendering, source), if it has one."""
    return getattr(task.source, "fingerprint", None)


def cache_command(name: str, root: str, split: str) -> str:
    return (f"ift-jax tasks cache {name} --output={root} --splits={split} "
            f"--vocab={TASK_VOCABULARY.spec}")


# Reading.


@dataclasses.dataclass(frozen=True)
class CachedSplit:
    """One task's split in a cache: its info, stats and record files."""

    directory: str
    split: str
    info: dict
    stats: dict

    @property
    def files(self) -> list[str]:
        n = self.info["num_shards"]
        prefix = seqio.utils.get_cached_tfrecord_prefix(self.directory, self.split)
        return [f"{prefix}-{i:05d}-of-{n:05d}" for i in range(n)]

    @property
    def examples(self) -> int:
        return int(self.stats["examples"])


def _read_json(path: str) -> Optional[dict]:
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def read_split(task: seqio.Task, split: str, root: Optional[str] = None) -> CachedSplit:
    """`task`'s cached `split` under `root` (default: the cache dir), checked against the run.

    Raises:
      MissingCacheError: the task or split is not cached there (or not completely).
      DataError: cached with another vocabulary or from another task definition.
    """
    root = root or _cache_dir
    directory = task_dir(root, task.name)
    command = cache_command(task.name, root, split)
    info = _read_json(seqio.utils.get_cached_info_path(directory, split))
    stats = _read_json(seqio.utils.get_cached_stats_path(directory, split))
    if info is None or stats is None or not tf.io.gfile.exists(
            os.path.join(directory, COMPLETED)):
        raise MissingCacheError(f"task {task.name!r} split {split!r} is not in the cache "
                                f"{root} (data.cache_dir); write it with `{command}`")
    ours, theirs = vocabulary_identity(), info.get("vocabulary")
    if ours != theirs:
        raise errors.DataError(
            f"cache {directory} ({split}) was written with vocabulary {theirs} "
            f"({info.get('vocabulary_spec')}), this run uses {ours} ({TASK_VOCABULARY.spec}); "
            f"rewrite it with `{command}` or set data.vocab to the cache's")
    if info.get("fingerprint") != fingerprint(task):
        raise errors.DataError(
            f"cache {directory} ({split}) was written from another definition of task "
            f"{task.name!r} (fingerprint {info.get('fingerprint')}, now {fingerprint(task)}); "
            f"rewrite it with `{command}`")
    return CachedSplit(directory, split, info, stats)


def _feature_spec(info: dict) -> dict:
    spec = {}
    for name, feature in info["features"].items():
        if feature["dtype"] == "string":
            spec[name] = tf.io.FixedLenFeature([], tf.string)
        else:
            spec[name] = tf.io.FixedLenSequenceFeature([], tf.int64, allow_missing=True)
    return spec


class PerExampleSource(seqio.DataSource):
    """A source sharded per example (any number of shards), with no output features of
    its own (the task's apply): the live `InstructionDataSource` and `CachedSource`."""

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    @property
    def output_features(self):
        return {}


class CachedSource(PerExampleSource):
    """One cached split, sharded and shuffled as `InstructionDataSource` does it live."""

    def __init__(self, cached: CachedSplit):
        self.cached = cached
        super().__init__(splits=(cached.split,), caching_permitted=False,
                         performs_internal_shuffling=True)

    def list_shards(self, split: str) -> Sequence[str]:
        return self.cached.files

    def num_input_examples(self, split: str) -> int:
        return self.cached.examples

    def get_dataset(self, split: str = "train", shuffle: bool = True,
                    seed: Optional[int] = None,
                    shard_info: Optional[seqio.ShardInfo] = None, *,
                    sequence_length=None, use_cached: bool = False,
                    num_epochs: Optional[int] = 1) -> tf.data.Dataset:
        # Files in order, read one after the other: the records come in split order.
        dataset = tf.data.TFRecordDataset(self.cached.files)
        if shard_info and shard_info.num_shards > 1:
            dataset = dataset.shard(shard_info.num_shards, shard_info.index)
        if shuffle:
            # The live source's buffer (the whole split) and seed: the same permutation.
            dataset = dataset.shuffle(self.cached.examples, seed=seed,
                                      reshuffle_each_iteration=True)
        features = self.cached.info["features"]
        spec = _feature_spec(self.cached.info)

        def parse(record):
            example = tf.io.parse_single_example(record, spec)
            return {k: tf.cast(v, features[k]["dtype"]) for k, v in example.items()}

        return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class CacheableTask(seqio.Task):
    """A `seqio.Task` whose cache is `set_cache_dir`'s, looked up on every use.

    SeqIO memoizes a task's cache dir and stats on first lookup; here they
    follow `set_cache_dir`, so one process can switch caches (tests,
    benchmarks), and a missing or mismatched cache fails in one line.
    """

    @property
    def cache_dir(self) -> Optional[str]:
        return task_dir(_cache_dir, self.name) if _cache_dir else None

    def get_cached_stats(self, split: str = "train"):
        return read_split(self, split).stats

    def _get_cached_source(self, split: str, file_shuffle_buffer_size=None) -> CachedSource:
        return CachedSource(read_split(self, split))


# Writing.


def tasks_of(name: str) -> list[seqio.Task]:
    """The task itself or a mixture's tasks; an unknown name lists what exists."""
    if name in seqio.MixtureRegistry.names():
        return list(seqio.get_mixture_or_task(name).tasks)
    if name in seqio.TaskRegistry.names():
        return [seqio.get_mixture_or_task(name)]
    names = sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names())
    close = difflib.get_close_matches(name, names, n=5)
    raise errors.DataError(
        f"no task or mixture {name!r}"
        + (f"; did you mean {', '.join(close)}" if close else "")
        + f"; mixtures: {', '.join(sorted(seqio.MixtureRegistry.names()))}; "
          f"tasks: `ift-jax tasks list` ({len(seqio.TaskRegistry.names())})")


def precached(task: seqio.Task, split: str) -> tf.data.Dataset:
    """What `task` yields at its cache point for `split`, in split order (uncached)."""
    dataset = task.source.get_dataset(split=split, shuffle=False)
    return task.preprocess_precache(dataset)


def _feature(value) -> tf.train.Feature:
    if isinstance(value, bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=np.asarray(value).tolist()))


def _features_info(dataset: tf.data.Dataset) -> dict:
    out = {}
    for name, spec in dataset.element_spec.items():
        dtype = "string" if spec.dtype == tf.string else spec.dtype.name
        out[name] = {"dtype": dtype, "shape": [None] * spec.shape.rank}
    return out


def write_split(task: seqio.Task, split: str, root: str,
                examples_per_shard: int = EXAMPLES_PER_SHARD) -> dict:
    """Writes `task`'s `split` under `root/<task>/`; returns its stats."""
    if not task.supports_caching:
        raise errors.DataError(f"task {task.name!r} has no cache point (CacheDatasetPlaceholder); "
                               f"only instruction tasks (instructions.register_task) are cached")
    directory = task_dir(root, task.name)
    tf.io.gfile.makedirs(directory)
    if tf.io.gfile.exists(os.path.join(directory, COMPLETED)):  # Incomplete until rewritten.
        tf.io.gfile.remove(os.path.join(directory, COMPLETED))
    dataset = precached(task, split)
    count = task.source.num_input_examples(split)
    num_shards = max(1, -(-count // examples_per_shard))
    prefix = seqio.utils.get_cached_tfrecord_prefix(directory, split)
    for old in tf.io.gfile.glob(f"{prefix}-*"):
        tf.io.gfile.remove(old)
    stats = {"examples": 0, "inputs_tokens": 0, "inputs_max_tokens": 0,
             "targets_tokens": 0, "targets_max_tokens": 0}
    examples = dataset.as_numpy_iterator()
    for shard in range(num_shards):
        with tf.io.TFRecordWriter(f"{prefix}-{shard:05d}-of-{num_shards:05d}") as writer:
            for example in itertools.islice(examples, examples_per_shard):
                writer.write(tf.train.Example(features=tf.train.Features(
                    feature={k: _feature(v) for k, v in example.items()})).SerializeToString())
                _count(stats, example)
    stats["examples"] += sum(1 for _ in examples)  # More than the source counted: refused below.
    if stats["examples"] != count:
        raise errors.DataError(f"task {task.name!r} split {split!r}: wrote {stats['examples']} "
                               f"examples, its source counts {count}")
    info = {"features": _features_info(dataset), "num_shards": num_shards,
            "seqio_version": seqio.__version__, "format": FORMAT, "task": task.name,
            "examples": count, "vocabulary": vocabulary_identity(),
            "vocabulary_spec": TASK_VOCABULARY.spec, "fingerprint": fingerprint(task)}
    _write_json(seqio.utils.get_cached_info_path(directory, split), info)
    _write_json(seqio.utils.get_cached_stats_path(directory, split), stats)
    return stats


def _count(stats: dict, example: dict) -> None:
    stats["examples"] += 1
    for key in ("inputs", "targets"):
        n = len(example[key])
        stats[f"{key}_tokens"] += n
        stats[f"{key}_max_tokens"] = max(stats[f"{key}_max_tokens"], n)


def _write_json(path: str, value: dict) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)


def mark_completed(task: seqio.Task, root: str) -> None:
    with tf.io.gfile.GFile(os.path.join(task_dir(root, task.name), COMPLETED), "w") as f:
        f.write("")


def write(name: str, root: str, splits: Optional[Iterable[str]] = None,
          log=print) -> list[tuple[str, str, int]]:
    """Caches every task of `name` (task or mixture) under `root`: (task, split, examples).

    `splits` None = every split each task has; a named split a task lacks is skipped.
    """
    rows = []
    for task in tasks_of(name):
        wanted = [s for s in (splits or task.splits) if s in task.splits]
        for split in wanted:
            stats = write_split(task, split, root)
            rows.append((task.name, split, stats["examples"]))
            log(f"{task.name} [{split}]: {stats['examples']} examples -> "
                f"{task_dir(root, task.name)}")
        if wanted:
            mark_completed(task, root)
    return rows
