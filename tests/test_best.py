"""`ift_jax.best`: the best checkpoint by a metric and early stopping, from scripted metrics."""

import json
import os

import ml_collections
import pytest

from ift_jax import best, errors


def _point(value, task="t", metric="accuracy"):
    return {"tasks": {task: {metric: value}}}


def _write(workdir, step, point):
    (workdir / "eval").mkdir(exist_ok=True)
    (workdir / "eval" / f"step_{step}.json").write_text(json.dumps({"step": step, **point}))


def test_best_follows_the_metric_up_or_down_by_mode():
    higher = best.Tracker.from_spec("t/accuracy")
    assert [higher.update(s, _point(v)) for s, v in [(1, 50), (2, 70), (3, 60), (4, 70)]] == [
        True, True, False, False]
    assert (higher.best_step, higher.best_value) == (2, 70.0)  # Ties keep the earlier step.
    lower = best.Tracker.from_spec("t/loss")  # auto: loss is lower-is-better
    for step, value in [(1, 2.0), (2, 1.5), (3, 1.7)]:
        lower.update(step, _point(value, metric="loss"))
    assert (lower.best_step, lower.higher_is_better) == (2, False)
    forced = best.Tracker.from_spec("t/accuracy", mode="min")
    forced.update(1, _point(50))
    forced.update(2, _point(40))
    assert forced.best_step == 2


def test_suite_aggregates_can_be_tracked():
    tracker = best.Tracker.from_spec("mmlu_5shot/score")
    assert tracker.update(3, {"tasks": {}, "suites": {"mmlu_5shot": {"score": 31.0}}})
    assert tracker.record() == {"metric": "mmlu_5shot/score", "mode": "max", "step": 3,
                                "value": 31.0}


def test_early_stopping_counts_evaluations_without_min_delta_improvement():
    cfg = ml_collections.ConfigDict(dict(metric="t/accuracy", patience=2, min_delta=1.0,
                                         mode="auto"))
    stopper = best.EarlyStopping.from_config(cfg)
    decisions = []
    for step, value in [(1, 50.0), (2, 55.0), (3, 55.5), (4, 56.0), (5, 60.0)]:
        stopper.tracker.update(step, _point(value))
        decisions.append(stopper.should_stop())
    # 55.5 and 56.0 improve by less than min_delta: two evaluations without improvement.
    assert decisions == [False, False, False, True, False]
    assert stopper.tracker.best_step == 5


def test_a_resumed_run_replays_its_eval_files(tmp_path):
    for step, value in [(0, 10.0), (100, 40.0), (200, 30.0), (300, 35.0)]:
        _write(tmp_path, step, _point(value))
    tracker = best.Tracker.from_spec("t/accuracy").replay(str(tmp_path), up_to=200)
    assert (tracker.best_step, tracker.best_value, tracker.since_best) == (100, 40.0, 1)
    best.write_record(str(tmp_path), tracker)
    assert json.loads((tmp_path / "best_checkpoint.json").read_text())["step"] == 100


def test_bad_specs_are_one_line_config_errors():
    with pytest.raises(errors.ConfigError, match="give <task>/<metric>"):
        best.Tracker.from_spec("accuracy")
    with pytest.raises(errors.ConfigError, match="choose one of auto, max, min"):
        best.Tracker.from_spec("t/accuracy", mode="highest")
    tracker = best.Tracker.from_spec("t/rougeL")
    with pytest.raises(errors.ConfigError, match=r"step 5 was evaluated without it \(tasks "
                                                 r"and suites: t\)"):
        tracker.update(5, _point(1.0))
    with pytest.raises(errors.ConfigError, match="patience=0: must be >= 1"):
        best.EarlyStopping.from_config(ml_collections.ConfigDict(
            dict(metric="t/accuracy", patience=0, min_delta=0.0)))


# ----------------------------------------------------------------------------
# Wired into training: a tiny run whose evaluations return a scripted metric.

ACCURACY = {0: 10.0, 2: 30.0, 4: 50.0, 6: 40.0, 8: 45.0, 10: 20.0, 12: 25.0}


@pytest.fixture
def scripted_eval(monkeypatch):
    """Evaluation points score `ACCURACY[step]` (and write their eval file, as the
    real evaluator does, which is what a resumed run replays)."""
    from ift_jax import evaluation, evaluator

    def at_step(self, step, params):
        tasks = {"t": {"accuracy": ACCURACY[step]}}
        directory = os.path.join(self.workdir, "eval")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"step_{step}.json"), "w") as f:
            json.dump({"step": step, "tasks": tasks}, f)
        return evaluation.PointResult(tasks, {}, {}, {})

    monkeypatch.setattr(evaluator.RunEvaluator, "at_step", at_step)


def _config(steps, **sections):
    from test_train import tiny_config
    config = tiny_config(steps=steps, checkpoint_every=2, keep_checkpoints=1)
    config.eval.every = 2
    for key, value in sections.items():
        section, name = key.split("__")
        setattr(config[section] if section != "early" else config.train.early_stopping,
                name, value)
    return config


def _checkpoints(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                  if s.isdigit())


def test_keep_best_keeps_the_best_evaluated_checkpoint_besides_the_last(tmp_path,
                                                                        scripted_eval):
    from ift_jax import train
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(_config(12, checkpoint__keep_best="t/accuracy"), workdir)
    assert _checkpoints(workdir) == [4, 12]  # The last one (keep 1) and the best.
    assert json.load(open(f"{workdir}/best_checkpoint.json")) == {
        "metric": "t/accuracy", "mode": "max", "step": 4, "value": 50.0}
    assert json.load(open(f"{workdir}/summary.json"))["finished"] is True


def test_early_stopping_ends_the_run_finished_and_a_resume_remembers(tmp_path,
                                                                     scripted_eval):
    from ift_jax import train
    workdir = str(tmp_path / "run")
    early = dict(early__metric="t/accuracy", early__patience=2,
                 checkpoint__keep_best="t/accuracy")
    # To step 6: one evaluation (6) without improvement since the best (4).
    train.train_and_evaluate(_config(6, **early), workdir)
    assert "stop_reason" not in json.load(open(f"{workdir}/summary.json"))
    # Longer: the resumed run replays 0..6 and stops at 8, the second miss in a row.
    train.train_and_evaluate(_config(12, **early), workdir,
                             allow_config_changes=("train.steps",))
    summary = json.load(open(f"{workdir}/summary.json"))
    assert summary["step"] == 8 and summary["finished"] is True
    assert summary["stop_reason"] == ("early stopping: t/accuracy did not improve by more "
                                      "than 0.0 for 2 evaluations (best 50 at step 4)")
    assert _checkpoints(workdir) == [4, 8]  # The best survived the resume.
    # Run again: the evaluations already say stop; nothing more is trained.
    train.train_and_evaluate(_config(12, **early), workdir)
    assert json.load(open(f"{workdir}/summary.json"))["step"] == 8


def test_keep_best_and_early_stopping_need_evaluations():
    from ift_jax import config_checks
    config = _config(4, checkpoint__keep_best="t/accuracy")
    config.eval.every = 0
    with pytest.raises(errors.ConfigError, match=r"checkpoint.keep_best='t/accuracy' follows "
                                                 r"an evaluated metric"):
        config_checks.validate(config)
    config.eval.every = 2
    config.checkpoint.keep_best = "accuracy"
    with pytest.raises(errors.ConfigError, match="give <task>/<metric>"):
        config_checks.validate(config)
