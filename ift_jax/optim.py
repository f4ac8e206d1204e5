"""Optimizers and learning-rate schedules, built from two small frozen dataclasses.

The trainer reads the ConfigDict and builds a `ScheduleConfig` inside an
`OptimizerConfig`; `make_optimizer` turns it into an optax transformation:
global-norm clipping (optional) → Adafactor or AdamW driven by the schedule.

Adafactor defaults follow t5x's `adafactor.Adafactor` as used by the T5 1.1
gin files: factored second moments for params whose two largest dims are
both ≥ 128, `decay_rate=0.8`, per-block update clipping at RMS 1.0, no
momentum, and `multiply_by_parameter_scale=True` (t5x's default, used for
pre-training and full fine-tuning). Lester et al.'s prompt tuning used
Adafactor with `multiply_by_parameter_scale=False`, a constant lr of 0.3 and
weight decay 1e-5; turn it off for PEFT too, since zero-initialised params
(LoRA B) would otherwise get updates scaled by the 1e-3 floor. t5x does not
clip the global gradient norm; set `grad_clip_norm=None` to match it exactly.

Weight decay is applied only to params with ≥ 2 dims (kernels, embeddings,
prompts), never to 1-D layer-norm scales or biases: the common convention.
For AdamW it is decoupled and multiplied by the lr (optax/PyTorch AdamW); for
Adafactor it is decoupled and *not* lr-scaled (t5x's `weight_decay_rate`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from ift_jax import errors

SCHEDULES = ("constant", "linear_warmup", "rsqrt", "cosine", "linear_decay")
OPTIMIZERS = ("adafactor", "adamw")
_NEEDS_TOTAL_STEPS = ("cosine", "linear_decay")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule; `step` below is the optimizer's update count (from 0).

    - constant: `base`.
    - linear_warmup: `base * min(1, step / warmup_steps)`.
    - rsqrt: t5x's `rsqrt_decay`, scaled so the lr during warmup is `base`:
      `base * sqrt(max(warmup_steps, 1) / max(step, warmup_steps, 1))`.
      T5's pre-training schedule (0.01 for 10k steps, then 1/sqrt(step)) is
      `base=0.01, warmup_steps=10_000`. Flat during warmup, as in t5x.
    - cosine: linear warmup to `base`, then cosine decay to `end_value` at
      `total_steps` (which counts the warmup steps).
    - linear_decay: linear warmup to `base`, then linear decay to `end_value`
      at `total_steps`.
    """

    name: str
    base: float
    warmup_steps: int = 0
    total_steps: int | None = None
    end_value: float = 0.0

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise errors.ConfigError(f"unknown schedule {self.name!r}; valid schedules: "
                                     f"{', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise errors.ConfigError(f"schedule warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.name == "constant" and self.warmup_steps:
            raise errors.ConfigError("schedule 'constant' has no warmup; set warmup_steps=0 or use "
                                     "'linear_warmup'")
        if self.name in _NEEDS_TOTAL_STEPS and (self.total_steps is None
                                                or self.total_steps <= self.warmup_steps):
            raise errors.ConfigError(f"schedule {self.name!r} needs total_steps > warmup_steps "
                                     f"({self.warmup_steps}); got total_steps={self.total_steps}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer choice and hyper-parameters; see the module docstring for defaults."""

    name: str
    schedule: ScheduleConfig
    weight_decay: float = 0.0
    grad_clip_norm: float | None = 1.0
    # AdamW.
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # Adafactor (t5x defaults).
    factored: bool = True
    min_dim_size_to_factor: int = 128
    decay_rate: float = 0.8
    clipping_threshold: float | None = 1.0
    multiply_by_parameter_scale: bool = True
    momentum: float | None = None

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise errors.ConfigError(f"unknown optimizer {self.name!r}; valid optimizers: "
                                     f"{', '.join(OPTIMIZERS)}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise errors.ConfigError(f"grad_clip_norm must be > 0 or None (no clipping), "
                                     f"got {self.grad_clip_norm}")


def _warmup(base: float, warmup_steps: int, after: optax.Schedule) -> optax.Schedule:
    # With warmup_steps == 0 the boundary is 0, so `after` runs from the first step.
    ramp = optax.linear_schedule(0.0, base, warmup_steps)
    return optax.join_schedules([ramp, after], [warmup_steps])


def make_schedule(cfg: ScheduleConfig) -> optax.Schedule:
    """Returns the optax schedule (jit-traceable `step -> lr`) described by `cfg`."""
    base, warmup = cfg.base, cfg.warmup_steps
    if cfg.name == "constant":
        return optax.constant_schedule(base)
    if cfg.name == "linear_warmup":
        return _warmup(base, warmup, optax.constant_schedule(base))
    if cfg.name == "rsqrt":
        floor = max(warmup, 1)
        return lambda step: base * jnp.sqrt(floor / jnp.maximum(step, floor))
    if cfg.name == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, base, warmup, cfg.total_steps,
                                                  cfg.end_value)
    if cfg.name == "linear_decay":
        decay = optax.linear_schedule(base, cfg.end_value, cfg.total_steps - warmup)
        return _warmup(base, warmup, decay)
    raise errors.ConfigError(f"unknown schedule {cfg.name!r}; valid schedules: "
                             f"{', '.join(SCHEDULES)}")


def decay_mask(params):
    """True for params that get weight decay: those with at least 2 dims."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Returns global-norm clipping (if set) chained with the scheduled optimizer."""
    lr = make_schedule(cfg.schedule)
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                          weight_decay=cfg.weight_decay, mask=decay_mask)
    else:
        opt = optax.adafactor(
            lr, min_dim_size_to_factor=cfg.min_dim_size_to_factor,
            decay_rate=cfg.decay_rate, multiply_by_parameter_scale=cfg.multiply_by_parameter_scale,
            clipping_threshold=cfg.clipping_threshold, momentum=cfg.momentum,
            weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=decay_mask,
            factored=cfg.factored)
    if cfg.grad_clip_norm is None:
        return opt
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)


def learning_rate_at(cfg: OptimizerConfig | ScheduleConfig, step: int) -> float:
    """The schedule's lr at `step`, for logging (Adafactor's parameter scaling not included)."""
    schedule_cfg = cfg.schedule if isinstance(cfg, OptimizerConfig) else cfg
    return float(make_schedule(schedule_cfg)(step))
