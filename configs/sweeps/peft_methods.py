"""Every method of `ift_jax.peft.METHODS` (and DoRA) on one task, side by side.

    ift-jax sweep --config=configs/sweeps/peft_methods.py --workdir=runs/methods \\
        --config.init_from=/path/to/flan-t5-base
    ift-jax sweep --config=configs/sweeps/peft_methods.py:tiny --workdir=/tmp/methods

FLAN-T5-base on DialogSum with each method's literature settings (those of
`configs/flan_t5.py`, repeated here as overrides so each point is one
`ift-jax train` command): trainable params, peak memory, validation loss and
ROUGE per method in `ROOT/sweep_summary.{csv,md,png}`.

Preset `tiny`: the embedded default's tiny T5 from scratch on the synthetic
summaries, a few steps per method: a CPU smoke test of the machinery.
"""

from ift_jax import peft
from ift_jax.configs.sweeps import common

# Per method: the overrides that make the base (LoRA) config that method's preset.
METHODS = {
    "full": {"peft.method": "full", "optimizer.name": "adafactor",
             "optimizer.learning_rate": 1e-3},
    "lora": {"peft.method": "lora", "optimizer.name": "adamw",
             "optimizer.learning_rate": 1e-3},
    "qlora": {"peft.method": "qlora", "optimizer.name": "adamw",
              "optimizer.learning_rate": 1e-3},
    "prompt": {"peft.method": "prompt", "optimizer.name": "adafactor",
               "optimizer.learning_rate": 0.3, "optimizer.weight_decay": 1e-5,
               "data.pack": False},
    "dora": {"peft.method": "lora", "peft.lora_use_dora": True, "optimizer.name": "adamw",
             "optimizer.learning_rate": 1e-3},
    "houlsby": {"peft.method": "houlsby", "peft.adapter_width": 48, "optimizer.name": "adamw",
                "optimizer.learning_rate": 3e-4},
    "pfeiffer": {"peft.method": "pfeiffer", "peft.adapter_width": 48,
                 "optimizer.name": "adamw", "optimizer.learning_rate": 3e-4},
    "ia3": {"peft.method": "ia3", "optimizer.name": "adafactor",
            "optimizer.learning_rate": 3e-3},
    "prefix": {"peft.method": "prefix", "peft.prefix_length": 20, "peft.prefix_hidden": 512,
               "optimizer.name": "adamw", "optimizer.learning_rate": 5e-4},
}
_MISSING = set(peft.METHODS) - {point["peft.method"] for point in METHODS.values()}
assert not _MISSING, f"peft_methods.py lacks a point for {sorted(_MISSING)}"
# The tiny model (d_model 128): sizes scaled down with it.
_TINY = {"peft.adapter_width": 16, "peft.prefix_length": 4, "peft.prefix_hidden": 32}


def get_config(arg=None):
    if arg == "tiny":
        c = common.tiny_config()
        c.peft.lora_rank, c.peft.qlora_tile_size, c.peft.prompt_length = 8, 32, 8
        return c
    if arg:
        raise ValueError(f"peft_methods presets: 'tiny' or none; got {arg!r}")
    return common.flan_t5_base_dialogsum()


def get_sweep(arg=None):
    points = [{"name": name, **overrides} for name, overrides in METHODS.items()]
    if arg == "tiny":  # The tiny model from scratch: keep one learning rate that works.
        for point in points:
            point["optimizer.name"], point["optimizer.learning_rate"] = "adamw", 3e-3
            point.update({k: v for k, v in _TINY.items() if k in point})
    return points
