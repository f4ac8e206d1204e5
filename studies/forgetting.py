"""Study 2, forgetting: single-task fine-tuning on DialogSum with full fine-tuning,
LoRA and prompt tuning, from the base; the DialogSum gain and, at every
checkpoint, the change of each guard task's validation loss and metrics.

Every run is compared with the base evaluated the same way (`forgetting/base`,
a `train.steps=0` run). LoRA and prompt-tuned models are scored as they run:
adapter merged, prompt prepended to every input (guard tasks too); with the
adapter or prompt removed the base is unchanged by construction.

Rules, fixed before the runs (final checkpoint; "forgetting" = minus the mean
change of the trained guard tasks' primary metrics, in points):
1. full fine-tuning gains most on the target: its ROUGE-L gain exceeds both
   PEFT methods';
2. full fine-tuning forgets most: its forgetting exceeds both PEFT methods';
3. PEFT methods forget far less: each forgets at most half as much as full
   fine-tuning (which must itself forget, by at least `MIN_FORGETTING` points).
"""

from __future__ import annotations

from typing import Optional

from ift_jax.studies import figures, plans, readout, recipe

NAME = "forgetting"
TITLE = "Catastrophic forgetting: full fine-tuning vs LoRA vs prompt tuning"
CLAIM = ("Fine-tuning on one task makes a multi-task model forget the others; full "
         "fine-tuning gains most on the target and forgets most, parameter-efficient methods "
         "forget far less (the course's central warning; Luo et al. 2023, Biderman et al. "
         "2024 'LoRA learns less and forgets less').")
MIN_FORGETTING = 1.0
NEXT = ("More fine-tuning steps (forgetting grows with steps; Luo et al.) and a larger base, "
        "whose skills are worth more and are less tied to its surface formats.")


def plan(preset: str, root: str, init_from: str = "") -> plans.Plan:
    del init_from
    return plans.Plan(NAME, preset, root, recipe.forgetting_steps(preset, root),
                      recipe.settings(preset))


def run_results(workdir: str, reference: dict, groups: dict) -> dict:
    """One fine-tuning run against the reference (the base): target metrics and the
    guard deltas at each evaluated step."""
    points = []
    for step in readout.eval_steps(workdir):
        now = readout.at_step(workdir, step)
        point = {"step": step, "target": now.get(recipe.TARGET, {})}
        for kind, tasks in groups.items():
            d = readout.deltas(now, reference, tasks)
            point[kind] = {"deltas": d, "mean_primary": readout.mean_primary_delta(d, reference),
                           "mean_loss": readout.mean_loss_delta(d)}
        points.append(point)
    return {"workdir": workdir, "params": readout.params(workdir), "points": points}


def reference(root: str) -> dict:
    return readout.at_step(recipe.workdir(root, recipe.REFERENCE), 0)


def results(plan: plans.Plan, prefix: str = NAME) -> dict:
    ref = reference(plan.root)
    groups = recipe.GUARD_GROUPS[plan.preset]
    runs = {m: run_results(recipe.workdir(plan.root, f"{prefix}/{m}"), ref, groups)
            for m in recipe.METHODS}
    return {"reference": ref, "groups": {k: list(v) for k, v in groups.items()}, "runs": runs}


def final(run: dict) -> dict:
    return run["points"][-1] if run["points"] else {}


def target_gain(run: dict, ref: dict, metric: str = "rougeL") -> Optional[float]:
    now = final(run).get("target", {}).get(metric)
    base = ref.get(recipe.TARGET, {}).get(metric)
    return None if now is None or base is None else now - base


def forgetting(run: dict) -> Optional[float]:
    """Minus the final mean change of the trained guards' primary metrics (points)."""
    value = final(run).get("trained", {}).get("mean_primary")
    return None if value is None else -value


def findings(results: dict) -> list[str]:
    runs, ref = results["runs"], results["reference"]
    gains = {m: target_gain(r, ref) for m, r in runs.items()}
    forgot = {m: forgetting(r) for m, r in runs.items()}
    if None in gains.values() or None in forgot.values():
        return ["Not measured: some runs have no final evaluation."]
    peft = [m for m in runs if m != "full"]
    claim1 = all(gains["full"] > gains[m] for m in peft)
    claim2 = all(forgot["full"] > forgot[m] for m in peft)
    claim3 = forgot["full"] >= MIN_FORGETTING and all(
        forgot[m] <= forgot["full"] / 2 for m in peft)
    shown = "; ".join(f"{m} {gains[m]:+.2f}" for m in runs)
    lost = "; ".join(f"{m} {forgot[m]:+.2f}" for m in runs)
    lines = [f"1. Full fine-tuning gains most on DialogSum: **{readout.verdict(claim1)}** "
             f"(ROUGE-L gain over the base: {shown}).",
             f"2. Full fine-tuning forgets most: **{readout.verdict(claim2)}** (forgetting = "
             f"minus the mean change of the trained guard tasks' primary metrics, points: "
             f"{lost}).",
             f"3. PEFT methods forget far less (at most half of full fine-tuning's, which "
             f"forgets at least {MIN_FORGETTING:g} point): **{readout.verdict(claim3)}**."]
    if not (claim1 and claim2 and claim3):
        lines.append(f"What we would try next: {NEXT}")
    return lines


def table(results: dict, title_prefix: str = "") -> str:
    runs, ref = results["runs"], results["reference"]
    base_target = ref.get(recipe.TARGET, {})
    head = ["method", "trainable params", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ΔROUGE-L",
            "trained guards Δprimary", "Δloss", "held-out Δprimary", "Δloss"]
    rows = [["base (step 0)", readout.MISSING, base_target.get("rouge1"),
             base_target.get("rouge2"), base_target.get("rougeL"), readout.MISSING,
             readout.MISSING, readout.MISSING, readout.MISSING, readout.MISSING]]
    for method, run in runs.items():
        point = final(run)
        target = point.get("target", {})
        rows.append([title_prefix + method, run["params"].get("trainable"), target.get("rouge1"),
                     target.get("rouge2"), target.get("rougeL"),
                     readout.cell(target_gain(run, ref), signed=True),
                     *_group_cells(point, "trained"), *_group_cells(point, "held_out")])
    per_step = [[title_prefix + method, p["step"], p["target"].get("rougeL"),
                 *_group_cells(p, "trained"), *_group_cells(p, "held_out")]
                for method, run in runs.items() for p in run["points"]]
    return "\n\n".join([
        readout.table(head, rows),
        "Every checkpoint (Δ against the base; loss up = worse):",
        readout.table(["method", "step", "ROUGE-L", "trained Δprimary", "Δloss",
                       "held-out Δprimary", "Δloss"], per_step),
        "Each guard task at the final checkpoint (Δ primary metric, Δ loss in brackets):",
        guard_table(results, title_prefix)])


def _group_cells(point: dict, kind: str) -> list[str]:
    group = point.get(kind, {})
    return [readout.cell(group.get("mean_primary"), signed=True),
            readout.cell(group.get("mean_loss"), 3, signed=True)]


def guard_table(results: dict, title_prefix: str = "") -> str:
    ref = results["reference"]
    rows = []
    for kind in ("trained", "held_out"):
        for task in results["groups"][kind]:
            if task not in ref:
                continue
            metric = readout.primary(readout.scores(ref[task]))
            row = [task, kind.replace("_", " "), metric, ref[task].get(metric)]
            for run in results["runs"].values():
                d = final(run).get(kind, {}).get("deltas", {}).get(task, {})
                row.append(f"{readout.cell(d.get(metric), signed=True)} "
                           f"({readout.cell(d.get('loss'), 3, signed=True)})")
            rows.append(row)
    return readout.table(["task", "kind", "metric", "base",
                          *(title_prefix + m for m in results["runs"])], rows)


def plot(results: dict, path: str, label: str = "") -> Optional[str]:
    runs, ref = results["runs"], results["reference"]
    if not any(r["points"] for r in runs.values()):
        return None
    base_rouge = ref.get(recipe.TARGET, {}).get("rougeL")
    fig, (left, right) = figures.new(2)
    figures.lines(left, {label + m: [(0, base_rouge)] + [(p["step"], p["target"].get("rougeL"))
                                                        for p in r["points"]]
                         for m, r in runs.items()},
                  "fine-tuning step", "DialogSum ROUGE-L", "target")
    series = {}
    for m, r in runs.items():
        for kind in ("trained", "held_out"):
            points = [(p["step"], p[kind]["mean_primary"]) for p in r["points"]]
            if any(y is not None for _, y in points):
                series[f"{label}{m}, {kind.replace('_', ' ')}"] = [(0, 0.0)] + points
    figures.lines(right, series, "fine-tuning step", "mean Δ primary metric (points)",
                  "guard tasks vs the base")
    return figures.save(fig, path)
