"""Param-tree plumbing shared by the PEFT modules, and their user-error type.

Param trees are nested dicts; a *leaf* is whatever is not a dict (an array,
a boxed `nn.Partitioned`, a QLoRA `WithAux` kernel, a `ShapeDtypeStruct`).
Paths are `/`-joined dict keys (`decoder/layers_1/self_attention/value/kernel`)
and regexes are `re.fullmatch`ed against them (qwix does the same with module
paths, which are param paths without the last key).
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
from qwix._src.providers import ptq as qwix_ptq  # WithAux: QLoRA's kernel leaves

from ift_jax import errors

PyTree = Any
_MAX_LISTED = 40


class PeftError(errors.ConfigError):
    """A PEFT setting that does not fit the model or its params."""


def flatten(tree: PyTree) -> dict[tuple[str, ...], Any]:
    if not isinstance(tree, (dict, flax.core.FrozenDict)):
        raise TypeError(f"expected a nested dict of params, got {type(tree).__name__}")
    return flax.traverse_util.flatten_dict(tree)


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    return flax.traverse_util.unflatten_dict(flat) if flat else {}


def path(key: tuple[str, ...]) -> str:
    return "/".join(str(k) for k in key)


def listing(paths: list[str]) -> str:
    """Paths for an error message, `layers_<i>` folded to `layers_N` (every layer)."""
    folded = list(dict.fromkeys(re.sub(r"/layers_\d+/", "/layers_N/", p) for p in paths))
    shown = ", ".join(folded[:_MAX_LISTED])
    more = len(folded) - _MAX_LISTED
    note = " (layers_N: each layer)" if folded != paths else ""
    return shown + (f", ... ({more} more)" if more > 0 else "") + note


def unbox(tree: PyTree) -> PyTree:
    """`nn.unbox` without sharding constraints, so it works eagerly under a mesh."""
    def unbox_leaf(x):
        if isinstance(x, nn.Partitioned):
            return x.unbox(apply_constraint=False)
        return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x
    return jax.tree.map(unbox_leaf, tree,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def is_quantized(leaf: Any) -> bool:
    return isinstance(unbox(leaf), qwix_ptq.WithAux)


def abstract_params(model: nn.Module) -> PyTree:
    """Boxed `ShapeDtypeStruct` params of `model` (adapters included); no memory used.

    Safe under `partitioning.mesh_context`, unlike a LoRA model's own `init`:
    qwix 0.1.8 applies the kernel's logical constraint (3 axes) to the new 2-D
    A/B while creating them, which fails whenever axis rules are active.
    """
    enc, dec = jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    with nn.logical_axis_rules(()):  # Shapes only: no constraints to apply.
        return jax.eval_shape(lambda: model.init(rngs, enc, dec))["params"]


def count_params(tree: PyTree) -> int:
    """Number of scalars in a param tree (a QLoRA kernel counts its full logical shape)."""
    leaves = flatten(tree).values() if isinstance(tree, (dict, flax.core.FrozenDict)) else (
        [tree])
    return sum(math.prod(unbox(leaf).shape) for leaf in leaves)
