"""Workdir files through etils.epath (the gs:// path), exercised on local disk."""

import json

import pytest

from ift_jax import evaluation, fileio, report


@pytest.fixture
def as_bucket(monkeypatch):
    """Every path takes the bucket branch (epath); epath serves local paths too."""
    monkeypatch.setattr(fileio, "is_remote", lambda path: True)


def test_bucket_branch_reads_writes_lists_moves_and_appends(tmp_path, as_bucket):
    root = str(tmp_path / "run" / "eval")
    fileio.makedirs(root)
    assert fileio.isdir(root) and not fileio.exists(f"{root}/a.json")
    fileio.write_text(f"{root}/a.tmp", "{}")
    fileio.replace(f"{root}/a.tmp", f"{root}/a.json")
    assert fileio.listdir(root) == ["a.json"]
    fileio.append_text(f"{root}/log.jsonl", "1\n")
    fileio.append_text(f"{root}/log.jsonl", "2\n")  # Read and rewritten whole.
    with fileio.open(f"{root}/log.jsonl") as f:
        assert f.read() == "1\n2\n"
    with fileio.open(f"{root}/blob", "wb") as f:
        f.write(b"\x89PNG")
    assert (tmp_path / "run" / "eval" / "blob").read_bytes() == b"\x89PNG"


def test_eval_files_and_tables_through_the_bucket_branch(tmp_path, as_bucket):
    workdir = str(tmp_path / "run")
    evaluation.write_step(workdir, 0, {"t": {"accuracy": 50.0}}, {"t": [{"prediction": "x"}]},
                          guard_tasks=["t"])
    evaluation.write_step(workdir, 10, {"t": {"accuracy": 40.0}}, {"t": []}, guard_tasks=["t"])
    assert evaluation.finished_steps(workdir) == [0, 10]
    csv_path, md_path = report.write_tables(workdir)
    assert "step 10" in open(md_path).read()
    assert report.forgetting(workdir)["deltas"][10]["t"]["accuracy"] == -10.0
    assert json.loads((tmp_path / "run" / "eval" / "step_0.json").read_text())["step"] == 0
