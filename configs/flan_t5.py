"""Fine-tuning FLAN-T5 (small ... xxl) with full fine-tuning or any PEFT method.

Presets are `key=value` pairs after the colon (big_vision style):

    ift-jax train --config=configs/flan_t5.py:size=base,method=lora,task=dialogsum \\
        --config.init_from=/path/to/flan-t5-base --workdir=runs/base_lora_dialogsum

- size: small | base | large | xl | xxl (the HF directory in `init_from` must hold
  that model: config.json, weights and spiece.model, which becomes the vocabulary)
- method: one of `ift_jax.peft.METHODS`: full | lora | qlora | prompt | houlsby |
  pfeiffer | ia3 | prefix
- task: dialogsum (single task, mixture `ift_dialogsum`) | multitask (`ift_multitask`)
- runlocal: shrink steps and batch for a quick check on a laptop

Hyper-parameters follow the literature:
- full: Adafactor, constant lr 1e-3 (FLAN fine-tuning), no parameter scaling.
- lora / qlora: AdamW lr 1e-3, r=32, alpha=32 on the attention q and v
  projections, dropout 0.05 (the DialogSum LoRA lab); qlora stores the frozen
  base kernels in NF4 with tile size 64.
- prompt: Adafactor, constant lr 0.3, weight decay 1e-5, no parameter scaling,
  100 prompt tokens initialized from the vocabulary (Lester et al. 2021).
- houlsby / pfeiffer: AdamW lr 3e-4, bottleneck width d_model / 16 (Pfeiffer et
  al. 2021's reduction factor 16; lr as Mahabadi et al. 2021's T5-base adapters).
- ia3: Adafactor, constant lr 3e-3, no parameter scaling (T-Few, Liu et al. 2022).
- prefix: AdamW lr 5e-4, 20 prefix positions in every attention block, trained
  through a reparameterization MLP of width 512 (Li & Liang 2021).
"""

from ift_jax import peft
from ift_jax.configs import default

SIZES = ("small", "base", "large", "xl", "xxl")
METHODS = peft.METHODS
TASKS = {"dialogsum": "ift_dialogsum", "multitask": "ift_multitask"}


def _parse(arg):
    values = dict(size="base", method="lora", task="dialogsum", runlocal="")
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in values:
            raise ValueError(f"unknown preset key {key!r}; keys: {', '.join(values)}")
        values[key] = value or "1"
    for key, valid in (("size", SIZES), ("method", METHODS), ("task", TASKS)):
        if values[key] not in valid:
            raise ValueError(f"{key}={values[key]!r}; choose one of {', '.join(valid)}")
    return values


def get_config(arg=None):
    p = _parse(arg)
    c = default.get_config()
    c.model = default.ml_collections.ConfigDict({"preset": p["size"], "dropout_rate": 0.1,
                                                 "dtype": "bfloat16", "remat": "none",
                                                 "scan_layers": False})
    c.init_from = ""  # Required: the HF FLAN-T5 directory of this size.
    c.data.mixture = TASKS[p["task"]]
    c.data.vocab = ""  # Empty: the spiece.model of init_from.
    c.data.inputs_length, c.data.targets_length = 512, 128
    c.train.steps = 2000 if p["task"] == "dialogsum" else 10000
    c.train.batch_size = 32
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.loss.z_loss = 0.0
    c.peft.method = p["method"]
    o = c.optimizer
    o.schedule, o.warmup_steps, o.grad_clip_norm = "constant", 0, 1.0
    if p["method"] == "full":
        o.name, o.learning_rate = "adafactor", 1e-3
    elif p["method"] in ("lora", "qlora"):
        o.name, o.learning_rate = "adamw", 1e-3
        c.peft.lora_rank, c.peft.lora_alpha, c.peft.lora_dropout = 32, 32.0, 0.05
    elif p["method"] == "prompt":
        o.name, o.learning_rate, o.weight_decay = "adafactor", 0.3, 1e-5
        c.peft.prompt_length, c.peft.prompt_init = 100, "vocab"
        c.data.pack = False  # One prompt per example: packed rows would share it.
    elif p["method"] in ("houlsby", "pfeiffer"):
        o.name, o.learning_rate = "adamw", 3e-4
        c.peft.adapter_width = {"small": 32, "base": 48, "large": 64, "xl": 128,
                                "xxl": 256}[p["size"]]
    elif p["method"] == "ia3":
        o.name, o.learning_rate = "adafactor", 3e-3
    else:
        o.name, o.learning_rate = "adamw", 5e-4
        c.peft.prefix_length, c.peft.prefix_hidden = 20, 512
    if p["runlocal"]:
        c.train.steps, c.train.batch_size = 20, 4
        c.train.log_every, c.train.checkpoint_every = 5, 10
        c.data.inputs_length, c.data.targets_length = 256, 64
    return c


def get_sweep():
    """LoRA rank x learning rate on base/dialogsum: one dict of overrides per run."""
    return [{"config.peft.lora_rank": r, "config.optimizer.learning_rate": lr}
            for r in (8, 16, 32) for lr in (3e-4, 1e-3)]
