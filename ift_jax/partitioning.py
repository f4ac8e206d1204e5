"""The one place for mesh axes, logical-axis rules and shardings.

Models name every param and main activation with *logical* axes (`embed`,
`mlp`, `heads`, `activation_batch`, ...). This module maps them onto the
three *mesh* axes:

- `data`: pure data parallelism (params replicated),
- `fsdp`: data parallelism with params (and optimizer state) sharded on `embed`,
- `tensor`: Megatron-style model parallelism over heads / mlp / vocab.

Rules are tried in order; an axis whose mesh axis is already used by an
earlier dimension of the same array falls through to the next rule (flax's
semantics), and names without a rule are replicated.

Typical use (what `sharded_init` does, following the Flax lm1b example)::

    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    abstract = jax.eval_shape(init_fn, rng)            # boxed, no memory
    shardings = logical_shardings(abstract, mesh)      # NamedSharding tree
    variables = jax.jit(init_fn, out_shardings=shardings)(rng)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from ift_jax import errors
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = Sequence[tuple[str, Optional[str | tuple[str, ...]]]]

# Params: `embed` carries FSDP; heads/mlp/vocab carry tensor parallelism.
# Activations use their own names so batch (data+fsdp) never clashes with
# the param rule for `embed`.
DEFAULT_RULES: LogicalRules = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("relpos_buckets", None),
    ("prompt_length", None),
)

# Batch arrays (tokens, segment ids, ...) are [batch, length].
BATCH_AXES = ("activation_batch", "activation_length")


def make_mesh(axis_sizes: Mapping[str, int] | Sequence[int],
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """Builds a `Mesh` over `MESH_AXES`; one size may be -1 to take the remaining devices.

    Args:
      axis_sizes: `{"data": d, "fsdp": f, "tensor": t}` (missing axes are 1) or
        a sequence of three sizes in `MESH_AXES` order.
      devices: defaults to `jax.devices()` (all hosts).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = _resolve_sizes(axis_sizes, len(devices))
    try:
        device_array = mesh_utils.create_device_mesh(sizes, devices)
    except (AssertionError, NotImplementedError, ValueError):
        # Fake CPU devices and odd shapes have no physical topology to follow.
        device_array = np.asarray(devices).reshape(sizes)
    return Mesh(device_array, MESH_AXES)


def _resolve_sizes(axis_sizes: Mapping[str, int] | Sequence[int],
                   num_devices: int) -> tuple[int, ...]:
    if isinstance(axis_sizes, Mapping):
        unknown = set(axis_sizes) - set(MESH_AXES)
        if unknown:
            raise errors.ConfigError(f"unknown mesh axes {sorted(unknown)}; mesh axes are "
                                     f"{MESH_AXES}")
        sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    else:
        sizes = [int(s) for s in axis_sizes]
        if len(sizes) != len(MESH_AXES):
            raise errors.ConfigError(f"mesh needs {len(MESH_AXES)} sizes {MESH_AXES}, got {sizes}")
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise errors.ConfigError(f"at most one mesh axis may be -1, got "
                                 f"{dict(zip(MESH_AXES, sizes))}")
    if fill:
        known = math.prod(s for s in sizes if s != -1)
        if known <= 0 or num_devices % known:
            raise errors.ConfigError(f"cannot fill mesh {dict(zip(MESH_AXES, sizes))} with "
                                     f"{num_devices} devices")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise errors.ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                                 f"devices, {num_devices} are available")
    return tuple(sizes)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """Makes `mesh` and `rules` current so activation constraints take effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_specs(boxed_tree: Any) -> Any:
    """Tree of logical `PartitionSpec`s (axis names) from boxed params/variables."""
    return nn.get_partition_spec(boxed_tree)


def logical_shardings(boxed_tree: Any, mesh: Mesh,
                      rules: LogicalRules = DEFAULT_RULES) -> Any:
    """`NamedSharding` per leaf of a boxed tree (e.g. from `jax.eval_shape(init)`).

    A dimension that its mesh axes do not divide evenly is replicated instead
    (e.g. QLoRA's per-tile scales, `[embed / tile, ...]`, on a large fsdp axis).
    """
    shardings = nn.logical_to_mesh_sharding(logical_specs(boxed_tree), mesh, rules)
    return jax.tree.map(lambda sharding, leaf: _divisible(sharding, np.shape(leaf)),
                        shardings, _values(boxed_tree),
                        is_leaf=lambda x: x is None or isinstance(x, NamedSharding))


def _values(boxed_tree: Any) -> Any:
    """The boxed tree's values, unboxed without sharding constraints (which an active
    mesh would otherwise apply to these abstract values)."""
    def value(x):
        return x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x
    return jax.tree.map(value, boxed_tree,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _divisible(sharding: Optional[NamedSharding], shape: tuple[int, ...]
               ) -> Optional[NamedSharding]:
    if sharding is None or not shape:
        return sharding
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for dim, axes in enumerate(spec[:len(shape)]):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if shape[dim] % math.prod(sharding.mesh.shape[name] for name in names):
            spec[dim] = None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[:len(shape)]))


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of `[batch, length]` input arrays."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(BATCH_AXES, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def abstract_init(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh,
                  rules: LogicalRules = DEFAULT_RULES) -> tuple[Any, Any]:
    """`(shapes, shardings)` of `init_fn`'s variables without computing any (unboxed
    `jax.ShapeDtypeStruct`s, and the `NamedSharding`s `sharded_init` would give)."""
    abstract = jax.eval_shape(init_fn, rng)
    return nn.unbox(abstract), logical_shardings(abstract, mesh, rules)


def sharded_init(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh,
                 rules: LogicalRules = DEFAULT_RULES) -> tuple[Any, Any]:
    """Initializes variables directly in their shards; nothing is built whole first.

    Args:
      init_fn: `rng -> boxed variables`, e.g. `lambda r: model.init(r, *dummy)`.

    Returns:
      `(variables, shardings)`: unboxed arrays placed by their logical axes,
      and the matching `NamedSharding` tree.
    """
    _, shardings = abstract_init(init_fn, rng, mesh, rules)

    def unboxed_init(r):
        return nn.unbox(init_fn(r))

    # No mesh context here: out_shardings place every param, and wrappers such as
    # qwix's LoRA may re-box reshaped kernels in ways a constraint would reject.
    variables = jax.jit(unboxed_init, out_shardings=shardings)(rng)
    return variables, shardings
