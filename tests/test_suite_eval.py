"""Benchmark suites in evaluation: near-chance random model, `eval --suites`, refusals."""

import json

import jax
import numpy as np
import pytest

import ift_jax.tasks  # noqa: F401
from ift_jax import cli, evaluation, inference, partitioning, suites
from ift_jax.models import t5

BYTE_MODEL = dict(vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                  num_decoder_layers=2)


def test_a_random_weight_model_scores_near_chance_on_mmlu(tmp_path):
    config = t5.get_config("tiny", dtype="float32", **BYTE_MODEL)
    model = t5.Transformer(config)
    params = model.init(jax.random.key(0), np.ones((1, 8), np.int32),
                        np.ones((1, 4), np.int32))["params"]
    mesh = partitioning.make_mesh({"fsdp": -1})
    # Prompts cut to their last 512 bytes (question and "Answer:"), one length bucket.
    runner = inference.Inference(model, params, mesh, batch_size=32, inputs_length=512,
                                 targets_length=8, num_buckets=1)
    subjects = suites.MMLU_SUBJECTS[::14]  # 5 subjects x 20 questions
    spec = evaluation.EvalSpec(tuple(suites.mmlu_task(s, 0) for s in subjects), split="test",
                               inputs_length=512, max_examples=20, targets_length=8,
                               max_decode_length=2)
    point = evaluation.evaluate(str(tmp_path), 0, runner, spec)
    accuracy = np.mean([point.tasks[t]["rank_accuracy"] for t in spec.tasks])
    assert 10.0 <= accuracy <= 40.0, accuracy  # Chance is 25%: a band, not a value.
    rows = [json.loads(line) for line in
            (tmp_path / "predictions" / "step_0" / f"{spec.tasks[0]}.jsonl").open()]
    assert all(r["choices"] == ["A", "B", "C", "D"] and len(r["choice_log_likelihoods"]) == 4
               for r in rows)
    assert all(0.0 <= point.tasks[t]["calibration_ece"] <= 100.0 for t in spec.tasks)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import transformers
    out = tmp_path_factory.mktemp("hf_byte")
    transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False)).save_pretrained(out)
    return str(out)


# Eval settings of the suite test (`eval --config`, CI time): one padded input length
# (prompts cut to their last 256 bytes) instead of four buckets up to the suite's own
# length, so the seven GLUE tasks share compiled input shapes.
EVAL_CONFIG = """
from ift_jax.configs import default


def get_config():
    c = default.get_config()
    c.eval.length_buckets, c.eval.suite_inputs_length = 1, 256
    return c
"""


def test_eval_of_an_hf_model_on_a_suite_writes_the_suite_aggregates(hf_dir, tmp_path):
    out = tmp_path / "glue_eval"
    config = tmp_path / "eval_config.py"
    config.write_text(EVAL_CONFIG)
    assert cli.main(["eval", f"--init_from={hf_dir}", "--suites=glue", "--vocab=byte",
                     "--max_examples=3", f"--config={config}", f"--workdir={out}"]) == 0
    step0 = json.loads((out / "eval" / "step_0.json").read_text())
    assert set(step0["tasks"]) == set(suites.get("glue").tasks)
    glue = step0["suites"]["glue"]
    assert glue == pytest.approx(suites.get("glue").aggregate(step0["tasks"]), nan_ok=True)
    assert "score" in glue and "glue_cola" in glue
    assert json.loads((out / "config.json").read_text())["init_from"] == hf_dir
    assert cli.main(["report", f"--workdir={out}"]) == 0
    readme = (out / "report" / "README.md").read_text()
    assert "## Benchmark suites" in readme and "glue score" in readme
    assert "rougeLsum splits sentences with `pysbd`" in readme


def _last_error_line(capsys, *argv) -> str:
    """`ift-jax ARGV` in this process: exit status 2 and its last stderr line."""
    assert cli.main(list(argv)) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_suite_input_is_one_line(hf_dir, tmp_path, monkeypatch, capsys):
    # In this process (test_cli checks that an `ift-jax` process prints errors as one line).
    line = _last_error_line(capsys, "eval", f"--init_from={hf_dir}", "--suites=mmlu_6shot",
                            f"--workdir={tmp_path}/a")
    assert line.startswith(
        "ift-jax eval: error: unknown suite 'mmlu_6shot'; suites: bbh_cot, bbh_direct, ")
    empty = tmp_path / "no_data"
    empty.mkdir()
    with monkeypatch.context() as m:
        m.setenv("IFT_JAX_DATA_DIR", str(empty))
        line = _last_error_line(capsys, "train", f"--workdir={tmp_path}/b",
                                "--config.eval.suites=bbh_direct")
    assert f"data folder {empty}/bbh is missing" in line and "bbh/SOURCE.md" in line
    assert not (tmp_path / "b").exists()
    line = _last_error_line(capsys, "train", f"--workdir={tmp_path}/c",
                            "--config.data.mixture=mmlu_5shot")
    assert "contains benchmark task 'mmlu_5shot'" in line
    assert not (tmp_path / "c").exists()
