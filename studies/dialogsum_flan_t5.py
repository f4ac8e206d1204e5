"""Study 7, the FLAN-T5 DialogSum recipe (docs/dialogsum_recipe.md) as a study:
FLAN-T5-base zero-shot, fully fine-tuned and with LoRA r = 32 on q and v, with
the lab's settings (configs/flan_t5.py: 2,000 steps of 32, Adafactor 1e-3 for
full, AdamW 1e-3 for LoRA; greedy decoding of at most 200 tokens; the whole
test split), beside the published ROUGE.

    ift-jax study dialogsum_flan_t5 --init_from=/path/to/flan-t5-base --workdir=runs/studies

It needs FLAN-T5-base weights (`--init_from`, an HF directory with
`spiece.model`), which cannot be downloaded here: its committed page has the
published column and an empty "ours" column. The `smoke` preset runs the same
three arms for a few steps on any small HF T5 directory (CI: a random one).
"""

from __future__ import annotations

import os
from typing import Optional

import ift_jax.configs
from ift_jax.studies import figures, plans, readout

NAME = "dialogsum_flan_t5"
TITLE = "FLAN-T5-base on DialogSum: zero-shot vs full fine-tuning vs LoRA"
CLAIM = ("Fine-tuning FLAN-T5-base on DialogSum lifts ROUGE far above zero-shot, and LoRA "
         "(r = 32 on q and v, 1.4% of the params) comes within about 1.5 ROUGE-L points of "
         "full fine-tuning (the DialogSum LoRA lab).")
NEEDS_INIT_FROM = "a FLAN-T5-base HF directory (config.json, weights, spiece.model)"
# ROUGE-1, ROUGE-2, ROUGE-L F-measures as published (docs/dialogsum_recipe.md).
PUBLISHED = {"zero_shot": (0.2334, 0.0760, 0.2015), "full": (0.4216, 0.1804, 0.3384),
             "lora": (0.4081, 0.1633, 0.3251)}
ARMS = {"zero_shot": "full", "full": "full", "lora": "lora"}  # arm: method
# The lab's evaluation: the whole test split, greedy, up to 200 tokens; one point at the end.
LAB_EVAL = {"eval.split": "test", "eval.max_examples": 0, "eval.max_decode_length": 200}
SMOKE = {"train.steps": 2, "train.batch_size": 8, "train.checkpoint_every": 2,
         "train.log_every": 1, "data.inputs_length": 128, "data.targets_length": 32,
         "eval.max_examples": 2, "eval.max_decode_length": 4}


def config_file() -> str:
    return os.path.join(os.path.dirname(ift_jax.configs.__file__), "flan_t5.py")


def _step(preset: str, root: str, init_from: str, arm: str) -> plans.Step:
    steps = 2000
    config = {"init_from": init_from, **LAB_EVAL, "eval.every": steps}
    if arm == "zero_shot":
        config.update({"train.steps": 0, "eval.every": 1})
    if preset == "smoke":
        config.update(SMOKE)
        config["eval.every"] = 1 if arm == "zero_shot" else SMOKE["train.steps"]
        if arm == "zero_shot":
            config["train.steps"] = 0
    workdir = os.path.join(root, NAME, arm)
    spec = f"{config_file()}:size=base,method={ARMS[arm]},task=dialogsum"
    flags = (("config", spec), ("workdir", workdir),
             *((f"config.{k}", v) for k, v in config.items()))
    return plans.Step(f"{NAME}/{arm}", ("train",), flags, workdir)


def plan(preset: str, root: str, init_from: str = "") -> plans.Plan:
    # Without weights (--page_only) the page shows the commands with HF_DIR to fill in.
    steps = [_step(preset, root, init_from or "HF_DIR", arm) for arm in ARMS]
    return plans.Plan(NAME, preset, root, steps,
                      {"config": "configs/flan_t5.py:size=base,method=full|lora,task=dialogsum",
                       "evaluation": LAB_EVAL, **({"smoke": SMOKE} if preset == "smoke" else {})},
                      init_from)


def results(plan: plans.Plan) -> dict:
    arms = {}
    for arm in ARMS:
        workdir = os.path.join(plan.root, NAME, arm)
        target = readout.at_step(workdir).get("dialogsum", {})
        ours = [target.get(m) for m in ("rouge1", "rouge2", "rougeL")]
        arms[arm] = {"published": list(PUBLISHED[arm]),
                     "ours": [None if v is None else v / 100 for v in ours],
                     "trainable_params": readout.params(workdir).get("trainable")}
    return {"init_from": plan.init_from, "arms": arms}


def findings(results: dict) -> list[str]:
    if any(None in a["ours"] for a in results["arms"].values()):
        return ["**Needs FLAN-T5 weights**: the \"ours\" column is empty because this "
                "repository's machines cannot download FLAN-T5-base, so the three arms have "
                "not been run. Run `ift-jax study dialogsum_flan_t5 --init_from=HF_DIR "
                "--workdir=ROOT --page_dir=docs/studies` with a copy of `google/flan-t5-base` "
                "to fill it in."]
    arms = results["arms"]
    full, lora = arms["full"]["ours"][2], arms["lora"]["ours"][2]
    holds = full > arms["zero_shot"]["ours"][2] and full - lora <= 0.015
    return [f"Fine-tuning beats zero-shot and LoRA is within 0.015 ROUGE-L of full "
            f"fine-tuning: **{readout.verdict(holds)}** (ROUGE-L zero-shot "
            f"{arms['zero_shot']['ours'][2]:.4f}, full {full:.4f}, LoRA {lora:.4f}; "
            f"init_from {results['init_from']})."]


def table(results: dict) -> str:
    rows = []
    for arm, a in results["arms"].items():
        rows.append([arm.replace("_", "-"), *(f"{v:.4f}" for v in a["published"]),
                     *(readout.MISSING if v is None else f"{v:.4f}" for v in a["ours"])])
    return readout.table(["run", "published ROUGE-1", "ROUGE-2", "ROUGE-L", "ours ROUGE-1",
                          "ROUGE-2", "ROUGE-L"], rows)


def plot(results: dict, path: str) -> Optional[str]:
    arms = results["arms"]
    fig, ax = figures.new(1, width=7.0)
    figures.grouped_bars(ax, list(arms), {
        "published": [a["published"][2] for a in arms.values()],
        "ours": [a["ours"][2] for a in arms.values()]})
    ax.set_ylabel("ROUGE-L (F, 0-1)")
    return figures.save(fig, path)
