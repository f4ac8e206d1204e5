"""Study 5, prompt tuning vs scale (Lester et al. 2021): prompt tuning and full
fine-tuning on DialogSum at each model size of the preset (`recipe.SIZES`: three
that fit a CPU; the `gpu` preset adds a larger one). Each size gets its own
base, instruction-tuned from scratch exactly as the `m` base (same data,
steps and optimizer); the `m` size reuses the base and forgetting studies'
runs. Runs other than those are evaluated at the end only, on DialogSum.

Rule, fixed before the runs: the gap (full fine-tuning's ROUGE-L minus prompt
tuning's) narrows as the model grows when it falls strictly from each size to
the next larger one.
"""

from __future__ import annotations

from typing import Optional

from ift_jax.studies import figures, plans, readout, recipe

NAME = "prompt_vs_scale"
TITLE = "Prompt tuning vs full fine-tuning across model sizes"
CLAIM = ("Prompt tuning trails full fine-tuning on small models and the gap closes as the "
         "model grows (Lester et al. 2021, Figure 1: it matches at about 10B parameters).")
METHODS = ("full", "prompt")
NEXT = ("Larger sizes (the gpu preset) and longer prompt tuning: Lester et al. train "
        "prompts for 30,000 steps, and a small model's prompt may simply be undertrained.")


def _name(preset: str, size: str, method: str) -> str:
    if size == recipe.BASE_SIZE:
        return f"forgetting/{method}"
    return f"{NAME}/{size}_{method}"


def plan(preset: str, root: str, init_from: str = "") -> plans.Plan:
    del init_from
    forgetting = {s.name: s for s in recipe.forgetting_steps(preset, root)}
    steps = list(recipe.base_steps(preset, root))
    for size in recipe.SIZES[preset]:
        if size != recipe.BASE_SIZE:
            steps.append(recipe.base_step(preset, root, size))
        for method in METHODS:
            name = _name(preset, size, method)
            steps.append(forgetting[name] if name in forgetting else recipe.fine_tune_step(
                name, preset, root, method, size=size, guards=False, every_checkpoint=False))
    return plans.Plan(NAME, preset, root, plans.unique(steps), recipe.settings(preset))


def results(plan: plans.Plan) -> dict:
    sizes = {}
    for size in recipe.SIZES[plan.preset]:
        point = {"params": readout.params(recipe.base_workdir(plan.root, size)).get("total")}
        for method in METHODS:
            workdir = recipe.workdir(plan.root, _name(plan.preset, size, method))
            target = readout.at_step(workdir).get(recipe.TARGET, {})
            point[method] = {"trainable_params": readout.params(workdir).get("trainable"),
                             **{m: target.get(m) for m in readout.TARGET_METRICS}}
        full, prompt = point["full"]["rougeL"], point["prompt"]["rougeL"]
        point["gap"] = None if full is None or prompt is None else full - prompt
        sizes[size] = point
    return {"sizes": sizes}


def findings(results: dict) -> list[str]:
    gaps = [(size, p["gap"], p["params"]) for size, p in results["sizes"].items()]
    if any(g is None for _, g, _ in gaps):
        return ["Not measured: some sizes have no final evaluation."]
    if len(gaps) < 2:
        return [f"Not measured: one model size ({gaps[0][0]}, gap {gaps[0][1]:+.2f}); the "
                f"trend needs two or more."]
    holds = all(later < earlier for (_, earlier, _), (_, later, _) in zip(gaps, gaps[1:]))
    shown = "; ".join(f"{s} ({readout.cell(n)} params) {g:+.2f}" for s, g, n in gaps)
    lines = [f"The gap (full minus prompt tuning, ROUGE-L) narrows with every step up in "
             f"size: **{readout.verdict(holds)}** ({shown})."]
    if not holds:
        lines.append(f"What we would try next: {NEXT}")
    return lines


def table(results: dict) -> str:
    rows = []
    for size, p in results["sizes"].items():
        rows.append([size, p["params"], p["full"]["rougeL"], p["prompt"]["rougeL"],
                     readout.cell(p["gap"], signed=True), p["full"]["rouge1"],
                     p["prompt"]["rouge1"], p["prompt"]["trainable_params"]])
    return readout.table(["size", "params", "full ROUGE-L", "prompt ROUGE-L", "gap",
                          "full ROUGE-1", "prompt ROUGE-1", "prompt trainable params"], rows)


def plot(results: dict, path: str) -> Optional[str]:
    sizes = results["sizes"]
    if all(p["params"] is None for p in sizes.values()):
        return None
    fig, (left, right) = figures.new(2)
    figures.lines(left, {m: [(p["params"], p[m]["rougeL"]) for p in sizes.values()
                             if p["params"]] for m in METHODS},
                  "model params", "DialogSum ROUGE-L", "target vs size")
    left.set_xscale("log")
    figures.lines(right, {"full - prompt": [(p["params"], p["gap"]) for p in sizes.values()
                                            if p["params"]]},
                  "model params", "ROUGE-L gap", "gap vs size")
    right.set_xscale("log")
    return figures.save(fig, path)
