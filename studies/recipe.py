"""The studies' shared recipe, per preset: vocabulary, model sizes, the base
model's instruction tuning from scratch, DialogSum fine-tuning per method, and
evaluation. Every value is chosen here, before any run, from the literature
scaled down (the reasons are beside the values); no study changes them after
seeing its results.

Every step is `ift-jax train` on the embedded default config with the
overrides below, so each page's commands state every setting that differs
from `configs/default.py`.

- Vocabulary: a SentencePiece unigram model trained on the base mixture's
  training text (`ift-jax tasks train-spm study_base`); bytes in `smoke`.
- Sizes: T5 1.1 shapes (the `tiny` preset's gated-GELU and untied logits); `m` is the studies' base
  model, `xs` and `s` the smaller ones of prompt_vs_scale (and, on a GPU, `l`
  a larger one).
- Base: `study_base` (tasks/study_mixtures.py) from scratch, AdamW with warmup
  and cosine decay (the embedded default's optimizer; T5's Adafactor at 1e-2
  is tuned for much longer runs).
- Fine-tuning on DialogSum, per method, with configs/flan_t5.py's settings
  (those of the literature): full = Adafactor, constant 1e-3 (FLAN); LoRA =
  AdamW 1e-3 on q and v, alpha = r, dropout 0.05 (the DialogSum LoRA lab:
  r = 32 on FLAN-T5-base's d_model 768, scaled to the same r / d_model ratio
  at our width); prompt = Adafactor 0.3, weight decay 1e-5, 100 tokens
  initialized from the vocabulary, unpacked rows (Lester et al. 2021).
"""

from __future__ import annotations

import os
from typing import Any

from ift_jax.studies import plans
from ift_jax.tasks import mixtures, study_mixtures

# name: (d_model, d_ff, num_heads, d_kv, layers per stack)
SIZES = {
    # smoke: the base size only (CI time: each size is a base and two runs more);
    # prompt_vs_scale's plan over sizes is checked on the cpu preset without running it.
    "smoke": {"m": (64, 128, 2, 32, 1)},
    # cpu: sized so that studies 1-6 (~22 runs) fit in about 90 minutes of wall time on
    # this 2-core machine shared with 3-4 other jobs (a process gets ~0.5-1 core). Measured
    # before any study ran: (192, 768, 4, 48, 2) trains at ~3 CPU-s a step of 32 x 320
    # tokens, so the base shrank to d_model 128 (~0.8 CPU-s a step of 16 x 320, estimated
    # from the FLOPs) and the sizes of prompt_vs_scale span widths 64-128 (1.3M-3.2M
    # params with the 8k vocabulary; embeddings dominate at this scale, so the range is
    # small: Lester et al.'s trend is over 60M-11B).
    "cpu": {"xs": (64, 256, 2, 32, 2), "s": (96, 384, 4, 24, 2), "m": (128, 512, 4, 32, 2)},
    # T5 1.1-like shapes from scratch: the old cpu sizes, T5 1.1 small as the base, T5 1.1 base.
    "gpu": {"xs": (128, 512, 4, 32, 2), "s": (192, 768, 4, 48, 3), "m": (512, 1024, 6, 64, 8),
            "l": (768, 2048, 12, 64, 12)},
}
BASE_SIZE = "m"

VOCAB_SIZE = {"smoke": 0, "cpu": 8000, "gpu": 16000}  # 0: bytes.

BASE_TRAINING = {
    # steps, batch rows, inputs length, targets length, learning rate, warmup steps
    "smoke": dict(steps=4, batch=8, inputs=96, targets=32, lr=3e-3, warmup=1),
    # 300 steps of 16 packed rows (~1.5M tokens). Resized before any result: a first
    # start at 600 steps trained at 770-1,360 tokens/s on the shared machine (load
    # average 7-14, `nice -n 10`), ~70 min for the base alone; 300 steps take ~25-30 min
    # with its two evaluations. Far less than FLAN's budget: the base learns formats and
    # easy tasks, not much knowledge.
    "cpu": dict(steps=300, batch=16, inputs=256, targets=64, lr=2e-3, warmup=30),
    "gpu": dict(steps=20000, batch=128, inputs=512, targets=128, lr=1e-3, warmup=1000),
}

FINE_TUNING = {
    # steps, batch rows, inputs length, targets length, checkpoints (= evaluations)
    "smoke": dict(steps=2, batch=8, inputs=128, targets=32, every=2),
    # 60 steps x 8 packed rows of 512 tokens (~2 dialogues a row): ~1,000 dialogues, 8%
    # of an epoch of DialogSum's 12,460; ~5 min of training a run at the measured ~1,000
    # tokens/s (see BASE_TRAINING), as 14 fine-tuning runs must fit beside the base.
    # Targets of 96 tokens cut 3% of its summaries (64: 13%). Checkpoints (and guard
    # evaluations) at 30 and 60.
    "cpu": dict(steps=60, batch=8, inputs=512, targets=96, every=30),
    # The DialogSum lab's: 2,000 steps of 32, inputs 512, targets 128.
    "gpu": dict(steps=2000, batch=32, inputs=512, targets=128, every=500),
}

EVALUATION = {
    # examples per task, tokens decoded at most
    # smoke: one input length compiled for evaluation, not eval.length_buckets' 4 (CI time).
    "smoke": dict(examples=2, decode=4, buckets=1),
    # 32 examples a task (21 tasks with the guards): evaluations with decoding are the
    # other large cost. ROUGE-L on 32 DialogSum examples moves by ~1-2 points between
    # samples: differences below that are noise at this preset. Decoding stops at 64
    # tokens (cuts ~13% of DialogSum's reference summaries; the same for every run).
    "cpu": dict(examples=32, decode=64),
    "gpu": dict(examples=200, decode=128),
}

# The lab's r / d_model = 32 / 768; at cpu's d_model 128 that is 5.3, rounded up to 8.
LORA_RANK = {"smoke": 4, "cpu": 8, "gpu": 32}
PROMPT_LENGTH = {"smoke": 4, "cpu": 100, "gpu": 100}

TARGET = "dialogsum"
GUARDS = {"smoke": "synthetic_sentiment",
          "cpu": "study_guard,ift_guard", "gpu": "study_guard,ift_guard"}
# The guard tasks by kind: trained on by the base (forgetting is measured on them), and
# held out of its training (T0 datasets of `ift_guard`: generalization, not memory).
GUARD_GROUPS = {
    "smoke": {"trained": study_mixtures.SMOKE_GUARD_TASKS, "held_out": ()},
    "cpu": {"trained": study_mixtures.STUDY_GUARD_TASKS, "held_out": mixtures.GUARD_TASKS},
    "gpu": {"trained": study_mixtures.STUDY_GUARD_TASKS, "held_out": mixtures.GUARD_TASKS},
}
BASE_MIXTURE = {"smoke": "ift_synthetic", "cpu": "study_base", "gpu": "study_base"}
REPLAY_MIXTURE = {"smoke": "study_smoke_replay", "cpu": "study_dialogsum_replay",
                  "gpu": "study_dialogsum_replay"}

METHODS = ("full", "lora", "prompt")


def vocab_steps(preset: str, root: str) -> list[plans.Step]:
    """The vocabulary step (none with bytes)."""
    if not VOCAB_SIZE[preset]:
        return []
    return [plans.vocab_step("vocab", BASE_MIXTURE[preset], vocab_prefix(preset, root),
                             VOCAB_SIZE[preset])]


def vocab_prefix(preset: str, root: str) -> str:
    return os.path.join(root, "vocab", f"study_base_{VOCAB_SIZE[preset]}")


def vocab_config(preset: str, root: str) -> dict[str, Any]:
    """`data.vocab` and `model.vocab_size` of every run of the preset."""
    if not VOCAB_SIZE[preset]:
        return {"data.vocab": "byte", "model.vocab_size": 384}
    # T5 pads the vocabulary to a multiple of 128 (32,100 -> 32,128).
    size = -(-VOCAB_SIZE[preset] // 128) * 128
    return {"data.vocab": vocab_prefix(preset, root) + ".model", "model.vocab_size": size}


def model_config(preset: str, size: str) -> dict[str, Any]:
    d_model, d_ff, heads, d_kv, layers = SIZES[preset][size]
    return {"model.d_model": d_model, "model.d_ff": d_ff, "model.num_heads": heads,
            "model.d_kv": d_kv, "model.num_layers": layers, "model.num_decoder_layers": layers}


def eval_config(preset: str, tasks: str, guards: str = "") -> dict[str, Any]:
    e = EVALUATION[preset]
    return {"eval.tasks": tasks, **({"eval.guard_tasks": guards} if guards else {}),
            "eval.max_examples": e["examples"], "eval.max_decode_length": e["decode"],
            **({"eval.length_buckets": e["buckets"]} if "buckets" in e else {})}


def base_workdir(root: str, size: str = BASE_SIZE) -> str:
    return os.path.join(root, "base", "train" if size == BASE_SIZE else f"train_{size}")


def base_step(preset: str, root: str, size: str = BASE_SIZE) -> plans.Step:
    """Instruction tuning of a `size` model from scratch on the base mixture.

    The `m` base is evaluated before and after on the guard tasks, the held-out
    `ift_guard` and DialogSum (the target of the later studies); other sizes
    only after, on the same tasks.
    """
    t = BASE_TRAINING[preset]
    config = {
        **model_config(preset, size), **vocab_config(preset, root),
        "data.mixture": BASE_MIXTURE[preset], "data.inputs_length": t["inputs"],
        "data.targets_length": t["targets"], "train.steps": t["steps"],
        "train.batch_size": t["batch"],
        # Checkpoints only so that a killed run resumes near where it stopped.
        "train.checkpoint_every": max(1, t["steps"] // 6),
        "train.log_every": max(1, t["steps"] // 40),
        "optimizer.name": "adamw", "optimizer.learning_rate": t["lr"],
        "optimizer.schedule": "cosine", "optimizer.warmup_steps": t["warmup"],
        "optimizer.end_learning_rate": float(f"{t['lr'] / 10:.3g}"),
        **eval_config(preset, f"{base_eval_tasks(preset)}"),
        "eval.every": t["steps"], "eval.at_start": size == BASE_SIZE,
    }
    name = "base/train" if size == BASE_SIZE else f"base/train_{size}"
    return plans.train_step(name, base_workdir(root, size), config)


def base_eval_tasks(preset: str) -> str:
    """What the base is scored on: its guard tasks, then DialogSum (not trained on)."""
    return f"{GUARDS[preset]},{TARGET}"


def base_steps(preset: str, root: str, size: str = BASE_SIZE) -> list[plans.Step]:
    return vocab_steps(preset, root) + [base_step(preset, root, size)]


def method_config(preset: str, method: str, lora_rank: int = 0) -> dict[str, Any]:
    """The optimizer and PEFT settings of `method` (see the module docstring)."""
    config: dict[str, Any] = {"peft.method": method, "optimizer.schedule": "constant",
                              "optimizer.warmup_steps": 0, "optimizer.grad_clip_norm": 1.0}
    if method == "full":
        config.update({"optimizer.name": "adafactor", "optimizer.learning_rate": 1e-3})
    elif method == "lora":
        rank = lora_rank or LORA_RANK[preset]
        config.update({"optimizer.name": "adamw", "optimizer.learning_rate": 1e-3,
                       "peft.lora_rank": rank, "peft.lora_alpha": float(LORA_RANK[preset]),
                       "peft.lora_dropout": 0.05})
    elif method == "prompt":
        config.update({"optimizer.name": "adafactor", "optimizer.learning_rate": 0.3,
                       "optimizer.weight_decay": 1e-5, "peft.prompt_length":
                       PROMPT_LENGTH[preset], "peft.prompt_init": "vocab", "data.pack": False})
    else:
        raise ValueError(f"method {method!r}; methods: {', '.join(METHODS)}")
    return config


def fine_tune_config(preset: str, root: str, method: str, *, size: str = BASE_SIZE,
                     mixture: str = "ift_dialogsum", guards: bool = True,
                     every_checkpoint: bool = True, lora_rank: int = 0) -> dict[str, Any]:
    """DialogSum fine-tuning of the `size` base with `method`.

    The starting model is evaluated once, by `reference_step`, not by each run.

    Args:
      mixture: the training mixture (`REPLAY_MIXTURE` for the multi-task remedy).
      guards: also evaluate the guard tasks (forgetting).
      every_checkpoint: evaluate at every checkpoint; else only at the end.
    """
    t = FINE_TUNING[preset]
    every = t["every"] if every_checkpoint else t["steps"]
    return {  # The architecture (and vocabulary size) come from init_from.
        "init_from": base_workdir(root, size), "model.dropout_rate": 0.1,
        "data.vocab": vocab_config(preset, root)["data.vocab"],
        "data.mixture": mixture, "data.inputs_length": t["inputs"],
        "data.targets_length": t["targets"], "train.steps": t["steps"],
        "train.batch_size": t["batch"], "train.checkpoint_every": every,
        "train.log_every": max(1, t["steps"] // 30), "loss.z_loss": 0.0,
        **method_config(preset, method, lora_rank),
        **eval_config(preset, TARGET, GUARDS[preset] if guards else ""),
        "eval.every": every, "eval.at_start": False,
    }


def fine_tune_step(name: str, preset: str, root: str, method: str, **options: Any
                   ) -> plans.Step:
    return plans.train_step(name, workdir(root, name),
                            fine_tune_config(preset, root, method, **options))


def workdir(root: str, name: str) -> str:
    """The workdir of step `name` (`forgetting/full` -> ROOT/forgetting/full)."""
    return os.path.join(root, *name.split("/"))


REFERENCE = "forgetting/base"


def reference_step(preset: str, root: str) -> plans.Step:
    """The base evaluated as the fine-tuning runs evaluate (same lengths, tasks and
    guards): `train.steps=0`, the reference every fine-tuned model is compared with."""
    config = fine_tune_config(preset, root, "full")
    config.update({"train.steps": 0, "eval.every": 1, "eval.at_start": True})
    return plans.train_step(REFERENCE, workdir(root, REFERENCE), config)


def forgetting_steps(preset: str, root: str) -> list[plans.Step]:
    """The base, its reference evaluation, and DialogSum fine-tuning with each method
    (guards evaluated at every checkpoint)."""
    return [*base_steps(preset, root), reference_step(preset, root),
            *(fine_tune_step(f"forgetting/{m}", preset, root, m) for m in METHODS)]


def settings(preset: str) -> dict[str, Any]:
    """The recipe of `preset` as the pages state it."""
    return {"sizes": {k: dict(zip(("d_model", "d_ff", "num_heads", "d_kv", "layers"), v))
                      for k, v in SIZES[preset].items()},
            "vocab_size": VOCAB_SIZE[preset] or "bytes", "base_training": BASE_TRAINING[preset],
            "base_mixture": BASE_MIXTURE[preset], "fine_tuning": FINE_TUNING[preset],
            "evaluation": EVALUATION[preset], "guard_tasks": GUARDS[preset],
            "lora_rank": LORA_RANK[preset], "prompt_length": PROMPT_LENGTH[preset]}
