"""The console filter: library start-up noise out, everything else (ours, errors) through."""

import os
import subprocess
import sys

import pytest

from ift_jax import console

CUDA_INFO = (b"I0000 00:00:1796002920.668925    6774 cudart_stub.cc:31] Could not find cuda "
             b"drivers on your machine, GPU will not be used.")
CUINIT = (b"E0000 00:00:1796002929.721362    6774 cuda_platform.cc:52] failed call to cuInit: "
          b"INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)")
BANNER = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
TF_WARNING = (b"W0000 00:00:1796004257.160116   16406 cache_dataset_ops.cc:912] The calling "
              b"iterator did not fully read the dataset being cached.")
REAL_ERROR = b"E1130 02:05:38.973000   17340 bfc_allocator.cc:485] Allocator ran out of memory"
FATAL = b"F0000 00:00:1796004257.160116   16406 check.cc:1] Check failed: x == y"


@pytest.mark.parametrize("line, level, noise", [
    (CUDA_INFO, 2, True), (CUINIT, 2, True), (BANNER, 2, True), (TF_WARNING, 2, True),
    (REAL_ERROR, 2, False), (FATAL, 2, False), (FATAL, 3, False), (REAL_ERROR, 3, True),
    (TF_WARNING, 0, False), (CUINIT, 0, True),  # A probe's error is noise at any level.
    (b"2026-11-30 02:05:38,973 start-up: from scratch", 2, False),
    (b"step 1/1  loss 6.6017", 2, False),
    (b"Traceback (most recent call last):", 2, False),
])
def test_noise_is_library_start_up_lines_only(line, level, noise):
    assert console.is_noise(line, level) == noise


def test_filter_drops_noise_split_across_reads_and_passes_partial_lines_at_once():
    stream = (CUDA_INFO + b"\n" + b"ours 1\n" + TF_WARNING + b"\n" + REAL_ERROR + b"\n"
              + b"\rbar 10%")
    written = []
    # Reads of 7 bytes: lines arrive in pieces, as from a pipe.
    chunks = [stream[i:i + 7] for i in range(0, len(stream), 7)]
    console.filter_lines(lambda n: chunks.pop(0) if chunks else b"", written.append)
    assert b"".join(written) == b"ours 1\n" + REAL_ERROR + b"\n" + b"\rbar 10%"
    partial = []
    pieces = [b"\rbar 10%", b"\rbar 20%"]
    console.filter_lines(lambda n: pieces.pop(0) if pieces else b"", partial.append)
    assert partial == [b"\rbar 10%", b"\rbar 20%"]  # Not held back until a newline.


PROGRAM = f"""
import os, sys
from ift_jax import console
argv = sys.argv[1:]
console.quiet(console.verbose_requested(argv))
print("argv", argv, file=sys.stderr, flush=True)
for line in {[CUDA_INFO, BANNER, CUINIT, REAL_ERROR]!r}:
    os.write(2, line + b"\\n")
"""


def _run(*args, env=None):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("TF_CPP_MIN_LOG_LEVEL", console.VERBOSE_ENV)}
    return subprocess.run([sys.executable, "-c", PROGRAM, *args], capture_output=True,
                          env={**full_env, **(env or {})}, check=True)


def test_a_process_keeps_its_own_lines_and_real_errors_only():
    err = _run("x").stderr.decode()
    assert err.splitlines() == ["argv ['x']", REAL_ERROR.decode()]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_verbose_keeps_everything(how):
    result = _run("--verbose") if how == "flag" else _run(env={console.VERBOSE_ENV: "1"})
    lines = result.stderr.splitlines()
    assert [CUDA_INFO, BANNER, CUINIT, REAL_ERROR] == lines[1:]
    assert lines[0] == b"argv []"  # --verbose is taken out of the command line.
