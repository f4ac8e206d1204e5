"""Predictions files and eval JSON as DESIGN.md's contract says; scores recomputable."""

import json

import numpy as np
import pytest
import seqio

import ift_jax.tasks  # noqa: F401
from ift_jax import evaluation, metrics
from ift_jax.data.vocabularies import TASK_VOCABULARY

SPEC = evaluation.EvalSpec(tasks=("synthetic_support_summary", "synthetic_sentiment"),
                           split="validation", inputs_length=256, batch_size=16,
                           max_examples=40)


def oracle(spec):
    """A predict_fn that answers every input with its reference (EOS-terminated)."""
    answers = {}
    for name in spec.tasks:
        task = seqio.get_mixture_or_task(name)
        for ex in task.get_dataset({"inputs": spec.inputs_length, "targets": 512},
                                   split=spec.split, shuffle=False).as_numpy_iterator():
            answers[tuple(ex["inputs"][:spec.inputs_length])] = ex["targets"]

    def predict(batch):
        out = np.zeros((batch.shape[0], 128), np.int32)
        for row, inputs in enumerate(batch):
            key = tuple(int(t) for t in inputs[inputs > 0])
            target = answers.get(key, np.asarray([1]))
            out[row, :len(target)] = target[:128]
        return out
    return predict


def constant(batch):
    text = TASK_VOCABULARY.encode("negative") + [1]
    return np.tile(np.asarray(text, np.int32), (batch.shape[0], 1))


def test_perfect_predictions_score_100_and_files_follow_the_contract(tmp_path):
    results = evaluation.evaluate(str(tmp_path), 7, oracle(SPEC), SPEC)
    assert results["synthetic_sentiment"]["accuracy"] == 100.0
    assert results["synthetic_support_summary"]["rouge1"] == pytest.approx(100.0)
    written = json.loads((tmp_path / "eval" / "step_7.json").read_text())
    assert written == {"step": 7, "tasks": results}
    rows = [json.loads(line) for line in
            (tmp_path / "predictions" / "step_7" / "synthetic_sentiment.jsonl").open()]
    assert len(rows) == 40 and set(rows[0]) == {"inputs", "references", "prediction"}
    assert "OPTIONS:" in rows[0]["inputs"] and rows[0]["prediction"] == rows[0]["references"][0]


def test_scores_are_recomputable_from_the_predictions_files(tmp_path):
    results = evaluation.evaluate(str(tmp_path), 3, constant, SPEC)
    for task in SPEC.tasks:
        assert evaluation.recompute(str(tmp_path), 3, task) == results[task]
    rows = [json.loads(line) for line in
            (tmp_path / "predictions" / "step_3" / "synthetic_sentiment.jsonl").open()]
    expected = metrics.accuracy([r["references"][0] for r in rows], ["negative"] * len(rows))
    assert results["synthetic_sentiment"]["accuracy"] == expected["accuracy"]
    assert 0 < expected["accuracy"] < 100


def test_finished_steps_are_those_with_eval_json(tmp_path):
    assert evaluation.finished_steps(str(tmp_path)) == []
    evaluation.write_step(str(tmp_path), 20, {"t": {"accuracy": 1.0}}, {"t": []})
    evaluation.write_step(str(tmp_path), 5, {"t": {"accuracy": 1.0}}, {"t": []})
    assert evaluation.finished_steps(str(tmp_path)) == [5, 20]


def test_invalid_utf8_predictions_are_replaced_and_counted():
    vocab = seqio.ByteVocabulary()
    ids = [ord("o") + 3, ord("k") + 3, 0xFF + 3, 1, ord("x") + 3]
    text, bad = evaluation.decode_tokens(vocab, ids)
    assert text == "ok\ufffd" and bad
    assert evaluation.decode_tokens(vocab, [ord("a") + 3, 1]) == ("a", False)


def test_an_empty_split_is_an_error_naming_task_and_split():
    # max_examples=0 reads nothing: the same path as an empty split.
    spec = evaluation.EvalSpec(tasks=("synthetic_sentiment",), max_examples=0)
    task = seqio.get_mixture_or_task("synthetic_sentiment")
    with pytest.raises(ValueError, match="'synthetic_sentiment': split 'validation' has no"):
        evaluation._examples(task, spec)


def test_training_evaluates_at_checkpoints_and_offline_eval_skips_finished(tmp_path):
    from ift_jax import train
    from test_train import tiny_config
    config = tiny_config(steps=4)
    config.eval.every, config.eval.max_examples, config.eval.max_decode_length = 2, 4, 8
    config.eval.tasks = "synthetic_sentiment"
    train.train_and_evaluate(config, str(tmp_path / "run"))
    assert evaluation.finished_steps(str(tmp_path / "run")) == [2, 4]
    assert evaluation.evaluate_checkpoints(str(tmp_path / "run")) == []

    config.eval.every = 0  # train without evaluating, then evaluate offline
    train.train_and_evaluate(config, str(tmp_path / "offline"))
    assert evaluation.finished_steps(str(tmp_path / "offline")) == []
    assert evaluation.evaluate_checkpoints(str(tmp_path / "offline")) == [2, 4]
    assert evaluation.evaluate_checkpoints(str(tmp_path / "offline")) == []
    rows = (tmp_path / "offline" / "predictions" / "step_4" / "synthetic_sentiment.jsonl"
            ).read_text().splitlines()
    assert len(rows) == 4
