"""The files a user hands `ift-jax predict` and `ift-jax score`: rows in, results out.

`read_rows(path, fields)` reads a JSONL file whose every line is an object with a
string for each of `fields`, decoded as UTF-8 (a leading byte-order mark is
dropped), and turns every problem into one `InputFileError` line naming the
file and line: a byte that is not UTF-8 (UTF-16, which Windows tools write as
"Unicode", is named as such), a line that is not JSON, a row without the fields.

`check_output(output, input_path)` looks before anything is computed, and
`write_rows` writes the results (or prints them): results are never written over
the input, over a file of a training run's record
(`config.json`, `summary.json`, `eval/`, `checkpoints/`, ...: the files
`ift-jax train` writes into its workdir), or into a folder this user cannot
write. A new file beside a run's own files is fine.

Pure Python: nothing here imports jax, TensorFlow or seqio.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Optional

from ift_jax import errors, fileio
from ift_jax.data import records

# What `ift-jax train` writes into a workdir (docs/design.md, "The workdir").
RUN_RECORD = ("config.json", "config_changes.jsonl", "model-info.txt", "run.lock",
              "train_metrics.jsonl", "best_checkpoint.json", "summary.json", "checkpoints",
              "checkpoints_damaged", "data_position", "tb", "eval", "predictions", "report")


def read_rows(path: str, fields: Sequence[str] = ("inputs",),
              check: Optional[Callable[[dict], Optional[str]]] = None) -> list[dict]:
    """Rows of a JSONL file, each an object with a string value for each of `fields`
    (other keys are kept as they are) that `check` (if given) finds no fault in.

    Raises:
      InputFileError: naming the file and line of a row that is not UTF-8, not JSON or
        not such an object, or `check`'s message for it.
    """
    try:
        with fileio.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise errors.InputFileError(f"--input={path}: no such file") from None
    except IsADirectoryError:
        raise errors.InputFileError(f"--input={path} is a folder; give a JSONL file") from None
    try:
        text = records.decode_utf8(data)
    except records.NotUtf8 as e:
        raise errors.InputFileError(f"{path}:{e.line}: {e.problem}") from None
    rows = []
    # Split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings.
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            rows.append(_row(path, number, line, fields, check))
    if not rows:
        raise errors.InputFileError(f"{path}: no rows; give one JSON object per line")
    return rows


def _row(path: str, number: int, line: str, fields: Sequence[str],
         check: Optional[Callable[[dict], Optional[str]]]) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise errors.InputFileError(f"{path}:{number}: not JSON ({e.msg})") from None
    missing = [k for k in fields if not isinstance(row, dict) or not isinstance(row.get(k), str)]
    if missing:
        raise errors.InputFileError(f"{path}:{number}: {_row_format(fields, missing)}")
    fault = check(row) if check else None
    if fault:
        raise errors.InputFileError(f"{path}:{number}: {fault}")
    return row


def _row_format(fields: Sequence[str], missing: Sequence[str]) -> str:
    example = json.dumps({k: ("Summarize: ..." if k == "inputs" else "...") for k in fields})
    if len(fields) == 1:
        return f"each line must be an object with a string '{fields[0]}' field, e.g. {example}"
    names = ", ".join(f"'{k}'" for k in fields)
    lacking = ", ".join(f"'{k}'" for k in missing)
    return (f"each line must be an object with string fields {names} (this one lacks "
            f"{lacking}), e.g. {example}")


def _is_run(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json")) and any(
        os.path.exists(os.path.join(folder, name))
        for name in ("checkpoints", "train_metrics.jsonl", "summary.json", "run.lock"))


def _run_holding(path: str) -> Optional[tuple[str, str]]:
    """(workdir, first part of `path` below it) of the training run `path` lies in."""
    below = []
    folder = os.path.dirname(path)
    while True:
        if _is_run(folder):
            return folder, below[-1] if below else os.path.basename(path)
        below.append(os.path.basename(folder))
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def check_output(output: Optional[str], input_path: str) -> None:
    """Refuses an `--output` that would overwrite the input or a training run's record,
    or whose folder cannot be written (see the module docstring); None (stdout) is fine.

    Raises:
      ConfigError: one line naming the path and the fix.
    """
    if not output or fileio.is_remote(output):
        return
    path = os.path.realpath(output)
    if os.path.exists(input_path) and path == os.path.realpath(input_path):
        raise errors.ConfigError(f"--output={output} is the --input file; write the results "
                                 f"to another file")
    if os.path.isdir(path):
        raise errors.ConfigError(f"--output={output} is a folder; give a file name, e.g. "
                                 f"{os.path.join(output, 'rows.jsonl')}")
    held = _run_holding(path)
    if held and (held[1] in RUN_RECORD or held[1].startswith("start_over-")):
        raise errors.ConfigError(
            f"--output={output} would overwrite {held[1]} of the training run in {held[0]}; "
            f"give a file outside the run's own files")
    folder = os.path.dirname(path)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    if not os.access(folder, os.W_OK):
        raise errors.ConfigError(f"--output={output}: {folder} is not writable; give a file "
                                 f"in a folder this user can write to")


def write_rows(rows: Sequence[dict], output: Optional[str], what: str, note: str = "") -> None:
    """JSONL rows to `output` (its folder made; saying `wrote N <what> to ...<note>`), or
    to stdout without `output`."""
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    if not output:
        sys.stdout.writelines(lines)
        return
    fileio.makedirs(os.path.dirname(output) or ".")
    with fileio.open(output, "w") as f:
        f.writelines(lines)
    print(f"wrote {len(rows)} {what} to {output}{note}")
