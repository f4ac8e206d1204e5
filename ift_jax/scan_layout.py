"""Param layouts of the layer stacks: unrolled (t5x/HF) and scanned (`model.scan_layers`).

Unrolled, each layer owns its subtree, `encoder/layers_0/...`, `encoder/layers_1/...`
(the layout of t5x and HF checkpoints, exports and `hf.load_t5`). Scanned, one
subtree `encoder/layers/...` holds every layer's leaf stacked on a new leading
axis (what `nn.scan` creates). This module converts whole param trees between the
two, leaf by leaf (adapter leaves and QLoRA's quantized kernels included), so a
run can import and export the unrolled layout whatever it trains with.

Works on nested dicts of arrays (numpy or jax; leaves that are pytrees, such as
qwix's quantized arrays, are stacked array by array). Boxed (logically
partitioned) trees must be unboxed first.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ift_jax import errors

STACKS = ("encoder", "decoder")
SCANNED = "layers"  # The scanned stack's subtree name.
_UNROLLED = re.compile(r"layers_(\d+)")


def _flatten(tree: dict) -> dict:
    return traverse_util.flatten_dict(tree)


def _unflatten(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat) if flat else {}


def is_scanned(params: Any) -> bool:
    """Whether `params` hold a scanned stack (`encoder/layers` or `decoder/layers`)."""
    return any(isinstance(params.get(s), dict) and SCANNED in params[s] for s in STACKS)


def is_unrolled(params: Any) -> bool:
    return any(isinstance(params.get(s), dict) and any(_UNROLLED.fullmatch(k) for k in params[s])
               for s in STACKS)


def _stack_leaves(leaves: list) -> Any:
    stack = np.stack if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(leaves)) \
        else jnp.stack
    return jax.tree.map(lambda *xs: stack(xs), *leaves)


def stack(params: Any) -> dict:
    """The scanned layout of unrolled `params` (other params untouched)."""
    out = dict(params)
    for name in STACKS:
        block = params.get(name)
        if not isinstance(block, dict):
            continue
        indices = sorted(int(m.group(1)) for k in block if (m := _UNROLLED.fullmatch(k)))
        if not indices:
            continue
        if indices != list(range(len(indices))):
            raise errors.CheckpointError(f"{name} has layers {indices}; scanning needs "
                                         f"layers_0 ... layers_{len(indices) - 1}")
        per_layer = [_flatten(block[f"layers_{i}"]) for i in indices]
        keys = per_layer[0].keys()
        odd = [i for i, f in enumerate(per_layer) if f.keys() != keys]
        if odd:
            raise errors.CheckpointError(
                f"{name}/layers_{odd[0]} has other params than {name}/layers_0; layers "
                f"that differ cannot be stacked for model.scan_layers=True")
        stacked = {k: _stack_leaves([f[k] for f in per_layer]) for k in keys}
        rest = {k: v for k, v in block.items() if not _UNROLLED.fullmatch(k)}
        out[name] = {**rest, SCANNED: _unflatten(stacked)}
    return out


def unstack(params: Any) -> dict:
    """The unrolled (t5x/HF) layout of scanned `params` (other params untouched)."""
    out = dict(params)
    for name in STACKS:
        block = params.get(name)
        if not isinstance(block, dict) or SCANNED not in block:
            continue
        flat = _flatten(block[SCANNED])
        num = jax.tree.leaves(next(iter(flat.values())))[0].shape[0]
        rest = {k: v for k, v in block.items() if k != SCANNED}
        for i in range(num):
            rest[f"layers_{i}"] = _unflatten(
                {k: jax.tree.map(lambda x: x[i], v) for k, v in flat.items()})
        out[name] = rest
    return out


def to_layout(params: Any, scanned: bool) -> dict:
    """`params` in the scanned (`scanned=True`) or unrolled layout, whichever they had."""
    if scanned:
        return params if is_scanned(params) else stack(params)
    return unstack(params) if is_scanned(params) else params


def check_layout(params: Any, scanned: bool, where: str) -> None:
    """Raises `CheckpointError` naming `model.scan_layers` when `params` have the other layout."""
    if scanned and is_unrolled(params) or not scanned and is_scanned(params):
        have = "unrolled (layers_N)" if scanned else "scanned (stacked layers)"
        raise errors.CheckpointError(
            f"{where} holds {have} layer params but this run has "
            f"model.scan_layers={scanned}; set --config.model.scan_layers={not scanned} or "
            f"convert them with ift_jax.scan_layout.to_layout")
