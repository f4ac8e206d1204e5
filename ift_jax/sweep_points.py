"""One point of a sweep: run in its own supervised process or in this one, what it ended
with (and why it failed), and adopting a run of it that is still going.

- `run_point(argv)`: an `ift-jax train` process that dies with the sweep: it is
  started with `$IFT_JAX_SWEEP_PID` set, and the `ift-jax` command sets Linux's
  parent-death signal to SIGTERM when it sees it (`die_with_sweep`, first thing
  in `cli.main`: in the new process, never between fork and exec of a sweep
  whose threads may hold locks), so a sweep that is killed (even by SIGKILL)
  stops its running point, which saves a checkpoint and exits 0. SIGTERM/SIGINT
  sent to the sweep are passed on to it. Its stderr is passed through to the
  sweep's as it comes, and kept to say why it failed.
- `run_in_process(main, argv)`: the same through the CLI's `main` in this
  process; a bug's exception is printed with its traceback and counts as the
  point failing, so the sweep goes on.
- `adopt(name, workdir)`: a rerun finds the point's run lock held by a live
  process (one an earlier sweep left running, say on a machine without the
  parent-death signal, or one saving after a SIGTERM) and waits for it, rather
  than starting a second trainer that the lock would refuse, which would count
  as failed.
- A failed point's reason (`why_failed`): its one-line error (`ift-jax train:
  error: ...`), else the last line it wrote, else how it died.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Optional

from ift_jax import run_lock

ADOPT_POLL_S = 5.0  # How often a rerun looks whether a point it adopted is still running.


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a point's run ended: `done`, `failed` (with the reason) or `stopped`."""
    status: str
    reason: str = ""
    exit_code: Optional[int] = None


def run(name: str, argv: list[str],
        in_process: Optional[Callable[[list[str]], int]] = None) -> Outcome:
    """Runs the point's `ift-jax train` argv: `run_point`, or `run_in_process` with
    `in_process` (the CLI's `main`)."""
    print(f"sweep point {name}: {shlex.join(argv)}", flush=True)
    if in_process:
        return run_in_process(in_process, argv[1:])
    code, stopped, reason = run_point([sys.executable, "-m", "ift_jax", *argv[1:]])
    if stopped:
        return Outcome("stopped", exit_code=code)
    return Outcome("failed" if code else "done", reason, code)


def adopt(name: str, workdir: str, poll_s: Optional[float] = None) -> bool:
    """Waits while a live process holds the point's run lock (an earlier sweep's run
    of it, still going); returns whether there was one."""
    holder = run_lock.live_holder(workdir)
    if holder is None:
        return False
    print(f"sweep point {name}: still running from an earlier launch ({holder.host}, pid "
          f"{holder.pid}); waiting for it to end", flush=True)
    while run_lock.live_holder(workdir) is not None:
        time.sleep(ADOPT_POLL_S if poll_s is None else poll_s)
    return True


def run_in_process(main: Callable[[list[str]], int], argv: list[str]) -> Outcome:
    """One point through the CLI's `main` in this process; its last error line (or the
    exception of a bug, whose traceback is printed) is the reason it failed."""
    seen = _Tee(sys.stderr)
    try:
        with contextlib.redirect_stderr(seen):
            code = main(argv)
    except Exception as e:  # A bug in the point (ours or a user's task): the sweep goes on.
        traceback.print_exc()
        return Outcome("failed", f"{type(e).__name__}: {e}".splitlines()[0], 1)
    return Outcome("failed" if code else "done", why_failed(seen.text(), code) if code else "",
                   code)


class _Tee(io.TextIOBase):
    """A stream that writes through to `stream` and keeps the last lines written."""

    def __init__(self, stream, keep: int = 200):
        self.stream, self.keep, self.lines = stream, keep, [""]

    def write(self, text: str) -> int:
        self.stream.write(text)
        *done, self.lines[-1] = (self.lines[-1] + text).split("\n")
        self.lines[-1:-1] = done
        del self.lines[:-self.keep]
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def text(self) -> str:
        return "\n".join(self.lines)


_ERROR_LINE = re.compile(r"ift-jax \w+: error: (.*)")


def why_failed(stderr: str, code: int) -> str:
    """Why a point failed: its one-line error, else its last line, else its exit."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors_ = [m.group(1) for line in lines if (m := _ERROR_LINE.search(line))]
    if errors_:
        return errors_[-1]
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return lines[-1] if lines else f"exit code {code}"


SWEEP_PID_ENV = "IFT_JAX_SWEEP_PID"


def die_with_sweep() -> None:
    """In a point's process, first thing: when a sweep started it (`$IFT_JAX_SWEEP_PID`),
    SIGTERM it when the sweep dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG); the point
    then saves a checkpoint and exits. Processes it starts do not inherit the request."""
    sweep = os.environ.pop(SWEEP_PID_ENV, "")
    if not sweep.isdigit():
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG.
    except (OSError, AttributeError):
        return  # Not Linux: a rerun adopts an orphaned point instead.
    if os.getppid() != int(sweep):  # The sweep died before the line above: stop now.
        os.kill(os.getpid(), signal.SIGTERM)


def run_point(argv: list[str]) -> tuple[int, bool, str]:
    """Runs one point; SIGTERM/SIGINT are passed on to it (it checkpoints and exits)
    and end the sweep, and its process ends with the sweep's (`die_with_sweep`).
    Returns (exit code, whether a signal came, why it failed: see `why_failed`)."""
    stopped = []
    child = subprocess.Popen(argv, stderr=subprocess.PIPE,
                             env={**os.environ, SWEEP_PID_ENV: str(os.getpid())})
    tail = _Tee(sys.stderr)
    copier = threading.Thread(target=_copy_lines, args=(child.stderr, tail), daemon=True)
    copier.start()

    def forward(signum, frame):
        stopped.append(signum)
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    copier.join()
    return code, bool(stopped), why_failed(tail.text(), code) if code else ""


def _copy_lines(source, sink: _Tee) -> None:
    """The point's stderr, passed on as it comes (progress lines redraw with `\\r`)."""
    while chunk := source.read1(65536) if hasattr(source, "read1") else source.read(65536):
        sink.write(chunk.decode("utf-8", errors="replace"))
        sink.flush()



