"""Study 6, in-context vs fine-tuned: the base with 0, 1 and a few DialogSum train
exemplars before each validation input, against each fine-tuned model of the
forgetting study, on the same validation examples and templates.

The k-shot points are a `train.steps=0` run of the base with longer inputs
(`ICL_INPUTS`, so that k exemplars fit; FLAN's few-shot format, exemplars
dropped from the end while the prompt is too long, the mean number kept is
shown). Its step 0 is the 0-shot point at that length; the 0-shot point at the
fine-tuned models' length is the forgetting study's reference run. The
fine-tuned models are scored 0-shot, as they were trained.

Rule, fixed before the runs: in-context learning is not enough for this small
model when the best k-shot ROUGE-L of the base stays below every fine-tuned
model's.
"""

from __future__ import annotations

from typing import Optional

from ift_jax.studies import figures, plans, readout, recipe

NAME = "icl_vs_finetuned"
TITLE = "In-context learning vs fine-tuning on a small model"
CLAIM = ("In-context examples may not be enough for small models: a fine-tuned small model "
         "beats the same model prompted with a few examples (the course; Brown et al. 2020 "
         "show few-shot gains growing with scale).")
SHOTS = {"smoke": (1,), "cpu": (1, 3), "gpu": (1, 3, 5)}
ICL_INPUTS = {"smoke": 256, "cpu": 1024, "gpu": 2048}
INCONTEXT = f"{NAME}/base_incontext"
NEXT = ("A larger base (few-shot ability grows with scale) and exemplars chosen by "
        "similarity to the input rather than the first train examples.")


def incontext_step(preset: str, root: str) -> plans.Step:
    config = recipe.fine_tune_config(preset, root, "full", guards=False)
    config.update({"train.steps": 0, "eval.every": 1, "eval.at_start": True,
                   "data.inputs_length": ICL_INPUTS[preset],
                   "eval.incontext_shots": ",".join(map(str, SHOTS[preset]))})
    return plans.train_step(INCONTEXT, recipe.workdir(root, INCONTEXT), config)


def plan(preset: str, root: str, init_from: str = "") -> plans.Plan:
    del init_from
    steps = [*recipe.forgetting_steps(preset, root), incontext_step(preset, root)]
    return plans.Plan(NAME, preset, root, steps,
                      {**recipe.settings(preset), "shots": list(SHOTS[preset]),
                       "incontext_inputs_length": ICL_INPUTS[preset]})


def _row(label: str, prompt: str, tasks: dict, shots_used: Optional[float] = None) -> dict:
    target = tasks.get(recipe.TARGET, {})
    return {"model": label, "prompt": prompt, "exemplars": shots_used,
            **{m: target.get(m) for m in readout.TARGET_METRICS}}


def results(plan: plans.Plan) -> dict:
    root, preset = plan.root, plan.preset
    lengths = recipe.FINE_TUNING[preset]["inputs"], ICL_INPUTS[preset]
    incontext = recipe.workdir(root, INCONTEXT)
    rows = [_row("base", f"0-shot, inputs {lengths[0]}",
                 readout.at_step(recipe.workdir(root, recipe.REFERENCE), 0), 0.0),
            _row("base", f"0-shot, inputs {lengths[1]}", readout.at_step(incontext, 0), 0.0)]
    for k in SHOTS[preset]:
        point = readout.incontext(incontext, k)
        rows.append(_row("base", f"{k}-shot, inputs {lengths[1]}", point.get("tasks", {}),
                         point.get("shots_used", {}).get(recipe.TARGET)))
    for method in recipe.METHODS:
        rows.append(_row(f"fine-tuned ({method})", f"0-shot, inputs {lengths[0]}",
                         readout.at_step(recipe.workdir(root, f"forgetting/{method}"))))
    return {"rows": rows}


def findings(results: dict) -> list[str]:
    base = [r for r in results["rows"] if r["model"] == "base"]
    tuned = [r for r in results["rows"] if r["model"] != "base"]
    if any(r["rougeL"] is None for r in results["rows"]):
        return ["Not measured: some points have no evaluation."]
    best = max(base, key=lambda r: r["rougeL"])
    holds = all(r["rougeL"] > best["rougeL"] for r in tuned)
    zero = base[1]["rougeL"]
    shots = "; ".join(f"{r['prompt'].split(',')[0]} {r['rougeL'] - zero:+.2f}"
                      for r in base[2:])
    lines = [f"Every fine-tuned model beats the base's best prompt ({best['prompt']}, "
             f"ROUGE-L {best['rougeL']:.2f}): **{readout.verdict(holds)}** (fine-tuned: "
             + "; ".join(f"{r['model']} {r['rougeL']:.2f}" for r in tuned) + ").",
             f"Exemplars against 0-shot at the same length (ROUGE-L): {shots}."]
    if not holds:
        lines.append(f"What we would try next: {NEXT}")
    return lines


def table(results: dict) -> str:
    return readout.table(["model", "prompt", "exemplars used", "ROUGE-1", "ROUGE-2", "ROUGE-L",
                          "validation loss"],
                         [[r["model"], r["prompt"], r["exemplars"],
                           *(r[m] for m in readout.TARGET_METRICS)] for r in results["rows"]])


def plot(results: dict, path: str) -> Optional[str]:
    rows = [r for r in results["rows"] if r["rougeL"] is not None]
    if not rows:
        return None
    fig, ax = figures.new(1, width=7.0)
    labels = [f"{r['model']}\n{r['prompt']}" for r in rows]
    ax.barh(range(len(rows)), [r["rougeL"] for r in rows],
            color=["0.6" if r["model"] == "base" else "tab:blue" for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize="x-small")
    ax.invert_yaxis()
    ax.set_xlabel("DialogSum ROUGE-L")
    ax.grid(axis="x", alpha=0.3)
    return figures.save(fig, path)
