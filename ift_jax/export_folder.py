"""The folder an export writes: looked at first, written aside, renamed into place, marked.

`ift-jax export` never overwrites silently and never leaves a half-written
model where a finished one is expected (orbax and HF's own savers promise the
first; the second is what a killed export used to break: the new `config.json`
beside the old weights, indistinguishable from a finished export):

- `check_output(output, overwrite)`, before anything is read: a folder that
  holds anything is refused unless `overwrite`, and even then only when all it
  holds is a model export (HF or HF PEFT files, `spiece.model`, our marker):
  a training run, or any folder holding other things, is never replaced.
- `writing(output, record)`: the files go into a hidden temporary folder beside
  `output` (`.<name>.export-<pid>.tmp`), then `MARKER` is written last, listing
  every file with its size, and the folder is renamed into place (an old
  export is renamed aside first and deleted after). A kill before the rename
  leaves `output` as it was (or absent); the temporary folder of a dead
  process is removed by the next export to the same output. Only between the
  two renames (microseconds) is neither folder at `output`.
- `problem(folder)`: loaders (`hf.load_t5`, `peft_formats.load_peft`, and so
  `predict`, `score`, `eval` and `init_from`) refuse an unfinished export: a
  temporary folder, or one whose files differ from what its marker lists.
  Folders without a marker (written by transformers, PEFT or an older ift_jax)
  are read as they are.

Local folders only, as the exports themselves.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any, Optional

from ift_jax import errors

MARKER = "ift_jax_export.json"
# What an HF model or HF PEFT adapter folder holds (transformers, PEFT, t5x converters).
_MODEL_FILES = re.compile(
    r"(config|generation_config|adapter_config|tokenizer|tokenizer_config|"
    r"special_tokens_map|added_tokens)\.json|"
    r"(model|adapter_model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)|"
    r"(model|pytorch_model)\.(safetensors|bin)\.index\.json|"
    r"spiece\.model|flax_model\.msgpack|tf_model\.h5|README\.md|"
    + re.escape(MARKER))
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(export|replaced)-(?P<pid>\d+)\.tmp")


def _aside(output: str, kind: str) -> str:
    parent, name = os.path.split(os.path.abspath(output))
    return os.path.join(parent, f".{name}.{kind}-{os.getpid()}.tmp")


def check_output(output: str, overwrite: bool) -> None:
    """Refuses an `output` that holds anything (unless `overwrite`) or that holds
    anything but a model export (always), and one whose parent cannot be written.

    Raises:
      ConfigError: one line naming what is there and the fix.
    """
    if os.path.exists(output) and not os.path.isdir(output):
        raise errors.ConfigError(f"--output={output} is a file; give a folder to write the "
                                 f"export into")
    held = sorted(os.listdir(output)) if os.path.isdir(output) else []
    others = [name + ("/" if os.path.isdir(os.path.join(output, name)) else "")
              for name in held if not _MODEL_FILES.fullmatch(name)
              or os.path.isdir(os.path.join(output, name))]
    if others:
        raise errors.ConfigError(
            f"--output={output} holds {_names(others)}, which no export writes (a training "
            f"run or another folder): nothing there is replaced, even with --overwrite; "
            f"give an empty or new folder")
    if held and not overwrite:
        raise errors.ConfigError(
            f"--output={output} already holds an export ({_names(held)}); pass --overwrite "
            f"to replace it, or give an empty or new folder")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.access(parent if os.path.isdir(parent) else _existing(parent), os.W_OK):
        raise errors.ConfigError(f"--output={output}: {parent} is not writable; give a "
                                 f"folder this user can write to")


def _names(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _existing(path: str) -> str:
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


def _remove_stale(output: str) -> None:
    """Temporary folders of earlier exports to `output` whose process is gone."""
    parent, name = os.path.split(os.path.abspath(output))
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        match = _TEMPORARY.fullmatch(entry)
        if match and match["name"] == name and not _alive(int(match["pid"])):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@contextlib.contextmanager
def writing(output: str, record: dict[str, Any]) -> Iterator[str]:
    """Yields a temporary folder to write the export into; on success marks it finished
    (`MARKER`: `record` plus every file and its size) and renames it into place."""
    _remove_stale(output)
    temporary = _aside(output, "export")
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    try:
        yield temporary
        _mark(temporary, record)
        _swap_into_place(temporary, output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _mark(folder: str, record: dict[str, Any]) -> None:
    files = {name: os.path.getsize(os.path.join(folder, name))
             for name in sorted(os.listdir(folder))}
    for name in files:  # On disk before the marker that says they are.
        with open(os.path.join(folder, name), "rb") as f:
            os.fsync(f.fileno())
    written = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(os.path.join(folder, MARKER), "w", encoding="utf-8") as f:
        json.dump({**record, "written": written, "files": files}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _swap_into_place(temporary: str, output: str) -> None:
    old = None
    if os.path.isdir(output) and os.listdir(output):
        old = _aside(output, "replaced")
        os.rename(output, old)
    elif os.path.isdir(output):
        os.rmdir(output)  # Empty: nothing to keep.
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    os.rename(temporary, output)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def problem(folder: str) -> Optional[str]:
    """Why `folder` is not a finished export (see the module docstring), or None."""
    if _TEMPORARY.fullmatch(os.path.basename(os.path.normpath(folder))):
        return (f"{folder} is the temporary folder of an export that did not finish (killed "
                f"while writing); export again")
    path = os.path.join(folder, MARKER)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path} is unreadable: the export may not have finished; export again"
    for name, size in files.items():
        found = os.path.join(folder, name)
        if not os.path.isfile(found):
            return f"{folder} is an unfinished or damaged export: {name} is missing; export again"
        if os.path.getsize(found) != size:
            return (f"{folder} is an unfinished or damaged export: {name} is "
                    f"{os.path.getsize(found):,} bytes, the export wrote {size:,}; export "
                    f"again")
    return None
