"""Study 3, multi-task remedy: the forgetting study's fine-tuning with the guard
tasks mixed back in (FLAN-style multi-task fine-tuning): `study_dialogsum_replay`
draws 10% of its examples from the trained guard tasks (tasks/study_mixtures.py),
the rest from DialogSum; same steps, methods and evaluation as `forgetting`,
evaluated at the final checkpoint only.

Rules, fixed before the runs (full fine-tuning, final checkpoint; forgetting
as in `forgetting`):
1. forgetting largely disappears: with replay it is at most half of what it
   is without (which must be at least `forgetting.MIN_FORGETTING` points);
2. at a small cost on the target: ROUGE-L at most `MAX_COST` points below the
   single-task run's.
"""

from __future__ import annotations

from typing import Optional

from ift_jax.studies import figures, forgetting, plans, readout, recipe

NAME = "multitask_remedy"
TITLE = "Multi-task remedy: fine-tuning with the guard tasks replayed"
CLAIM = ("Mixing a small share (5-10%) of the earlier tasks into the fine-tuning data "
         "(FLAN-style multi-task fine-tuning) largely removes forgetting at a small cost on "
         "the target.")
MAX_COST = 1.0
NEXT = ("A larger replay share (the top of the literature's range is 10%; 20-30% would "
        "show whether the trend continues) and replay of the whole base mixture rather "
        "than the measured guard tasks alone.")


def _steps(preset: str, root: str) -> list[plans.Step]:
    # Evaluated at the end only (the claim is about the final checkpoint; the forgetting
    # study has the per-checkpoint curves): one guard evaluation a run, not two.
    return [recipe.fine_tune_step(f"{NAME}/{m}", preset, root, m,
                                  mixture=recipe.REPLAY_MIXTURE[preset],
                                  every_checkpoint=False)
            for m in recipe.METHODS]


def plan(preset: str, root: str, init_from: str = "") -> plans.Plan:
    del init_from
    steps = recipe.forgetting_steps(preset, root) + _steps(preset, root)
    settings = {**recipe.settings(preset), "replay_mixture": recipe.REPLAY_MIXTURE[preset]}
    return plans.Plan(NAME, preset, root, steps, settings)


def results(plan: plans.Plan) -> dict:
    return {"single_task": forgetting.results(plan),
            "replay": forgetting.results(plan, prefix=NAME)}


def findings(results: dict) -> list[str]:
    single, replay = results["single_task"], results["replay"]
    lines = []
    for method in recipe.METHODS:
        s_run, r_run = single["runs"][method], replay["runs"][method]
        lines.append(
            f"- {method}: forgetting {readout.cell(forgetting.forgetting(s_run))} -> "
            f"{readout.cell(forgetting.forgetting(r_run))} points with replay; DialogSum "
            f"ROUGE-L {readout.cell(_rouge(s_run))} -> {readout.cell(_rouge(r_run))}.")
    s_full, r_full = single["runs"]["full"], replay["runs"]["full"]
    before, after = forgetting.forgetting(s_full), forgetting.forgetting(r_full)
    if None in (before, after, _rouge(s_full), _rouge(r_full)):
        return ["Not measured: some runs have no final evaluation."]
    claim1 = before >= forgetting.MIN_FORGETTING and after <= before / 2
    cost = _rouge(s_full) - _rouge(r_full)
    claim2 = cost <= MAX_COST
    lines += [f"1. With replay, full fine-tuning's forgetting at most halves (from at least "
              f"{forgetting.MIN_FORGETTING:g} point): **{readout.verdict(claim1)}** "
              f"({before:+.2f} -> {after:+.2f}).",
              f"2. Cost on DialogSum at most {MAX_COST:g} ROUGE-L point: "
              f"**{readout.verdict(claim2)}** (cost {cost:+.2f})."]
    if not (claim1 and claim2):
        lines.append(f"What we would try next: {NEXT}")
    return lines


def _rouge(run: dict) -> Optional[float]:
    return forgetting.final(run).get("target", {}).get("rougeL")


def table(results: dict) -> str:
    merged = {"reference": results["single_task"]["reference"],
              "groups": results["single_task"]["groups"],
              "runs": {**{f"{m}": r for m, r in results["single_task"]["runs"].items()},
                       **{f"{m} + replay": r for m, r in results["replay"]["runs"].items()}}}
    return forgetting.table(merged)


def plot(results: dict, path: str) -> Optional[str]:
    single, replay = results["single_task"]["runs"], results["replay"]["runs"]
    if not any(r["points"] for r in replay.values()):
        return None
    fig, (left, right) = figures.new(2)
    methods = list(recipe.METHODS)
    figures.grouped_bars(left, methods, {
        "single task": [forgetting.forgetting(single[m]) for m in methods],
        "with replay": [forgetting.forgetting(replay[m]) for m in methods]})
    left.set_ylabel("forgetting (points, trained guard tasks)")
    figures.grouped_bars(right, methods, {
        "single task": [_rouge(single[m]) for m in methods],
        "with replay": [_rouge(replay[m]) for m in methods]})
    right.set_ylabel("DialogSum ROUGE-L")
    return figures.save(fig, path)
