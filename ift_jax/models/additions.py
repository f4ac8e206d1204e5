"""What PEFT methods put inside T5: soft prompts, bottleneck adapters, IA3 scales, prefixes.

The methods themselves (configs, inits, trainable partitions, exports) live in
`ift_jax.peft`; this module owns only the model side, so that every method
stays a partition of the one `t5.Transformer`:

- `SoftPrompt` / `prepend_prompt`: prompt tuning's input embeddings
  (`Transformer(prompt_length=P)`), shared or one per row.
- `Additions`: which of the others a `Transformer(config, additions=...)` builds.
  The default builds none, and the model is the plain T5.
- `BottleneckAdapter`: `h + up(act(down(h)))` (Houlsby et al. 2019), applied
  to a sublayer's output before the residual sum.
- IA3 (Liu et al. 2022) is a `DenseGeneral(ia3=...)` option
  (`ift_jax.models.layers`), set for the projections `ia3_targets` names.
- `PrefixKeyValues`: the prefix table `[prefix_length, slots, heads, kv]`,
  either a param or the output of the reparameterization MLP (Li & Liang
  2021); `prefix_slots` says which attention block reads which slots.

Prefix keys sit at positions `-P..-1` of the stream they join: a self-attention
query at position i gets the relative-position bias of distance `j - P - i`
towards prefix j (what HF T5 computes when prefixes arrive as a filled cache,
and the natural reading for the encoder); cross-attention has no position
bias, so its prefixes get none.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ift_jax import errors
from ift_jax.models import layers

Array = jax.Array

ADAPTER_SITES = ("attention", "mlp")
PREFIX_PLACEMENTS = ("all", "peft")
# Projections IA3 may scale. `wo` scales its input (the MLP's intermediate
# activations, PEFT's "feedforward" modules); the others scale their output.
IA3_MODULES = ("query", "key", "value", "out", "wi", "wi_0", "wi_1", "wo")
IA3_INPUT_SCALED = ("wo",)


@dataclasses.dataclass(frozen=True)
class Additions:
    """Additive PEFT modules inside the T5 layers (all off by default).

    Attributes:
      adapter_sites: where bottleneck adapters go: `attention` (after every
        attention sublayer, cross-attention included) and/or `mlp`.
        Houlsby: both; Pfeiffer: `mlp` only.
      adapter_width: the bottleneck width.
      adapter_activation: a `layers.ACTIVATIONS` name.
      adapter_init_std: the down and up kernels start as a normal truncated at
        two standard deviations (Houlsby's near-identity init); biases at 0.
      ia3_targets: projection names (`IA3_MODULES`) that get an IA3 scale.
      prefix_length: prefix positions per attention block (0: none).
      prefix_placement: `all`: encoder self-, decoder self- and
        cross-attention of every layer, each with its own keys and values;
        `peft`: what HF PEFT does for T5 (see `prefix_slots`).
      prefix_hidden: width of the reparameterization MLP (0: the table is
        the param itself).
    """

    adapter_sites: tuple[str, ...] = ()
    adapter_width: int = 0
    adapter_activation: str = "relu"
    adapter_init_std: float = 1e-2
    ia3_targets: tuple[str, ...] = ()
    prefix_length: int = 0
    prefix_placement: str = "all"
    prefix_hidden: int = 0

    def __post_init__(self):
        bad_sites = [s for s in self.adapter_sites if s not in ADAPTER_SITES]
        if bad_sites or (self.adapter_sites and self.adapter_width < 1):
            raise errors.ConfigError(f"adapters need sites in {ADAPTER_SITES} and width >= 1; got "
                                     f"{self.adapter_sites}, width {self.adapter_width}")
        if self.adapter_activation not in layers.ACTIVATIONS:
            raise errors.ConfigError(f"adapter activation {self.adapter_activation!r}; choose "
                                     f"one of {sorted(layers.ACTIVATIONS)}")
        bad = [t for t in self.ia3_targets if t not in IA3_MODULES]
        if bad:
            raise errors.ConfigError(f"IA3 targets {bad}; choose among {', '.join(IA3_MODULES)}")
        if self.prefix_placement not in PREFIX_PLACEMENTS:
            raise errors.ConfigError(f"prefix placement {self.prefix_placement!r}; choose one of "
                                     f"{PREFIX_PLACEMENTS}")
        if self.prefix_length < 0 or self.prefix_hidden < 0:
            raise errors.ConfigError("prefix_length and prefix_hidden must be >= 0")


class BottleneckAdapter(nn.Module):
    """`h + up(act(down(h)))` with biases; near the identity at init."""

    width: int
    activation: str
    init_std: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h_BxLxD: Array) -> Array:
        d_model = h_BxLxD.shape[-1]
        init = jax.nn.initializers.truncated_normal(self.init_std)

        def dense(name, features, axes):
            return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=layers.param_init(init, axes),
                            bias_init=layers.param_init(nn.initializers.zeros, axes[1:]),
                            name=name)

        down = dense("down", self.width, ("embed", "adapter"))(h_BxLxD)
        up = dense("up", d_model, ("adapter", "embed"))(layers.ACTIVATIONS[self.activation](down))
        return h_BxLxD + up.astype(h_BxLxD.dtype)


# ----------------------------------------------------------------------------
# Prefixes.


def prefix_slots(num_layers: int, num_decoder_layers: int, placement: str
                 ) -> tuple[int, dict[tuple[str, int], tuple[int, int]]]:
    """`(slots, {(block, layer): (key slot, value slot)})`, block in
    `encoder` / `decoder` (self-attention) / `cross`.

    `all`: every block of every layer has its own two slots.

    `peft`: HF PEFT 0.21 on transformers 5.x, read from `PeftModel.get_prompt`:
    its table is `[P, 2 * num_layers * d_model]` (num_layers: the encoder's);
    for seq2seq it doubles the table along the slot axis and hands layer i the
    four slots `4i .. 4i + 3` of the doubled axis, i.e. slots `4i mod 2L` and
    `4i + 1 mod 2L` for the decoder self-attention's keys and values and the
    next two for cross-attention; it then replaces the cross-attention cache
    by an empty one. So only decoder self-attention gets prefixes, layers i
    and i + L/2 share theirs, and half of the table is never read. The
    encoder gets none.
    """
    table: dict[tuple[str, int], tuple[int, int]] = {}
    if placement == "all":
        for i in range(num_layers):
            table[("encoder", i)] = (2 * i, 2 * i + 1)
        base = 2 * num_layers
        for j in range(num_decoder_layers):
            table[("decoder", j)] = (base + 4 * j, base + 4 * j + 1)
            table[("cross", j)] = (base + 4 * j + 2, base + 4 * j + 3)
        return base + 4 * num_decoder_layers, table
    if num_decoder_layers > num_layers:
        raise errors.ConfigError(f"prefix placement 'peft' needs num_decoder_layers <= "
                                 f"num_layers (HF PEFT sizes its table by the encoder's "
                                 f"{num_layers} layers); got {num_decoder_layers}; use "
                                 f"placement 'all'")
    slots = 2 * num_layers
    for j in range(num_decoder_layers):
        table[("decoder", j)] = (4 * j % slots, (4 * j + 1) % slots)
    return slots, table


class PrefixKeyValues(nn.Module):
    """The prefix table `[length, slots, heads, kv]` in the compute dtype.

    Without `hidden`, the table is the param `key_values` (N(0, 1), as PEFT's
    `nn.Embedding`). With it, `embedding [length, d_model]` goes through
    `tanh(e @ mlp_in + b) @ mlp_out + b` (PEFT's `prefix_projection`, inits as
    torch's `nn.Linear`); `ift_jax.peft.fold_prefix` turns that into the
    plain table for decoding and export.
    """

    length: int
    slots: int
    num_heads: int
    d_kv: int
    d_model: int
    hidden: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self) -> Array:
        shape = (self.length, self.slots, self.num_heads, self.d_kv)
        normal = nn.initializers.normal(stddev=1.0)
        if not self.hidden:
            table = self.param("key_values", layers.param_init(
                normal, ("prompt_length", None, "heads", "kv")), shape, self.param_dtype)
            return table.astype(self.dtype)
        embedding = self.param("embedding", layers.param_init(normal, ("prompt_length", "embed")),
                               (self.length, self.d_model), self.param_dtype)
        h = jnp.tanh(self._linear("mlp_in", embedding, self.hidden, ("embed", None)))
        out = self._linear("mlp_out", h, self.slots * self.num_heads * self.d_kv, (None, None))
        return out.reshape(shape).astype(self.dtype)

    def _linear(self, name: str, x: Array, features: int, axes) -> Array:
        fan_in = x.shape[-1]
        kernel = self.param(f"{name}_kernel", layers.param_init(_torch_linear_init(fan_in), axes),
                            (fan_in, features), self.param_dtype)
        bias = self.param(f"{name}_bias", layers.param_init(_torch_linear_init(fan_in), axes[1:]),
                          (features,), self.param_dtype)
        y = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
        return y + bias.astype(jnp.float32)


def _torch_linear_init(fan_in: int):
    """torch `nn.Linear`'s init of weight and bias: U(+-1/sqrt(fan_in))."""
    bound = fan_in ** -0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def prefix_init(name: str, rng: Array, shape: tuple[int, ...], dtype: Any,
                abstract: dict[tuple[str, ...], Any]) -> Array:
    """What `PrefixKeyValues` initializes its param `name` to (`abstract`: the
    model's flat abstract params, for the MLP's fan-in)."""
    if name in ("key_values", "embedding"):
        return jax.random.normal(rng, shape, dtype)
    fan_in = (abstract[("prefix", "embedding")].shape[1] if name.startswith("mlp_in")
              else abstract[("prefix", "mlp_in_bias")].shape[0])
    return _torch_linear_init(fan_in)(rng, shape, dtype)


def prefix_pair(table_PxSxHxK: Array, slots: tuple[int, int]) -> tuple[Array, Array]:
    """The `([P, heads, kv], [P, heads, kv])` keys and values in `slots`."""
    return table_PxSxHxK[:, slots[0]], table_PxSxHxK[:, slots[1]]


def prefix_bias(relpos: nn.Module, query_pos_BxQ: Array, length: int) -> Array:
    """Relative-position bias `[batch, heads, q, P]` towards prefix positions -P..-1."""
    key_pos = jnp.arange(length, dtype=query_pos_BxQ.dtype)[None, :] - length
    return relpos(query_pos_BxQ, key_pos).astype(jnp.float32)


def with_prefix_columns(bias_BxHxQxK: Array, prefix_BxHxQxP: Array) -> Array:
    """`[prefix bias; bias]` along keys, both broadcast to one shape (fp32)."""
    lead = jnp.broadcast_shapes(bias_BxHxQxK.shape[:-1], prefix_BxHxQxP.shape[:-1])
    return jnp.concatenate([
        jnp.broadcast_to(prefix_BxHxQxP.astype(jnp.float32), lead + prefix_BxHxQxP.shape[-1:]),
        jnp.broadcast_to(bias_BxHxQxK.astype(jnp.float32), lead + bias_BxHxQxK.shape[-1:])],
        axis=-1)


# ----------------------------------------------------------------------------
# Soft prompts (Lester et al., 2021). Masks, inits and training live in
# `ift_jax.peft`; here only the param and where it goes.


class SoftPrompt(nn.Module):
    """`[prompt_length, embed]` embeddings prepended to the encoder input.

    Initialized uniform in [-0.5, 0.5] (the paper's "random uniform");
    `ift_jax.peft.init_prompt` gives the vocab and text inits.

    Serving several prompts in one batch (`ift_jax.serving`), the params hold
    one prompt per row instead: `embedding [batch, prompt_length, embed]` and
    `length [batch]` (row r uses its first `length[r]` positions; 0: none).
    """

    length: int
    d_model: int
    param_dtype: Any

    @nn.compact
    def __call__(self) -> tuple[Array, Optional[Array]]:
        """`(embedding, per-row lengths or None)`."""
        if self.has_variable("params", "length"):  # Per-row (read as is: no shape check).
            return self.get_variable("params", "embedding"), self.get_variable("params", "length")

        def uniform(key, shape, dtype):
            return jax.random.uniform(key, shape, dtype, -0.5, 0.5)
        return self.param("embedding", layers.param_init(uniform, ("prompt_length", "embed")),
                          (self.length, self.d_model), self.param_dtype), None


def prepend_prompt(prompt: Array, lengths_B: Optional[Array], x_BxLxD: Array,
                   valid_BxL: Array, positions_BxL: Array) -> tuple[Array, Array, Array]:
    """Embeddings, key validity and positions of `[prompt; tokens]`.

    The prompt takes positions 0..P-1 and the tokens follow, as in HF T5 fed
    `inputs_embeds=[prompt; token embeddings]`. With per-row `lengths_B`, row r
    keeps its first `lengths_B[r]` prompt positions (the rest are masked) and
    its tokens start at that position: what the row's own prompt gives alone.
    """
    batch, p = x_BxLxD.shape[0], prompt.shape[-2]
    prompt_BxPxD = jnp.broadcast_to(prompt.astype(x_BxLxD.dtype),
                                     (batch,) + prompt.shape[-2:])
    x_BxSxD = jnp.concatenate([prompt_BxPxD, x_BxLxD], axis=1)
    valid_BxS = jnp.concatenate([prompt_valid(batch, p, lengths_B), valid_BxL], axis=1)
    shift = p if lengths_B is None else lengths_B[:, None].astype(positions_BxL.dtype)
    positions_BxL = positions_BxL + shift
    rows = positions_BxL.shape[0]
    prompt_pos = jnp.broadcast_to(jnp.arange(p, dtype=positions_BxL.dtype)[None], (rows, p))
    return x_BxSxD, valid_BxS, jnp.concatenate([prompt_pos, positions_BxL], axis=1)


def prompt_valid(batch: int, p: int, lengths_B: Optional[Array]) -> Array:
    """`[batch, P]` bool: which prompt positions are keys (all, or per-row lengths)."""
    if lengths_B is None:
        return jnp.ones((batch, p), bool)
    return jnp.arange(p)[None, :] < lengths_B[:, None]
