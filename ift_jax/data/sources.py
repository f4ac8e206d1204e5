"""Where task examples come from: local files, TFDS builders, or code.

A `RecordSource` yields plain Python records (dicts) per split, each with a
string id and the fields it declares up front (so templates can be checked
at registration, before any file is read). Files are read lazily, on first
use, so registering tasks never fails because data is absent; using a task
whose files are missing raises `MissingDataError` naming the expected path
and how to set the data directory.

Data directory: `set_data_dir(path)` (the trainer calls it from its config),
else the `IFT_JAX_DATA_DIR` environment variable.
"""

from __future__ import annotations

import abc
import functools
import os
import threading
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ift_jax import errors
from ift_jax import fileio
from ift_jax.data import records as records_lib

ENV_VAR = "IFT_JAX_DATA_DIR"
ID_FIELD = "_id"  # Every loaded record carries its id under this key.

_data_dir_override: Optional[str] = None


class MissingDataError(errors.MissingError):
    """A task's data files are not where the data directory says."""


def set_data_dir(path: Optional[str]) -> None:
    """Sets the folder holding one sub-folder per dataset (e.g. `dialogsum/`)."""
    global _data_dir_override
    _data_dir_override = path


def data_dir() -> Optional[str]:
    return _data_dir_override or os.environ.get(ENV_VAR) or None


Prepare = Callable[[dict], dict]


class RecordSource(abc.ABC):
    """Records of one dataset, by split; loaded once and cached."""

    def __init__(self, name: str, fields: Sequence[str], splits: Sequence[str],
                 prepare: Optional[Prepare] = None):
        self.name = name
        self.fields = tuple(fields)
        self.splits = tuple(splits)
        self._prepare = prepare
        self._cache: dict[str, list[dict]] = {}
        self._lock = threading.Lock()

    @abc.abstractmethod
    def _load_raw(self, split: str) -> list[tuple[str, dict]]:
        """(id, raw record) pairs of `split`."""

    @property
    def description(self) -> str:
        return self.name

    def load(self, split: str) -> list[dict]:
        """Prepared records of `split`, each with its id under `ID_FIELD`."""
        if split not in self.splits:
            raise errors.DataError(f"source {self.name!r} has no split {split!r}; splits: "
                                   f"{', '.join(self.splits)}")
        with self._lock:
            if split not in self._cache:
                self._cache[split] = [self._prepared(i, r) for i, r in self._load_raw(split)]
        return self._cache[split]

    def _prepared(self, example_id: str, record: dict) -> dict:
        out = dict(self._prepare(record) if self._prepare else record)
        missing = [f for f in self.fields if f not in out]
        if missing:
            raise errors.DataError(f"source {self.name!r}: record {example_id!r} lacks declared "
                                   f"field(s) {', '.join(missing)}; it has: "
                                   f"{', '.join(sorted(out))}")
        out[ID_FIELD] = example_id
        return out


class FileSource(RecordSource):
    """jsonl / tsv / csv files under `<data_dir>/<subdir>/`.

    Either `files` maps each split to its file(s), or `hash_split` maps split
    names to fractions and `files` has the one file (under any key) whose
    records are split deterministically by a hash of their id. `reader(path)`
    turns one file into records (default `records.read_records`); datasets in
    a layout of their own (headerless TSV, nested JSON) pass theirs.
    """

    def __init__(self, name: str, subdir: str, files: Mapping[str, str | Sequence[str]],
                 fields: Sequence[str], *, id_field: Optional[str] = None,
                 prepare: Optional[Prepare] = None,
                 hash_split: Optional[Mapping[str, float]] = None, split_seed: int = 0,
                 reader: Callable[[str], list[dict]] = records_lib.read_records):
        splits = tuple(hash_split) if hash_split else tuple(files)
        super().__init__(name, fields, splits, prepare)
        self.subdir = subdir
        self.files = {k: (v,) if isinstance(v, str) else tuple(v) for k, v in files.items()}
        self.id_field = id_field
        self.hash_split = dict(hash_split) if hash_split else None
        self.split_seed = split_seed
        self.reader = reader
        if self.hash_split and len(self.files) != 1:
            raise errors.ConfigError(f"source {name!r}: hash_split needs exactly one file entry")

    @property
    def description(self) -> str:
        names = sorted({f for fs in self.files.values() for f in fs})
        return f"files {self.subdir}/{{{', '.join(names)}}}"

    def paths(self, key: str) -> list[str]:
        root = data_dir()
        if root is None:
            raise MissingDataError(
                f"task data {self.subdir}/ needs a data directory: set {ENV_VAR} (or the "
                f"config's data_dir) to the folder that holds {self.subdir}/")
        paths = [os.path.join(root, self.subdir, f) for f in self.files[key]]
        for p in paths:
            if not fileio.exists(p):
                raise MissingDataError(
                    f"{self.name}: expected {p}; set {ENV_VAR} (now {root!r}) to the folder "
                    f"that holds {self.subdir}/")
        return paths

    def _records_of(self, key: str) -> list[tuple[str, dict]]:
        out = []
        for path in self.paths(key):
            for index, record in enumerate(self.reader(path)):
                out.append((self._id_of(record, path, index), record))
        return out

    def _id_of(self, record: dict, path: str, index: int) -> str:
        if self.id_field is None:
            return f"{os.path.basename(path)}:{index}"
        if self.id_field not in record:
            raise errors.DataError(f"{path}: record {index} has no id field {self.id_field!r}; "
                                   f"fields: {', '.join(sorted(record))}")
        return str(record[self.id_field])

    @functools.cached_property
    def _hash_splits(self) -> dict[str, list[tuple[str, dict]]]:
        (key,) = self.files
        by_split: dict[str, list[tuple[str, dict]]] = {s: [] for s in self.hash_split}
        for example_id, record in self._records_of(key):
            split = records_lib.split_of(example_id, self.hash_split, self.split_seed)
            by_split[split].append((example_id, record))
        return by_split

    def _load_raw(self, split: str) -> list[tuple[str, dict]]:
        if self.hash_split:
            return self._hash_splits[split]
        return self._records_of(split)


class TfdsSource(RecordSource):
    """A TFDS builder read through `seqio.TfdsDataSource` (its data_dir or TFDS's default)."""

    def __init__(self, name: str, tfds_name: str, splits: Mapping[str, str],
                 fields: Sequence[str], *, id_field: Optional[str] = None,
                 prepare: Optional[Prepare] = None, tfds_data_dir: Optional[str] = None):
        super().__init__(name, fields, tuple(splits), prepare)
        if ":" not in tfds_name:
            raise errors.ConfigError(f"source {name!r}: TFDS name {tfds_name!r} needs a version, "
                                     f"e.g. 'glue/rte:2.0.0' (seqio requires one)")
        self.tfds_name = tfds_name
        self.split_map = dict(splits)
        self.id_field = id_field
        self.tfds_data_dir = tfds_data_dir

    @property
    def description(self) -> str:
        return f"tfds {self.tfds_name}"

    def _load_raw(self, split: str) -> list[tuple[str, dict]]:
        import seqio
        # read_only: nothing can be downloaded here; prepare TFDS data elsewhere.
        source = seqio.TfdsDataSource(self.tfds_name, splits=self.split_map,
                                      tfds_data_dir=self.tfds_data_dir, read_only=True)
        try:
            dataset = source.get_dataset(split, shuffle=False)
        except AssertionError as e:  # TFDS's "could not find data in ..."
            where = self.tfds_data_dir or "$TFDS_DATA_DIR or ~/tensorflow_datasets"
            raise MissingDataError(
                f"{self.name}: no prepared TFDS data for {self.tfds_name} in {where} "
                f"({str(e).splitlines()[0]}); run `tfds build` for it where there is "
                f"network and copy the data dir") from None
        out = []
        for index, example in enumerate(dataset.as_numpy_iterator()):
            record = {k: _to_python(v) for k, v in example.items()}
            example_id = str(record[self.id_field]) if self.id_field else f"{split}:{index}"
            out.append((example_id, record))
        return out


def _to_python(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_to_python(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


class GeneratedSource(RecordSource):
    """Records made by code (synthetic tasks): `generate(split) -> list[dict]`."""

    def __init__(self, name: str, generate: Callable[[str], list[dict]],
                 fields: Sequence[str], splits: Sequence[str], *, id_field: str = "id"):
        super().__init__(name, fields, splits)
        self._generate = generate
        self.id_field = id_field

    @property
    def description(self) -> str:
        return "generated"

    def _load_raw(self, split: str) -> list[tuple[str, dict]]:
        return [(str(r[self.id_field]), r) for r in self._generate(split)]
