"""Files of a workdir, local or on a bucket (`gs://...`).

Local paths go to the builtins and `os`; paths with a scheme (`gs://`,
`s3://`, ...) go through `etils.epath` (orbax's own file layer, backed by
`tf.io.gfile` here), so metrics, eval results and reports land beside the
orbax checkpoints of a `gs://` workdir. Object stores cannot append, so
`append_text` rewrites the object there.
"""

from __future__ import annotations

import builtins
import os
from typing import IO, Any, Optional


def is_remote(path: str) -> bool:
    return "://" in str(path)


def _epath(path: str):
    from etils import epath
    return epath.Path(path)


def open(path: str, mode: str = "r", encoding: str | None = None, **kwargs: Any) -> IO:
    """`open` for local paths and buckets alike (text modes default to UTF-8)."""
    if "b" not in mode:
        encoding = encoding or "utf-8"
    if not is_remote(path):
        return builtins.open(path, mode, encoding=encoding, **kwargs)
    if kwargs.get("newline") == "":  # csv's request; buckets never translate newlines.
        kwargs.pop("newline")
    return _epath(path).open(mode, encoding=encoding, **kwargs)


def makedirs(path: str) -> None:
    if is_remote(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    if is_remote(path):
        return sorted(p.name for p in _epath(path).iterdir())
    return sorted(os.listdir(path))


def replace(source: str, target: str) -> None:
    """Moves `source` over `target` (atomic locally; copy + delete on buckets)."""
    if is_remote(source):
        _epath(source).replace(target)
    else:
        os.replace(source, target)


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def append_text(path: str, text: str) -> None:
    """Appends `text`; on a bucket the object is read and written back whole."""
    if not is_remote(path):
        with open(path, "a") as f:
            f.write(text)
        return
    old = _epath(path).read_text() if exists(path) else ""
    write_text(path, old + text)


def remove(path: str) -> None:
    """Deletes a file; one that is already gone is fine."""
    if is_remote(path):
        _epath(path).unlink(missing_ok=True)
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def move(source: str, target: str) -> None:
    """Moves a file or folder to `target` (which must not exist; its parent is made).
    Locally a rename (atomic on one filesystem); on buckets, which cannot rename
    folders, every object is copied, then the source removed."""
    makedirs(os.path.dirname(target.rstrip("/")))
    if not is_remote(source):
        if os.path.exists(target):
            raise FileExistsError(target)
        os.rename(source, target)
        return
    src, dst = _epath(source), _epath(target)
    if not src.is_dir():
        src.copy(dst)
        src.unlink()
        return
    for path in src.rglob("*"):
        if not path.is_dir():
            out = dst / path.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            path.copy(out)
    src.rmtree()


def unwritable(directory: str) -> Optional[OSError]:
    """Why this process cannot write into `directory` (made if missing), or None: a
    file is written and removed there (permissions alone miss read-only mounts)."""
    probe = os.path.join(directory, f".ift_jax_write_test.{os.getpid()}")
    try:
        makedirs(directory)
        write_text(probe, "")
        remove(probe)
    except OSError as e:
        return e
    return None
