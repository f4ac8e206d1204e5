"""Reports of a run from its workdir files alone: tables, forgetting, plots and a README.

Reads what training and evaluation wrote (the workdir contract in docs/design.md):

- `config.json`: `eval.guard_tasks`, a comma-separated string of guard tasks;
- `train_metrics.jsonl`: one `{"step": N, "loss": ..., ...}` object per logged step;
- `eval/step_<N>.json`: `{"step": N, "tasks": {task: {metric: value}}}`; step 0 is
  the starting model before training; optional `suites` (benchmark aggregates)
  and `robustness` (per-template scores of multi-template tasks);
- `eval/incontext_<k>shot.json`: the starting model evaluated with k exemplars.

and writes into `workdir/report/`:

- `eval_table.csv`: long format, one row per (point, task, metric), full precision;
- `eval_table.md`: one markdown table per task, rows = points, columns = metrics;
- `forgetting.json`: per guard task and step > 0, score deltas vs step 0;
- `train_loss.png`, `eval_<task>.png`, `forgetting.png`, `suites.png` (each only when
  its data exists);
- `README.md`: the summary linking all of the above.

No JAX, TensorFlow or SeqIO here, so `ift-jax report` runs anywhere the files are;
matplotlib is imported only when plotting.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from typing import Union

from ift_jax import errors
from ift_jax import fileio

# Scores where higher is better, in the order that picks a task's primary metric.
PRIMARY_METRICS = ("rank_accuracy", "accuracy", "exact_match", "span_f1", "rougeL",
                   "rougeLsum", "bleu", "rouge1")
# Not scores: validation loss and calibration error are lower-is-better, the other
# a count of bad outputs.
# Tables keep them; plots and deltas leave them out.
NON_SCORE_METRICS = ("loss", "invalid_utf8_predictions", "calibration_ece")
COUNT_METRICS = ("invalid_utf8_predictions",)
# Column order of tables; metrics not listed follow alphabetically.
METRIC_ORDER = ("rank_accuracy", "calibration_ece", "accuracy", "exact_match", "span_f1",
                "span_precision", "span_recall", "rouge1", "rouge2", "rougeL", "rougeLsum", "bleu",
                "token_accuracy", "loss", "invalid_utf8_predictions")
CSV_COLUMNS = ("point", "kind", "shots", "step", "task", "metric", "value")

_STEP_FILE = re.compile(r"^step_(\d+)\.json$")
_INCONTEXT_FILE = re.compile(r"^incontext_(\d+)shot\.json$")

Run = Union[str, os.PathLike, dict]


def _read_json(path: str):
    try:
        with fileio.open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise errors.InputFileError(f"{path} is not valid JSON ({e}); delete or rewrite it") from e


def _config_guard_tasks(workdir: str) -> list[str]:
    path = os.path.join(workdir, "config.json")
    if not fileio.exists(path):
        return []
    value = (_read_json(path).get("eval") or {}).get("guard_tasks") or ""
    names = value.split(",") if isinstance(value, str) else value
    return [n.strip() for n in names if n.strip()]


def load_eval(workdir: str) -> dict:
    """Reads every evaluation file of a workdir.

    Args:
      workdir: the run's directory.

    Returns:
      `{"workdir": str, "steps": {N: {task: {metric: value}}},
      "incontext": {k: {task: {metric: value}}}, "guard_tasks": [task, ...],
      "suites": {N: {suite: {aggregate: value}}}, "robustness": {N: {task: {...}}}}`
      with steps and shot counts ascending. Guard tasks come from `config.json`, else from
      the `"guard_tasks"` lists of the step files. A missing `eval/` gives empty dicts.
    """
    workdir = os.fspath(workdir)
    directory = os.path.join(workdir, "eval")
    steps, incontext, recorded_guards = {}, {}, []
    suites, robustness = {}, {}
    names = fileio.listdir(directory) if fileio.isdir(directory) else []
    for name in names:
        step_match, shots_match = _STEP_FILE.match(name), _INCONTEXT_FILE.match(name)
        if not (step_match or shots_match):
            continue  # `*.tmp` files of an evaluation in progress, anything else.
        data = _read_json(os.path.join(directory, name))
        if step_match:
            step = int(step_match.group(1))
            steps[step] = data.get("tasks", {})
            if data.get("suites"):
                suites[step] = data["suites"]
            if data.get("robustness"):
                robustness[step] = data["robustness"]
            recorded_guards += [g for g in data.get("guard_tasks", [])
                                if g not in recorded_guards]
        else:
            incontext[int(shots_match.group(1))] = data.get("tasks", {})
    return {"workdir": workdir,
            "steps": dict(sorted(steps.items())),
            "incontext": dict(sorted(incontext.items())),
            "guard_tasks": _config_guard_tasks(workdir) or recorded_guards,
            "suites": dict(sorted(suites.items())),
            "robustness": dict(sorted(robustness.items()))}


def load_train_metrics(workdir: str) -> list[dict]:
    """Rows of `train_metrics.jsonl` by ascending step ([] when the file is missing).

    A resumed run logs some steps twice; the later row wins. An unreadable line
    (a run killed mid-write) is skipped with a warning.
    """
    path = os.path.join(os.fspath(workdir), "train_metrics.jsonl")
    if not fileio.exists(path):
        return []
    by_step = {}
    with fileio.open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                by_step[int(row["step"])] = row
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                logging.warning("%s:%d: skipping unreadable line", path, number)
    return [by_step[s] for s in sorted(by_step)]


def _as_run(run: Run) -> dict:
    return run if isinstance(run, dict) else load_eval(run)


def _is_score(metric: str) -> bool:
    return metric not in NON_SCORE_METRICS


def _ordered_metrics(metrics) -> list[str]:
    known = [m for m in METRIC_ORDER if m in metrics]
    return known + sorted(m for m in metrics if m not in METRIC_ORDER)


def primary_metric(metrics) -> str | None:
    """The first present of PRIMARY_METRICS, else the first other score, else None."""
    for name in PRIMARY_METRICS:
        if name in metrics:
            return name
    scores = [m for m in _ordered_metrics(metrics) if _is_score(m)]
    return scores[0] if scores else None


def _points(run: dict):
    """(label, kind, shots, step, tasks) per evaluation point, in-context first."""
    for shots, tasks in run["incontext"].items():
        yield f"{shots}-shot", "incontext", shots, 0, tasks
    for step, tasks in run["steps"].items():
        yield f"step {step}", "step", None, step, tasks


def eval_table(run: Run) -> list[dict]:
    """Long-format rows of every evaluation point, task and metric.

    Args:
      run: a workdir, or what `load_eval` returned.

    Returns:
      Dicts with CSV_COLUMNS keys: point ("1-shot", "step 100"), kind
      ("incontext" | "step"), shots (None for steps), step (0 for in-context: the
      starting model), task, metric, value. Points in-context first, then by step.
    """
    rows = []
    for point, kind, shots, step, tasks in _points(_as_run(run)):
        for task in sorted(tasks):
            for metric in _ordered_metrics(tasks[task]):
                rows.append({"point": point, "kind": kind, "shots": shots, "step": step,
                             "task": task, "metric": metric, "value": tasks[task][metric]})
    return rows


def _format(metric: str, value) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if metric in COUNT_METRICS else f"{value:.2f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table of string cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def eval_markdown(run: Run) -> str:
    """One markdown table per task: rows = evaluation points, columns = metrics."""
    run = _as_run(run)
    points = list(_points(run))
    tasks = sorted({t for *_, point_tasks in points for t in point_tasks})
    sections = []
    for task in tasks:
        present = [(label, p[task]) for label, *_, p in points if task in p]
        metrics = _ordered_metrics({m for _, values in present for m in values})
        rows = [[label] + [_format(m, values.get(m)) for m in metrics]
                for label, values in present]
        sections.append(f"### {task}\n\n" + markdown_table(["point"] + metrics, rows))
    return "\n\n".join(sections) + "\n"


def write_tables(workdir: str) -> tuple[str, str]:
    """Writes `report/eval_table.csv` and `report/eval_table.md`; returns both paths."""
    run = load_eval(workdir)
    out_dir = _report_dir(workdir)
    csv_path = os.path.join(out_dir, "eval_table.csv")
    with fileio.open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(eval_table(run))  # str(float) round-trips: full precision.
    md_path = os.path.join(out_dir, "eval_table.md")
    with fileio.open(md_path, "w") as f:
        f.write(f"# Evaluation of {run['workdir']}\n\n" + eval_markdown(run))
    return csv_path, md_path


def forgetting(run: Run) -> dict:
    """Score deltas of the guard tasks at each step > 0 against step 0.

    Args:
      run: a workdir, or what `load_eval` returned.

    Returns:
      `{"guard_tasks": [...], "primary_metric": {task: metric},
      "deltas": {step: {task: {metric: value - value_at_step_0}}},
      "reason": None, or why nothing could be measured}`. Only score metrics
      (higher is better) get deltas; guard tasks missing at a step are left out.
    """
    run = _as_run(run)
    guards, steps = run["guard_tasks"], run["steps"]
    result = {"guard_tasks": guards, "primary_metric": {}, "deltas": {}, "reason": None}
    base = steps.get(0, {})
    measured = [t for t in guards if t in base]
    if not guards:
        result["reason"] = "no guard tasks configured"
    elif 0 not in steps:
        result["reason"] = "no step 0 evaluation"
    elif not measured:
        result["reason"] = f"guard tasks not in the step 0 evaluation: {', '.join(guards)}"
    elif not any(step > 0 for step in steps):
        result["reason"] = "no evaluation after step 0"
    if result["reason"]:
        return result
    result["primary_metric"] = {t: primary_metric(base[t]) for t in measured}
    for step in (s for s in steps if s > 0):
        result["deltas"][step] = {
            t: {m: steps[step][t][m] - v for m, v in base[t].items()
                if _is_score(m) and m in steps[step][t]}
            for t in measured if t in steps[step]}
    return result


def _latest_primary_deltas(result: dict) -> tuple[int, dict[str, tuple[str, float]]]:
    """(latest step, {task: (primary metric, delta)}) of a `forgetting` result."""
    step = max(result["deltas"])
    deltas = {}
    for task, metric_deltas in result["deltas"][step].items():
        metric = result["primary_metric"][task]
        if metric in metric_deltas:
            deltas[task] = (metric, metric_deltas[metric])
    return step, deltas


def forgetting_summary(run: Run) -> str:
    """One line on forgetting at the latest step, over the guard tasks' primary metrics.

    E.g. "forgetting at step 200 vs step 0 over 12 guard tasks: mean Δ -3.1 (primary
    metrics), worst t0_imdb accuracy -12.0, 9 of 12 worse"; or "no forgetting
    measured: <reason>".
    """
    result = run if isinstance(run, dict) and "deltas" in run else forgetting(run)
    if result["reason"]:
        return f"no forgetting measured: {result['reason']}"
    step, deltas = _latest_primary_deltas(result)
    if not deltas:
        return f"no forgetting measured: no guard task has a score at step {step}"
    mean = sum(d for _, d in deltas.values()) / len(deltas)
    worst = min(deltas, key=lambda t: deltas[t][1])
    worse = sum(d < 0 for _, d in deltas.values())
    return (f"forgetting at step {step} vs step 0 over {len(deltas)} guard tasks: "
            f"mean Δ {mean:+.1f} (primary metrics), worst {worst} {deltas[worst][0]} "
            f"{deltas[worst][1]:+.1f}, {worse} of {len(deltas)} worse")


def safe_filename(name: str) -> str:
    """`name` with every character outside [A-Za-z0-9_.-] replaced by `_`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "_"


def _report_dir(workdir: str) -> str:
    out_dir = os.path.join(os.fspath(workdir), "report")
    fileio.makedirs(out_dir)
    return out_dir


def _new_figure(width: float = 7.0, height: float = 4.5):
    # The object-oriented API with the Agg canvas: no pyplot state, and a Colab
    # user's interactive backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_train_loss(train_rows: list[dict], path: str) -> str | None:
    """Training loss vs step as a PNG; None (nothing written) without loss rows."""
    points = [(r["step"], r["loss"]) for r in train_rows if "loss" in r]
    if not points:
        return None
    fig = _new_figure()
    ax = fig.subplots()
    ax.plot(*zip(*points), color="C0")
    ax.set(xlabel="step", ylabel="training loss", title="training loss")
    ax.grid(alpha=0.3)
    with fileio.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return path


def plot_task(run: dict, task: str, path: str) -> str | None:
    """One panel per score metric of `task` (and its validation loss) vs step,
    k-shot values as dashed lines."""
    steps = {s: tasks[task] for s, tasks in run["steps"].items() if task in tasks}
    shots = {k: tasks[task] for k, tasks in run["incontext"].items() if task in tasks}
    seen = {m for values in [*steps.values(), *shots.values()] for m in values}
    metrics = [m for m in _ordered_metrics(seen) if _is_score(m) or m == "loss"]
    if not metrics:
        return None
    ncols = min(3, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig = _new_figure(4.0 * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        points = [(s, v[metric]) for s, v in steps.items() if metric in v]
        if points:
            ax.plot(*zip(*points), marker="o", color="C0", label="fine-tuned")
        for i, (k, values) in enumerate(shots.items()):
            if metric in values:
                ax.axhline(values[metric], linestyle="--", color=f"C{i + 1}",
                           label=f"{k}-shot")
        ax.set(title=metric, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(task)
    with fileio.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return path


def plot_forgetting(result: dict, path: str) -> str | None:
    """Bars of each guard task's primary-metric delta at the latest step vs step 0."""
    if result["reason"]:
        return None
    step, deltas = _latest_primary_deltas(result)
    if not deltas:
        return None
    tasks = sorted(deltas, key=lambda t: deltas[t][1])
    values = [deltas[t][1] for t in tasks]
    fig = _new_figure(7.0, 1.0 + 0.35 * len(tasks))
    ax = fig.subplots()
    ax.barh([f"{t} ({deltas[t][0]})" for t in tasks], values,
            color=["C3" if v < 0 else "C2" for v in values])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set(xlabel="Δ vs step 0 (primary metric)", title=f"forgetting at step {step}")
    ax.grid(axis="x", alpha=0.3)
    with fileio.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return path


def write_plots(workdir: str) -> list[str]:
    """Writes every plot whose data exists into `report/`; returns their paths."""
    run, out_dir = load_eval(workdir), _report_dir(workdir)
    paths = [plot_train_loss(load_train_metrics(workdir),
                             os.path.join(out_dir, "train_loss.png"))]
    tasks = sorted({t for *_, point_tasks in _points(run) for t in point_tasks})
    used = set()
    for task in tasks:
        name = safe_filename(task)
        while name in used:  # Two names that sanitize alike must not overwrite.
            name += "_"
        used.add(name)
        paths.append(plot_task(run, task, os.path.join(out_dir, f"eval_{name}.png")))
    paths.append(plot_forgetting(forgetting(run), os.path.join(out_dir, "forgetting.png")))
    paths.append(plot_suites(run, os.path.join(out_dir, "suites.png")))
    return [p for p in paths if p]


def plot_suites(run: dict, path: str) -> str | None:
    """Each benchmark suite's aggregates across steps (None when no step has suites)."""
    if not run.get("suites"):
        return None
    fig = _new_figure()
    ax = fig.subplots()
    series: dict[str, list[tuple[int, float]]] = {}
    for step, suites in run["suites"].items():
        for suite, values in suites.items():
            for name, value in values.items():
                series.setdefault(f"{suite} {name}", []).append((step, value))
    for label, points in sorted(series.items()):
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=label)
    ax.set(xlabel="step", ylabel="score", title="benchmark suites")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    with fileio.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return path


def suites_table(run: dict) -> str | None:
    """Markdown: rows = steps, columns = each suite's aggregates (None: no suites)."""
    if not run.get("suites"):
        return None
    columns = sorted({(suite, name) for suites in run["suites"].values()
                      for suite, values in suites.items() for name in values})
    rows = [[f"step {step}"] + [_format(name, suites.get(suite, {}).get(name))
                                for suite, name in columns]
            for step, suites in run["suites"].items()]
    return markdown_table(["point"] + [f"{suite} {name}" for suite, name in columns], rows)


def robustness_table(run: dict) -> str | None:
    """Markdown: the latest step's per-template spread of multi-template tasks."""
    if not run.get("robustness"):
        return None
    step = max(run["robustness"])
    rows = []
    for task, entry in sorted(run["robustness"][step].items()):
        values = entry["per_template"]
        rows.append([task, entry["metric"], str(len(values)), _format("", min(values.values())),
                     _format("", max(values.values())), _format("", entry["spread"]),
                     _format("", entry["std"])])
    return (f"Step {step}: the primary metric per instruction template.\n\n" + markdown_table(
        ["task", "metric", "templates", "min", "max", "spread", "std"], rows))


def calibration_table(run: dict) -> str | None:
    """Markdown: the latest step's expected calibration error of rank classification."""
    steps = [s for s, tasks in run["steps"].items()
             if any("calibration_ece" in m for m in tasks.values())]
    if not steps:
        return None
    step = max(steps)
    rows = [[task, _format("", m.get("rank_accuracy")), _format("", m["calibration_ece"])]
            for task, m in sorted(run["steps"][step].items()) if "calibration_ece" in m]
    return (f"Step {step}: expected calibration error (x 100, 10 equal-mass bins) of the "
            f"rank-classification probabilities; lower is better.\n\n"
            + markdown_table(["task", "rank_accuracy", "calibration_ece"], rows))


def _rouge_note(workdir: str) -> str | None:
    path = os.path.join(workdir, "config.json")
    if not fileio.exists(path):
        return None
    split = (_read_json(path).get("eval") or {}).get("rouge_sentence_split")
    return (f"rougeLsum splits sentences with `{split}` (`eval.rouge_sentence_split`)."
            if split else None)


def _primary_table(run: dict) -> str:
    """Markdown: the latest step's primary metric per task vs step 0 and in-context."""
    latest = max(run["steps"]) if run["steps"] else None
    compare = [(f"step {s}", run["steps"][s]) for s in (0,)
               if s in run["steps"] and s != latest]
    compare += [(f"{k}-shot", tasks) for k, tasks in run["incontext"].items()]
    columns = ([(f"step {latest}", run["steps"][latest])] if latest is not None else [])
    columns += compare
    tasks = sorted({t for _, point_tasks in columns for t in point_tasks})
    rows = []
    for task in tasks:
        metric = primary_metric({m for _, p in columns for m in p.get(task, {})})
        if metric is None:
            continue
        rows.append([task, metric] + [_format(metric, p.get(task, {}).get(metric))
                                      for _, p in columns])
    return markdown_table(["task", "metric"] + [label for label, _ in columns], rows)


def prompt_section(workdir: str) -> str | None:
    """For a prompt-tuning run (`peft.method=prompt`): the nearest vocabulary tokens of
    its latest soft prompt, also written to `report/prompt_neighbors.{md,json}`."""
    path = os.path.join(workdir, "config.json")
    config = _read_json(path) if fileio.exists(path) else {}
    if (config.get("peft") or {}).get("method") != "prompt":
        return None
    # Here, not at the top: reading a checkpoint needs jax, and importing this module
    # stays cheap (as matplotlib's import in _new_figure).
    from ift_jax import prompt_neighbors
    try:
        return prompt_neighbors.markdown(prompt_neighbors.write(workdir))
    except errors.UserError as e:
        return f"Not available: {e}"


def _readme(run: dict, train_rows: list[dict], summary: str, plots: list[str],
            prompt: str | None = None) -> str:
    losses = [r for r in train_rows if "loss" in r]
    loss_line = (f"Final training loss: {losses[-1]['loss']:.4f} (step {losses[-1]['step']})"
                 if losses else "No training loss logged (no train_metrics.jsonl).")
    lines = [f"# Report: {run['workdir']}", "", loss_line, ""]
    if run["steps"] or run["incontext"]:
        lines += ["## Primary metric per task", "", _primary_table(run), ""]
    for title, table in (("Benchmark suites", suites_table(run)),
                         ("Robustness to the instruction", robustness_table(run)),
                         ("Calibration", calibration_table(run))):
        if table:
            lines += [f"## {title}", "", table, ""]
    if prompt:
        lines += ["## Soft prompt: nearest tokens", "", prompt, ""]
    lines += ["## Forgetting", "", summary, ""]
    note = _rouge_note(run["workdir"])
    if note:
        lines += [note, ""]
    lines += ["## Plots", ""]
    lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})\n" for p in plots] or ["none"]
    lines += ["", "## Files", "",
              "- [eval_table.md](eval_table.md): every metric, one table per task",
              "- [eval_table.csv](eval_table.csv): the same, long format, full precision",
              "- [forgetting.json](forgetting.json): deltas of the guard tasks vs step 0", ""]
    return "\n".join(lines)


def write_report(workdir: str) -> str:
    """Writes tables, forgetting, plots and `report/README.md`; returns the README path.

    Raises:
      FileNotFoundError: the workdir has no evaluation files and no train_metrics.jsonl.
    """
    workdir = os.fspath(workdir)
    run, train_rows = load_eval(workdir), load_train_metrics(workdir)
    if not (run["steps"] or run["incontext"] or train_rows):
        raise errors.MissingError(
              f"nothing to report in workdir {workdir!r}: it has no eval/step_<N>.json, "
              "no eval/incontext_<k>shot.json and no train_metrics.jsonl; run "
              "`ift-jax train` or `ift-jax eval` with this --workdir first")
    write_tables(workdir)
    result = forgetting(run)
    out_dir = _report_dir(workdir)
    with fileio.open(os.path.join(out_dir, "forgetting.json"), "w") as f:
        json.dump({**result, "summary": forgetting_summary(result)}, f, indent=2)
    plots = write_plots(workdir)
    path = os.path.join(out_dir, "README.md")
    with fileio.open(path, "w") as f:
        f.write(_readme(run, train_rows, forgetting_summary(result), plots,
                        prompt_section(workdir)))
    return path
