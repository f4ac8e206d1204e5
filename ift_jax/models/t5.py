"""Flax linen T5 (v1.0 and v1.1 / FLAN-T5), numerically equal to HF transformers.

What this module owns:

- `T5Config`: the facts real checkpoints vary, plus compute/param dtypes, and
  the presets (`tiny`, T5 1.1 / FLAN-T5 `small` ... `xxl`).
- `Transformer`: the encoder-decoder with the t5x-compatible `__call__`, and
  `encode` / `decode` for generation with an autoregressive KV cache.
- Shape-only helpers: `abstract_variables`, `param_count`, `init_cache`.
- `select_cache_rows`: beam search's reordering of the decoding cache.

The building blocks (attention, MLP, norms, relative position biases) live
in `ift_jax.models.layers`.

Param tree (t5x T5 1.1 naming, so t5x and HF checkpoints map one-to-one)::

    token_embedder/embedding                         [vocab, embed]
    encoder/relpos_bias/rel_embedding                [heads, relpos_buckets]
    encoder/layers_N/pre_attention_layer_norm/scale  [embed]
    encoder/layers_N/attention/{query,key,value}/kernel  [embed, heads, kv]
    encoder/layers_N/attention/out/kernel            [heads, kv, embed]
    encoder/layers_N/pre_mlp_layer_norm/scale        [embed]
    encoder/layers_N/mlp/{wi | wi_0,wi_1}/kernel     [embed, mlp]
    encoder/layers_N/mlp/wo/kernel                   [mlp, embed]
    encoder/encoder_norm/scale
    decoder/relpos_bias/rel_embedding
    decoder/layers_N/{pre_self_attention_layer_norm, self_attention,
                      pre_cross_attention_layer_norm, encoder_decoder_attention,
                      pre_mlp_layer_norm, mlp}/...
    decoder/decoder_norm/scale
    decoder/logits_dense/kernel                      [embed, vocab]  (untied only)
    prompt/embedding                  [prompt_length, embed]  (prompt tuning only)

Every param carries logical axis names (`nn.with_logical_partitioning`); the
mapping to mesh axes lives in `ift_jax.partitioning` alone.

Numerics follow the reference: RMS layer norm in fp32, no 1/sqrt(d_kv) in
attention (T5 folds it into the init), softmax and logits in fp32, relative
position buckets computed exactly as HF's `_relative_position_bucket`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ift_jax.models import layers
from ift_jax.models.layers import relative_position_bucket  # noqa: F401 (public)

Array = jax.Array
DType = Any


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 model. Defaults are T5 1.1 / FLAN-T5 `small`.

    Attributes:
      tie_word_embeddings: the output projection reuses `token_embedder`
        (T5 v1.0) instead of its own `decoder/logits_dense` (T5 1.1).
      scale_decoder_outputs: multiply the decoder output by d_model**-0.5
        before the tied projection (T5 v1.0). Kept apart from tying because
        transformers 5.x can build tied models without the scaling.
      dtype: compute dtype (activations, matmuls); params stay `param_dtype`.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_decoder_layers: Optional[int] = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    scale_decoder_outputs: bool = False
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def __post_init__(self):
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        _ = self.activations  # validates feed_forward_proj early

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activations(self) -> tuple[str, ...]:
        """Activation of each input projection: one (`wi`) or two (`wi_0`, `wi_1`)."""
        name = self.feed_forward_proj.removeprefix("gated-")
        if self.feed_forward_proj == "gated-gelu":
            name = "gelu_new"  # What HF (and mesh-tf) mean by gated-gelu.
        if name not in layers.ACTIVATIONS:
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r} is not supported; use "
                f"'<act>' or 'gated-<act>' with <act> one of {sorted(layers.ACTIVATIONS)}"
            )
        return (name, "linear") if self.is_gated else (name,)

    def replace(self, **changes) -> "T5Config":
        return dataclasses.replace(self, **changes)


_T5_11 = dict(vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False)

PRESETS: dict[str, T5Config] = {
    # Small enough for CPU tests; same structure as the real ones.
    "tiny": T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                     num_decoder_layers=2, num_heads=4,
                     relative_attention_num_buckets=32, feed_forward_proj="gated-gelu"),
    "small": T5Config(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8,
                      num_heads=6, **_T5_11),
    "base": T5Config(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12,
                     num_heads=12, **_T5_11),
    "large": T5Config(d_model=1024, d_kv=64, d_ff=2816, num_layers=24,
                      num_decoder_layers=24, num_heads=16, **_T5_11),
    "xl": T5Config(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
                   num_heads=32, **_T5_11),
    "xxl": T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                    num_decoder_layers=24, num_heads=64, **_T5_11),
}


def get_config(name: str, **overrides) -> T5Config:
    """Returns preset `name` (see `PRESETS`) with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown T5 preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)


_EMBED_AXES = ("activation_batch", "activation_length", "activation_embed")


def _layer_norm(config: T5Config, name: str) -> layers.LayerNorm:
    return layers.LayerNorm(config.layer_norm_epsilon, config.dtype, config.param_dtype,
                            name=name)


def _attention(config: T5Config, name: str) -> layers.MultiHeadAttention:
    return layers.MultiHeadAttention(config.num_heads, config.d_kv, config.dropout_rate,
                              config.dtype, config.param_dtype, name=name)


def _mlp(config: T5Config) -> layers.MlpBlock:
    return layers.MlpBlock(config.d_ff, config.activations, config.dropout_rate, config.dtype,
                    config.param_dtype, name="mlp")


def _dropout(config: T5Config, x: Array, deterministic: bool) -> Array:
    return nn.Dropout(config.dropout_rate)(x, deterministic=deterministic)


class EncoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x: Array, bias: Array, *, deterministic: bool) -> Array:
        c = self.config
        y = _layer_norm(c, "pre_attention_layer_norm")(x)
        y = _attention(c, "attention")(y, y, bias, deterministic=deterministic)
        x = layers.constrain(x + _dropout(c, y, deterministic), _EMBED_AXES)
        y = _layer_norm(c, "pre_mlp_layer_norm")(x)
        y = _mlp(c)(y, deterministic=deterministic)
        return layers.constrain(x + _dropout(c, y, deterministic), _EMBED_AXES)


class DecoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x: Array, encoded: Array, self_bias: Array, cross_bias: Array, *,
                 deterministic: bool, decode: bool, cache_index: Optional[Array]) -> Array:
        c = self.config
        y = _layer_norm(c, "pre_self_attention_layer_norm")(x)
        y = _attention(c, "self_attention")(y, y, self_bias, deterministic=deterministic,
                                            decode=decode, cache_index=cache_index)
        x = layers.constrain(x + _dropout(c, y, deterministic), _EMBED_AXES)
        y = _layer_norm(c, "pre_cross_attention_layer_norm")(x)
        # Decoding steps (not cache creation, whose encoder output is a dummy)
        # project the encoder output once and keep its keys and values.
        y = _attention(c, "encoder_decoder_attention")(y, encoded, cross_bias,
                                                       deterministic=deterministic,
                                                       reuse_kv=cache_index is not None)
        x = layers.constrain(x + _dropout(c, y, deterministic), _EMBED_AXES)
        y = _layer_norm(c, "pre_mlp_layer_norm")(x)
        y = _mlp(c)(y, deterministic=deterministic)
        return layers.constrain(x + _dropout(c, y, deterministic), _EMBED_AXES)


# ----------------------------------------------------------------------------
# Masks. Boolean masks are turned into additive biases once per stack.


def _mask_to_bias(mask_BxHxQxK: Array) -> Array:
    # finfo.min as HF does; fully masked rows cannot occur for real tokens.
    return jnp.where(mask_BxHxQxK, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def _attention_mask(key_valid_BxK: Array, query_segments: Optional[Array],
                    key_segments: Optional[Array], causal: bool = False) -> Array:
    """`[batch, 1, q, k]` bool: key is a real token, same segment, and (causal) not ahead.

    Only keys are masked (as in HF): padded query rows still get finite
    outputs, which keeps padded positions comparable with the reference.
    """
    mask = key_valid_BxK[:, None, None, :]
    if query_segments is not None:
        mask = mask & (query_segments[:, None, :, None] == key_segments[:, None, None, :])
    if causal:
        k = key_valid_BxK.shape[-1]  # Causal self-attention: queries are the keys.
        mask = mask & (jnp.arange(k)[:, None] >= jnp.arange(k)[None, :])[None, None]
    return mask


def _positions(tokens_BxL: Array, positions_BxL: Optional[Array]) -> Array:
    if positions_BxL is not None:
        return positions_BxL
    return jnp.arange(tokens_BxL.shape[1], dtype=jnp.int32)[None, :]


# ----------------------------------------------------------------------------
# Prompt tuning hook (Lester et al., 2021). Training, masks and the other
# inits live in `ift_jax.peft`; here only the param and where it goes.


class SoftPrompt(nn.Module):
    """`[prompt_length, embed]` embeddings prepended to the encoder input.

    Initialized uniform in [-0.5, 0.5] (the paper's "random uniform");
    `ift_jax.peft.init_prompt` gives the vocab and text inits.
    """

    length: int
    d_model: int
    param_dtype: DType

    @nn.compact
    def __call__(self) -> Array:
        def uniform(key, shape, dtype):
            return jax.random.uniform(key, shape, dtype, -0.5, 0.5)
        return self.param("embedding", layers.param_init(uniform, ("prompt_length", "embed")),
                          (self.length, self.d_model), self.param_dtype)


def _prepend_prompt(prompt_PxD: Array, x_BxLxD: Array, valid_BxL: Array,
                    positions_BxL: Array) -> tuple[Array, Array, Array]:
    """Embeddings, key validity and positions of `[prompt; tokens]`.

    The prompt takes positions 0..P-1 and the tokens follow, as in HF T5 fed
    `inputs_embeds=[prompt; token embeddings]`.
    """
    batch, p = x_BxLxD.shape[0], prompt_PxD.shape[0]
    prompt_BxPxD = jnp.broadcast_to(prompt_PxD.astype(x_BxLxD.dtype)[None],
                                     (batch,) + prompt_PxD.shape)
    x_BxSxD = jnp.concatenate([prompt_BxPxD, x_BxLxD], axis=1)
    valid_BxS = jnp.concatenate([jnp.ones((batch, p), bool), valid_BxL], axis=1)
    prompt_pos = jnp.broadcast_to(jnp.arange(p, dtype=positions_BxL.dtype)[None],
                                  (positions_BxL.shape[0], p))
    return x_BxSxD, valid_BxS, jnp.concatenate([prompt_pos, positions_BxL + p], axis=1)


# ----------------------------------------------------------------------------
# Stacks and the full model.


class Encoder(nn.Module):
    config: T5Config
    embedder: nn.Module

    @nn.compact
    def __call__(self, tokens_BxL: Array, segment_ids_BxL: Optional[Array] = None,
                 positions_BxL: Optional[Array] = None, *, deterministic: bool,
                 prompt_PxD: Optional[Array] = None) -> Array:
        """Encodes `[prompt; tokens]`: `[batch, prompt_len + length, d_model]`."""
        c = self.config
        x = self.embedder(tokens_BxL).astype(c.dtype)
        valid = tokens_BxL > 0
        pos = _positions(tokens_BxL, positions_BxL)
        if prompt_PxD is not None:
            x, valid, pos = _prepend_prompt(prompt_PxD, x, valid, pos)
        x = layers.constrain(_dropout(c, x, deterministic), _EMBED_AXES)
        bias = layers.RelativePositionBiases(
            c.relative_attention_num_buckets, c.relative_attention_max_distance,
            c.num_heads, True, c.dtype, c.param_dtype, name="relpos_bias")(pos, pos)
        mask = _attention_mask(valid, segment_ids_BxL, segment_ids_BxL)
        bias = bias.astype(jnp.float32) + _mask_to_bias(mask)
        for i in range(c.num_layers):
            x = EncoderLayer(c, name=f"layers_{i}")(x, bias, deterministic=deterministic)
        x = _layer_norm(c, "encoder_norm")(x)
        return layers.constrain(_dropout(c, x, deterministic), _EMBED_AXES)


class Decoder(nn.Module):
    config: T5Config
    embedder: nn.Module

    @nn.compact
    def __call__(self, encoded: Array, encoder_tokens_BxS: Array, tokens_BxL: Array,
                 target_tokens_BxL: Optional[Array] = None,
                 encoder_segment_ids: Optional[Array] = None,
                 segment_ids_BxL: Optional[Array] = None,
                 positions_BxL: Optional[Array] = None, *,
                 deterministic: bool, decode: bool = False) -> Array:
        c = self.config
        relpos = layers.RelativePositionBiases(
            c.relative_attention_num_buckets, c.relative_attention_max_distance,
            c.num_heads, False, c.dtype, c.param_dtype, name="relpos_bias")
        cache_index = None
        if decode and self.has_variable("cache", "cache_index"):
            self_bias, cache_index = self._decode_step_bias(relpos)
            cross_mask = (encoder_tokens_BxS > 0)[:, None, None, :]
        else:
            if decode:  # Cache creation: reserve the step counter.
                self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            pos = _positions(tokens_BxL, positions_BxL)
            self_bias = relpos(pos, pos)
            # T5's start token is the pad id 0, so padding comes from the targets.
            valid = (target_tokens_BxL > 0) if target_tokens_BxL is not None else (
                jnp.ones(tokens_BxL.shape, bool))
            self_mask = _attention_mask(valid, segment_ids_BxL, segment_ids_BxL, causal=True)
            self_bias = self_bias.astype(jnp.float32) + _mask_to_bias(self_mask)
            cross_mask = _attention_mask(encoder_tokens_BxS > 0, segment_ids_BxL,
                                         encoder_segment_ids)
        cross_bias = _mask_to_bias(cross_mask)

        x = self.embedder(tokens_BxL).astype(c.dtype)
        x = layers.constrain(_dropout(c, x, deterministic), _EMBED_AXES)
        for i in range(c.num_decoder_layers):
            x = DecoderLayer(c, name=f"layers_{i}")(
                x, encoded, self_bias, cross_bias, deterministic=deterministic,
                decode=decode, cache_index=cache_index)
        x = _layer_norm(c, "decoder_norm")(x)
        x = _dropout(c, x, deterministic)
        return self._logits(x)

    def _decode_step_bias(self, relpos: layers.RelativePositionBiases) -> tuple[Array, Array]:
        """Bias of the single query at the cache index over all cached keys."""
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        cur = index.value
        max_length = self._cache_length()
        key_pos = jnp.arange(max_length, dtype=jnp.int32)[None, :]
        bias = relpos(jnp.reshape(cur, (1, 1)), key_pos)
        mask = (key_pos <= cur)[:, None, None, :]
        index.value = cur + 1
        return bias.astype(jnp.float32) + _mask_to_bias(mask), cur

    def _cache_length(self) -> int:
        cache = self.scope.variables()["cache"]
        return cache["layers_0"]["self_attention"]["cached_key"].shape[1]

    def _logits(self, x_BxLxD: Array) -> Array:
        c = self.config
        if c.scale_decoder_outputs:
            x_BxLxD = x_BxLxD * (c.d_model ** -0.5)
        if c.tie_word_embeddings:
            logits = self.embedder.attend(x_BxLxD.astype(c.dtype))
        else:
            logits = layers.DenseGeneral(
                (c.vocab_size,), ("embed", "vocab"), c.d_model ** -0.5, dtype=c.dtype,
                param_dtype=c.param_dtype, name="logits_dense")(x_BxLxD)
        logits = logits.astype(jnp.float32)
        return layers.constrain(logits, ("activation_batch", "activation_length",
                                   "activation_vocab"))


class Transformer(nn.Module):
    """T5 encoder-decoder with t5x's call signature. Returns fp32 logits `[B, L, V]`.

    Attributes:
      prompt_length: prompt tuning's number of soft-prompt positions (0: none).
        The prompt is prepended to the encoder input and attended to by the
        decoder; callers keep passing token arrays without it.
    """

    config: T5Config
    prompt_length: int = 0

    def setup(self):
        c = self.config
        self.token_embedder = nn.Embed(
            c.vocab_size, c.d_model, dtype=c.dtype, param_dtype=c.param_dtype,
            embedding_init=layers.param_init(nn.initializers.normal(stddev=1.0),
                                             ("vocab", "embed")))
        self.encoder = Encoder(c, self.token_embedder)
        self.decoder = Decoder(c, self.token_embedder)
        if self.prompt_length:
            self.prompt = SoftPrompt(self.prompt_length, c.d_model, c.param_dtype)

    def _check_unpacked(self, encoder_segment_ids: Optional[Array]) -> None:
        if self.prompt_length and encoder_segment_ids is not None:
            raise ValueError("prompt tuning does not support packed inputs (encoder segment "
                             "ids were given); build batches with packing off")

    def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
               encoder_positions: Optional[Array] = None, *,
               enable_dropout: bool = False) -> Array:
        """Encoder output `[batch, prompt_length + length, d_model]` in the compute dtype."""
        self._check_unpacked(encoder_segment_ids)
        return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                            deterministic=not enable_dropout,
                            prompt_PxD=self.prompt() if self.prompt_length else None)

    def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Optional[Array] = None,
               encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               decoder_positions: Optional[Array] = None, *, enable_dropout: bool = False,
               decode: bool = False) -> Array:
        """Logits from the decoder. With `decode=True`, one token per call and a cache.

        The cache is created by a call with `decode=True` on full-length inputs
        (see `init_cache`); after that each call consumes `[batch, 1]` tokens.
        The first such call adds the cross-attention keys and values of
        `encoded` to the cache, and later calls use those (their `encoded` is
        not read). While decoding, `encoded` and `encoder_input_tokens` may
        have fewer rows than `decoder_input_tokens`, by a whole factor G: each
        of their rows then serves G consecutive decoder rows (beam search: the
        beams of one input).
        """
        self._check_unpacked(encoder_segment_ids)
        if self.prompt_length:  # The decoder attends to the prompt positions too.
            prompt_tokens = jnp.ones((encoder_input_tokens.shape[0], self.prompt_length),
                                     jnp.int32)
            encoder_input_tokens = jnp.concatenate([prompt_tokens, encoder_input_tokens], 1)
        return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens,
                            decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                            decoder_positions, deterministic=not enable_dropout,
                            decode=decode)

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 decoder_target_tokens: Optional[Array] = None,
                 encoder_segment_ids: Optional[Array] = None,
                 decoder_segment_ids: Optional[Array] = None,
                 encoder_positions: Optional[Array] = None,
                 decoder_positions: Optional[Array] = None, *,
                 enable_dropout: bool = False, decode: bool = False) -> Array:
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                              enable_dropout=enable_dropout)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                           decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                           decoder_positions, enable_dropout=enable_dropout, decode=decode)


# ----------------------------------------------------------------------------
# Shapes, counts and the decoding cache, all without allocating params.


def _dummy_inputs(batch: int, encoder_length: int, decoder_length: int):
    return (jnp.ones((batch, encoder_length), jnp.int32),
            jnp.ones((batch, decoder_length), jnp.int32))


def abstract_variables(config: T5Config, batch: int = 1, encoder_length: int = 8,
                       decoder_length: int = 8) -> dict:
    """`jax.eval_shape` of `init`: boxed ShapeDtypeStructs, no memory allocated."""
    model = Transformer(config)
    enc, dec = _dummy_inputs(batch, encoder_length, decoder_length)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), enc, dec))


def param_count(config: T5Config) -> int:
    """Number of parameters, from shapes only."""
    params = nn.unbox(abstract_variables(config)["params"])
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def init_cache(config: T5Config, batch: int, max_decode_length: int,
               encoder_length: int) -> dict:
    """Zeroed `cache` collection for `decode=True` steps of up to `max_decode_length`."""
    model = Transformer(config)
    enc, dec = _dummy_inputs(batch, encoder_length, max_decode_length)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), enc, dec, decode=True))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes))


def select_cache_rows(cache: dict, rows: Array) -> dict:
    """The cache of decoder rows `rows` (beam search continues the beams it keeps).

    Only the self-attention keys and values belong to decoder rows: the step
    counter is shared, and the cross-attention keys and values belong to the
    inputs, whose beams keep sharing them whichever survive.
    """
    def select(path, x):
        in_self_attention = any(getattr(k, "key", None) == "self_attention" for k in path)
        return x[rows] if in_self_attention else x
    return jax.tree_util.tree_map_with_path(select, cache)
