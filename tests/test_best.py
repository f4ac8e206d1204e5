"""`ift_jax.best`: the best checkpoint by a metric and early stopping, from scripted metrics."""

import json

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
