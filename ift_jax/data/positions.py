"""Positions of the indexed training stream, saved per host beside each checkpoint.

`save` writes this host's `ift_jax.data.indexed.Position` after `step` batches
to `<workdir>/data_position/<step>/process_<i>_of_<n>.json`, before the
checkpoint of that step is started: a position without its checkpoint is never
read, and a checkpoint without a usable position (a run from before positions
were saved, another host count, another mixture or batch spec) resumes by
computing and dropping `step` batches, as SeqIO's pipeline does, with one log
line saying why.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

from ift_jax import fileio
from ift_jax.data.indexed import IndexedStream, Position

FOLDER = "data_position"


def path(workdir: str, step: int, process: int, processes: int) -> str:
    return os.path.join(workdir, FOLDER, str(step), f"process_{process}_of_{processes}.json")


def save(stream: IndexedStream, workdir: str, step: int, process: int, processes: int
         ) -> None:
    """Writes the position `stream` has reached (after `step` batches) for this host."""
    target = path(workdir, step, process, processes)
    fileio.makedirs(os.path.dirname(target))
    record = {"step": step, "identity": stream.identity(),
              "position": stream.position.to_json()}
    fileio.write_text(target + ".tmp", json.dumps(record, sort_keys=True))
    fileio.replace(target + ".tmp", target)


def resume(stream: IndexedStream, workdir: str, step: int, process: int, processes: int
           ) -> bool:
    """Puts `stream` after `step` batches: the saved position when there is one that
    fits, else by computing and dropping them. Returns whether it restored."""
    if step == 0:
        return False
    target = path(workdir, step, process, processes)
    record, why = _usable(target, stream)
    if record is not None:
        stream.position = Position.from_json(record["position"])
        logging.info("start-up: data stream restored at step %d from %s", step, target)
        return True
    logging.info("start-up: %s; replaying %d batches of the data stream", why, step)
    stream.skip(step)
    return False


def _usable(target: str, stream: IndexedStream) -> tuple[Optional[dict], str]:
    if not fileio.exists(target):
        return None, f"no saved data position {target}"
    try:
        with fileio.open(target) as f:
            record = json.load(f)
        Position.from_json(record["position"])
    except (ValueError, KeyError, TypeError) as e:
        return None, f"the saved data position {target} is unreadable ({e})"
    saved, current = record.get("identity", {}), json.loads(json.dumps(stream.identity()))
    if saved != current:
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        return None, (f"the saved data position {target} is of another stream "
                      f"({', '.join(changed)} differ)")
    return record, ""


def drop_except(workdir: str, keep: set[int], process: int, processes: int) -> None:
    """Removes this host's positions of steps not in `keep` (their checkpoints are
    gone), and a step's folder once no host's position is left in it."""
    folder = os.path.join(workdir, FOLDER)
    if not fileio.isdir(folder):
        return
    for name in fileio.listdir(folder):
        if name.isdigit() and int(name) not in keep:
            fileio.remove(path(workdir, int(name), process, processes))
            if not fileio.is_remote(folder):  # Buckets have no folders to remove.
                try:
                    os.rmdir(os.path.join(folder, name))
                except OSError:  # Another host's position is still there; it removes it.
                    pass
