"""Predictions files and eval JSON as docs/design.md's contract says; scores recomputable."""

import json
import os

import numpy as np
import pytest
import seqio

import ift_jax.tasks  # noqa: F401
from ift_jax import evaluation, evaluator, metrics
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
    point = evaluation.evaluate(str(tmp_path), 7, oracle(SPEC), SPEC)
    results = point.tasks
    assert results["synthetic_sentiment"]["accuracy"] == 100.0
    assert results["synthetic_support_summary"]["rouge1"] == pytest.approx(100.0)
    written = json.loads((tmp_path / "eval" / "step_7.json").read_text())
    assert written == {"step": 7, "tasks": results, "robustness": point.robustness}
    # Every template of the multi-template task is perfect: no spread across them.
    spread = written["robustness"]["synthetic_sentiment"]
    assert spread["metric"] == "accuracy" and spread["spread"] == 0.0
    assert len(spread["per_template"]) > 1 and sum(spread["examples"].values()) == 40
    rows = [json.loads(line) for line in
            (tmp_path / "predictions" / "step_7" / "synthetic_sentiment.jsonl").open()]
    assert len(rows) == 40
    assert set(rows[0]) == {"inputs", "references", "prediction", "template"}
    assert "OPTIONS:" in rows[0]["inputs"] and rows[0]["prediction"] == rows[0]["references"][0]


def test_scores_are_recomputable_from_the_predictions_files(tmp_path):
    results = evaluation.evaluate(str(tmp_path), 3, constant, SPEC).tasks
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


def prefers(word):
    """A score_fn whose log-likelihood is 0 for targets spelling `word`, else -1."""
    wanted = TASK_VOCABULARY.encode(word) + [1]

    def score_fn(inputs, targets):
        hit = np.array([list(t[t > 0]) == wanted for t in targets], np.float32)
        tokens = (targets > 0).sum(-1).astype(np.float32)
        return hit - 1.0, hit * tokens, tokens
    return score_fn


def test_rank_classification_picks_the_likeliest_choice_and_is_recomputable(tmp_path):
    spec = evaluation.EvalSpec(tasks=("synthetic_sentiment",), inputs_length=256,
                               batch_size=16, max_examples=40, targets_length=16)
    results = evaluation.evaluate(str(tmp_path), 1, constant, spec, prefers("positive")).tasks
    rows = [json.loads(line) for line in
            (tmp_path / "predictions" / "step_1" / "synthetic_sentiment.jsonl").open()]
    assert all(r["choices"] == ["negative", "positive"] for r in rows)
    assert all(r["choice_prediction"] == "positive" for r in rows)
    share = 100.0 * sum(r["references"] == ["positive"] for r in rows) / len(rows)
    assert results["synthetic_sentiment"]["rank_accuracy"] == share
    # Teacher-forced loss: -sum(ll)/tokens; here ll is -1 per non-"positive" target.
    tokens = sum(r["target_tokens"] for r in rows)
    assert results["synthetic_sentiment"]["loss"] == pytest.approx(
        sum(r["references"] != ["positive"] for r in rows) / tokens)
    assert evaluation.recompute(str(tmp_path), 1, "synthetic_sentiment") == (
        results["synthetic_sentiment"])


def test_score_targets_is_the_training_loss_without_z_loss():
    import jax
    from ift_jax import decoding, losses
    from ift_jax.models import t5
    config = t5.get_config("tiny", vocab_size=64, dtype="float32")
    model = t5.Transformer(config)
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, 64, (3, 10)).astype(np.int32)
    targets = rng.integers(2, 64, (3, 6)).astype(np.int32)
    targets[0, 4:] = 0  # A padded row.
    params = model.init(jax.random.key(0), inputs, targets)["params"]
    ll, correct, tokens = decoding.score_targets(model, params, inputs, targets)
    logits = model.apply({"params": params}, inputs, np.pad(targets[:, :-1], ((0, 0), (1, 0))))
    terms = losses.loss_terms(logits, {"decoder_target_tokens": targets}, losses.LossConfig())
    assert float(-ll.sum() / tokens.sum()) == pytest.approx(
        float(terms["loss_sum"] / terms["denominator"]), rel=1e-5)
    assert tokens.tolist() == [4.0, 6.0, 6.0] and float(correct.sum()) == float(terms["correct"])


def test_unknown_metric_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="no metric 'rouge_l'; available: accuracy, bleu, "
                                         "exact_match, rouge, span_f1"):
        evaluation.EvalSpec(tasks=("synthetic_sentiment",), metrics=("rouge_l",))


def test_metric_names_replace_the_tasks_own(tmp_path):
    spec = evaluation.EvalSpec(tasks=("synthetic_sentiment",), inputs_length=256,
                               max_examples=8, metrics=("exact_match", "bleu"))
    results = evaluation.evaluate(str(tmp_path), 1, constant, spec).tasks
    assert set(results["synthetic_sentiment"]) == {"exact_match", "bleu"}


def test_incontext_exemplars_come_from_train_and_fit_the_input_length():
    from ift_jax.data import instructions
    roomy = instructions.with_shots("synthetic_support_summary", 2, 4096)
    tight = instructions.with_shots("synthetic_support_summary", 2, 300)
    wide, narrow = roomy.source.rendered("validation"), tight.source.rendered("validation")
    assert set(wide["shots"]) == {"2"}
    assert {"0", "1"} & set(narrow["shots"])  # Some exemplars dropped to fit.
    for text, shots in zip(narrow["inputs"], narrow["shots"]):
        assert len(TASK_VOCABULARY.encode(text)) + 1 <= 300 or shots == "0"
    base = seqio.get_mixture_or_task("synthetic_support_summary").source.rendered("validation")
    # The example itself comes last, after its exemplars (train dialogues, not validation).
    assert wide["inputs"][0].endswith(base["inputs"][0]) and wide["inputs"][0] != base["inputs"][0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 4-step tiny run evaluated at steps 0, 2, 4 with a guard task and 0/1-shot."""
    from ift_jax import train
    from test_train import tiny_config
    config = tiny_config(steps=4)
    config.eval.every, config.eval.max_examples, config.eval.max_decode_length = 2, 4, 8
    config.eval.tasks, config.eval.guard_tasks = "synthetic_sentiment", "synthetic_extraction"
    config.eval.incontext_shots = "0,1"
    config.data.inputs_length = 256  # Room for one exemplar.
    workdir = str(tmp_path_factory.mktemp("evaluated") / "run")
    train.train_and_evaluate(config, workdir)
    return workdir, config


def test_training_evaluates_start_checkpoints_guards_and_incontext(run_dir):
    workdir, _ = run_dir
    assert evaluation.finished_steps(workdir) == [0, 2, 4]
    step4 = json.loads(open(f"{workdir}/eval/step_4.json").read())
    assert step4["guard_tasks"] == ["synthetic_extraction"]
    assert set(step4["tasks"]) == {"synthetic_sentiment", "synthetic_extraction"}
    one_shot = json.loads(open(f"{workdir}/eval/incontext_1shot.json").read())
    assert one_shot["shots"] == 1 and one_shot["shots_used"]["synthetic_sentiment"] == 1.0
    rows = open(f"{workdir}/predictions/incontext_1shot/synthetic_sentiment.jsonl").readlines()
    assert len(rows) == 4 and json.loads(rows[0])["shots"] == 1
    table = open(f"{workdir}/report/eval_table.csv").read()
    assert "1-shot" in table and "step 4" in table
    from ift_jax import report
    forgetting = report.forgetting(workdir)
    delta = forgetting["deltas"][4]["synthetic_extraction"]["accuracy"]
    assert delta == (step4["tasks"]["synthetic_extraction"]["accuracy"] - json.loads(
        open(f"{workdir}/eval/step_0.json").read())["tasks"]["synthetic_extraction"]["accuracy"])
    assert "over 1 guard tasks" in report.forgetting_summary(workdir)


def test_offline_eval_evaluates_each_checkpoint_once_and_skips_broken_ones(run_dir, tmp_path,
                                                                          caplog):
    import shutil
    from ift_jax import train
    _, config = run_dir
    config.eval.every = 0  # train without evaluating, then evaluate offline
    config.eval.incontext_shots = ""
    workdir = str(tmp_path / "offline")
    train.train_and_evaluate(config, workdir)
    assert evaluation.finished_steps(workdir) == []
    shutil.copytree(f"{workdir}/checkpoints/4", f"{workdir}/checkpoints/6")
    for path in (tmp_path / "offline" / "checkpoints" / "6").rglob("*"):
        if path.is_file() and path.stat().st_size > 100:
            path.write_bytes(b"torn")  # A half-written checkpoint.
    outcome = evaluator.evaluate_checkpoints(workdir)
    assert (outcome.evaluated, outcome.unreadable) == ([0, 2, 4], [6])
    assert "checkpoint 6 of" in caplog.text and "skipped" in caplog.text
    assert "could not read checkpoints [6]" in outcome.summary()
    # Set aside as training does: a later eval no longer meets it.
    assert [p.name.split("-")[0] for p in (tmp_path / "offline" / "checkpoints_damaged"
                                            ).iterdir()] == ["6"]
    again = evaluator.evaluate_checkpoints(workdir)
    assert (again.evaluated, again.already, again.unreadable) == ([], [0, 2, 4], [])
    rows = (tmp_path / "offline" / "predictions" / "step_4" / "synthetic_sentiment.jsonl"
            ).read_text().splitlines()
    assert len(rows) == 4


def test_predict_and_report_commands(run_dir, tmp_path, capsys):
    from ift_jax import cli
    workdir, _ = run_dir
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"inputs": "Is this review positive or negative? Great lamp.", '
                      '"id": 7}\n\n{"inputs": "The kettle broke."}\n')
    assert cli.main(["predict", f"--workdir={workdir}", f"--input={inputs}",
                     f"--output={tmp_path}/out.jsonl"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").open()]
    assert [r.get("id") for r in rows] == [7, None]
    assert all(isinstance(r["prediction"], str) for r in rows)
    inputs.write_text('{"inputs": "ok"}\n{"text": "no inputs"}\n')
    assert cli.main(["predict", f"--workdir={workdir}", f"--input={inputs}"]) == 2
    assert f"{inputs}:2: each line must be an object" in capsys.readouterr().err
    assert cli.main(["report", f"--workdir={workdir}"]) == 0
    assert "forgetting at step 4 vs step 0" in capsys.readouterr().out
    for name in ("README.md", "train_loss.png", "eval_synthetic_sentiment.png",
                 "forgetting.png", "eval_table.md"):
        assert (os.path.join(workdir, "report", name)) and os.path.exists(
            os.path.join(workdir, "report", name)), name
