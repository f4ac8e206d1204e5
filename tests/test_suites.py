"""Benchmark suites: names, data checks, the papers' aggregates, and the training canary."""

import subprocess
import sys

import pytest
import seqio

import ift_jax.tasks  # noqa: F401
from ift_jax import suites
from ift_jax.data import instructions, sources
from ift_jax.data.templates import PatternTemplate
from ift_jax.tasks import mixtures

NAMES = ("bbh_cot", "bbh_direct", "glue", "mmlu_0shot", "mmlu_5shot", "superglue")


def test_suites_are_named_and_their_tasks_registered_with_the_split():
    assert tuple(sorted(suites.SUITES)) == NAMES
    sizes = {name: len(suites.get(name).tasks) for name in NAMES}
    assert sizes == {"bbh_cot": 27, "bbh_direct": 27, "glue": 7, "mmlu_0shot": 57,
                     "mmlu_5shot": 57, "superglue": 7}
    for suite in suites.SUITES.values():
        assert suite.citation and suite.max_decode_length > 0
        for name in suite.tasks:
            assert suite.split in seqio.get_mixture_or_task(name).source.splits, name
    assert suites.get("bbh_cot").max_decode_length > suites.get("bbh_direct").max_decode_length


def test_unknown_suite_lists_the_suites():
    with pytest.raises(suites.SuiteError, match=r"^unknown suite 'mmlu'; suites: "
                                                r"bbh_cot, bbh_direct, glue, mmlu_0shot, "
                                                r"mmlu_5shot, superglue$"):
        suites.get("mmlu")
    assert issubclass(suites.SuiteError, ValueError)


def test_parse_keeps_order_drops_blanks_and_repeats():
    parsed = suites.parse(" mmlu_5shot, bbh_direct,,superglue,mmlu_5shot ")
    assert [s.name for s in parsed] == ["mmlu_5shot", "bbh_direct", "superglue"]
    assert suites.parse("") == []
    with pytest.raises(suites.SuiteError, match="unknown suite 'bbh'"):
        suites.parse("glue,bbh")


def test_missing_data_folder_names_the_folder_and_its_source_md(tmp_path):
    suites.check_data(suites.get("mmlu_5shot"))  # ../shared/data has it.
    (tmp_path / "glue").mkdir()
    suites.check_data(suites.get("glue"), str(tmp_path))
    with pytest.raises(suites.SuiteError) as error:
        suites.check_data(suites.get("bbh_cot"), str(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    assert f"data folder {tmp_path}/bbh is missing" in message
    assert "bbh/SOURCE.md" in message and sources.ENV_VAR in message


def _scores(suite, metric_values):
    return {t: dict(metric_values(i, t)) for i, t in enumerate(suite.tasks)}


def test_mmlu_aggregates_macro_over_subjects_and_the_four_categories():
    suite = suites.get("mmlu_5shot")
    # rank_accuracy 40 on STEM subjects, 60 elsewhere; generation accuracy = rank - 10.
    values = {t: 40.0 if c == "stem" else 60.0 for t, c in suite.categories.items()}
    scores = _scores(suite, lambda i, t: {"rank_accuracy": values[t],
                                          "accuracy": values[t] - 10, "loss": 1.0})
    out = suite.aggregate(scores)
    assert out["score"] == out["rank_accuracy"] == pytest.approx((18 * 40 + 39 * 60) / 57)
    assert out["rank_accuracy_stem"] == 40.0 and out["rank_accuracy_humanities"] == 60.0
    assert out["rank_accuracy_categories"] == pytest.approx((40 + 60 + 60 + 60) / 4)
    assert out["accuracy"] == pytest.approx((18 * 30 + 39 * 50) / 57)
    assert out["accuracy_categories"] == pytest.approx((30 + 50 + 50 + 50) / 4)
    assert set(out) == {"score", *(f"{m}{c}" for m in ("rank_accuracy", "accuracy") for c in (
        "", "_stem", "_humanities", "_social_sciences", "_other", "_categories"))}


def test_bbh_aggregate_is_the_macro_average_over_27_tasks():
    suite = suites.get("bbh_cot")
    out = suite.aggregate(_scores(suite, lambda i, t: {"accuracy": float(i)}))
    assert out == {"score": pytest.approx(13.0), "accuracy": pytest.approx(13.0)}


def test_glue_scores_average_each_tasks_leaderboard_metrics_then_the_tasks():
    suite = suites.get("glue")
    metric_values = {"glue_cola": {"mcc": 40.0, "accuracy": 80.0},
                     "glue_mrpc": {"f1": 90.0, "accuracy": 84.0},
                     "glue_stsb": {"pearson": 88.0, "spearman": 86.0}}
    scores = {t: metric_values.get(t, {"accuracy": 70.0}) for t in suite.tasks}
    out = suite.aggregate(scores)
    assert out["glue_cola"] == 40.0  # MCC only: CoLA's accuracy is not a GLUE score.
    assert out["glue_mrpc"] == 87.0 and out["glue_stsb"] == 87.0
    assert out["score"] == pytest.approx((40 + 87 + 87 + 4 * 70) / 7)
    superglue = suites.get("superglue")
    metric_values = {"super_glue_cb": {"accuracy": 80.0, "macro_f1": 60.0},
                     "super_glue_multirc": {"f1a": 70.0, "exact_match": 20.0}}
    out = superglue.aggregate({t: metric_values.get(t, {"accuracy": 50.0})
                               for t in superglue.tasks})
    assert out["super_glue_cb"] == 70.0 and out["super_glue_multirc"] == 45.0
    assert out["score"] == pytest.approx((70 + 45 + 5 * 50) / 7)


def test_aggregate_names_missing_tasks_and_metrics():
    suite = suites.get("bbh_direct")
    with pytest.raises(suites.SuiteError, match="no scores for 27 of its 27 tasks"):
        suite.aggregate({})
    scores = {t: {"accuracy": 1.0} for t in suite.tasks}
    scores["bbh_direct_navigate"] = {"rouge1": 3.0}
    with pytest.raises(suites.SuiteError,
                       match="task 'bbh_direct_navigate' has no 'accuracy' \\(it has rouge1\\)"):
        suite.aggregate(scores)


def test_benchmark_tasks_are_known_by_name_and_derived_names():
    assert suites.is_benchmark_task("mmlu_5shot_anatomy")
    assert suites.is_benchmark_task("bbh_cot_navigate")
    assert suites.is_benchmark_task("mmlu_0shot")  # The mixture.
    assert suites.is_benchmark_task("mmlu_5shot_anatomy_incontext_3shot")
    assert not suites.is_benchmark_task("glue_rte")
    assert not suites.is_benchmark_task("mmlu_5shot_anatomyx")
    assert not suites.is_benchmark_task("dialogsum")


def test_a_training_mixture_holding_a_benchmark_task_is_refused():
    suites.check_training_mixture("ift_multitask")
    suites.check_training_mixture("dialogsum")
    mixtures.register_mixture("test_leaky_mixture", ["samsum", "bbh_direct_navigate"], 1.0)
    try:
        with pytest.raises(suites.SuiteError) as error:
            suites.check_training_mixture("test_leaky_mixture")
    finally:
        seqio.MixtureRegistry.remove("test_leaky_mixture")
    assert str(error.value) == (
        "training mixture 'test_leaky_mixture' contains benchmark task 'bbh_direct_navigate': "
        "MMLU and BBH are evaluation data and must never be trained on; remove it from the "
        "mixture")
    with pytest.raises(suites.SuiteError, match="contains benchmark task 'mmlu_0shot'"):
        suites.check_training_mixture("mmlu_0shot")
    with pytest.raises(suites.SuiteError, match="benchmark task 'bbh_cot_snarks'"):
        suites.check_training_mixture("my_mix", ["samsum", "bbh_cot_snarks"])


def test_a_task_reading_benchmark_data_under_another_name_is_refused():
    source = sources.FileSource("renamed", "mmlu", {"test": "test/anatomy_test.csv"},
                                ("question",))
    instructions.register_task("my_anatomy_quiz", source,
                               [PatternTemplate("q", "{question}", "{question}")])
    try:
        with pytest.raises(suites.SuiteError, match="benchmark task 'my_anatomy_quiz'"):
            suites.check_training_mixture("my_anatomy_quiz")
    finally:
        seqio.TaskRegistry.remove("my_anatomy_quiz")


def test_suites_module_imports_without_tensorflow_seqio_or_jax():
    code = ("import sys, ift_jax.suites; "
            "print(sorted(m for m in ('tensorflow', 'seqio', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
