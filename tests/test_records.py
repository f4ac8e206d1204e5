"""Reading local data files as records, and deterministic splits."""

import json

import pytest

from ift_jax.data.records import DataFileError, read_records, split_of, split_records

FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}


def _write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def test_reads_jsonl_skipping_blank_lines(tmp_path):
    path = _write(tmp_path, "d.jsonl",
                  '{"id": 1, "text": "a\u2028b"}\n\n  \n{"id": 2, "text": "c"}\r\n')
    assert read_records(path) == [{"id": 1, "text": "a\u2028b"}, {"id": 2, "text": "c"}]


def test_reads_csv_with_quoted_commas_and_newlines(tmp_path):
    path = _write(tmp_path, "d.csv", 'id,text\r\n1,"a, b"\r\n2,"line1\nline2"\r\n')
    assert read_records(path) == [{"id": "1", "text": "a, b"},
                                  {"id": "2", "text": "line1\nline2"}]


def test_reads_tsv_with_literal_quotes(tmp_path):
    path = _write(tmp_path, "d.tsv", 'sentence\tlabel\n"hi, " she said\t1\nok\t0\n')
    assert read_records(path) == [{"sentence": '"hi, " she said', "label": "1"},
                                  {"sentence": "ok", "label": "0"}]


def test_drops_utf8_byte_order_mark(tmp_path):
    path = _write(tmp_path, "d.csv", b"\xef\xbb\xbfid,text\n1,x\n")
    assert read_records(path) == [{"id": "1", "text": "x"}]


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataFileError, match=f"{path}: no such file"):
        read_records(path)


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.jsonl", "\n\n"),
                                          ("e.csv", ""), ("e.tsv", "id\ttext\n")])
def test_empty_file(tmp_path, name, content):
    path = _write(tmp_path, name, content)
    with pytest.raises(DataFileError, match=f"{path}: is empty"):
        read_records(path)


def test_unsupported_suffix_lists_supported(tmp_path):
    path = _write(tmp_path, "d.parquet", "x")
    with pytest.raises(DataFileError, match=r"'\.parquet'; supported: \.csv, \.jsonl, \.tsv"):
        read_records(path)


def test_not_utf8_names_line(tmp_path):
    path = _write(tmp_path, "d.jsonl", b'{"a": 1}\n{"a": "\xff\xfe"}\n')
    with pytest.raises(DataFileError, match=f"{path}: line 2: not UTF-8 \\(byte 0xff\\)"):
        read_records(path)


def test_utf16_file_gets_a_hint(tmp_path):
    path = _write(tmp_path, "d.csv", "id,text\n1,x\n".encode("utf-16"))
    with pytest.raises(DataFileError, match="line 1: not UTF-8.*looks like UTF-16"):
        read_records(path)


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write(tmp_path, "d.jsonl", '{"a": 1}\n{"a": 2}\n{"a": 3,,}\n{"a": 4}\n')
    with pytest.raises(DataFileError) as info:
        read_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line 3: malformed JSON: ")
    assert "Expecting property name" in message and "\n" not in message


def test_json_line_that_is_not_an_object(tmp_path):
    path = _write(tmp_path, "d.jsonl", '{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataFileError, match=f"{path}: line 2: expected a JSON object, "
                                            f"got an array"):
        read_records(path)


def test_ragged_csv_row_names_line(tmp_path):
    path = _write(tmp_path, "d.csv", 'id,text\n1,"two\nlines"\n2,x,extra\n')
    with pytest.raises(DataFileError, match=f"{path}: line 4: 3 columns, but the header has 2"):
        read_records(path)


def test_ragged_tsv_row_names_line(tmp_path):
    path = _write(tmp_path, "d.tsv", "id\ttext\n1\tx\n2\n")
    with pytest.raises(DataFileError, match=f"{path}: line 3: 1 columns, but the header has 2"):
        read_records(path)


def test_repeated_header_column(tmp_path):
    path = _write(tmp_path, "d.csv", "id,text,id\n1,x,2\n")
    with pytest.raises(DataFileError, match="header repeats column\\(s\\): id"):
        read_records(path)


def test_split_of_is_deterministic_and_seeded():
    ids = [f"ex-{i}" for i in range(200)]
    first = [split_of(i, FRACTIONS) for i in ids]
    assert first == [split_of(i, FRACTIONS, seed=0) for i in ids]
    assert first != [split_of(i, FRACTIONS, seed=1) for i in ids]


def test_split_of_pinned_values():
    # Pins the hash scheme: changing it would silently move examples between splits.
    # sha256("0:0") starts 0xac72..., i.e. 0.674 in [0, 1): past "a" (0.5), so "b".
    assert [split_of(str(i), {"a": 0.5, "b": 0.5}) for i in range(12)] == list("bbbaabbabaab")
    assert split_of("0", {"a": 0.67, "b": 0.33}) == "b"
    assert split_of("0", {"a": 0.68, "b": 0.32}) == "a"
    assert split_of("x", {"only": 1.0}) == "only"
    assert split_of("x", {"never": 0.0, "always": 1.0}) == "always"


def test_split_of_proportions_follow_fractions():
    counts = dict.fromkeys(FRACTIONS, 0)
    for i in range(10_000):
        counts[split_of(str(i), FRACTIONS, seed=7)] += 1
    for name, fraction in FRACTIONS.items():
        assert abs(counts[name] / 10_000 - fraction) < 0.02, (name, counts)


def test_split_of_rejects_fractions_not_summing_to_one():
    with pytest.raises(ValueError, match="must sum to 1, got 0.9 \\(train=0.8, test=0.1\\)"):
        split_of("x", {"train": 0.8, "test": 0.1})


def test_split_records_partitions_records():
    records = [{"id": i, "text": str(i)} for i in range(500)]
    splits = split_records(records, "id", FRACTIONS, seed=3)
    assert list(splits) == ["train", "validation", "test"]
    seen = [r["id"] for split in splits.values() for r in split]
    assert sorted(seen) == list(range(500))
    for name, split in splits.items():
        assert split and all(split_of(str(r["id"]), FRACTIONS, seed=3) == name for r in split)


def test_split_records_with_id_function():
    records = [{"q": f"question {i}"} for i in range(50)]
    splits = split_records(records, lambda r: json.dumps(r, sort_keys=True), FRACTIONS)
    assert sum(len(s) for s in splits.values()) == 50


def test_split_records_missing_id_field_lists_fields():
    with pytest.raises(ValueError, match="record 1 has no id field 'id'; it has fields: "
                                         "question, uid"):
        split_records([{"id": 1}, {"uid": 2, "question": "q"}], "id", FRACTIONS)


def test_split_records_duplicate_id_is_named():
    with pytest.raises(ValueError, match="duplicate id 'a7' \\(records 0 and 2\\)"):
        split_records([{"id": "a7"}, {"id": "b"}, {"id": "a7"}], "id", FRACTIONS)
