"""T5 building blocks: projections, RMS norm, relative position biases, attention, MLP.

Each param is created with its logical axis names; activations are
constrained with logical names too (a no-op unless a mesh and rules are
current, see `ift_jax.partitioning.mesh_context`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ift_jax import errors

Array = jax.Array
DType = Any

# Activation names as HF's ACT2FN spells them (the part after `gated-`).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


# `model.remat` names besides the `jax.checkpoint_policies` that take no arguments.
# full: save nothing, recompute each layer's forward pass in the backward pass;
# save_dots: keep the projections' outputs (dots without batch dims, as t5x's
# "minimal" remat), recompute the rest (attention scores, activations, norms).
REMAT = {"none": None, "full": None,
         "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
_POLICY_FACTORIES = ("save_and_offload_only_these_names", "save_any_names_but_these",
                     "save_anything_except_these_names", "save_from_both_policies",
                     "save_only_these_names", "offload_dot_with_no_batch_dims")


def remat_names() -> list[str]:
    policies = [n for n in dir(jax.checkpoint_policies)
                if not n.startswith("_") and n not in _POLICY_FACTORIES]
    return list(REMAT) + policies


def remat_policy(name: str) -> Optional[Callable]:
    """The `jax.checkpoint` policy of `model.remat=name` (None: save nothing)."""
    if name in REMAT:
        return REMAT[name]
    if name not in remat_names():
        raise errors.ConfigError(f"model.remat={name!r} is not a remat policy; set "
                                 f"--config.model.remat to one of {', '.join(remat_names())}")
    return getattr(jax.checkpoint_policies, name)


def param_init(init: Callable, axes: tuple[Optional[str], ...]) -> Callable:
    return nn.with_logical_partitioning(init, axes)


def constrain(x: Array, axes: tuple[Optional[str], ...]) -> Array:
    return nn.with_logical_constraint(x, axes)


class DenseGeneral(nn.Module):
    """Bias-free projection contracting the trailing `num_contract` input axes.

    The kernel is stored with its full shape (e.g. `[embed, heads, kv]`), so
    its logical axes stay valid under a mesh (flax's DenseGeneral initializes
    a flattened kernel, which breaks multi-axis logical constraints).
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    stddev: float
    num_contract: int = 1
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    ia3: str = ""  # IA3 (`ift_jax.peft`): "input" / "output" scaled by `ia3_scale`.

    @nn.compact
    def __call__(self, x: Array) -> Array:
        contract = tuple(range(x.ndim - self.num_contract, x.ndim))
        in_shape = tuple(x.shape[a] for a in contract)
        kernel = self.param(
            "kernel", param_init(nn.initializers.normal(stddev=self.stddev), self.kernel_axes),
            in_shape + tuple(self.features), self.param_dtype)
        # jnp.asarray, not .astype: qwix intercepts it to pass QLoRA's NF4 kernels through.
        x, kernel = x.astype(self.dtype), jnp.asarray(kernel, self.dtype)
        if self.ia3 == "input":
            x = x * self._ia3_scale(in_shape, self.kernel_axes[:self.num_contract])
        y = self._contract(x, kernel)
        if self.ia3 == "output":
            y = y * self._ia3_scale(tuple(self.features), self.kernel_axes[self.num_contract:])
        return y

    def _ia3_scale(self, shape: tuple[int, ...], axes: tuple[str, ...]) -> Array:
        """IA3's learned vector (ones at init: the model starts as its base)."""
        scale = self.param("ia3_scale", param_init(nn.initializers.ones, axes), shape,
                           self.param_dtype)
        return scale.astype(self.dtype)

    def _contract(self, x: Array, kernel: Array) -> Array:
        if self.num_contract == 1 and x.ndim > 2:
            # Batch and length merged into one row axis: the weight gradient is
            # then one plain GEMM. With two free axes XLA:CPU transposes and
            # copies the activations first; merged, T5 small's train step is
            # ~13% faster on CPU. The kernel keeps its shape, which qwix needs
            # to find it. Length is never sharded, so the merge is free.
            lead = x.shape[:-1]
            y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), kernel, (((1,), (0,)), ((), ())))
            return y.reshape(lead + y.shape[1:])
        contract = tuple(range(x.ndim - self.num_contract, x.ndim))
        dims = ((contract, tuple(range(self.num_contract))), ((), ()))
        return jax.lax.dot_general(x, kernel, dims)


class LayerNorm(nn.Module):
    """T5's RMS norm: no mean subtraction, no bias, variance in fp32."""

    epsilon: float
    dtype: DType
    param_dtype: DType

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        d = x_BxLxD.shape[-1]
        scale = self.param("scale", param_init(nn.initializers.ones, ("embed",)),
                           (d,), self.param_dtype)
        x = x_BxLxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        return (x * scale.astype(jnp.float32)).astype(self.dtype)


def relative_position_bucket(relative_position: Array, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> Array:
    """HF's `_relative_position_bucket`, op for op (memory position - query position)."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(relative_position.dtype) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # Clamp before the log so exact (small) positions never take log(0).
    safe = jnp.maximum(relative_position, max_exact).astype(jnp.float32)
    large = max_exact + (
        jnp.log(safe / max_exact) / np.float32(math.log(max_distance / max_exact))
        * (num_buckets - max_exact)
    ).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, relative_position, large)


class RelativePositionBiases(nn.Module):
    """Per-head bias from bucketed relative positions, shared by all layers of a stack."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    dtype: DType
    param_dtype: DType

    @nn.compact
    def __call__(self, query_pos_BxQ: Array, key_pos_BxK: Array) -> Array:
        """Returns the bias `[batch, heads, q, k]` (batch may be 1 for broadcasting)."""
        rel_embedding = self.param(
            "rel_embedding",
            param_init(nn.initializers.normal(stddev=1.0), ("heads", "relpos_buckets")),
            (self.num_heads, self.num_buckets), self.param_dtype)
        relative_BxQxK = key_pos_BxK[:, None, :] - query_pos_BxQ[:, :, None]
        bucket_BxQxK = relative_position_bucket(
            relative_BxQxK.astype(jnp.int32), self.bidirectional, self.num_buckets,
            self.max_distance)
        # One-hot contraction (as t5x) rather than a gather: cheap, and shards cleanly.
        onehot_BxQxKxR = jax.nn.one_hot(bucket_BxQxK, self.num_buckets, dtype=self.dtype)
        bias_BxHxQxK = jnp.einsum("hr,bqkr->bhqk", rel_embedding.astype(self.dtype),
                                  onehot_BxQxKxR)
        return bias_BxHxQxK


_HEADS_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


class MultiHeadAttention(nn.Module):
    """T5 attention: no 1/sqrt(d_kv) scaling, additive bias, optional KV cache."""

    num_heads: int
    d_kv: int
    dropout_rate: float
    dtype: DType
    param_dtype: DType
    ia3: tuple[str, ...] = ()  # Projections whose output IA3 scales (`query` ... `out`).

    def _projection(self, name: str, x: Array, d_model: int) -> Array:
        stddev = (d_model * self.d_kv) ** -0.5 if name == "query" else d_model ** -0.5
        return DenseGeneral((self.num_heads, self.d_kv), ("embed", "heads", "kv"), stddev,
                            dtype=self.dtype, param_dtype=self.param_dtype,
                            ia3="output" if name in self.ia3 else "", name=name)(x)

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_kv: Array, bias_BxHxQxK: Array, *,
                 deterministic: bool, decode: bool = False,
                 cache_index: Optional[Array] = None, reuse_kv: bool = False,
                 prefix_kv: Optional[tuple[Array, Array]] = None) -> Array:
        """Attention of `inputs_q` over `inputs_kv`.

        Args:
          decode: append this step's key and value to the cache at `cache_index`
            (self-attention while decoding; see `_update_cache`).
          reuse_kv: `inputs_kv` is the same at every call (the encoder output
            while decoding): project it at the first call only (see
            `_project_once`).
          prefix_kv: prefix tuning's `([P, heads, kv], [P, heads, kv])` keys and
            values, put in front of the projected (or cached) ones; they are
            params, never cached. `bias_BxHxQxK` then has P more key columns,
            in front.

        `inputs_kv` may have fewer rows than `inputs_q`, by a whole factor:
        consecutive groups of query rows then share one key row (beam search's
        beams of one input share its encoder output), which spares repeating it.
        """
        d_model = inputs_q.shape[-1]
        query_BxQxHxK = constrain(self._projection("query", inputs_q, d_model), _HEADS_AXES)
        if reuse_kv:
            key_BxSxHxK, value_BxSxHxK = self._project_once(inputs_kv, d_model)
        else:
            key_BxSxHxK = constrain(self._projection("key", inputs_kv, d_model), _HEADS_AXES)
            value_BxSxHxK = constrain(self._projection("value", inputs_kv, d_model),
                                      _HEADS_AXES)
        if decode:
            key_BxSxHxK, value_BxSxHxK = self._update_cache(key_BxSxHxK, value_BxSxHxK,
                                                            cache_index)
        if prefix_kv is not None:
            key_BxSxHxK, value_BxSxHxK = (_prepend_rows(p, x) for p, x in zip(
                prefix_kv, (key_BxSxHxK, value_BxSxHxK)))

        query_shape = query_BxQxHxK.shape  # The groups of query rows become more queries.
        query_BxQxHxK = query_BxQxHxK.reshape((key_BxSxHxK.shape[0], -1) + query_shape[2:])
        scores_BxHxQxS = jnp.einsum("bqhk,bshk->bhqs", query_BxQxHxK, key_BxSxHxK)
        scores_BxHxQxS = scores_BxHxQxS.astype(jnp.float32) + bias_BxHxQxK.astype(
            jnp.float32)
        # Softmax with the normalization after the value product, as flash
        # attention: out = (exp(s - max) @ v) / sum(exp(s - max)). Dividing the
        # [q, kv] output instead of the [q, s] weights saves one pass over the
        # scores forward, and backward needs no row sum over [q, s] (its row
        # term is sum(d_out * out) over kv). Same math; the max is a constant
        # shift, so no gradient flows through it. Dropout commutes with the
        # per-row division. T5 small, CPU: train step 2-8% faster.
        max_BxHxQx1 = jax.lax.stop_gradient(jnp.max(scores_BxHxQxS, axis=-1, keepdims=True))
        unnormalized_BxHxQxS = jnp.exp(scores_BxHxQxS - max_BxHxQx1)
        sum_BxHxQ = jnp.sum(unnormalized_BxHxQxS, axis=-1)
        unnormalized_BxHxQxS = nn.Dropout(self.dropout_rate)(
            unnormalized_BxHxQxS.astype(self.dtype), deterministic=deterministic)
        out_BxQxHxK = jnp.einsum("bhqs,bshk->bqhk", unnormalized_BxHxQxS, value_BxSxHxK)
        out_BxQxHxK = (out_BxQxHxK.astype(jnp.float32)
                       / jnp.transpose(sum_BxHxQ, (0, 2, 1))[..., None]).astype(self.dtype)
        out_BxQxHxK = constrain(out_BxQxHxK.reshape(query_shape), _HEADS_AXES)
        return DenseGeneral((d_model,), ("heads", "kv", "embed"),
                            (self.num_heads * self.d_kv) ** -0.5, num_contract=2,
                            dtype=self.dtype, param_dtype=self.param_dtype,
                            ia3="output" if "out" in self.ia3 else "",
                            name="out")(out_BxQxHxK)

    def _project_once(self, inputs_kv: Array, d_model: int) -> tuple[Array, Array]:
        """Keys and values of `inputs_kv`: projected at the first call, then read from the cache.

        Cross-attention while decoding attends to the same encoder output at
        every step; projecting it anew costs `2 x input length` token
        projections per row, layer and step, most of a step's work (T5 small,
        128 input tokens: about 18 times the rest of the layer). XLA hoists
        that out of the decoding loop on CPU but not on GPU, so the cache
        keeps them, as HF's `EncoderDecoderCache` does. The first call (with
        `cache` mutable) adds them to the cache; later calls ignore `inputs_kv`.
        """
        if self.has_variable("cache", "cached_key"):
            return (self.get_variable("cache", "cached_key"),
                    self.get_variable("cache", "cached_value"))
        key_BxSxHxK = constrain(self._projection("key", inputs_kv, d_model), _HEADS_AXES)
        value_BxSxHxK = constrain(self._projection("value", inputs_kv, d_model), _HEADS_AXES)
        self.put_variable("cache", "cached_key", key_BxSxHxK)
        self.put_variable("cache", "cached_value", value_BxSxHxK)
        return key_BxSxHxK, value_BxSxHxK

    def _update_cache(self, key_Bx1xHxK: Array, value_Bx1xHxK: Array,
                      cache_index: Optional[Array]) -> tuple[Array, Array]:
        """Writes this step's key/value at `cache_index`; returns the whole cache.

        The first call (cache variables absent, as in `init`) only creates the
        cache with the shape of the full-length input and leaves it untouched.
        """
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key_Bx1xHxK.shape,
                                   key_Bx1xHxK.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros,
                                     value_Bx1xHxK.shape, value_Bx1xHxK.dtype)
        if not initialized:
            return key_Bx1xHxK, value_Bx1xHxK
        if key_Bx1xHxK.shape[1] != 1:
            raise ValueError(f"decode=True feeds one token per step; got length "
                             f"{key_Bx1xHxK.shape[1]}")
        start = (0, cache_index, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, key_Bx1xHxK.astype(cached_key.value.dtype), start)
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, value_Bx1xHxK.astype(cached_value.value.dtype), start)
        return cached_key.value, cached_value.value


def _prepend_rows(prefix_PxHxK: Array, x_BxSxHxK: Array) -> Array:
    prefix = jnp.broadcast_to(prefix_PxHxK.astype(x_BxSxHxK.dtype)[None],
                              (x_BxSxHxK.shape[0],) + prefix_PxHxK.shape)
    return jnp.concatenate([prefix, x_BxSxHxK], axis=1)


class MlpBlock(nn.Module):
    """Position-wise feed-forward: `wi` (or gated `wi_0` * `wi_1`), dropout, `wo`.

    `ia3` names the projections IA3 scales: `wi*` their output, `wo` its input
    (the intermediate activations, as HF PEFT's "feedforward" modules).
    """

    d_ff: int
    activations: tuple[str, ...]
    dropout_rate: float
    dtype: DType
    param_dtype: DType
    ia3: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, x_BxLxD: Array, *, deterministic: bool) -> Array:
        d_model = x_BxLxD.shape[-1]
        hidden = []
        for i, act in enumerate(self.activations):
            name = "wi" if len(self.activations) == 1 else f"wi_{i}"
            h_BxLxF = DenseGeneral((self.d_ff,), ("embed", "mlp"), d_model ** -0.5,
                                   dtype=self.dtype, param_dtype=self.param_dtype,
                                   ia3="output" if name in self.ia3 else "",
                                   name=name)(x_BxLxD)
            hidden.append(h_BxLxF if act == "linear" else ACTIVATIONS[act](h_BxLxF))
        h_BxLxF = functools.reduce(jnp.multiply, hidden)
        h_BxLxF = constrain(h_BxLxF, ("activation_batch", "activation_length",
                                       "activation_mlp"))
        h_BxLxF = nn.Dropout(self.dropout_rate)(h_BxLxF, deterministic=deterministic)
        return DenseGeneral((d_model,), ("mlp", "embed"), self.d_ff ** -0.5, dtype=self.dtype,
                            param_dtype=self.param_dtype,
                            ia3="input" if "wo" in self.ia3 else "", name="wo")(h_BxLxF)
