"""`ift-jax score`: the log-likelihood of given targets, equal to HF transformers' loss on
the same pairs, for a run's checkpoint and for an HF directory, on any mesh."""

import json

import numpy as np
import pytest

from ift_jax import cli, export, train
from hf_reference import make_hf_checkpoint
from test_train import tiny_config

ROWS = [
    {"inputs": "Is this review positive or negative? Great lamp.", "targets": "positive",
     "id": 7},
    {"inputs": "Translate to German: The house is small.", "targets": "Das Haus ist klein."},
    {"inputs": "Résumé : il pleut à Paris.", "targets": "Il pleut, à Paris, encore et encore."},
    {"inputs": "x" * 120 + " is longer than inputs_length", "targets": ""},
    {"inputs": "Q: 2+2?", "targets": "4"},
]
INPUTS_LENGTH = 96  # tiny_config's data.inputs_length.


def byte_ids(text):
    """seqio's ByteVocabulary: UTF-8 bytes + 3 (0 pad, 1 EOS, 2 unk)."""
    return [b + 3 for b in text.encode("utf-8")]


def hf_log_likelihoods(model, rows, inputs_length):
    """-loss x target tokens of transformers' own loss, one pair at a time."""
    import torch
    out = []
    for row in rows:
        enc = byte_ids(row["inputs"])[:inputs_length - 1] + [1]
        labels = byte_ids(row["targets"]) + [1]
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([enc]), labels=torch.tensor([labels])).loss
        out.append(-float(loss) * len(labels))
    return np.array(out)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("hf") / "model"
    # Room for the byte vocabulary; start and pad ids for transformers' loss from `labels`.
    _, reloaded = make_hf_checkpoint("v1_1", str(hf_dir), vocab_size=384,
                                     decoder_start_token_id=0, pad_token_id=0)
    return hf_dir, reloaded


@pytest.fixture(scope="module")
def sharded_run(hf_model, tmp_path_factory):
    """Two steps of fine-tuning `hf_model` on a (1, 4, 2) data/fsdp/tensor mesh."""
    config = tiny_config(steps=2)
    config.init_from = str(hf_model[0])
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
    config.eval.at_start = False
    config.eval.length_buckets = 1  # One padded shape per mesh: one compilation each.
    workdir = tmp_path_factory.mktemp("score") / "run"
    train.train_and_evaluate(config, str(workdir))
    return workdir


@pytest.fixture(scope="module")
def input_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS))
    return path


def score(tmp_path, *flags):
    out = tmp_path / f"scores_{len(list(tmp_path.iterdir()))}.jsonl"
    assert cli.main(["score", *flags, f"--output={out}"]) == 0
    return [json.loads(line) for line in out.open()]


def check_against(rows, want):
    got = np.array([r["log_likelihood"] for r in rows])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for row, source in zip(rows, ROWS):
        assert row["tokens"] == len(byte_ids(source["targets"])) + 1  # EOS counted.
        assert row["log_likelihood_per_token"] == pytest.approx(
            row["log_likelihood"] / row["tokens"])
        assert row["perplexity"] == pytest.approx(np.exp(-row["log_likelihood_per_token"]))
        assert 0 <= row["argmax_hits"] <= row["tokens"]
        assert {k: row[k] for k in source} == source  # Other fields kept.


def test_score_of_an_hf_directory_equals_transformers_loss(hf_model, input_file, tmp_path):
    hf_dir, reference = hf_model
    rows = score(tmp_path, f"--init_from={hf_dir}", "--vocab=byte", f"--input={input_file}",
                 f"--inputs_length={INPUTS_LENGTH}")
    check_against(rows, hf_log_likelihoods(reference, ROWS, INPUTS_LENGTH))
    assert [r.get("inputs_truncated", False) for r in rows] == [False] * 3 + [True, False]


def test_score_of_a_run_equals_transformers_loss_on_its_export_and_any_mesh(
        sharded_run, input_file, tmp_path, capsys):
    import transformers
    export.export_hf(str(sharded_run), str(tmp_path / "hf"))
    reference = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    want = hf_log_likelihoods(reference, ROWS, INPUTS_LENGTH)
    one = score(tmp_path, f"--workdir={sharded_run}", f"--input={input_file}", "--mesh=1,1,1")
    check_against(one, want)
    capsys.readouterr()
    sharded = score(tmp_path, f"--workdir={sharded_run}", f"--input={input_file}")  # 1x4x2
    assert "score step 2: 5/5 row (100%)" in capsys.readouterr().err  # Progress, on stderr.
    np.testing.assert_allclose([r["log_likelihood"] for r in sharded],
                               [r["log_likelihood"] for r in one], rtol=1e-5)
    assert [r["argmax_hits"] for r in sharded] == [r["argmax_hits"] for r in one]


@pytest.mark.parametrize("lines, message", [
    ('{"inputs": "a", "targets": "b"}\n{"inputs": "a"}\n',
     "pairs.jsonl:2: each line must be an object with string fields 'inputs', 'targets' "
     "(this one lacks 'targets')"),
    ('\n{"inputs": "a", "targets": "b"}\n{"inputs": "a", "targets": 3}\n', "pairs.jsonl:3: "),
    ('{"inputs": "a", "targets": "b"}\nnot json\n', "pairs.jsonl:2: not JSON"),
    ('["inputs", "targets"]\n', "pairs.jsonl:1: each line must be an object"),
    ("\n", "pairs.jsonl: no rows"),
    (b'{"inputs": "a", "targets": "b"}\n{"inputs": "caf\xe9", "targets": "b"}\n',
     "pairs.jsonl:2: not UTF-8 (byte 0xe9)"),
    ('{"inputs": "a", "targets": "b"}\n'.encode("utf-16"),
     "pairs.jsonl:1: not UTF-8 (byte 0xff); it looks like UTF-16, re-save it as UTF-8"),
])
def test_bad_input_lines_are_one_error_line_naming_file_and_line(lines, message, hf_model,
                                                                 tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(lines if isinstance(lines, bytes) else lines.encode())
    assert cli.main(["score", f"--init_from={hf_model[0]}", f"--input={path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ift-jax score: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    if "UTF" in message:  # predict reads its input the same way (a regression once).
        assert cli.main(["predict", f"--workdir={tmp_path / 'no_run'}", f"--input={path}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ift-jax predict: error: ") and message.replace(
            ', "targets": "b"', "") in err and len(err.strip().splitlines()) == 1


def test_results_never_overwrite_the_input_or_a_runs_record(sharded_run, input_file,
                                                           tmp_path, capsys):
    before = {p: p.read_bytes() for p in sharded_run.rglob("*") if p.is_file()}
    for output, message in [
            (sharded_run / "config.json", f"would overwrite config.json of the training run "
                                          f"in {sharded_run}"),
            (sharded_run / "eval" / "scores.jsonl", "would overwrite eval of the training"),
            (input_file, "is the --input file")]:
        for command in (["score", f"--workdir={sharded_run}"],
                        ["predict", f"--workdir={sharded_run}"]):
            assert cli.main([*command, f"--input={input_file}", f"--output={output}"]) == 2
            err = capsys.readouterr().err
            assert message in err and len(err.strip().splitlines()) == 1, err
    assert {p: p.read_bytes() for p in sharded_run.rglob("*") if p.is_file()} == before


def test_a_damaged_spiece_model_is_one_line_before_the_model_is_read(hf_model, input_file,
                                                                   tmp_path, capsys):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(hf_model[0], model)
    (model / "spiece.model").write_bytes(b"\x0a\x05trunc")  # A download cut short.
    for flags in ([], [f"--vocab={model / 'config.json'}"]):  # Its own, or any file given.
        assert cli.main(["score", f"--init_from={model}", f"--input={input_file}",
                         *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not a SentencePiece model" in err[0], err


def test_score_takes_a_run_or_a_model_and_the_flags_that_go_with_it(hf_model, input_file,
                                                                    capsys):
    for flags in ([], [f"--init_from={hf_model[0]}", "--workdir=/tmp/x"],
                  [f"--init_from={hf_model[0]}", "--step=3"], ["--workdir=/tmp/x", "--vocab=byte"]):
        assert cli.main(["score", f"--input={input_file}", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ift-jax score: error: --") or "give one of" in err, flags
