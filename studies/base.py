"""Study 1, base: multi-task instruction tuning of a small T5 from scratch.

No pretrained weights can be downloaded here, so every other study starts
from a base that ift_jax instruction-tunes itself on `study_base` (the T0
subset, SAMSum, Amazon reviews, WNUT-17, Multi30k and the synthetic tasks;
DialogSum is kept out, it is the new task of the later studies). The page
reports each evaluated task's validation loss and metrics before (random
init) and after.

Rule for "learned", fixed before the run: a trained task's primary metric
(rank accuracy, accuracy, span F1, ROUGE-L or BLEU; 0-100) rises by at least
`LEARNED_POINTS`, or its validation loss falls by at least `LEARNED_NATS`.
The base "learns the mixture measurably" when at least half of the trained
guard tasks are learned.
"""

from __future__ import annotations

from typing import Optional

from ift_jax.studies import figures, plans, readout, recipe

NAME = "base"
TITLE = "Base model: multi-task instruction tuning from scratch"
CLAIM = ("A small T5 instruction-tuned from scratch on the multi-task mixture learns its "
         "tasks measurably (the studies' stand-in for FLAN-T5, whose weights are not "
         "reachable here).")
LEARNED_POINTS = 5.0
LEARNED_NATS = 0.5


def plan(preset: str, root: str, init_from: str = "") -> plans.Plan:
    del init_from
    return plans.Plan(NAME, preset, root, recipe.base_steps(preset, root),
                      recipe.settings(preset))


def _group(preset: str, task: str) -> str:
    groups = recipe.GUARD_GROUPS[preset]
    if task in groups["trained"]:
        return "trained"
    return "held out" if task in groups["held_out"] else "not trained (target)"


def results(plan: plans.Plan) -> dict:
    workdir = recipe.base_workdir(plan.root)
    steps = readout.eval_steps(workdir)
    before = readout.at_step(workdir, 0) if 0 in steps else {}
    after = readout.at_step(workdir, steps[-1]) if steps and steps[-1] > 0 else {}
    rows = []
    for task in sorted(set(before) | set(after), key=lambda t: (_group(plan.preset, t), t)):
        metric = readout.primary(readout.scores(after.get(task) or before.get(task)))
        rows.append({"task": task, "group": _group(plan.preset, task), "metric": metric,
                     "before": readout.pick(before, task, metric),
                     "after": readout.pick(after, task, metric),
                     "loss_before": readout.pick(before, task, "loss"),
                     "loss_after": readout.pick(after, task, "loss"),
                     "learned": _learned(before.get(task), after.get(task), metric)
                     if _group(plan.preset, task) == "trained" else None})
    return {"workdir": workdir, "steps": steps, "tasks": rows, "before": before, "after": after,
            "params": readout.params(workdir), "train_loss": readout.train_loss(workdir)}


def _learned(before: Optional[dict], after: Optional[dict], metric: str) -> Optional[bool]:
    if not before or not after:
        return None
    gain = after.get(metric, 0.0) - before.get(metric, 0.0)
    drop = before.get("loss", 0.0) - after.get("loss", 0.0)
    return gain >= LEARNED_POINTS or drop >= LEARNED_NATS


def findings(results: dict) -> list[str]:
    trained = [r for r in results["tasks"] if r["group"] == "trained"]
    measured = [r for r in trained if r["learned"] is not None]
    if not measured:
        return ["Not measured: the base has no evaluation before and after training."]
    learned = [r["task"] for r in measured if r["learned"]]
    holds = len(learned) * 2 >= len(measured)
    lines = [f"**{readout.verdict(holds)}**: {len(learned)} of {len(measured)} trained guard "
             f"tasks learned (primary metric +{LEARNED_POINTS:g} points or validation loss "
             f"-{LEARNED_NATS:g} nats): {', '.join(learned) or 'none'}."]
    held = [r for r in results["tasks"] if r["group"] == "held out" and r["after"] is not None]
    if held:
        change = readout.mean([r["after"] - r["before"] for r in held
                               if r["before"] is not None])
        lines.append(f"Held-out T0 tasks (`ift_guard`, never trained on): mean primary "
                     f"metric {readout.mean([r['after'] for r in held]):.1f} after training, "
                     f"{readout.cell(change, 1, signed=True)} from the random init.")
    return lines


def table(results: dict) -> str:
    rows = [[r["task"], r["group"], r["metric"] or readout.MISSING, r["before"], r["after"],
             readout.cell(None if r["after"] is None or r["before"] is None
                          else r["after"] - r["before"], signed=True),
             r["loss_before"], r["loss_after"],
             {True: "yes", False: "no", None: readout.MISSING}[r["learned"]]]
            for r in results["tasks"]]
    return readout.table(["task", "kind", "metric", "before", "after", "Δ", "loss before",
                          "loss after", "learned"], rows)


def plot(results: dict, path: str) -> Optional[str]:
    rows = [r for r in results["tasks"] if r["after"] is not None]
    if not rows:
        return None
    fig, (left, right) = figures.new(2, width=12.0)
    labels = [f"{r['task']} ({r['metric']})" for r in rows]
    figures.paired_barh(left, labels, [r["before"] or 0.0 for r in rows],
                        [r["after"] for r in rows], ("before (random init)", "after"))
    left.set_xlabel("primary metric (0-100)")
    steps, losses = zip(*results["train_loss"]) if results["train_loss"] else ((), ())
    right.plot(steps, losses)
    right.set_xlabel("step")
    right.set_ylabel("training loss")
    right.set_title("training loss", fontsize="small")
    return figures.save(fig, path)
