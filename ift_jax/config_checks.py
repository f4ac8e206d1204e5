"""A run config checked before any work: ranges, choices, divisibility, schedules.

`validate(config)` needs nothing but the config: every numeric field's range,
every choice, the batch against `train.num_microbatches` and against the mesh
axes that are given as numbers, and each schedule against `train.steps`.
`validate_for_devices(config, device_count, process_count)` adds what needs
the machine: the mesh resolved over the devices, and the batch against the
data-parallel axes (`mesh.data` × `mesh.fsdp`) and the hosts.

Both raise `errors.ConfigError` with one line that names the key, its value,
what is wrong and the flag that fixes it, e.g.

    train.checkpoint_every=0 must be at least 1 (steps between checkpoints);
    set --config.train.checkpoint_every=N with N >= 1

Keys a config does not have are skipped, so trimmed-down configs work too.
The CLI calls both before the workdir is created or the model initialized.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

from ift_jax import best, losses, optim, peft
from ift_jax.errors import ConfigError
from ift_jax.models import layers, t5

_MISSING = object()
MESH_AXES = ("data", "fsdp", "tensor")
DTYPES = ("float32", "bfloat16", "float16")
HOST_SHARDINGS = ("examples", "global_batch")
PIPELINES = ("seqio", "indexed")
FROZEN_DTYPES = ("float32", "bfloat16")
# Schedules that ramp up over `warmup_steps` before reaching the learning rate.
_RAMPED = ("linear_warmup", "cosine", "linear_decay")


def get(config: Any, key: str) -> Any:
    """`config.a.b` for key `"a.b"`, or `_MISSING`."""
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return _MISSING
        node = node[part]
    return node


def _fail(key: str, value: Any, need: str, fix: Optional[str] = None) -> ConfigError:
    return ConfigError(f"{key}={value!r} {need}; {fix or f'set --config.{key}=...'}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_at_least(low: int, what: str) -> Callable[[str, Any], None]:
    def check(key, value):
        if not _is_int(value) or value < low:
            raise _fail(key, value, f"must be an integer >= {low} ({what})",
                        f"set --config.{key}=N with N >= {low}")
    return check


def _number(low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False, what: str = "") -> Callable[[str, Any], None]:
    if high == math.inf:
        span = "finite" if low == -math.inf else f"{'>' if low_open else '>='} {low:g}"
    else:
        span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(key, value):
        ok = _is_number(value) and math.isfinite(value)
        ok = ok and (value > low if low_open else value >= low)
        ok = ok and (value < high if high_open else value <= high)
        if not ok:
            raise _fail(key, value, f"must be a number {span}" + (f" ({what})" if what else ""),
                        f"set --config.{key} to a number {span}")
    return check


def _one_of(choices: Sequence[str], allow_empty: bool = False) -> Callable[[str, Any], None]:
    def check(key, value):
        if value not in choices and not (allow_empty and value == ""):
            raise _fail(key, value, f"is not one of {', '.join(map(str, choices))}",
                        f"set --config.{key}={choices[0]}")
    return check


def _shot_list(key: str, value: Any) -> None:
    parts = [p.strip() for p in str(value).split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise _fail(key, value, "must be comma-separated shot counts >= 0",
                    f"set --config.{key}=0,1,3 (or empty for none)")


def _boolean(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _fail(key, value, "must be True or False", f"set --config.{key}=True")


RULES: dict[str, Callable[[str, Any], None]] = {
    # 0: no training, only the starting model's evaluation (see _check_zero_steps).
    "train.steps": _int_at_least(0, "optimizer steps to train"),
    "train.batch_size": _int_at_least(1, "examples per step, over all hosts"),
    "train.num_microbatches": _int_at_least(1, "1 = no gradient accumulation"),
    "train.log_every": _int_at_least(1, "steps between metric lines"),
    "train.checkpoint_every": _int_at_least(1, "steps between checkpoints"),
    "train.keep_checkpoints": _int_at_least(
        1, "checkpoints kept; with 0 a finished run would keep no model"),
    "train.early_stopping.patience": _int_at_least(1, "evaluations without improvement"),
    "train.early_stopping.min_delta": _number(0.0),
    "train.early_stopping.mode": _one_of(best.MODES),
    "checkpoint.keep_best_mode": _one_of(best.MODES),
    "eval.every": _int_at_least(0, "steps between evaluations; 0 = none during training"),
    "eval.max_examples": _int_at_least(0, "per task; 0 = the whole split"),
    "eval.batch_size": _int_at_least(1, "examples decoded at once"),
    "eval.max_decode_length": _int_at_least(1, "tokens generated at most"),
    "eval.num_beams": _int_at_least(1, "1 = greedy"),
    "eval.length_penalty": _number(-math.inf),
    "eval.incontext_shots": _shot_list,
    "data.inputs_length": _int_at_least(1, "tokens per input"),
    "data.targets_length": _int_at_least(1, "tokens per target"),
    "data.host_sharding": _one_of(HOST_SHARDINGS),
    "data.pipeline": _one_of(PIPELINES),
    "optimizer.name": _one_of(optim.OPTIMIZERS),
    "optimizer.schedule": _one_of(optim.SCHEDULES),
    "optimizer.learning_rate": _number(0.0, low_open=True),
    "optimizer.warmup_steps": _int_at_least(0, "steps of linear warmup"),
    "optimizer.end_learning_rate": _number(0.0),
    "optimizer.weight_decay": _number(0.0),
    "optimizer.grad_clip_norm": _number(0.0, what="0 = no clipping"),
    "loss.z_loss": _number(0.0),
    "loss.label_smoothing": _number(0.0, 1.0, high_open=True),
    "loss.normalization": _one_of(losses.NORMALIZATIONS),
    "peft.method": _one_of(peft.METHODS),
    "peft.lora_rank": _int_at_least(1, "LoRA rank r"),
    "peft.lora_alpha": _number(0.0, low_open=True, what="LoRA scale is alpha / r"),
    "peft.lora_dropout": _number(0.0, 1.0, high_open=True),
    "peft.qlora_tile_size": _int_at_least(1, "NF4 quantization tile"),
    "peft.qlora_double_quant": _boolean,
    "peft.prompt_length": _int_at_least(1, "prompt tokens"),
    "peft.prompt_init": _one_of(peft.PROMPT_INITS),
    "model.dropout_rate": _number(0.0, 1.0, high_open=True),
    "model.dtype": _one_of(DTYPES),
    "model.remat": _one_of(tuple(layers.remat_names())),
    "model.scan_layers": _boolean,
    "optimizer.offload_state": _boolean,
    "peft.frozen_dtype": _one_of(FROZEN_DTYPES),
    "device_peak_flops": _number(0.0, what="0 = unknown, no MFU"),
    **{f"model.{k}": _int_at_least(1, "model size") for k in (
        "vocab_size", "d_model", "d_ff", "num_heads", "d_kv", "num_layers",
        "num_decoder_layers")},
}


def validate(config: Any) -> None:
    """Checks what needs no devices; raises `ConfigError` at the first problem."""
    for key, rule in RULES.items():
        value = get(config, key)
        if value is not _MISSING:
            rule(key, value)
    preset = get(config, "model.preset")
    if preset is not _MISSING and not get(config, "init_from") and preset not in t5.PRESETS:
        raise _fail("model.preset", preset, f"is not one of {', '.join(t5.PRESETS)}",
                    "set --config.model.preset=tiny (or init_from to a checkpoint)")
    _check_zero_steps(config)
    _check_microbatches(config)
    _check_schedule(config)
    _check_double_quant(config)
    _check_best(config)
    _check_prompt_init(config)
    _check_packing(config)
    sizes = mesh_sizes(config)
    if sizes is not None and -1 not in (sizes["data"], sizes["fsdp"]):
        _check_batch_split(config, sizes["data"] * sizes["fsdp"], sizes)


def _check_prompt_init(config: Any) -> None:
    """A text-initialized soft prompt takes the text's token embeddings from the
    `init_from` base; without one it would silently keep the model's random init."""
    if (get(config, "peft.method") == "prompt" and get(config, "peft.prompt_init") == "text"
            and not get(config, "init_from")):
        raise _fail("peft.prompt_init", "text", "takes the embeddings of the text's tokens "
                    "from the init_from base, and this run has no init_from",
                    "set --config.init_from=DIR (a pretrained model), or "
                    "--config.peft.prompt_init=uniform")


def _check_packing(config: Any) -> None:
    """Prompt tuning prepends one soft prompt to each encoder row; a packed row holds
    several examples, so the model refuses packed batches (at the first training step,
    after the step-0 evaluation, were it not refused here)."""
    if get(config, "peft.method") == "prompt" and get(config, "data.pack") is True:
        raise _fail("data.pack", True, "packs several examples into each row, and prompt "
                    "tuning (peft.method='prompt') prepends one soft prompt per row",
                    "set --config.data.pack=False")


def validate_for_devices(config: Any, device_count: int, process_count: int = 1) -> None:
    """`validate`, plus the mesh over `device_count` devices and the batch split over
    the data-parallel devices and `process_count` hosts."""
    validate(config)
    sizes = mesh_sizes(config)
    if sizes is not None:
        sizes = resolve_mesh(sizes, device_count)
        _check_batch_split(config, sizes["data"] * sizes["fsdp"], sizes)
    batch = get(config, "train.batch_size")
    if batch is not _MISSING and batch % process_count:
        raise _fail("train.batch_size", batch,
                    f"is not divisible by the {process_count} processes (hosts)",
                    f"use a multiple of {process_count}")


def mesh_sizes(config: Any) -> Optional[dict[str, int]]:
    """`config.mesh` as `{axis: size}` (checked: integers >= 1, at most one -1)."""
    mesh = get(config, "mesh")
    if mesh is _MISSING:
        return None
    unknown = sorted(set(mesh.keys()) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh has unknown axes {unknown}; mesh axes are "
                          f"{', '.join(MESH_AXES)}")
    sizes = {axis: mesh[axis] if axis in mesh else 1 for axis in MESH_AXES}
    for axis, size in sizes.items():
        if not _is_int(size) or (size < 1 and size != -1):
            raise _fail(f"mesh.{axis}", size, "must be an integer >= 1, or -1 for the "
                        "devices the other axes leave", f"set --config.mesh.{axis}=1")
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError(f"mesh {_mesh_text(sizes)} has more than one axis set to -1; "
                          f"give all but one a size, e.g. --config.mesh.data=1")
    return sizes


def resolve_mesh(sizes: dict[str, int], device_count: int) -> dict[str, int]:
    """Fills the -1 axis from `device_count`; raises unless the mesh uses every device."""
    known = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if device_count % known:
            raise ConfigError(f"mesh {_mesh_text(sizes)}: the fixed axes ({known} devices) "
                              f"do not divide the {device_count} devices; choose sizes "
                              f"whose product divides {device_count}")
        return {a: device_count // known if s == -1 else s for a, s in sizes.items()}
    if known != device_count:
        raise ConfigError(f"mesh {_mesh_text(sizes)} needs {known} devices, "
                          f"{device_count} are available; set one axis to -1 (e.g. "
                          f"--config.mesh.fsdp=-1) to use them all")
    return dict(sizes)


def _mesh_text(sizes: dict[str, int]) -> str:
    return " ".join(f"{axis}={size}" for axis, size in sizes.items())


def _divisors(n: int) -> str:
    found = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, found[:12])) + (", ..." if len(found) > 12 else "")


def _check_zero_steps(config: Any) -> None:
    """`train.steps=0` evaluates the starting model and trains nothing (a zero-shot
    baseline); without that evaluation it would do nothing and call itself finished."""
    if get(config, "train.steps") != 0:
        return
    if get(config, "eval.every") not in (_MISSING, 0) and get(config, "eval.at_start") is True:
        return
    raise _fail("train.steps", 0, "trains nothing, and with eval.every=0 or "
                "eval.at_start=False evaluates nothing either",
                "set --config.train.steps=N with N >= 1 (0 only evaluates the starting model: "
                "eval.at_start=True and eval.every > 0)")


def _check_best(config: Any) -> None:
    """keep_best and early stopping follow evaluated metrics: they need evaluations."""
    for key in ("checkpoint.keep_best", "train.early_stopping.metric"):
        spec = get(config, key)
        if spec in (_MISSING, ""):
            continue
        best.parse(spec, key)
        if get(config, "eval.every") in (_MISSING, 0):
            raise _fail(key, spec, "follows an evaluated metric, and eval.every=0 evaluates "
                        "nothing during training", "set --config.eval.every=N (a multiple of "
                        "train.checkpoint_every keeps the evaluated steps' checkpoints)")


def _check_microbatches(config: Any) -> None:
    batch, micro = get(config, "train.batch_size"), get(config, "train.num_microbatches")
    if _MISSING not in (batch, micro) and batch % micro:
        raise _fail("train.num_microbatches", micro,
                    f"does not divide train.batch_size={batch}",
                    f"set --config.train.num_microbatches to one of {_divisors(batch)}, or "
                    f"change train.batch_size")


def _check_batch_split(config: Any, data_parallel: int, sizes: dict[str, int]) -> None:
    batch = get(config, "train.batch_size")
    if batch is _MISSING or batch % data_parallel == 0:
        return
    multiple = -(-batch // data_parallel) * data_parallel
    raise _fail("train.batch_size", batch,
                f"is not divisible by the data-parallel devices (mesh.data x mesh.fsdp = "
                f"{sizes['data']} x {sizes['fsdp']} = {data_parallel})",
                f"use a multiple of {data_parallel}, e.g. --config.train.batch_size="
                f"{multiple}, or change mesh.data / mesh.fsdp")


def _check_schedule(config: Any) -> None:
    schedule = get(config, "optimizer.schedule")
    warmup, steps = get(config, "optimizer.warmup_steps"), get(config, "train.steps")
    if schedule not in _RAMPED or _MISSING in (warmup, steps) or warmup < steps:
        return
    raise _fail("optimizer.warmup_steps", warmup,
                f"is not below train.steps={steps}: schedule {schedule!r} would never "
                f"reach optimizer.learning_rate",
                f"set --config.optimizer.warmup_steps below {steps} (or more train.steps)")


def _check_double_quant(config: Any) -> None:
    method = get(config, "peft.method")
    if get(config, "peft.qlora_double_quant") is not True or method in (_MISSING, "qlora"):
        return
    raise _fail("peft.qlora_double_quant", True,
                f"double-quantizes QLoRA's NF4 scales; peft.method is {method!r}",
                "set --config.peft.method=qlora (or peft.qlora_double_quant=False)")
