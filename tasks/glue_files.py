"""GLUE and SuperGLUE from their official file layouts, as records with TFDS's feature names.

`<data dir>/glue/<TASK>/{dev,train}.tsv` as GLUE's `download_glue_data.py`
writes them, and `<data dir>/super_glue/<TASK>/val.jsonl` as the SuperGLUE
zip holds them (see each folder's SOURCE.md). A reader per task turns a file
into records named and labelled as the TFDS builders (`glue/rte`,
`super_glue/cb`, ...) name them, so the same templates read local files and
TFDS alike:

- labels become TFDS's class indices (`"not_entailment"` -> 1, `True` -> 1,
  CB's `"neutral"` -> 2), STS-B's score a float;
- `idx` is the file's `index` column or `idx` key, else the row number;
- CoLA's TSV has no header (source, label, original mark, sentence);
- MultiRC's nested paragraphs become one record per answer option, with
  `group` = the question (`"<paragraph>-<question>"`) for its exact match, and
  the option's text as `response` (FLAN's name; TFDS calls it `answer`, which
  here is the label text the templates target).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Callable, Sequence

from ift_jax import fileio
from ift_jax.data import records

Reader = Callable[[str], list[dict]]

NLI2 = ("entailment", "not_entailment")  # TFDS order of RTE / QNLI labels.
CB_LABELS = ("entailment", "contradiction", "neutral")  # TFDS order of super_glue/cb.


@dataclasses.dataclass(frozen=True)
class LocalFiles:
    """Where a dataset's files are and how to read them.

    Attributes:
      subdir: `"glue"` or `"super_glue"`, under the data directory.
      files: split -> path under `subdir`, e.g. `{"validation": "RTE/dev.tsv"}`.
      reader: path -> records with TFDS's feature names.
    """

    subdir: str
    files: dict[str, str]
    reader: Reader


def _label_index(labels: Sequence[str], path: str) -> Callable[[object], int]:
    def index(value: object) -> int:
        if value not in labels:
            raise records.DataFileError(f"{path}: label {value!r} is not one of "
                                        f"{', '.join(labels)}")
        return labels.index(value)
    return index


def _int_label(value: object) -> int:
    return int(value)  # "0"/"1" in TSVs; booleans (True = 1) in SuperGLUE's jsonl.


def read_cola(path: str) -> list[dict]:
    """CoLA's headerless TSV: source, label, original mark, sentence."""
    with fileio.open(path) as f:
        rows = list(csv.reader(io.StringIO(f.read(), newline=""), delimiter="\t",
                               quoting=csv.QUOTE_NONE))
    out = []
    for number, row in enumerate(rows, 1):
        if len(row) != 4:
            raise records.DataFileError(f"{path}: line {number}: {len(row)} columns, CoLA "
                                        f"has 4 (source, label, mark, sentence)")
        out.append({"idx": number - 1, "sentence": row[3], "label": int(row[1])})
    return out


def tsv_reader(columns: dict[str, str], label_column: str,
               label: Callable[[str], Callable[[object], object]] | None = None) -> Reader:
    """A GLUE TSV with a header: `columns` maps file columns to TFDS names; the
    label is `label(path)(value)` (default: an int)."""

    def read(path: str) -> list[dict]:
        parse = label(path) if label else _int_label
        out = []
        for number, row in enumerate(records.read_records(path)):
            record = {name: row[column] for column, name in columns.items()}
            record["label"] = parse(row[label_column])
            record["idx"] = int(row.get("index", number))
            out.append(record)
        return out
    return read


def jsonl_reader(fields: Sequence[str],
                 label: Callable[[str], Callable[[object], object]] | None = None) -> Reader:
    """A SuperGLUE jsonl whose keys are TFDS's names; `label` as in `tsv_reader`."""

    def read(path: str) -> list[dict]:
        parse = label(path) if label else _int_label
        return [{**{k: row[k] for k in fields}, "label": parse(row["label"]),
                 "idx": row["idx"]} for row in records.read_records(path)]
    return read


def read_wsc(path: str) -> list[dict]:
    """WSC: the spans' texts come out of `target`, as TFDS flattens them."""
    return [{"text": row["text"], "span1_text": row["target"]["span1_text"],
             "span2_text": row["target"]["span2_text"], "label": int(row["label"]),
             "idx": row["idx"]} for row in records.read_records(path)]


def read_multirc(path: str) -> list[dict]:
    """MultiRC: one record per answer option, grouped by question."""
    out = []
    for row in records.read_records(path):
        passage = row["passage"]
        for question in passage["questions"]:
            group = f"{row['idx']}-{question['idx']}"
            for answer in question["answers"]:
                out.append({"paragraph": passage["text"], "question": question["question"],
                            "response": answer["text"], "label": int(answer["label"]),
                            "idx": f"{group}-{answer['idx']}", "group": group})
    return out


def _glue(folder: str, reader: Reader, train: bool = False) -> LocalFiles:
    files = {"validation": f"{folder}/dev.tsv"}
    if train:
        files["train"] = f"{folder}/train.tsv"
    return LocalFiles("glue", files, reader)


def _super_glue(folder: str, reader: Reader) -> LocalFiles:
    return LocalFiles("super_glue", {"validation": f"{folder}/val.jsonl"}, reader)


_PAIR = {"sentence1": "sentence1", "sentence2": "sentence2"}

# Dataset name (tasks/glue.py) -> its local files. Splits are the files present here
# (see SOURCE.md): GLUE dev everywhere, train for SST-2, MRPC, STS-B and RTE.
LOCAL = {
    "glue_cola": _glue("CoLA", read_cola),
    "glue_sst2": _glue("SST-2", tsv_reader({"sentence": "sentence"}, "label"), train=True),
    "glue_mrpc": _glue("MRPC", tsv_reader({"#1 String": "sentence1", "#2 String": "sentence2"},
                                          "Quality"), train=True),
    "glue_stsb": _glue("STS-B", tsv_reader(_PAIR, "score", lambda path: float), train=True),
    "glue_qnli": _glue("QNLI", tsv_reader({"question": "question", "sentence": "sentence"},
                                          "label", lambda path: _label_index(NLI2, path))),
    "glue_rte": _glue("RTE", tsv_reader(_PAIR, "label", lambda path: _label_index(NLI2, path)),
                      train=True),
    "glue_wnli": _glue("WNLI", tsv_reader(_PAIR, "label")),
    "super_glue_boolq": _super_glue("BoolQ", jsonl_reader(("passage", "question"))),
    "super_glue_cb": _super_glue("CB", jsonl_reader(
        ("premise", "hypothesis"), lambda path: _label_index(CB_LABELS, path))),
    "super_glue_copa": _super_glue("COPA", jsonl_reader(
        ("premise", "choice1", "choice2", "question"))),
    "super_glue_multirc": _super_glue("MultiRC", read_multirc),
    "super_glue_rte": _super_glue("RTE", jsonl_reader(
        ("premise", "hypothesis"), lambda path: _label_index(NLI2, path))),
    "super_glue_wic": _super_glue("WiC", jsonl_reader(("sentence1", "sentence2", "word"))),
    "super_glue_wsc": _super_glue("WSC", read_wsc),
}
