"""One writer per workdir: a lock file held by the live training process.

`with run_lock.hold(workdir): ...` writes `WORKDIR/run.lock` (JSON: host, pid,
the pid's start time, run id, since, heartbeat, and the workdir it locks: its
path and inode) and removes it on the way out. A second trainer on the same
workdir is refused with one line naming the lock file and its holder:

    workdir runs/a is in use by another ift-jax run: host tpu-w-0, pid 4242, since
    2026-11-30 01:41:46 UTC (heartbeat 3 s ago), lock file runs/a/run.lock (workdir
    /home/me/runs/a); wait for it to finish or stop it, or use another --workdir

A lock file that names another folder is not this folder's lock: it was copied
along with a run (`cp -a` of a live run, to branch it), and the copy's trainer
takes it over with a warning naming both folders (`belongs_to`). The same folder
seen through another mount on another host keeps its inode, so it is still the
same folder there.

A lock left behind by a process that died (SIGKILL, a crash, a lost machine)
is stale and taken over, with a warning:

- holder on this host: stale when its pid is gone, or now belongs to another
  process (the start time in /proc differs);
- holder on another host: stale when its heartbeat is older than
  `stale_after_s` (default 120 s; the holder rewrites it every `heartbeat_s`,
  default 30 s, from a background thread), so clocks of the hosts sharing a
  workdir must agree to well within that;
- same `run_id` (`$IFT_JAX_RUN_ID`, which launch/slurm.py sets to the SLURM job
  id, constant across requeues): an earlier incarnation of this run, taken over
  unless it is alive on this host.

The hosts of one multi-host run share the lock: only process 0 takes it (the
others do nothing), so a second run is refused by its process 0, whose exit
ends the others through `jax.distributed`.

Locally the lock file appears atomically (written aside, then `os.link`ed into
place, which fails if it exists). On a bucket (`gs://`) there is no atomic
create: the lock is written if absent and read back, so two trainers started
within the same second can both pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Iterator, Optional

from ift_jax import fileio
from ift_jax.errors import WorkdirInUseError

LOCK_FILE = "run.lock"
RUN_ID_ENV = "IFT_JAX_RUN_ID"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0


@dataclasses.dataclass(frozen=True)
class Holder:
    """What the lock file says about the process holding it."""
    host: str
    pid: int
    since: float  # Unix time the lock was taken.
    heartbeat: float  # Unix time of the last heartbeat.
    token: str  # Unique per acquisition: tells our lock from a successor's.
    run_id: str = ""
    pid_start: Optional[int] = None  # /proc/<pid>/stat start time, against pid reuse.
    workdir: str = ""  # The folder locked: its real path (a URL on a bucket); "" in old locks.
    workdir_inode: Optional[int] = None  # Its inode (local folders): the same across mounts.

    def describe(self, now: float) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        run = f", run id {self.run_id}" if self.run_id else ""
        return (f"host {self.host}, pid {self.pid}, since {since}{run} "
                f"(heartbeat {max(now - self.heartbeat, 0):.0f} s ago)")

    @classmethod
    def from_json(cls, data: dict) -> "Holder":
        """The holder of a lock file's JSON (fields a newer ift_jax added are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _folder_identity(workdir: str) -> tuple[str, Optional[int]]:
    """(real path or URL, inode or None) of the folder a lock file locks."""
    if fileio.is_remote(workdir):
        return workdir.rstrip("/"), None
    path = os.path.realpath(workdir)
    try:
        return path, os.stat(path).st_ino
    except OSError:
        return path, None


def belongs_to(holder: Holder, workdir: str) -> bool:
    """Whether the lock `holder` was taken for `workdir` itself, not for the folder a
    copy of it was made from (see the module docstring). Locks written before the
    folder was recorded belong to the folder they are in."""
    if not holder.workdir:
        return True
    path, inode = _folder_identity(workdir)
    if holder.workdir == path:
        return True
    if fileio.is_remote(workdir) or holder.host == socket.gethostname():
        return False  # One name per folder on a bucket, and on one host (real paths).
    return inode is not None and holder.workdir_inode == inode  # Another mount of it.


def _pid_start(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: int, start: Optional[int]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Alive, owned by another user.
        pass
    current = _pid_start(pid)
    return start is None or current is None or current == start


def is_stale(holder: Holder, now: float, run_id: str = "",
             stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether `holder` is gone (see the module docstring for the rules)."""
    if holder.host == socket.gethostname():
        return not _pid_alive(holder.pid, holder.pid_start)
    if run_id and holder.run_id == run_id:
        return True
    return now - holder.heartbeat > stale_after_s


class RunLock:
    """The lock of one workdir; `acquire` once, `release` once (or use `hold`)."""

    def __init__(self, workdir: str, run_id: Optional[str] = None,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self.run_id = os.environ.get(RUN_ID_ENV, "") if run_id is None else run_id
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.lost = False  # Set if another process took the lock over from us.
        self._holder: Optional[Holder] = None
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one.

        Raises:
          WorkdirInUseError: a live process holds it.
        """
        fileio.makedirs(self.workdir)
        for _ in range(3):  # A lock released or taken over meanwhile: look again.
            now = time.time()
            mine = Holder(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex,
                          self.run_id, _pid_start(os.getpid()),
                          *_folder_identity(self.workdir))
            if self._create(mine):
                self._holder = mine
                self._start_heartbeat()
                return
            holder = self.read()
            if holder is None:
                self._remove_if_unreadable()
                continue
            if not belongs_to(holder, self.workdir):
                logging.warning("workdir %s: lock file %s was taken for %s by %s and copied "
                                "here with that folder; it is not this folder's lock: "
                                "replacing it", self.workdir, self.path, holder.workdir,
                                holder.describe(time.time()))
            elif not is_stale(holder, time.time(), self.run_id, self.stale_after_s):
                raise WorkdirInUseError(
                    f"workdir {self.workdir} is in use by another ift-jax run: "
                    f"{holder.describe(time.time())}, lock file {self.path} (workdir "
                    f"{holder.workdir or self.workdir}); wait for it to finish or stop it, "
                    f"or use another --workdir")
            else:
                logging.warning("workdir %s: taking over the run lock of a process that is "
                                "gone (%s)", self.workdir, holder.describe(time.time()))
            self._remove_if(holder.token)
        raise WorkdirInUseError(f"workdir {self.workdir}: could not take {self.path}; other "
                                f"processes keep taking it; is another run starting?")

    def read(self) -> Optional[Holder]:
        """The holder in the lock file; None if there is none or it is unreadable
        (another process in the middle of writing it, or a crash while writing it
        in place: see `_remove_if_unreadable`)."""
        try:
            with fileio.open(self.path) as f:
                return Holder.from_json(json.load(f))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            return None

    def _remove_if_unreadable(self, wait_s: float = 1.0) -> None:
        """Removes a lock file that stays unreadable for `wait_s` (a writer that
        crashed mid-write); one being written meanwhile becomes readable and stays."""
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if not fileio.exists(self.path) or self.read() is not None:
                return
            time.sleep(0.05)
        logging.warning("workdir %s: unreadable run lock %s; removing it",
                        self.workdir, self.path)
        fileio.remove(self.path)

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if it is still ours."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self._holder is not None:
            self._remove_if(self._holder.token)
            self._holder = None

    def _create(self, holder: Holder) -> bool:
        """Writes the lock file unless one exists; whether it did."""
        if fileio.is_remote(self.path):
            return self._create_by_write(holder)
        aside = f"{self.path}.{holder.token}"
        with open(aside, "w", encoding="utf-8") as f:
            f.write(json.dumps(dataclasses.asdict(holder)))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(aside, self.path)  # Atomic, and fails if the lock exists.
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(aside)

    def _create_by_write(self, holder: Holder) -> bool:
        """`_create` where no atomic create exists (buckets): write if absent, read back."""
        if fileio.exists(self.path):
            return False
        fileio.write_text(self.path, json.dumps(dataclasses.asdict(holder)))
        found = self.read()
        return found is not None and found.token == holder.token

    def _write(self, holder: Holder) -> None:
        aside = f"{self.path}.{holder.token}"
        fileio.write_text(aside, json.dumps(dataclasses.asdict(holder)))
        fileio.replace(aside, self.path)

    def _remove_if(self, token: str) -> None:
        holder = self.read()
        if holder is not None and holder.token == token:
            fileio.remove(self.path)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                      name="ift_jax-run-lock-heartbeat")
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = self.read()
            if current is None or current.token != self._holder.token:
                self.lost = True
                logging.error("workdir %s: lost the run lock to %s; another run may be "
                              "writing here", self.workdir,
                              current.describe(time.time()) if current else "nobody")
                return
            self._holder = dataclasses.replace(self._holder, heartbeat=time.time())
            self._write(self._holder)


def live_holder(workdir: str) -> Optional[Holder]:
    """The live process holding `workdir`'s run lock, or None (no lock, a stale one, or
    one copied from another folder)."""
    holder = RunLock(workdir).read()
    if holder is None or not belongs_to(holder, workdir) or is_stale(holder, time.time()):
        return None
    return holder


@contextlib.contextmanager
def hold(workdir: str, process_index: Optional[int] = None, **kwargs) -> Iterator[
        Optional[RunLock]]:
    """Holds `workdir`'s run lock for the block (process 0 only; see module docstring).

    Args:
      process_index: this process's index in a multi-host run (default
        `jax.process_index()`); only 0 takes the lock.
      **kwargs: `RunLock` options (run_id, heartbeat_s, stale_after_s).

    Raises:
      WorkdirInUseError: another live run holds the workdir.
    """
    if process_index is None:
        import jax  # Only here: a caller that knows its index needs no jax (tools, tests).
        process_index = jax.process_index()
    if process_index != 0:
        yield None
        return
    lock = RunLock(workdir, **kwargs)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
