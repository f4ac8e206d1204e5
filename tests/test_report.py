"""Reports from workdir files: tables, forgetting deltas and summary, plots, README."""

import csv
import json
import os
import subprocess
import sys

import pytest

from ift_jax import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

STEPS = {
    0: {"summarize": {"rougeL": 20.0, "rouge1": 25.0, "loss": 2.5},
        "guard_a": {"accuracy": 60.0, "token_accuracy": 0.5, "loss": 1.0},
        "guard_b": {"rank_accuracy": 70.0, "accuracy": 40.0}},
    100: {"summarize": {"rougeL": 30.0, "rouge1": 35.5, "loss": 2.0},
          "guard_a": {"accuracy": 55.0, "token_accuracy": 0.25, "loss": 1.5,
                      "invalid_utf8_predictions": 2.0},
          "guard_b": {"rank_accuracy": 72.5, "accuracy": 38.0}},
    200: {"summarize": {"rougeL": 33.123456789012, "rouge1": 36.0, "loss": 1.75},
          "guard_a": {"accuracy": 48.0, "token_accuracy": 0.375, "loss": 1.25},
          "guard_b": {"rank_accuracy": 71.0, "accuracy": 41.0}},
}
ONE_SHOT = {"summarize": {"rougeL": 22.0}, "guard_a": {"accuracy": 58.0}}
TRAIN_ROWS = [{"step": 10, "loss": 2.0, "accuracy": 0.4},
              {"step": 20, "loss": 1.5, "accuracy": 0.5},
              {"step": 20, "loss": 1.2, "accuracy": 0.55}]  # Logged again after a resume.


def write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def make_workdir(root, steps=STEPS, guard_tasks="guard_a, guard_b", incontext=True,
                 train=True):
    """A workdir as training and evaluation leave it."""
    workdir = str(root)
    eval_config = {} if guard_tasks is None else {"guard_tasks": guard_tasks}
    write_json(os.path.join(workdir, "config.json"), {"eval": eval_config})
    for step, tasks in steps.items():
        write_json(os.path.join(workdir, "eval", f"step_{step}.json"),
                   {"step": step, "tasks": tasks})
    if incontext:
        write_json(os.path.join(workdir, "eval", "incontext_1shot.json"),
                   {"shots": 1, "step": 0, "tasks": ONE_SHOT})
    # An evaluation in progress: must be ignored.
    write_json(os.path.join(workdir, "eval", "step_300.json.tmp"), {"step": 300, "tasks": {}})
    if train:
        with open(os.path.join(workdir, "train_metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in TRAIN_ROWS)
    return workdir


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """A full workdir after write_report: (workdir, README path)."""
    workdir = make_workdir(tmp_path_factory.mktemp("run"))
    return workdir, report.write_report(workdir)


def test_load_eval_reads_steps_incontext_and_guards_ignoring_tmp(tmp_path):
    run = report.load_eval(make_workdir(tmp_path))
    assert list(run["steps"]) == [0, 100, 200]
    assert run["steps"][100]["guard_b"]["rank_accuracy"] == 72.5
    assert run["incontext"] == {1: ONE_SHOT}
    assert run["guard_tasks"] == ["guard_a", "guard_b"]


def test_guard_tasks_fall_back_to_step_files_without_config(tmp_path):
    workdir = make_workdir(tmp_path, guard_tasks=None)
    write_json(os.path.join(workdir, "eval", "step_0.json"),
               {"step": 0, "tasks": STEPS[0], "guard_tasks": ["guard_b"]})
    assert report.load_eval(workdir)["guard_tasks"] == ["guard_b"]


def test_train_metrics_keep_last_row_of_a_repeated_step(tmp_path):
    rows = report.load_train_metrics(make_workdir(tmp_path))
    assert [(r["step"], r["loss"]) for r in rows] == [(10, 2.0), (20, 1.2)]


def test_forgetting_deltas_are_score_metrics_vs_step_0(tmp_path):
    result = report.forgetting(make_workdir(tmp_path))
    assert result["reason"] is None
    assert result["primary_metric"] == {"guard_a": "accuracy", "guard_b": "rank_accuracy"}
    # loss (lower is better) and the invalid-output count get no delta; the trained
    # task is not a guard task.
    assert result["deltas"][100] == {"guard_a": {"accuracy": -5.0, "token_accuracy": -0.25},
                                     "guard_b": {"rank_accuracy": 2.5, "accuracy": -2.0}}
    assert result["deltas"][200] == {"guard_a": {"accuracy": -12.0, "token_accuracy": -0.125},
                                     "guard_b": {"rank_accuracy": 1.0, "accuracy": 1.0}}
    assert 0 not in result["deltas"]


def test_forgetting_summary_names_latest_step_mean_worst_and_count(tmp_path):
    line = report.forgetting_summary(make_workdir(tmp_path))
    assert line == ("forgetting at step 200 vs step 0 over 2 guard tasks: mean Δ -5.5 "
                    "(primary metrics), worst guard_a accuracy -12.0, 1 of 2 worse")


def test_forgetting_without_guard_tasks_says_so(tmp_path):
    workdir = make_workdir(tmp_path, guard_tasks="")
    assert report.forgetting(workdir)["deltas"] == {}
    assert report.forgetting_summary(workdir) == (
        "no forgetting measured: no guard tasks configured")


def test_forgetting_without_step_0_says_so(tmp_path):
    workdir = make_workdir(tmp_path, steps={s: STEPS[s] for s in (100, 200)})
    assert report.forgetting_summary(workdir) == "no forgetting measured: no step 0 evaluation"


def test_forgetting_with_guard_tasks_absent_from_step_0_says_so(tmp_path):
    workdir = make_workdir(tmp_path, guard_tasks="other_task")
    assert "not in the step 0 evaluation: other_task" in report.forgetting_summary(workdir)


def test_primary_metric_prefers_ranked_scores_and_skips_non_scores():
    assert report.primary_metric({"accuracy": 1, "rank_accuracy": 2}) == "rank_accuracy"
    assert report.primary_metric({"bleu": 1, "rougeLsum": 2, "rougeL": 3}) == "rougeL"
    assert report.primary_metric({"loss": 1, "f1": 2}) == "f1"
    assert report.primary_metric({"loss": 1, "invalid_utf8_predictions": 0}) is None


def test_csv_is_long_format_with_full_precision(tmp_path):
    csv_path, _ = report.write_tables(make_workdir(tmp_path))
    assert csv_path == os.path.join(str(tmp_path), "report", "eval_table.csv")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == report.CSV_COLUMNS
    n_values = (sum(len(m) for tasks in STEPS.values() for m in tasks.values())
                + sum(len(m) for m in ONE_SHOT.values()))
    assert len(rows) == n_values
    points = list(dict.fromkeys(r["point"] for r in rows))
    assert points == ["1-shot", "step 0", "step 100", "step 200"]
    values = {(r["point"], r["task"], r["metric"]): r for r in rows}
    assert float(values["step 200", "summarize", "rougeL"]["value"]) == 33.123456789012
    assert float(values["step 100", "guard_a", "invalid_utf8_predictions"]["value"]) == 2.0
    shot = values["1-shot", "guard_a", "accuracy"]
    assert (shot["kind"], shot["shots"], shot["step"], float(shot["value"])) == (
        "incontext", "1", "0", 58.0)
    assert values["step 100", "guard_b", "accuracy"]["shots"] == ""


def test_markdown_has_one_table_per_task_with_two_decimals(tmp_path):
    _, md_path = report.write_tables(make_workdir(tmp_path))
    text = open(md_path).read()
    for task in ("guard_a", "guard_b", "summarize"):
        assert f"### {task}" in text
    guard_a = text.split("### guard_a")[1].split("###")[0]
    assert "| point | accuracy | token_accuracy | loss | invalid_utf8_predictions |" in guard_a
    assert "| step 100 | 55.00 | 0.25 | 1.50 | 2 |" in guard_a
    assert "| 1-shot | 58.00 | – | – | – |" in guard_a
    assert "| step 200 | 36.00 | 33.12 | 1.75 |" in text  # rouge1, rougeL, loss


def test_write_report_writes_pngs_tables_and_forgetting_json(reported):
    workdir, _ = reported
    out = os.path.join(workdir, "report")
    for name in ("train_loss.png", "eval_summarize.png", "eval_guard_a.png",
                 "eval_guard_b.png", "forgetting.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == PNG_SIGNATURE, name
    assert os.path.exists(os.path.join(out, "eval_table.csv"))
    saved = json.load(open(os.path.join(out, "forgetting.json")))
    assert saved["deltas"]["200"]["guard_a"]["accuracy"] == -12.0
    assert saved["summary"].startswith("forgetting at step 200")


def test_readme_summarizes_loss_primary_metrics_forgetting_and_links(reported):
    workdir, readme = reported
    assert readme == os.path.join(workdir, "report", "README.md")
    text = open(readme).read()
    assert text.startswith(f"# Report: {workdir}\n")
    assert "Final training loss: 1.2000 (step 20)" in text
    assert "| task | metric | step 200 | step 0 | 1-shot |" in text
    assert "| guard_b | rank_accuracy | 71.00 | 70.00 | – |" in text
    assert "| summarize | rougeL | 33.12 | 20.00 | 22.00 |" in text
    assert "mean Δ -5.5 (primary metrics)" in text
    for link in ("(forgetting.png)", "(train_loss.png)", "(eval_guard_a.png)",
                 "(eval_table.md)", "(eval_table.csv)", "(forgetting.json)"):
        assert link in text


def test_report_skips_plots_without_data(tmp_path):
    workdir = make_workdir(tmp_path, guard_tasks="", train=False)
    text = open(report.write_report(workdir)).read()
    out = os.path.join(workdir, "report")
    assert not os.path.exists(os.path.join(out, "train_loss.png"))
    assert not os.path.exists(os.path.join(out, "forgetting.png"))
    assert os.path.exists(os.path.join(out, "eval_guard_a.png"))
    assert "No training loss logged" in text
    assert "no forgetting measured: no guard tasks configured" in text


def test_report_of_training_only_workdir(tmp_path):
    workdir = make_workdir(tmp_path, steps={}, incontext=False, guard_tasks="")
    report.write_report(workdir)
    assert sorted(os.listdir(os.path.join(workdir, "report"))) == [
        "README.md", "eval_table.csv", "eval_table.md", "forgetting.json", "train_loss.png"]


def test_empty_workdir_raises_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_metrics.jsonl") as error:
        report.write_report(str(tmp_path))
    assert str(tmp_path) in str(error.value)


def test_task_names_become_safe_distinct_file_names(tmp_path):
    assert report.safe_filename("t0_imdb/movie: x.y-z") == "t0_imdb_movie__x.y-z"
    assert report.safe_filename("../..") == "_"
    workdir = make_workdir(tmp_path, steps={0: {"a/b": {"accuracy": 1.0},
                                                "a_b": {"accuracy": 2.0}}},
                           incontext=False, train=False, guard_tasks="")
    paths = report.write_plots(workdir)
    assert sorted(os.path.basename(p) for p in paths) == ["eval_a_b.png", "eval_a_b_.png"]


def test_import_is_cheap():
    code = ("import sys, ift_jax.report; "
            "print(sorted(m for m in ('jax', 'tensorflow', 'seqio', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
