"""What every launcher shares: checked names, config overrides, printing or running commands.

A command is always an argv list. It is run without a shell (`subprocess.run`)
or printed with `shlex.join`, so a value from a config or the command line is
one literal argument whatever characters it holds. Stdlib only: the launchers
run on a laptop that has no jax.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from typing import Callable, Sequence

# run(argv, capture) -> (exit status, stdout if captured else "").
Runner = Callable[[Sequence[str], bool], "tuple[int, str]"]

_CONFIG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# What says a job is done: ift-jax exits 0 after SIGTERM too (it saved a checkpoint and
# stopped early), so the exit status is not enough. Each reads the file on stdin and exits 0
# only for a finished run: `summary.json` with `"finished": true` (train), or a
# `sweep_summary.csv` whose points all have status `finished` (sweep).
FINISHED_FILES = {"train": "summary.json", "sweep": "sweep_summary.csv"}
_FINISHED_CHECKS = {
    "train": 'import json, sys; sys.exit(0 if json.load(sys.stdin).get("finished") is True '
             'else 1)',
    "sweep": 'import csv, sys; rows = list(csv.DictReader(sys.stdin)); '
             'sys.exit(0 if rows and all(r.get("status") == "finished" for r in rows) else 1)',
}


def finished_check(kind: str) -> str:
    """Shell: `python3 -c CHECK` for a job kind, reading the finished file on stdin
    (exit 1 also when the file is missing, empty or malformed)."""
    return f"python3 -c {shlex.quote(_FINISHED_CHECKS[kind])} 2>/dev/null"


def check(value: str, pattern: str, what: str, example: str) -> str:
    """Returns `value` if it fully matches `pattern`; else raises naming the fix."""
    if not re.fullmatch(pattern, value or ""):
        raise ValueError(f"invalid {what} {value!r}: expected something like {example!r}")
    return value


def override_args(settings: Sequence[str]) -> list[str]:
    """`["train.steps=100", ...]` -> `["--config.train.steps=100", ...]`; values stay as given."""
    args = []
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not _CONFIG_KEY.fullmatch(key):
            raise ValueError(f"--set {setting!r}: expected KEY=VALUE with a dotted config key, "
                             "e.g. --set train.steps=1000")
        args.append(f"--config.{key}={value}")
    return args


def env_assignments(settings: Sequence[str]) -> list[str]:
    """Checks `NAME=VALUE` environment settings and returns them unchanged."""
    for setting in settings:
        name, sep, _ = setting.partition("=")
        if not sep or not _ENV_NAME.fullmatch(name):
            raise ValueError(f"--env {setting!r}: expected NAME=VALUE, e.g. "
                             "--env IFT_JAX_DATA_DIR=gs://bucket/data")
    return list(settings)


def print_commands(commands: Sequence[Sequence[str]]) -> None:
    """Prints each argv as one copy-pasteable shell line."""
    for argv in commands:
        print(shlex.join(argv))


def run_command(argv: Sequence[str], capture: bool = False) -> "tuple[int, str]":
    """The real `Runner`: echoes the command to stderr, runs it without a shell."""
    print(f"+ {shlex.join(argv)}", file=sys.stderr, flush=True)
    result = subprocess.run(list(argv), check=False, text=True,
                            stdout=subprocess.PIPE if capture else None)
    return result.returncode, result.stdout or ""


def run_all(commands: Sequence[Sequence[str]], run: Runner = run_command) -> int:
    """Runs commands in order and stops at the first failure; returns its exit status."""
    for argv in commands:
        status, _ = run(argv, False)
        if status != 0:
            print(f"failed (exit {status}): {shlex.join(argv)}", file=sys.stderr)
            return status
    return 0
