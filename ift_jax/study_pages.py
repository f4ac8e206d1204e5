"""A study's page: `<name>.md`, its plot `<name>.png` and its results `<name>.json`,
written from the steps' files by `ift-jax study` (never by hand), and the facts
a page states: the git commit and the machine.

The page holds the claim, the findings (each claim checked by the study's
rule), the table and plot, the study's design and settings, the exact
commands (without this machine's paths: the checkout's files relative to it, the
data directory relative to the checkout or as a placeholder), the commit(s) the
steps ran at, the machine, and the wall and CPU time of every step (and what the
load averages say about the machine, only when they were recorded).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import inspect
import json
import os
import platform
import subprocess
from typing import Any, Sequence

from ift_jax import fileio
from ift_jax.studies import plans, readout

PRESET_NOTES = {
    "smoke": "a tiny model and a few steps that check the machinery (CI); the numbers mean "
             "nothing",
    "cpu": "sized for a 2-core CPU",
    "gpu": "larger models and more steps, for one accelerator",
}


def git_commit() -> str:
    """`<hash>` of the checkout ift_jax runs from (`+dirty` with uncommitted changes to
    tracked files), or "unknown" outside a git checkout."""
    where = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    """What the steps ran on (this process's machine: steps run where the runner runs).

    benchmarks/environment.py describes machines for the benchmarks, but benchmarks/
    is not installed with ift_jax, so the few facts a page needs are read here.
    """
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    return {"cpu_model": _cpu_model(), "cpus": os.cpu_count(),
            "ram_gib": round(ram / 2 ** 30, 1) if ram else None,
            "platform": platform.platform(), "python": platform.python_version(),
            **{p: _version(p) for p in ("jax", "jaxlib", "flax", "seqio")}}


# The checkout ift_jax runs from: its absolute path is this machine's, not the reader's.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_PLACEHOLDER = "/path/to/data"


def portable(command: str) -> str:
    """`command` without this machine's checkout path: files in the checkout (a config
    file) are named relative to it, as a reader's commands run from their checkout."""
    return command.replace(CHECKOUT + os.sep, "")


def portable_data_dir(data_dir: str) -> str:
    """How a page names the data directory: relative to the checkout when it lies
    beside it (`../shared/data`), else a placeholder: never this machine's path."""
    if not data_dir or "://" in data_dir:
        return data_dir
    relative = os.path.relpath(os.path.abspath(data_dir), CHECKOUT)
    return relative if relative.startswith("..") and relative.count("..") == 1 else (
        DATA_PLACEHOLDER)


def _step_rows(plan: plans.Plan, timings: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for step in plan.steps:
        attempts = timings.get(step.name, [])
        rows.append({"step": step.name, "done": step.done(), "command": portable(step.shell()),
                     "attempts": attempts,
                     "wall_s": sum(a["wall_s"] for a in attempts) if attempts else None,
                     "cpu_s": sum(a["cpu_s"] for a in attempts) if attempts else None,
                     "load": [a.get(k) for a in attempts for k in ("load_before",
                                                                    "load_after")],
                     "commits": sorted({a["commit"] for a in attempts})})
    return rows


def _minutes(seconds: Any) -> Any:
    return None if seconds is None else seconds / 60


def _timing_section(rows: list[dict], cpus: int) -> str:
    table = readout.table(
        ["step", "status", "wall (min)", "CPU (min)", "CPU / wall", "load avg (1 min)",
         "runs", "commit"],
        [[r["step"], "done" if r["done"] else "not done", _minutes(r["wall_s"]),
          _minutes(r["cpu_s"]),
          readout.cell(r["cpu_s"] / r["wall_s"] if r["wall_s"] else None),
          " – ".join(f"{x:.1f}" for x in r["load"] if x is not None) or readout.MISSING,
          len(r["attempts"]), ", ".join(c[:12] for c in r["commits"]) or readout.MISSING]
         for r in rows])
    timed = [r for r in rows if r["wall_s"] is not None]
    total_wall = sum(r["wall_s"] for r in timed) / 60
    total_cpu = sum(r["cpu_s"] for r in timed) / 60
    loads = [x for r in rows for x in r["load"] if x is not None]
    if not loads:
        shared = ("No load average was recorded while the steps ran (none was timed here), "
                  "so this page says nothing about what else the machine was running.")
    elif max(loads) > cpus / 2:
        shared = (f"The machine was shared with other jobs while the steps ran (1-minute "
                  f"load averages up to {max(loads):.1f} on {cpus} cores): wall times are "
                  f"longer than on an idle machine; CPU time (the steps' own processes) is "
                  f"the comparable measure.")
    else:
        shared = (f"The 1-minute load averages stayed at or below {max(loads):.1f} on {cpus} "
                  f"cores while the steps ran: the machine was otherwise idle.")
    return (f"{table}\n\nTotal over the steps timed here: {total_wall:.1f} min wall, "
            f"{total_cpu:.1f} min CPU. Steps shared with other studies (the base, the "
            f"forgetting runs) ran once and are counted on every page that uses them. "
            f"{shared}")


def _commands(plan: plans.Plan, command: Sequence[str]) -> str:
    data_dir = portable_data_dir(os.environ.get("IFT_JAX_DATA_DIR", ""))
    lines = []
    if data_dir:
        where = ("  # the folder holding the datasets (docs/tasks.md)"
                 if data_dir == DATA_PLACEHOLDER else "")
        lines.append(f"export IFT_JAX_DATA_DIR={data_dir}{where}")
    if command:
        lines.append(portable(" ".join(command)))
    lines.append("")
    lines.append("# The steps it runs, in order (each one an ordinary command; a re-run "
                 "skips those done):")
    lines += [portable(s.shell()) for s in plan.steps]
    return "```bash\n" + "\n".join(lines) + "\n```"


def _design(study) -> str:
    doc = inspect.getdoc(study) or ""
    body = doc.split("\n\n", 1)[1] if "\n\n" in doc else ""
    return body.strip("\n").rstrip()  # Keeps an indented first line (a code block).


def render(study, plan: plans.Plan, results: dict, rows: list[dict], info: dict,
           command: Sequence[str], png: str) -> str:
    """The page's markdown."""
    commits = sorted({c for r in rows for c in r["commits"]}) or [git_commit()]
    parts = [
        f"# {study.TITLE}",
        f"Written by `ift-jax study {study.NAME}` ({os.path.basename(__file__)} and "
        f"`ift_jax/studies/{study.NAME}.py`) from the steps' files; do not edit by hand. "
        f"Preset `{plan.preset}`: {PRESET_NOTES[plan.preset]}.",
        "## Claim", study.CLAIM,
        "## Findings", "\n".join(study.findings(results)),
        "## Results", study.table(results),
    ]
    if png:
        parts.append(f"![{study.NAME}]({os.path.basename(png)})")
    parts += ["## Design", _design(study),
              f"Settings (`ift_jax/studies/recipe.py` and `{study.NAME}.py`, chosen "
              f"before the runs):",
              "\n".join(f"- `{k}`: `{json.dumps(v)}`" for k, v in plan.settings.items()),
              "## Commands", _commands(plan, command),
              "## Commit, machine and time",
              f"Commit{'s' if len(commits) > 1 else ''}: "
              + ", ".join(f"`{c}`" for c in commits) + ".",
              f"Machine: {info['cpu_model']}, {info['cpus']} cores, {info['ram_gib']} GiB RAM, "
              f"{info['platform']}; Python {info['python']}, jax {info['jax']}, flax "
              f"{info['flax']}, seqio {info['seqio']}.",
              _timing_section(rows, info["cpus"] or 1)]
    return "\n\n".join(parts) + "\n"


def write(study, plan: plans.Plan, timings: dict[str, list[dict]], page_dir: str,
          command: Sequence[str] = ()) -> str:
    """Writes `<name>.md`, `.png` (when there is something to plot) and `.json` into
    `page_dir`; returns the page's path."""
    fileio.makedirs(page_dir)
    results = study.results(plan)
    png = study.plot(results, os.path.join(page_dir, f"{study.NAME}.png")) or ""
    rows = _step_rows(plan, timings)
    info = machine()
    page = os.path.join(page_dir, f"{study.NAME}.md")
    with fileio.open(page, "w") as f:
        f.write(render(study, plan, results, rows, info, command, png))
    payload = {"study": study.NAME, "title": study.TITLE, "preset": plan.preset,
               "claim": study.CLAIM, "findings": study.findings(results), "results": results,
               "settings": plan.settings, "machine": info, "steps": rows,
               "written": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds")}
    with fileio.open(os.path.join(page_dir, f"{study.NAME}.json"), "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return page

