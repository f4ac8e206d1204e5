"""Sweeps: a config file's `get_sweep()` points, run one after another.

A sweep file is an ordinary config file (`get_config(arg)`) that also defines
`get_sweep(arg)`: a list of override dicts, one per run ("point"), keyed by
config path (`"peft.lora_rank"`; big_vision's `"config.peft.lora_rank"` works
too). An optional `"name"` key names the point; by default the name is built
from the overridden keys' last parts and values (`lora_rank=8`). `product`
and `zip_` build such lists.

`ift-jax sweep --config=FILE[:arg] --workdir=ROOT [--dry_run] [--in_process]
[--points=NAME,...] [--config.k=v]` runs each point (or the named ones) as
its own `ift-jax train` process (so its peak memory is its own;
`--in_process` runs them in the sweep's process) in `ROOT/<name>/`, skips
points whose run finished (`summary.json` says so), and collects
`ROOT/sweep_summary.{csv,md,png}`: status, overrides, final training loss, the
last evaluation's metrics, trainable params and peak memory.

The sweep tells the truth about its points:

- a point that fails is `failed` in the summary with its reason (the point's
  one-line error, or the last line it wrote, or how it died), kept in
  `ROOT/sweep_points.json` until the point is run again;
- a point process dies with the sweep, and a rerun adopts a point that is still
  running instead of starting a second trainer (`ift_jax.sweep_points`);
- a point whose run lock a live process holds is `running` in the summary.
"""

from __future__ import annotations

import csv
import datetime
import itertools
import json
import logging
import os
import re
import shlex
import sys
from typing import Any, Callable, Optional, Sequence

from ift_jax import errors
from ift_jax import config_files, fileio, progress, run_lock, sweep_points

Point = dict[str, Any]
POINTS_FILE = "sweep_points.json"  # Each point's last outcome: {name: {status, reason, ...}}.


def product(*axes: dict[str, Sequence[Any]]) -> list[Point]:
    """Every combination: `product({"a": [1, 2]}, {"b": [3, 4]})` -> 4 points.

    Keys within one dict vary together (zipped); separate dicts multiply.
    """
    zipped = [zip_(axis) for axis in axes]
    return [dict(itertools.chain.from_iterable(p.items() for p in combo))
            for combo in itertools.product(*zipped)]


def zip_(axis: dict[str, Sequence[Any]]) -> list[Point]:
    """Values taken together: `zip_({"a": [1, 2], "b": [3, 4]})` -> a=1,b=3 and a=2,b=4.

    Raises:
      ValueError: if the lists differ in length.
    """
    lengths = {key: len(values) for key, values in axis.items()}
    if len(set(lengths.values())) > 1:
        raise errors.ConfigError(f"zipped sweep axes need equal lengths; got {lengths}")
    return [dict(zip(axis, values)) for values in zip(*axis.values())]


def _key(key: str) -> str:
    return key[len("config."):] if key.startswith("config.") else key


def point_name(point: Point) -> str:
    """The point's `name`, else `last_key_part=value` pairs; safe as a directory name."""
    name = point.get("name") or ",".join(
        f"{_key(k).rsplit('.', 1)[-1]}={v}" for k, v in point.items())
    safe = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", str(name))
    if not safe or safe in (".", ".."):
        raise errors.ConfigError(f"sweep point {point} has no usable name; give it a 'name' key")
    return safe


def overrides(point: Point) -> list[str]:
    """`--config.k=v` flags of a point (its `name` is not a config key)."""
    return [f"--config.{_key(k)}={v}" for k, v in point.items() if k != "name"]


def load_points(config_spec: str) -> list[Point]:
    """`get_sweep(arg)` of the config file in `FILE[:arg]`.

    Raises:
      ValueError: if the file defines no `get_sweep`, returns no points, or two
        points share a name.
    """
    path, _, arg = config_spec.partition(":")
    module = config_files.import_file(config_spec)
    if not hasattr(module, "get_sweep"):
        raise errors.ConfigError(f"{path} defines no get_sweep(); a sweep file returns a list of "
                                 "override dicts from get_sweep(arg)")
    try:
        points = module.get_sweep(arg or None)
    except TypeError:  # get_sweep() without the preset argument.
        points = module.get_sweep()
    if not points:
        raise errors.ConfigError(f"{path}: get_sweep() returned no points")
    names = [point_name(p) for p in points]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise errors.ConfigError(f"{path}: sweep points share names {duplicates}; add 'name' keys")
    return points


def has_sweep(config_spec: str) -> bool:
    """Whether the config file of `FILE[:arg]` defines `get_sweep`."""
    return hasattr(config_files.import_file(config_spec), "get_sweep")


def commands(config_spec: str, root: str, points: Sequence[Point],
             extra: Sequence[str] = ()) -> list[tuple[str, list[str]]]:
    """(point name, `ift-jax train` argv) per point; `extra` flags apply to all."""
    return [(point_name(p), ["ift-jax", "train", f"--config={config_spec}",
                             f"--workdir={os.path.join(root, point_name(p))}",
                             *extra, *overrides(p)]) for p in points]


def finished(workdir: str) -> bool:
    """Whether `workdir` holds a run that reached its last step (`summary.json`)."""
    path = os.path.join(workdir, "summary.json")
    if not fileio.exists(path):
        return False
    with fileio.open(path) as f:
        return bool(json.load(f).get("finished"))


def select(points: Sequence[Point], names: Sequence[str], path: str) -> list[Point]:
    """The points named in `names` (all for none), in the sweep's order.

    Raises:
      ConfigError: a name that is not a point (listing the points).
    """
    if not names:
        return list(points)
    known = [point_name(p) for p in points]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise errors.ConfigError(f"--points: {path} has no point {', '.join(unknown)}; its "
                                 f"points: {', '.join(known)}")
    return [p for p in points if point_name(p) in names]


def run(config_spec: str, root: str, extra: Sequence[str] = (), dry_run: bool = False,
        validate=None, in_process: Optional[Callable[[list[str]], int]] = None,
        only: Sequence[str] = ()) -> int:
    """Runs (or, with `dry_run`, prints) every point; returns the number that failed.

    Args:
      only: point names to run (all when empty); the summary covers these.
      validate: `argv -> None` raising on bad flags (the CLI's parser), called for
        every point before anything runs, so a typo fails the sweep up front.
      in_process: `argv -> exit code` running one point's `ift-jax` argv in this
        process (the CLI passes its own `main`) instead of one `ift-jax train`
        process each: no start-up per point (quick CPU sweeps, notebooks), but
        the peak host memory reported is the process's so far, not the point's own.
    """
    points = select(load_points(config_spec), only, config_spec.partition(":")[0])
    todo = commands(config_spec, root, points, extra)
    if validate:
        for _, argv in todo:
            validate(argv[2:])
    if dry_run:
        for name, argv in todo:
            state = "  # finished, skipped" if finished(os.path.join(root, name)) else ""
            print(shlex.join(argv) + state)
        return 0
    failed = 0
    pending = [(name, argv) for name, argv in todo if not finished(os.path.join(root, name))]
    for name in sorted({n for n, _ in todo} - {n for n, _ in pending}):
        logging.info("sweep point %s finished already; skipped", name)
    # Plain lines, never a bar: the points print their own output to the same terminal.
    tracker = progress.Progress(len(pending), "sweep", "points", stream=sys.stdout, bar=False,
                                every_s=0.0)
    for name, argv in pending:
        workdir = os.path.join(root, name)
        if sweep_points.adopt(name, workdir) and finished(workdir):
            outcome = sweep_points.Outcome("done", exit_code=0)  # Finished by the adopted run.
        else:
            outcome = sweep_points.run(name, argv, in_process)
        if outcome.status != "stopped":
            _record(root, name, outcome)
        if outcome.status == "stopped":  # Preempted: the point saved; a re-run resumes it.
            logging.warning("sweep stopped by a signal during point %s", name)
            break
        if outcome.status == "failed":
            logging.error("sweep point %s failed: %s", name, outcome.reason)
            failed += 1
        tracker.update(note=f"{name} {'failed' if outcome.status == 'failed' else 'done'}")
    write_summary(root, points)
    return failed


def _record(root: str, name: str, outcome: sweep_points.Outcome) -> None:
    """`ROOT/sweep_points.json`: the point's last outcome (rewritten whole)."""
    path = os.path.join(root, POINTS_FILE)
    records = read_records(root)
    records[name] = {"status": outcome.status, "reason": outcome.reason,
                     "exit_code": outcome.exit_code,
                     "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec="seconds")}
    fileio.makedirs(root)
    fileio.write_text(path + ".tmp", json.dumps(records, indent=1, sort_keys=True))
    fileio.replace(path + ".tmp", path)


def read_records(root: str) -> dict[str, dict]:
    """The points' last outcomes (`_record`); {} before any."""
    path = os.path.join(root, POINTS_FILE)
    if not fileio.exists(path):
        return {}
    try:
        with fileio.open(path) as f:
            return dict(json.load(f))
    except (ValueError, TypeError):
        return {}


# ----------------------------------------------------------------------------
# The summary table.


def _last_eval(workdir: str) -> dict[str, float]:
    from ift_jax import report
    steps = report.load_eval(workdir)["steps"] if fileio.isdir(
        os.path.join(workdir, "eval")) else {}
    if not steps:
        return {}
    last = steps[max(steps)]
    return {f"{task}/{metric}": value for task, values in last.items()
            for metric, value in values.items() if metric != "invalid_utf8_predictions"}


def _status(workdir: str, summary: dict, record: dict) -> tuple[str, str]:
    """(status, reason) of a point: finished, running (a live run lock), failed (the
    sweep's record of its last run, with the reason), stopped, or not run."""
    if summary.get("finished"):
        return "finished", ""
    if run_lock.live_holder(workdir) is not None:
        return "running", ""
    if record.get("status") == "failed":
        return "failed", record.get("reason") or f"exit code {record.get('exit_code')}"
    return ("stopped" if summary else "not run"), ""


def summary_rows(root: str, points: Sequence[Point]) -> list[dict[str, Any]]:
    """One row per point: name, overrides, status (and why a failed one failed),
    training and eval results."""
    records = read_records(root)
    rows = []
    for point in points:
        name = point_name(point)
        workdir = os.path.join(root, name)
        row: dict[str, Any] = {"point": name}
        row.update({_key(k): v for k, v in point.items() if k != "name"})
        summary_path = os.path.join(workdir, "summary.json")
        summary = {}
        if fileio.exists(summary_path):
            with fileio.open(summary_path) as f:
                summary = json.load(f)
        row["status"], reason = _status(workdir, summary, records.get(name, {}))
        if reason:
            row["reason"] = reason
        row["step"] = summary.get("step", "")
        row["train_loss"] = summary.get("train", {}).get("loss", "")
        row["trainable_params"] = summary.get("params", {}).get("trainable", "")
        row["total_params"] = summary.get("params", {}).get("total", "")
        memory = summary.get("peak_memory", {})
        row["peak_device_gib"] = _gib(memory.get("device_bytes"))
        row["peak_host_rss_gib"] = _gib(memory.get("host_rss_bytes"))
        row["wall_s"] = summary.get("wall_s", "")
        row.update(_last_eval(workdir))
        rows.append(row)
    return rows


def _gib(value: Optional[float]) -> Any:
    return round(value / 2 ** 30, 3) if value else ""


def _columns(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return columns


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def write_summary(root: str, points: Sequence[Point]) -> tuple[str, str, Optional[str]]:
    """`ROOT/sweep_summary.csv`, `.md` and `.png`; returns their paths (png: None if
    nothing to plot)."""
    rows = summary_rows(root, points)
    columns = _columns(rows)
    fileio.makedirs(root)
    csv_path = os.path.join(root, "sweep_summary.csv")
    with fileio.open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    md_path = os.path.join(root, "sweep_summary.md")
    from ift_jax import report
    table = report.markdown_table(columns, [[_cell(r.get(c, "")) for c in columns]
                                            for r in rows])
    with fileio.open(md_path, "w") as f:
        f.write(f"# Sweep {root}\n\n{table}\n")
    return csv_path, md_path, plot_summary(rows, os.path.join(root, "sweep_summary.png"))


def _swept_axis(rows: list[dict]) -> Optional[str]:
    """The one numeric override that differs across points, if there is exactly one."""
    candidates = []
    for key in _columns(rows):
        if key in ("point", "status") or "/" in key or key in _RESULT_COLUMNS:
            continue
        values = [r.get(key) for r in rows]
        if (all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                and len(set(values)) > 1):
            candidates.append(key)
    return candidates[0] if len(candidates) == 1 else None


_RESULT_COLUMNS = ("step", "train_loss", "trainable_params", "total_params",
                   "peak_device_gib", "peak_host_rss_gib", "wall_s")


def plot_summary(rows: list[dict], path: str) -> Optional[str]:
    """One panel per eval metric (+ trainable params): vs the swept value when one
    numeric setting varies (log x for ranges over 16x), else a bar per point."""
    metrics = [c for c in _columns(rows) if "/" in c or c == "trainable_params"]
    metrics = [m for m in metrics if any(isinstance(r.get(m), (int, float)) for r in rows)]
    if not metrics:
        return None
    from matplotlib.figure import Figure
    ncols = min(3, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    axis = _swept_axis(rows)
    for ax, metric in zip(axes, metrics):
        done = [r for r in rows if isinstance(r.get(metric), (int, float))]
        if axis:
            done.sort(key=lambda r: r[axis])
            xs = [r[axis] for r in done]
            ax.plot(xs, [r[metric] for r in done], marker="o")
            if min(xs) > 0 and max(xs) / min(xs) >= 16:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(axis)
        else:
            ax.bar(range(len(done)), [r[metric] for r in done])
            ax.set_xticks(range(len(done)), [r["point"] for r in done], rotation=30,
                          ha="right", fontsize="small")
        if metric == "trainable_params":
            ax.set_yscale("log")
        ax.set_title(metric, fontsize="small")
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    with fileio.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return path
