"""LoRA rank sweep (Hu et al. 2021, Table 6 style): r = 1, 2, 4, ..., 512 on one task.

    ift-jax sweep --config=configs/sweeps/lora_rank.py --workdir=runs/lora_rank \\
        --config.init_from=/path/to/flan-t5-base
    ift-jax sweep --config=configs/sweeps/lora_rank.py:tiny --workdir=/tmp/lora_rank

Each point is FLAN-T5-base + LoRA on the attention q and v (`configs/flan_t5.py`
size=base,method=lora) fine-tuned on DialogSum; alpha stays 32 for every rank
(Hu et al. set alpha once and do not tune it with r), so the update scale
alpha/r shrinks as r grows. Every point reports the validation loss and both
ROUGE and BLEU (`eval.metrics`), trainable params and peak memory in
`ROOT/sweep_summary.{csv,md,png}`.

Preset `tiny`: the embedded default's tiny T5 from scratch on the synthetic
summaries, ranks 1 and 4, a few steps: a smoke test of the machinery that
runs on a CPU in about a minute (its numbers say nothing about LoRA).
"""

from ift_jax import sweeps
from ift_jax.configs.sweeps import common

RANKS = tuple(2 ** i for i in range(10))  # 1 ... 512
TINY_RANKS = (1, 4)


def get_config(arg=None):
    if arg == "tiny":
        c = common.tiny_config()
    elif arg:
        raise ValueError(f"lora_rank presets: 'tiny' or none; got {arg!r}")
    else:
        c = common.flan_t5_base_dialogsum()
    c.eval.metrics = "rouge,bleu"
    return c


def get_sweep(arg=None):
    return sweeps.product({"peft.lora_rank": TINY_RANKS if arg == "tiny" else RANKS})
