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
summaries, ranks 1, 4 and 16, a few steps: a smoke test of the machinery that
runs on a CPU in about a minute (its numbers say nothing about LoRA).
"""

from ift_jax import sweeps
from ift_jax.configs import default, flan_t5

RANKS = tuple(2 ** i for i in range(10))  # 1 ... 512
TINY_RANKS = (1, 4, 16)


def get_config(arg=None):
    if arg == "tiny":
        c = default.get_config()
        c.data.mixture = "synthetic_support_summary"
        c.train.steps, c.train.checkpoint_every, c.train.log_every = 6, 6, 3
        c.train.batch_size = 8
        c.data.inputs_length, c.data.targets_length = 128, 48
        c.peft.method, c.peft.lora_alpha = "lora", 16.0
        c.optimizer.warmup_steps = 1
        c.eval.every, c.eval.at_start, c.eval.max_examples = 6, False, 4
        c.eval.max_decode_length = 8
    elif arg:
        raise ValueError(f"lora_rank presets: 'tiny' or none; got {arg!r}")
    else:
        c = flan_t5.get_config("size=base,method=lora,task=dialogsum")
        c.eval.every, c.eval.max_examples = c.train.checkpoint_every, 0
    c.eval.metrics = "rouge,bleu"
    return c


def get_sweep(arg=None):
    return sweeps.product({"peft.lora_rank": TINY_RANKS if arg == "tiny" else RANKS})
