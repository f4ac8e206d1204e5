"""Study 4, LoRA rank (Hu et al. 2021, Table 6 style): DialogSum fine-tuning of the
base with LoRA at ranks 1 ... 64 on q and v, and full fine-tuning as the
ceiling: the target's ROUGE and the trainable params per rank.

alpha stays at the forgetting study's rank for every rank (Hu et al. set alpha
to the first r they try and do not tune it), so alpha / r shrinks as r grows.
The rank of the forgetting study's LoRA run and its full fine-tuning run are
reused (same commands, run once). Other ranks are evaluated at the end only.

Rule, fixed before the runs: quality plateaus early when the smallest rank
whose ROUGE-L is within `PLATEAU_POINTS` of the best rank's is at most
`EARLY_RANK`. Added after the first cpu run, to read it honestly: a plateau of
ranks that all score below the base (no rank learned the target) says nothing
about rank, so then the verdict is "inconclusive", and the page also shows the
validation loss by rank (the quantity that moved).
"""

from __future__ import annotations

from typing import Optional

from ift_jax.studies import figures, plans, readout, recipe

NAME = "lora_rank"
TITLE = "LoRA rank: quality and trainable params from r = 1 to 64"
CLAIM = ("LoRA's quality plateaus at a small rank: r = 1-8 is about as good as 64, far "
         "below full fine-tuning's trainable params (Hu et al. 2021, Table 6).")
# cpu: Hu et al.'s Table 6 ranks (1, 2, 4, 8, 64), fewer runs than 1 ... 64 in powers
# of two, to fit the preset's time (chosen before any run).
RANKS = {"smoke": (1, 4), "cpu": (1, 2, 4, 8, 64), "gpu": (1, 2, 4, 8, 16, 32, 64)}
PLATEAU_POINTS = 1.0
EARLY_RANK = 8
NEXT = ("More fine-tuning steps (small ranks may just learn slower) and a second seed per "
        "rank to see how much of the differences is noise.")


def _name(preset: str, rank: int) -> str:
    return "forgetting/lora" if rank == recipe.LORA_RANK[preset] else f"{NAME}/r{rank}"


def plan(preset: str, root: str, init_from: str = "") -> plans.Plan:
    del init_from
    forgetting = {s.name: s for s in recipe.forgetting_steps(preset, root)}
    steps = [*recipe.base_steps(preset, root), forgetting[recipe.REFERENCE],
             forgetting["forgetting/full"]]
    for rank in RANKS[preset]:
        name = _name(preset, rank)
        steps.append(forgetting[name] if name in forgetting else recipe.fine_tune_step(
            name, preset, root, "lora", guards=False, every_checkpoint=False, lora_rank=rank))
    return plans.Plan(NAME, preset, root, steps,
                      {**recipe.settings(preset), "ranks": list(RANKS[preset])})


def _point(workdir: str) -> dict:
    target = readout.at_step(workdir).get(recipe.TARGET, {})
    return {"workdir": workdir, "trainable_params": readout.params(workdir).get("trainable"),
            **{m: target.get(m) for m in readout.TARGET_METRICS}}


def results(plan: plans.Plan) -> dict:
    ranks = {r: _point(recipe.workdir(plan.root, _name(plan.preset, r)))
             for r in RANKS[plan.preset]}
    base = readout.at_step(recipe.workdir(plan.root, recipe.REFERENCE), 0).get(recipe.TARGET, {})
    return {"ranks": ranks, "full": _point(recipe.workdir(plan.root, "forgetting/full")),
            "base": {m: base.get(m) for m in readout.TARGET_METRICS}}


def findings(results: dict) -> list[str]:
    scores = {r: p["rougeL"] for r, p in results["ranks"].items()}
    if None in scores.values():
        return ["Not measured: some ranks have no final evaluation."]
    best = max(scores.values())
    first = min(r for r, s in scores.items() if s >= best - PLATEAU_POINTS)
    holds = first <= EARLY_RANK
    base = results["base"]["rougeL"]
    learned = base is None or best > base
    full = results["full"]["rougeL"]
    verdict = readout.verdict(holds) if learned else "inconclusive"
    lines = [f"Quality plateaus by r = {EARLY_RANK} (smallest rank within "
             f"{PLATEAU_POINTS:g} ROUGE-L point of the best rank): **{verdict}**"
             f" (best rank {max(scores, key=scores.get)} at {best:.2f}; r = {first} is the "
             f"first within {PLATEAU_POINTS:g} point; r = 1 at {scores[min(scores)]:.2f}).",
             f"Full fine-tuning (the ceiling): ROUGE-L {readout.cell(full)}, "
             f"{readout.cell(results['full']['trainable_params'])} trainable params."]
    if not learned:
        lines.insert(1, f"Inconclusive because no rank's ROUGE-L beats the base's ({base:.2f}): "
                        "at this scale LoRA did not learn the target as decoding measures it, "
                        "so the ranks' plateau is not one of quality.")
    losses = {r: p["loss"] for r, p in results["ranks"].items()}
    if None not in losses.values():
        lines.append("Validation loss by rank: " + ", ".join(
            f"r = {r}: {loss:.3f}" for r, loss in losses.items())
            + f" (full fine-tuning {readout.cell(results['full']['loss'])}).")
    if not holds or not learned:
        lines.append(f"What we would try next: {NEXT}")
    return lines


def table(results: dict) -> str:
    rows = [["base (no fine-tuning)", readout.MISSING,
             *(results["base"][m] for m in readout.TARGET_METRICS)]]
    rows += [[f"LoRA r = {r}", p["trainable_params"], *(p[m] for m in readout.TARGET_METRICS)]
             for r, p in results["ranks"].items()]
    full = results["full"]
    rows.append(["full fine-tuning", full["trainable_params"],
                 *(full[m] for m in readout.TARGET_METRICS)])
    return readout.table(["run", "trainable params", "ROUGE-1", "ROUGE-2", "ROUGE-L",
                          "validation loss"], rows)


def plot(results: dict, path: str) -> Optional[str]:
    ranks = results["ranks"]
    if all(p["rougeL"] is None for p in ranks.values()):
        return None
    fig, (left, right) = figures.new(2)
    figures.lines(left, {"LoRA": [(r, p["rougeL"]) for r, p in ranks.items()]}, "rank r",
                  "DialogSum ROUGE-L", "target vs rank", logx=True)
    for value, name, style in ((results["full"]["rougeL"], "full fine-tuning", "--"),
                               (results["base"]["rougeL"], "base", ":")):
        if value is not None:
            left.axhline(value, linestyle=style, color="0.4", label=name)
    left.legend(fontsize="small")
    figures.lines(right, {"LoRA": [(r, p["trainable_params"]) for r, p in ranks.items()]},
                  "rank r", "trainable params", "trainable params", logx=True)
    if results["full"]["trainable_params"]:
        right.axhline(results["full"]["trainable_params"], linestyle="--", color="0.4",
                      label="full fine-tuning")
    right.set_yscale("log")
    right.legend(fontsize="small")
    return figures.save(fig, path)
