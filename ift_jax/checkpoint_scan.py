"""Is a checkpoint folder whole? Cheap checks before a restore, a full read after one failed.

A run resumes from its newest *readable* checkpoint. Telling readable from
damaged must not cost a second restore, so `problem(step_dir)` reads only
what describes the checkpoint, never the arrays:

- orbax's layout: the step's `_CHECKPOINT_METADATA` and commit marker
  (`commit_success.txt`), and each item folder (`state`, `meta`) with its
  metadata (`meta/metadata` is the JSON itself; `state/_METADATA` names every
  array of the train state);
- the OCDBT database the arrays live in (`state/manifest.ocdbt` and its
  B+tree nodes, a few KB to MB for any model size): every array named in
  `_METADATA` has its zarr metadata key, and every byte range the tree
  points at (`d/<file>` at offset + length) lies inside a file that exists.

An interrupted copy (an empty or half-copied step folder), a truncated or
deleted data file, or a missing item is found this way. Bytes that are
present but wrong (bit rot, a file zeroed in place) are not: a restore fails
on them, and `unreadable(step_dir)` then reads every array once (one at a
time, on the host) to tell damage from any other failure (out of memory, a
bug), which must not set a good checkpoint aside.
"""

from __future__ import annotations

import ast
import json
import os
from typing import Any, Optional

import tensorstore as ts

from ift_jax import fileio

ITEMS = ("state", "meta")
_ARRAY_TYPES = ("jax.Array", "np.ndarray")
_ZARR_KEYS = (".zarray", "zarr.json")  # zarr v2 / v3 metadata of one array.


def _read_json(path: str) -> Any:
    with fileio.open(path) as f:
        return json.load(f)


def _size(path: str) -> Optional[int]:
    """The file's size in bytes, or None if it does not exist."""
    if fileio.is_remote(path):
        from etils import epath
        p = epath.Path(path)
        return p.stat().length if p.exists() else None
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _kvstore_spec(directory: str) -> Any:
    """A TensorStore kvstore spec for `directory` (local path or bucket URL)."""
    directory = directory.rstrip("/") + "/"
    return directory if fileio.is_remote(directory) else {"driver": "file", "path": directory}


def problem(step_dir: str) -> Optional[str]:
    """What makes the checkpoint in `step_dir` unreadable, or None if it looks whole.

    Reads metadata only (see the module docstring). The answer names the first
    missing or short file, relative to `step_dir`.
    """
    if not fileio.isdir(step_dir):
        return "the folder is missing"
    if not fileio.listdir(step_dir):
        return "the folder is empty: its save or a copy of it was cut off"
    for name, what in (("_CHECKPOINT_METADATA", "orbax's step metadata"),
                       ("commit_success.txt", "the commit marker")):
        if not fileio.exists(os.path.join(step_dir, name)):
            return f"{name} ({what}) is missing: the save or a copy of it was cut off"
    for item in ITEMS:
        if not fileio.isdir(os.path.join(step_dir, item)):
            return f"the item folder {item}/ is missing"
    try:
        _read_json(os.path.join(step_dir, "meta", "metadata"))
    except (OSError, ValueError) as e:
        return f"meta/metadata cannot be read ({_first_line(e)})"
    return _state_problem(os.path.join(step_dir, "state"))


def _state_problem(state_dir: str) -> Optional[str]:
    try:
        tree = _read_json(os.path.join(state_dir, "_METADATA"))["tree_metadata"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"state/_METADATA cannot be read ({_first_line(e)})"
    arrays = [".".join(str(k) for k in ast.literal_eval(path))
              for path, entry in tree.items()
              if entry.get("value_metadata", {}).get("value_type") in _ARRAY_TYPES
              and not entry["value_metadata"].get("skip_deserialize")]
    if not fileio.exists(os.path.join(state_dir, "manifest.ocdbt")):
        return _plain_zarr_problem(state_dir, arrays)
    try:
        keys, needed = array_index(state_dir)
    except (OSError, ValueError) as e:
        return f"state/: the array index cannot be read ({_first_line(e)})"
    for name, end in sorted(needed.items()):
        size = _size(os.path.join(state_dir, name))
        if size is None:
            return f"state/{name} is missing (the array index points into it)"
        if size < end:
            return f"state/{name} is truncated: {size} bytes, the array index needs {end}"
    for name in arrays:
        if not any(f"{name}/{z}".encode() in keys for z in _ZARR_KEYS):
            return f"state/: array {name} is missing from the array index"
    return None


def _plain_zarr_problem(state_dir: str, arrays: list[str]) -> Optional[str]:
    """Checkpoints written without OCDBT: one zarr folder per array."""
    for name in arrays:
        if not any(fileio.exists(os.path.join(state_dir, name, z)) for z in _ZARR_KEYS):
            return f"state/{name}/ (an array) is missing"
    return None


def array_index(state_dir: str) -> tuple[set[bytes], dict[str, int]]:
    """The OCDBT database of a checkpoint's `state/` (its latest version): every key,
    and per file the index points into (relative to `state_dir`, e.g.
    `ocdbt.process_0/d/<hash>`), how many bytes it must hold. Reads the manifest and
    the B+tree nodes only; files that only an earlier or per-process index uses
    are not listed (orbax reads through the merged one).

    Raises:
      ValueError: a node or the manifest cannot be read (tensorstore's error).
    """
    store = ts.KvStore.open(_kvstore_spec(state_dir)).result()
    manifest = ts.ocdbt.dump(store).result()
    needed: dict[str, int] = {}

    def need(location: str) -> None:  # "type:base/:d/file:offset:length"
        head, offset, length = location.rsplit(":", 2)
        _, base, relative = head.split(":", 2)
        name = base + relative
        needed[name] = max(needed.get(name, 0), int(offset) + int(length))

    for node in manifest.get("version_tree_nodes", []):
        need(node["location"] if isinstance(node, dict) else node)
    versions = manifest.get("versions") or []
    if not versions:
        raise ValueError("the manifest lists no version")
    keys: set[bytes] = set()
    root = versions[-1]["root"]
    stack = [(root["location"], b"")] if "location" in root else []  # Else: empty.
    while stack:
        location, prefix = stack.pop()
        need(location)
        node = ts.ocdbt.dump(store, location).result()
        for entry in node["entries"]:
            if node["height"] > 0:
                stack.append((entry["location"],
                              prefix + entry.get("subtree_common_prefix", b"")))
                continue
            if "indirect_value" in entry:
                need(entry["indirect_value"])
            keys.add(prefix + entry["key"])
    return keys, needed


def unreadable(step_dir: str) -> Optional[str]:
    """Reads every array of the checkpoint's state (one at a time, on the host) and
    its meta: what fails, or None if all of it reads. Costs one full read."""
    found = problem(step_dir)
    if found:
        return found
    state_dir = os.path.join(step_dir, "state")
    try:
        tree = _read_json(os.path.join(state_dir, "_METADATA"))["tree_metadata"]
        ocdbt = fileio.exists(os.path.join(state_dir, "manifest.ocdbt"))
        for path, entry in tree.items():
            if entry.get("value_metadata", {}).get("value_type") not in _ARRAY_TYPES:
                continue
            name = ".".join(str(k) for k in ast.literal_eval(path))
            _read_array(state_dir, name, ocdbt)
    except Exception as e:  # Whatever the storage layers raise on bad bytes.
        return f"state/ cannot be read: {_first_line(e)}"
    return None


def _read_array(state_dir: str, name: str, ocdbt: bool) -> None:
    if ocdbt:
        kvstore = {"driver": "ocdbt", "base": _kvstore_spec(state_dir), "path": f"{name}/"}
    else:
        kvstore = _kvstore_spec(os.path.join(state_dir, name))
    errors = []
    for driver in ("zarr", "zarr3"):
        try:
            array = ts.open({"driver": driver, "kvstore": kvstore}, open=True,
                            read=True).result()
        except ValueError as e:  # Not this zarr version: try the other.
            errors.append(e)
            continue
        array.read().result()
        return
    raise errors[0]


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
