"""What the shipped sweeps share: their tiny CPU preset and their FLAN-T5-base base."""

from ift_jax.configs import default, flan_t5


def tiny_config():
    """The embedded default's tiny T5 from scratch on the synthetic summaries, a few
    steps and one small evaluation at the end: a smoke test of the sweep machinery."""
    c = default.get_config()
    c.data.mixture = "synthetic_support_summary"
    c.train.steps, c.train.checkpoint_every, c.train.log_every = 6, 6, 3
    c.train.batch_size = 8
    c.data.inputs_length, c.data.targets_length = 128, 48
    c.peft.method, c.peft.lora_alpha = "lora", 16.0
    c.optimizer.warmup_steps = 1
    c.eval.every, c.eval.at_start, c.eval.max_examples = 6, False, 4
    c.eval.max_decode_length = 8
    return c


def flan_t5_base_dialogsum():
    """FLAN-T5-base + LoRA on DialogSum (configs/flan_t5.py), evaluated on the whole
    validation split at every checkpoint."""
    c = flan_t5.get_config("size=base,method=lora,task=dialogsum")
    c.eval.every, c.eval.max_examples = c.train.checkpoint_every, 0
    return c
