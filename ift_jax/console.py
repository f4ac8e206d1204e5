"""What `ift-jax` prints: its own lines, without the start-up noise of the libraries below.

On a machine without a TPU or GPU, TensorFlow (SeqIO's tf.data), XLA and absl
announce what they did not find, some of it at ERROR level, before the first
loss: "Unable to initialize backend 'tpu'", "Could not find cuda drivers",
"failed call to cuInit", "All log messages before absl::InitializeLog() is
called are written to STDERR". Nothing is wrong, and a newcomer should not
have to learn that. `quiet(verbose)` runs before those libraries load:

- Python loggers: `jax` and `absl` at WARNING, `tensorflow` at ERROR (the TPU
  probe is an INFO line of jax's); orbax's own ERROR reports (a failed
  background save logs its traceback from each of its threads, ~300 lines)
  are dropped: every orbax failure reaches ift_jax as an exception, which
  says it in one line (`checkpointing.SaveFailedError`), and its note that a
  checkpoint folder opened read-only (eval, predict, score, export) is read-only;
  so are the
  "Event loop is closed" reports of TensorStore writes that finish after
  orbax gave up a failed save (`sys.unraisablehook`) and asyncio's "exception
  was never retrieved" reports of that abandoned work;
- `TF_CPP_MIN_LOG_LEVEL=2` (unless set): TensorFlow's own C++ INFO/WARNING;
- native stderr: written by C++ straight to file descriptor 2 (absl logs
  before its initialization ignore TF_CPP_MIN_LOG_LEVEL), so fd 2 is routed
  through a small filter process (`console._filter_main`) that applies
  TF_CPP_MIN_LOG_LEVEL to every absl/glog-format line (by default: INFO and
  WARNING dropped, ERROR and FATAL kept), drops the absl banner, and drops the
  WARNING/ERROR lines of the CUDA/TensorRT/oneDNN start-up probes
  (`NATIVE_PROBES`: "failed call to cuInit" on a machine without a GPU). Every
  other line passes unchanged; FATAL always. A separate process, not a thread,
  so a crash of the main process still gets its last lines out.

`--verbose` (any command) or `IFT_JAX_VERBOSE=1` keeps everything: no filter,
the libraries' loggers at INFO.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from typing import Callable, Optional

VERBOSE_ENV = "IFT_JAX_VERBOSE"
VERBOSE_FLAG = "--verbose"
LOG_FORMAT = "%(asctime)s %(message)s"

_ABSL_BANNER = re.compile(
    rb"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    rb"STDERR\s*$")
# absl / glog C++ log lines: "E0000 00:00:1796002929.721362    6774 cuda_platform.cc:52] ..."
_NATIVE_LOG = re.compile(rb"^([IWEF])\d{4} [\d:.]+\s+\d+ [^\]]*\] ?(.*)$")
_SEVERITIES = b"IWEF"
# WARNING / ERROR lines that only report a hardware or library probe that found nothing.
NATIVE_PROBES = re.compile(
    rb"cuInit|Could not find cuda drivers|Unable to register cu(DNN|FFT|BLAS) factory|"
    rb"TF-TRT|TensorRT|oneDNN custom operations|computation placer already registered")
# A partial line that may still become a noise line once the rest arrives.
_NOISE_START = re.compile(rb"^(W(A(R(N(I(N(G(:.*)?)?)?)?)?)?)?|[IWE](\d{1,3}|\d{4}( .*)?)?)$",
                          re.S)


def is_verbose() -> bool:
    """Whether `$IFT_JAX_VERBOSE` asks for the libraries' logging."""
    return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


def verbose_requested(argv: list[str]) -> bool:
    """Whether `--verbose` is in argv (removed from it, and remembered in
    `$IFT_JAX_VERBOSE` for the processes a sweep starts) or the variable is set."""
    if VERBOSE_FLAG in argv:
        os.environ[VERBOSE_ENV] = "1"
    argv[:] = [arg for arg in argv if arg != VERBOSE_FLAG]
    return is_verbose()


def native_min_level() -> int:
    """`$TF_CPP_MIN_LOG_LEVEL` (0 all, 1 no INFO, 2 no WARNING, 3 no ERROR); default 2."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    except ValueError:
        return 2


def is_noise(line: bytes, min_level: int = 2) -> bool:
    """Whether a complete stderr line is library noise (see module docstring)."""
    line = line.rstrip(b"\r\n")
    if _ABSL_BANNER.match(line):
        return True
    native = _NATIVE_LOG.match(line)
    if native is None:
        return False
    severity = _SEVERITIES.index(native.group(1))
    if severity == 3:  # FATAL: always shown.
        return False
    return severity < min_level or (severity < 3 and bool(NATIVE_PROBES.search(native.group(2))))


def quiet_libraries(verbose: bool) -> None:
    """Logger levels and environment for the libraries (no file descriptors touched)."""
    if verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")  # jax's import would set 1.
        for name in ("jax", "absl", "tensorflow"):
            logging.getLogger(name).setLevel(logging.INFO)
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("jax").setLevel(logging.WARNING)
    absl = logging.getLogger("absl")
    absl.setLevel(logging.WARNING)  # orbax and seqio chatter.
    for noise in (_OrbaxErrorReports, _OrbaxReadOnlyNote):
        if not any(isinstance(f, noise) for f in absl.filters):
            absl.addFilter(noise())
    asyncio = logging.getLogger("asyncio")
    if not any(isinstance(f, _NeverRetrieved) for f in asyncio.filters):
        asyncio.addFilter(_NeverRetrieved())
    if not isinstance(sys.unraisablehook, _AbandonedWrites):
        sys.unraisablehook = _AbandonedWrites(sys.unraisablehook)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


class _OrbaxErrorReports(logging.Filter):
    """Drops orbax's ERROR records (it raises the same failure to its caller).

    absl's records carry absl's own file as `pathname`, so the caller is found
    on the stack (only for ERROR records, which are rare)."""

    _ORBAX = f"{os.sep}orbax{os.sep}"
    _LOGGING = (f"{os.sep}logging{os.sep}", f"{os.sep}absl{os.sep}")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        frame = sys._getframe(1)
        while frame is not None and any(p in frame.f_code.co_filename for p in self._LOGGING):
            frame = frame.f_back
        return frame is None or self._ORBAX not in frame.f_code.co_filename


class _OrbaxReadOnlyNote(logging.Filter):
    """Drops orbax's warning that a checkpoint folder opened read-only is read-only:
    ift_jax asks for that whenever it reads a run back."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


class _NeverRetrieved(logging.Filter):
    """Drops asyncio's "exception was never retrieved": work abandoned after a failure
    that was raised (and reported) where it mattered."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in str(record.msg)


class _AbandonedWrites:
    """`sys.unraisablehook` without the RuntimeError('Event loop is closed') that each
    TensorStore write still running when orbax abandons a failed save raises."""

    def __init__(self, hook: Callable):
        self.hook = hook

    def __call__(self, unraisable) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        self.hook(unraisable)


def setup_logging(verbose: bool) -> None:
    """INFO lines with a timestamp for ift_jax's own progress; libraries as `quiet_libraries`."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    quiet_libraries(verbose)


def filter_native_stderr() -> Optional[subprocess.Popen]:
    """Routes file descriptor 2 through the filter process; returns it (None if fd 2 is
    not open)."""
    try:
        original = os.dup(2)
    except OSError:
        return None
    read_end, write_end = os.pipe()
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    program = (f"import sys; sys.path.insert(0, {package_parent!r}); "
               "from ift_jax import console; console._filter_main()")
    child = subprocess.Popen([sys.executable, "-c", program], stdin=read_end,
                             stdout=original, stderr=subprocess.DEVNULL, close_fds=True)
    os.close(read_end)
    os.close(original)
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    return child


def quiet(verbose: bool, filter_stderr: bool = True) -> None:
    """Everything above: call before jax, TensorFlow or absl are imported."""
    quiet_libraries(verbose)
    if not verbose and filter_stderr:
        filter_native_stderr()


def filter_lines(read: Callable[[int], bytes], write: Callable[[bytes], None],
                 min_level: int = 2) -> None:
    """Copies `read` to `write` until EOF, dropping noise lines. A partial line is
    passed on at once (progress bars redraw with `\\r`) unless it may still turn
    into a noise line."""
    pending = b""
    while chunk := read(65536):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if not is_noise(line, min_level):
                write(line + b"\n")
        if pending and not _NOISE_START.match(pending):
            write(pending)
            pending = b""
    if pending and not is_noise(pending, min_level):
        write(pending)


def _filter_main() -> None:
    # The main process's last words (after Ctrl-C, SIGTERM) come after these signals.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    out = sys.stdout.buffer

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()

    try:
        filter_lines(lambda n: os.read(0, n), write, native_min_level())
    except BrokenPipeError:  # Nobody reads the original stderr any more.
        pass
