"""Gemma building blocks for T5Gemma: (1 + w) RMS norm, rotary positions, grouped-query
attention with soft-capping and a KV cache, scaled embeddings.

What this module owns (the model that composes them is `ift_jax.models.t5gemma`):

- `RMSNorm`: Gemma's norm, `x / rms(x) * (1 + scale)` in fp32, `scale` starting
  at 0 (stored as HF stores it, so checkpoints map one-to-one).
- `Rope`, `rope_tables`, `apply_rope`: rotary position embeddings with an
  optional linear scaling (T5Gemma 2's global layers), as transformers'
  `default` and `linear` rope types compute them.
- `Attention`: queries from one stream attending to keys and values from the
  same stream (`self`), from the encoder output (`cross`), or both at once
  (T5Gemma 2's merged decoder attention), with `num_kv_heads <= num_heads`
  (GQA), scores scaled by `query_pre_attn_scalar ** -0.5`, optional tanh
  soft-capping and T5Gemma 2's q/k norms. While decoding it keeps a KV cache.
- `Embedder`: the token table, looked up with Gemma's `sqrt(d_model)` scale and
  T5Gemma 2's end-of-image embedding, and `attend` for tied output logits.

Params carry the logical axis names of `ift_jax.models.layers` (`embed`, `heads`,
`kv`, `vocab`), the key and value projections' KV-head axis `heads` too:
`partitioning.logical_shardings` shards it over `tensor` where the KV heads
divide that axis and replicates it where they do not (one KV head in T5Gemma 2
270M and 1B). Their outputs carry no constraint, so they follow their kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ift_jax.models import layers

Array = jax.Array
DType = Any

NEG_INF = float(np.finfo(np.float32).min)  # Additive mask value, as HF's eager attention.

_HEADS_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


class RMSNorm(nn.Module):
    """`x / rms(x) * (1 + scale)` computed in fp32, returned in `x`'s dtype (as HF)."""

    epsilon: float
    param_dtype: DType = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", layers.param_init(nn.initializers.zeros, (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


# ----------------------------------------------------------------------------
# Rotary position embeddings.


@dataclasses.dataclass(frozen=True)
class Rope:
    """One rotary embedding: base `theta`, positions divided by `factor` (HF's `linear`)."""

    theta: float = 10_000.0
    factor: float = 1.0


def inverse_frequencies(head_dim: int, rope: Rope) -> np.ndarray:
    """`[head_dim // 2]` fp32, as transformers computes them (fp32 power, then / factor)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = np.float32(1.0) / (np.float32(rope.theta) ** exponents)
    return (inv / np.float32(rope.factor)).astype(np.float32)


def rope_tables(positions_BxL: Array, head_dim: int, rope: Rope,
                dtype: DType) -> tuple[Array, Array]:
    """`(cos, sin)`, each `[batch, length, head_dim]` in `dtype` (angles in fp32)."""
    inv = jnp.asarray(inverse_frequencies(head_dim, rope))
    angles = positions_BxL.astype(jnp.float32)[..., None] * inv
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x_BxLxHxD: Array, tables: tuple[Array, Array]) -> Array:
    """`x * cos + rotate_half(x) * sin` (the halves convention of HF's Gemma)."""
    cos, sin = (t[:, :, None, :] for t in tables)
    half = x_BxLxHxD.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxLxHxD[..., half:], x_BxLxHxD[..., :half]], axis=-1)
    return x_BxLxHxD * cos.astype(x_BxLxHxD.dtype) + rotated * sin.astype(x_BxLxHxD.dtype)


# ----------------------------------------------------------------------------
# Attention.


def match_rows(x: Array, rows: int) -> Array:
    """`x` with `rows` rows: kept, broadcast from one, or each row repeated (beams of an
    input share its encoder keys and values, which are cached once per input)."""
    if x.shape[0] == rows:
        return x
    if x.shape[0] == 1:
        return jnp.broadcast_to(x, (rows,) + x.shape[1:])
    return jnp.repeat(x, rows // x.shape[0], axis=0)


def attend(query_BxQxHxD: Array, key_BxSxKxD: Array, value_BxSxKxD: Array,
           bias_Bx1xQxS: Array, *, scale: float, softcap: Optional[float],
           dropout: nn.Module, deterministic: bool, dtype: DType) -> Array:
    """Grouped-query attention in HF's order: `q.k * scale`, soft-cap, + mask, fp32 softmax.

    Query head `h` reads KV head `h // (num_heads // num_kv_heads)`, as
    `repeat_kv` in transformers.
    """
    batch, length, heads, dim = query_BxQxHxD.shape
    kv_heads = key_BxSxKxD.shape[2]
    query = query_BxQxHxD.reshape(batch, length, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", query, key_BxSxKxD).astype(jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = scores + bias_Bx1xQxS.astype(jnp.float32)[:, :, None]
    weights = dropout(jax.nn.softmax(scores, axis=-1).astype(dtype), deterministic=deterministic)
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights, value_BxSxKxD.astype(dtype))
    return out.reshape(batch, length, heads, dim)


class Attention(nn.Module):
    """Gemma attention over the stream itself, the encoder output, or both (merged).

    Attributes:
      qk_norm_eps: T5Gemma 2's RMS norms of queries and keys (over `head_dim`,
        before the rotation); None: none (T5Gemma).
      softcap: `tanh(s / c) * c` on the scaled scores; None: off.
      init_std: normal init of the projections (HF's `initializer_range`).
      ia3: projection names (`query` ... `out`) whose output IA3 scales.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    softcap: Optional[float]
    qk_norm_eps: Optional[float]
    dropout_rate: float
    init_std: float
    dtype: DType
    param_dtype: DType
    ia3: tuple[str, ...] = ()

    def _projection(self, name: str) -> nn.Module:
        heads = self.num_heads if name == "query" else self.num_kv_heads
        return layers.DenseGeneral((heads, self.head_dim), ("embed", "heads", "kv"),
                                   self.init_std, dtype=self.dtype, param_dtype=self.param_dtype,
                                   ia3="output" if name in self.ia3 else "", name=name)

    def _norm(self, name: str) -> Any:
        if self.qk_norm_eps is None:
            return lambda x: x
        return RMSNorm(self.qk_norm_eps, self.param_dtype, axis_name="kv", name=name)

    def _kv_modules(self) -> dict:
        """Key and value projections and the key norm: created once, as the merged
        attention applies them to both the stream and the encoder output."""
        return {"key": self._projection("key"), "value": self._projection("value"),
                "key_norm": self._norm("key_norm")}

    def _keys_values(self, kv: dict, x: Array) -> tuple[Array, Array]:
        # No activation constraint: with fewer KV heads than the tensor axis a
        # `heads` constraint would pad them; unconstrained, they follow the kernels.
        return kv["key_norm"](kv["key"](x)), kv["value"](x)

    @nn.compact
    def __call__(self, x_BxLxD: Array, *, self_bias: Optional[Array] = None,
                 rope: Optional[tuple[Array, Array]] = None,
                 encoded: Optional[Array] = None, cross_bias: Optional[Array] = None,
                 deterministic: bool = True, decode: bool = False,
                 cache_index: Optional[Array] = None, reuse_cross: bool = False) -> Array:
        """Attention output `[batch, length, d_model]`.

        Args:
          self_bias: `[B, 1, L, L]` (or `[B, 1, 1, cache length]` while
            decoding) additive mask over the stream's own keys; None: the
            layer has no self part.
          rope: `(cos, sin)` of the query positions, applied to queries and
            to the stream's own keys (never to the encoder's).
          encoded: encoder output `[B', S, d_enc]` for the cross part (B' may
            divide B: see `match_rows`); `cross_bias` `[B' or 1, 1, L or 1, S]`.
          decode: one token per call; its key and value go into the cache at
            `cache_index` (see `_update_cache`).
          reuse_cross: project `encoded` at the first call only and keep its
            keys and values in the cache (decoding steps).
        """
        rows, length = x_BxLxD.shape[:2]
        query = self._norm("query_norm")(
            layers.constrain(self._projection("query")(x_BxLxD), _HEADS_AXES))
        if rope is not None:
            query = apply_rope(query, rope)
        kv = self._kv_modules()
        parts = []  # (keys, values, bias) of the self part, then of the cross part.
        if self_bias is not None:
            key, value = self._keys_values(kv, x_BxLxD)
            key = apply_rope(key, rope) if rope is not None else key
            if decode:
                key, value = self._update_cache(key, value, cache_index)
            parts.append((key, value, self_bias))
        if encoded is not None:
            key, value = self._cross_kv(kv, encoded, reuse_cross)
            parts.append((match_rows(key, rows), match_rows(value, rows), cross_bias))
        keys, values, biases = zip(*parts)
        bias = jnp.concatenate(
            [jnp.broadcast_to(match_rows(b, rows), (rows, 1, length, b.shape[-1]))
             for b in biases], axis=-1)
        out = attend(query, jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1),
                     bias, scale=self.query_pre_attn_scalar ** -0.5, softcap=self.softcap,
                     dropout=nn.Dropout(self.dropout_rate), deterministic=deterministic,
                     dtype=self.dtype)
        out = layers.constrain(out, _HEADS_AXES)
        return layers.DenseGeneral((x_BxLxD.shape[-1],), ("heads", "kv", "embed"), self.init_std,
                                   num_contract=2, dtype=self.dtype, param_dtype=self.param_dtype,
                                   ia3="output" if "out" in self.ia3 else "", name="out")(out)

    def _cross_kv(self, kv: dict, encoded: Array, reuse: bool) -> tuple[Array, Array]:
        """Encoder keys (k-normed, not rotated) and values; cached once when `reuse`.

        Decoding attends to the same encoder output at every step; projecting it
        anew would cost two projections of the whole input per step and layer.
        """
        if reuse and self.has_variable("cache", "cross_key"):
            return (self.get_variable("cache", "cross_key"),
                    self.get_variable("cache", "cross_value"))
        key, value = self._keys_values(kv, encoded)
        if reuse:
            self.put_variable("cache", "cross_key", key)
            self.put_variable("cache", "cross_value", value)
        return key, value

    def _update_cache(self, key_Bx1xKxD: Array, value_Bx1xKxD: Array,
                      cache_index: Optional[Array]) -> tuple[Array, Array]:
        """Writes this step's (rotated) key and value at `cache_index`; returns the cache.

        The first call (cache absent, as in `init`) creates the cache with the
        shape of the full-length input and leaves it zero. Sliding-window layers
        keep the full length too; the mask confines them to their window.
        """
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key_Bx1xKxD.shape,
                                   key_Bx1xKxD.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value_Bx1xKxD.shape,
                                     value_Bx1xKxD.dtype)
        if not initialized:
            return key_Bx1xKxD, value_Bx1xKxD
        if key_Bx1xKxD.shape[1] != 1:
            raise ValueError(f"decode=True feeds one token per step; got length "
                             f"{key_Bx1xKxD.shape[1]}")
        start = (0, cache_index, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, key_Bx1xKxD.astype(cached_key.value.dtype), start)
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, value_Bx1xKxD.astype(cached_value.value.dtype), start)
        return cached_key.value, cached_value.value


# ----------------------------------------------------------------------------
# Embeddings.


class Embedder(nn.Module):
    """The token table `[vocab, embed]`, and T5Gemma 2's `eoi_embedding` `[embed]`.

    Attributes:
      eoi_token_id: T5Gemma 2 replaces this token's (scaled) embedding by the
        unscaled `eoi_embedding` param; None: no such param (T5Gemma).
    """

    vocab_size: int
    d_model: int
    init_std: float
    param_dtype: DType
    eoi_token_id: Optional[int] = None

    def setup(self):
        self.embedding = self.param(
            "embedding", layers.param_init(nn.initializers.normal(self.init_std),
                                           ("vocab", "embed")),
            (self.vocab_size, self.d_model), self.param_dtype)
        if self.eoi_token_id is not None:
            self.eoi_embedding = self.param(
                "eoi_embedding", layers.param_init(nn.initializers.zeros, ("embed",)),
                (self.d_model,), self.param_dtype)

    def lookup(self, tokens_BxL: Array) -> Array:
        """Unscaled rows of the table, in the param dtype."""
        return jnp.take(jnp.asarray(self.embedding), tokens_BxL, axis=0)

    def scaled(self, tokens_BxL: Array) -> Array:
        """T5Gemma 2's embedding layer: rows times `sqrt(d)` rounded to the param dtype
        (HF's `embed_scale.to(weight.dtype)`), end-of-image rows replaced."""
        x = self.lookup(tokens_BxL)
        x = x * jnp.asarray(self.d_model ** 0.5, jnp.float32).astype(x.dtype)
        if self.eoi_token_id is not None:
            eoi = jnp.asarray(self.eoi_embedding, x.dtype)
            x = jnp.where((tokens_BxL == self.eoi_token_id)[..., None], eoi, x)
        return x

    def attend(self, x_BxLxD: Array) -> Array:
        """Tied output logits `x @ table.T` in `x`'s dtype."""
        return jnp.einsum("bld,vd->blv", x_BxLxD, jnp.asarray(self.embedding, x_BxLxD.dtype))
