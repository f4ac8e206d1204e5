"""Local data files read as records, and deterministic train/validation/test splits.

`read_records` reads `.jsonl`, `.csv` and `.tsv` into a list of dicts and turns
every problem with the file (missing, empty, not UTF-8, malformed line, ragged row)
into a one-line `DataFileError` naming the file and, where there is one, the line.

`split_of` assigns an example to a split from a sha256 of its id, so the same id
lands in the same split in every process and on every run with the same seed;
`split_records` applies it to a whole list.

Pure Python: nothing here imports tensorflow, seqio or jax.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping

from ift_jax import errors
from ift_jax import fileio

_JSON_TYPE_NAMES = {list: "an array", str: "a string", int: "a number", float: "a number",
                    bool: "a boolean", type(None): "null"}


class DataFileError(errors.DataError):
    """A data file that is missing or cannot be read as records."""


# --- reading ---------------------------------------------------------------------------


class NotUtf8(ValueError):
    """Bytes that are not UTF-8: the line of the first bad byte and what is wrong there."""

    def __init__(self, line: int, problem: str):
        super().__init__(f"line {line}: {problem}")
        self.line, self.problem = line, problem


def decode_utf8(data: bytes) -> str:
    """`data` decoded as UTF-8, a leading byte-order mark dropped.

    Raises:
      NotUtf8: naming the line and byte (and UTF-16, which is what Windows tools
        write as "Unicode").
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        hint = ""
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            hint = "; it looks like UTF-16, re-save it as UTF-8"
        raise NotUtf8(data[:exc.start].count(b"\n") + 1,
                      f"not UTF-8 (byte 0x{data[exc.start]:02x}){hint}") from None


def _read_text(path: str) -> str:
    """The file's text, decoded as UTF-8 (a leading byte-order mark is dropped)."""
    try:
        with fileio.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataFileError(f"{path}: is a directory, not a data file") from None
    try:
        return decode_utf8(data)
    except NotUtf8 as exc:
        raise DataFileError(f"{path}: {exc}") from None


def _read_jsonl(path: str, text: str) -> list[dict]:
    records = []
    # Split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}: line {number}: malformed JSON: {exc.msg} "
                                f"(column {exc.colno})") from None
        if not isinstance(value, dict):
            kind = _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
            raise DataFileError(f"{path}: line {number}: expected a JSON object, "
                                f"got {kind}")
        records.append(value)
    return records


def _rows_with_line_numbers(path: str, reader) -> Iterable[tuple[int, list[str]]]:
    """Non-blank rows, each with the line it starts on (quoted fields may span lines)."""
    start = 1
    try:
        for row in reader:
            if row:
                yield start, row
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataFileError(f"{path}: line {start}: {exc}") from None


def _read_delimited(path: str, text: str, delimiter: str, quoting: int) -> list[dict]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    rows = _rows_with_line_numbers(path, reader)
    header = next(rows, (0, None))[1]
    if header is None:
        return []
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataFileError(f"{path}: header repeats column(s): {', '.join(duplicates)}")
    records = []
    for number, row in rows:
        if len(row) != len(header):
            raise DataFileError(f"{path}: line {number}: {len(row)} columns, but the "
                                f"header has {len(header)}")
        records.append(dict(zip(header, row)))
    return records


def _read_csv(path: str, text: str) -> list[dict]:
    return _read_delimited(path, text, ",", csv.QUOTE_MINIMAL)


def _read_tsv(path: str, text: str) -> list[dict]:
    # Quotes are literal text in TSV exports (GLUE, spreadsheet "tab-separated values"):
    # with csv quoting on, a field starting with '"' would swallow tabs and lines.
    return _read_delimited(path, text, "\t", csv.QUOTE_NONE)


_READERS: dict[str, Callable[[str, str], list[dict]]] = {
    ".jsonl": _read_jsonl,
    ".csv": _read_csv,
    ".tsv": _read_tsv,
}


def read_records(path: str) -> list[dict]:
    """Reads a local data file into records, one dict per example.

    Args:
      path: a `.jsonl` file (one JSON object per line, blank lines skipped) or a
        `.csv` / `.tsv` file whose header row names the fields (values stay strings).

    Returns:
      The records in file order.

    Raises:
      DataFileError: the suffix is unsupported, or the file is missing, empty,
        not UTF-8, or has a malformed line; the message names the file and line.
    """
    suffix = os.path.splitext(path)[1].lower()
    reader = _READERS.get(suffix)
    if reader is None:
        raise DataFileError(f"{path}: unsupported suffix {suffix!r}; supported: "
                            f"{', '.join(sorted(_READERS))}")
    records = reader(path, _read_text(path))
    if not records:
        raise DataFileError(f"{path}: is empty (no records)")
    return records


# --- splits ----------------------------------------------------------------------------


def _check_fractions(fractions: Mapping[str, float]) -> None:
    if not fractions:
        raise errors.ConfigError("split fractions are empty; give e.g. {'train': 0.9, "
                                 "'validation': 0.1}")
    negative = sorted(name for name, f in fractions.items() if f < 0)
    if negative:
        raise errors.ConfigError(f"split fractions must not be negative: {', '.join(negative)}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        listed = ", ".join(f"{name}={f}" for name, f in fractions.items())
        raise errors.ConfigError(f"split fractions must sum to 1, got {total:g} ({listed})")


def _unit_interval(seed: int, example_id: str) -> float:
    """sha256 of `f"{seed}:{example_id}"` mapped to [0, 1)."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _pick_split(u: float, fractions: Mapping[str, float]) -> str:
    cumulative = 0.0
    for name, fraction in fractions.items():
        cumulative += fraction
        if u < cumulative:
            return name
    # Rounding can leave the total a hair under 1; the last non-empty split takes it.
    return [name for name, fraction in fractions.items() if fraction > 0][-1]


def split_of(example_id: str, fractions: Mapping[str, float], seed: int = 0) -> str:
    """The split an example belongs to, deterministic in `(seed, example_id)`.

    Args:
      example_id: a stable id of the example.
      fractions: split name -> fraction, summing to 1; cumulative in mapping order.
      seed: changes the assignment as a whole.

    Raises:
      ValueError: the fractions are empty, negative, or do not sum to 1.
    """
    _check_fractions(fractions)
    return _pick_split(_unit_interval(seed, example_id), fractions)


def _record_id(record: Mapping, index: int, id_field: str | Callable[[dict], str]) -> str:
    if callable(id_field):
        return str(id_field(record))
    if id_field not in record:
        raise errors.DataError(f"record {index} has no id field {id_field!r}; it has fields: "
                               f"{', '.join(sorted(record)) or '(none)'}")
    return str(record[id_field])


def split_records(records: Iterable[dict], id_field: str | Callable[[dict], str],
                  fractions: Mapping[str, float], seed: int = 0) -> dict[str, list[dict]]:
    """Partitions records into splits by `split_of` on each record's id.

    Args:
      records: the records, e.g. from `read_records`.
      id_field: the field holding a unique id, or a function from record to id.
      fractions: split name -> fraction, summing to 1.
      seed: as in `split_of`.

    Returns:
      Split name -> records in input order; every split in `fractions` is a key.

    Raises:
      ValueError: bad fractions, a record without the id field, or a duplicate id.
    """
    _check_fractions(fractions)
    splits: dict[str, list[dict]] = {name: [] for name in fractions}
    first_seen: dict[str, int] = {}
    for index, record in enumerate(records):
        example_id = _record_id(record, index, id_field)
        if example_id in first_seen:
            raise errors.DataError(f"duplicate id {example_id!r} (records {first_seen[example_id]} "
                                   f"and {index})")
        first_seen[example_id] = index
        splits[_pick_split(_unit_interval(seed, example_id), fractions)].append(record)
    return splits
