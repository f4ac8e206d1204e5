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

With `Transformer(additions=...)` (`ift_jax.models.additions`): IA3's
`.../<projection>/ia3_scale`, adapters' `.../<sublayer>_adapter/{down,up}/
{kernel,bias}` and the prefix table `prefix/key_values` (or `prefix/embedding`
and its MLP).

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

from ift_jax import errors
from ift_jax.models import additions as additions_lib
from ift_jax.models import layers
from ift_jax.models.additions import Additions
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
      remat: rematerialization of each layer while training (`layers.REMAT`, or
        a `jax.checkpoint_policies` name): less activation memory, more compute.
      scan_layers: each stack runs one compiled layer body over its layers
        (`nn.scan`); the layer params then carry a leading layer axis under
        `encoder/layers/...`, `decoder/layers/...` (`ift_jax.scan_layout`
        converts to and from the t5x/HF `layers_N` layout).
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
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        _ = self.activations  # validates feed_forward_proj early
        layers.remat_policy(self.remat)  # validates remat early

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
            raise errors.ConfigError(
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
        raise errors.ConfigError(f"unknown T5 preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)


_EMBED_AXES = ("activation_batch", "activation_length", "activation_embed")


def _layer_norm(config: T5Config, name: str) -> layers.LayerNorm:
    return layers.LayerNorm(config.layer_norm_epsilon, config.dtype, config.param_dtype,
                            name=name)


def _attention(config: T5Config, extra: Additions, name: str) -> layers.MultiHeadAttention:
    return layers.MultiHeadAttention(config.num_heads, config.d_kv, config.dropout_rate,
                                     config.dtype, config.param_dtype,
                                     ia3=extra.ia3_targets, name=name)


def _mlp(config: T5Config, extra: Additions) -> layers.MlpBlock:
    return layers.MlpBlock(config.d_ff, config.activations, config.dropout_rate, config.dtype,
                           config.param_dtype, ia3=extra.ia3_targets, name="mlp")


def _dropout(config: T5Config, x: Array, deterministic: bool) -> Array:
    return nn.Dropout(config.dropout_rate)(x, deterministic=deterministic)


def _adapted(config: T5Config, extra: Additions, site: str, name: str, y: Array) -> Array:
    """A sublayer's output `y` through its bottleneck adapter, if `site` has one."""
    if site not in extra.adapter_sites:
        return y
    return additions_lib.BottleneckAdapter(
        extra.adapter_width, extra.adapter_activation, extra.adapter_init_std, config.dtype,
        config.param_dtype, name=f"{name}_adapter")(y)


PrefixKV = Optional[tuple[Array, Array]]


class EncoderLayer(nn.Module):
    """One encoder block. Flags are attributes and every input positional, so the
    class can be wrapped in `nn.remat` / `nn.scan` (`scanned`: returns `(x, None)`,
    the shape of a scan body)."""

    config: T5Config
    extra: Additions = Additions()
    deterministic: bool = True
    scanned: bool = False

    @nn.compact
    def __call__(self, x: Array, bias: Array, prefix_kv: PrefixKV = None) -> Any:
        c, extra, deterministic = self.config, self.extra, self.deterministic
        y = _layer_norm(c, "pre_attention_layer_norm")(x)
        y = _attention(c, extra, "attention")(y, y, bias, deterministic=deterministic,
                                              prefix_kv=prefix_kv)
        y = _adapted(c, extra, "attention", "attention", y)
        x = layers.constrain(x + _dropout(c, y, deterministic), _EMBED_AXES)
        y = _layer_norm(c, "pre_mlp_layer_norm")(x)
        y = _adapted(c, extra, "mlp", "mlp", _mlp(c, extra)(y, deterministic=deterministic))
        x = layers.constrain(x + _dropout(c, y, deterministic), _EMBED_AXES)
        return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
    """One decoder block; flags are attributes, as `EncoderLayer`'s."""

    config: T5Config
    extra: Additions = Additions()
    deterministic: bool = True
    decode: bool = False
    scanned: bool = False

    @nn.compact
    def __call__(self, x: Array, encoded: Array, self_bias: Array, cross_bias: Array,
                 cache_index: Optional[Array] = None, self_prefix: PrefixKV = None,
                 cross_prefix: PrefixKV = None) -> Any:
        c, extra = self.config, self.extra
        deterministic, decode = self.deterministic, self.decode
        y = _layer_norm(c, "pre_self_attention_layer_norm")(x)
        y = _attention(c, extra, "self_attention")(
            y, y, self_bias, deterministic=deterministic, decode=decode,
            cache_index=cache_index, prefix_kv=self_prefix)
        y = _adapted(c, extra, "attention", "self_attention", y)
        x = layers.constrain(x + _dropout(c, y, deterministic), _EMBED_AXES)
        y = _layer_norm(c, "pre_cross_attention_layer_norm")(x)
        # Decoding steps (not cache creation, whose encoder output is a dummy)
        # project the encoder output once and keep its keys and values.
        y = _attention(c, extra, "encoder_decoder_attention")(
            y, encoded, cross_bias, deterministic=deterministic,
            reuse_kv=cache_index is not None, prefix_kv=cross_prefix)
        y = _adapted(c, extra, "attention", "encoder_decoder_attention", y)
        x = layers.constrain(x + _dropout(c, y, deterministic), _EMBED_AXES)
        y = _layer_norm(c, "pre_mlp_layer_norm")(x)
        y = _adapted(c, extra, "mlp", "mlp", _mlp(c, extra)(y, deterministic=deterministic))
        x = layers.constrain(x + _dropout(c, y, deterministic), _EMBED_AXES)
        return (x, None) if self.scanned else x


def _layer_class(c: T5Config, cls: type, num: int, in_axes: tuple, training: bool) -> type:
    """`cls` as the stack runs it: rematerialized (`c.remat`, only when gradients can
    be taken) and scanned over `num` layers (`c.scan_layers`, params and cache
    stacked on a leading `layers` axis)."""
    if training and c.remat != "none":
        # In a scan the loop already keeps XLA from merging recomputation and forward.
        cls = nn.remat(cls, policy=layers.remat_policy(c.remat), prevent_cse=not c.scan_layers)
    if not c.scan_layers:
        return cls
    return nn.scan(cls, variable_axes={"params": 0, "cache": 0},
                   split_rngs={"params": True, "dropout": True}, in_axes=in_axes,
                   length=num, metadata_params={nn.PARTITION_NAME: "layers"})


def _stacked_prefix(table: Optional[Array], slots: dict, block: str, num: int) -> PrefixKV:
    """Per-layer prefix keys and values stacked on a leading layer axis (scan input)."""
    pairs = [_prefix_for(table, slots, block, i) for i in range(num)]
    if pairs[0] is None:
        return None
    return tuple(jnp.stack([p[j] for p in pairs]) for j in range(2))


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
# Stacks and the full model.


def _prefix_slots(c: T5Config, extra: Additions) -> dict[tuple[str, int], tuple[int, int]]:
    if not extra.prefix_length:
        return {}
    return additions_lib.prefix_slots(c.num_layers, c.num_decoder_layers,
                                      extra.prefix_placement)[1]


def _prefix_for(table: Optional[Array], slots: dict, block: str, layer: int) -> PrefixKV:
    if table is None or (block, layer) not in slots:
        return None
    return additions_lib.prefix_pair(table, slots[(block, layer)])


class Encoder(nn.Module):
    config: T5Config
    embedder: nn.Module
    extra: Additions = Additions()

    @nn.compact
    def __call__(self, tokens_BxL: Array, segment_ids_BxL: Optional[Array] = None,
                 positions_BxL: Optional[Array] = None, *, deterministic: bool,
                 prompt: Optional[tuple[Array, Optional[Array]]] = None,
                 prefix_table: Optional[Array] = None) -> Array:
        """Encodes `[prompt; tokens]`: `[batch, prompt_len + length, d_model]`.

        `prompt` is `SoftPrompt`'s `(embedding, lengths)`; `prefix_table` the
        `PrefixKeyValues` table, read by layers with encoder slots.
        """
        c = self.config
        x = self.embedder(tokens_BxL).astype(c.dtype)
        valid = tokens_BxL > 0
        pos = _positions(tokens_BxL, positions_BxL)
        if prompt is not None:
            x, valid, pos = additions_lib.prepend_prompt(*prompt, x, valid, pos)
        x = layers.constrain(_dropout(c, x, deterministic), _EMBED_AXES)
        relpos = layers.RelativePositionBiases(
            c.relative_attention_num_buckets, c.relative_attention_max_distance,
            c.num_heads, True, c.dtype, c.param_dtype, name="relpos_bias")
        mask = _attention_mask(valid, segment_ids_BxL, segment_ids_BxL)
        bias = relpos(pos, pos).astype(jnp.float32) + _mask_to_bias(mask)
        slots = _prefix_slots(c, self.extra)
        if prefix_table is not None and ("encoder", 0) in slots:
            bias = additions_lib.with_prefix_columns(bias, additions_lib.prefix_bias(
                relpos, pos, prefix_table.shape[0]))
        layer = _layer_class(c, EncoderLayer, c.num_layers, (nn.broadcast, 0),
                             training=not deterministic)
        if c.scan_layers:
            x, _ = layer(c, self.extra, deterministic, scanned=True, name="layers")(
                x, bias, _stacked_prefix(prefix_table, slots, "encoder", c.num_layers))
        for i in range(0 if c.scan_layers else c.num_layers):
            x = layer(c, self.extra, deterministic, name=f"layers_{i}")(
                x, bias, _prefix_for(prefix_table, slots, "encoder", i))
        x = _layer_norm(c, "encoder_norm")(x)
        return layers.constrain(_dropout(c, x, deterministic), _EMBED_AXES)


class Decoder(nn.Module):
    config: T5Config
    embedder: nn.Module
    extra: Additions = Additions()

    @nn.compact
    def __call__(self, encoded: Array, encoder_tokens_BxS: Array, tokens_BxL: Array,
                 target_tokens_BxL: Optional[Array] = None,
                 encoder_segment_ids: Optional[Array] = None,
                 segment_ids_BxL: Optional[Array] = None,
                 positions_BxL: Optional[Array] = None, *,
                 deterministic: bool, decode: bool = False,
                 prefix_table: Optional[Array] = None) -> Array:
        c = self.config
        relpos = layers.RelativePositionBiases(
            c.relative_attention_num_buckets, c.relative_attention_max_distance,
            c.num_heads, False, c.dtype, c.param_dtype, name="relpos_bias")
        cache_index = None
        if decode and self.has_variable("cache", "cache_index"):
            self_bias, cache_index = self._decode_step_bias(relpos)
            query_pos = jnp.reshape(cache_index, (1, 1))
            cross_mask = (encoder_tokens_BxS > 0)[:, None, None, :]
        else:
            if decode:  # Cache creation: reserve the step counter.
                self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            query_pos = _positions(tokens_BxL, positions_BxL)
            self_bias = relpos(query_pos, query_pos)
            # T5's start token is the pad id 0, so padding comes from the targets.
            valid = (target_tokens_BxL > 0) if target_tokens_BxL is not None else (
                jnp.ones(tokens_BxL.shape, bool))
            self_mask = _attention_mask(valid, segment_ids_BxL, segment_ids_BxL, causal=True)
            self_bias = self_bias.astype(jnp.float32) + _mask_to_bias(self_mask)
            cross_mask = _attention_mask(encoder_tokens_BxS > 0, segment_ids_BxL,
                                         encoder_segment_ids)
        cross_bias = _mask_to_bias(cross_mask)
        slots = _prefix_slots(c, self.extra)
        if prefix_table is not None:
            p = prefix_table.shape[0]
            if ("decoder", 0) in slots:
                self_bias = additions_lib.with_prefix_columns(
                    self_bias, additions_lib.prefix_bias(relpos, query_pos, p))
            if ("cross", 0) in slots:  # Cross-attention has no position bias.
                cross_bias = additions_lib.with_prefix_columns(
                    cross_bias, jnp.zeros((1, 1, 1, p), jnp.float32))

        x = self.embedder(tokens_BxL).astype(c.dtype)
        x = layers.constrain(_dropout(c, x, deterministic), _EMBED_AXES)
        n = c.num_decoder_layers
        layer = _layer_class(c, DecoderLayer, n, (nn.broadcast,) * 4 + (0, 0),
                             training=not (deterministic or decode))
        if c.scan_layers:
            x, _ = layer(c, self.extra, deterministic, decode, scanned=True, name="layers")(
                x, encoded, self_bias, cross_bias, cache_index,
                _stacked_prefix(prefix_table, slots, "decoder", n),
                _stacked_prefix(prefix_table, slots, "cross", n))
        for i in range(0 if c.scan_layers else n):
            x = layer(c, self.extra, deterministic, decode, name=f"layers_{i}")(
                x, encoded, self_bias, cross_bias, cache_index,
                _prefix_for(prefix_table, slots, "decoder", i),
                _prefix_for(prefix_table, slots, "cross", i))
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
        if self.config.scan_layers:  # [layers, batch, length, heads, kv]
            return cache["layers"]["self_attention"]["cached_key"].shape[2]
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
      additions: bottleneck adapters, IA3 scales and prefixes inside the
        layers (`ift_jax.models.additions`); none by default.
    """

    config: T5Config
    prompt_length: int = 0
    additions: Additions = Additions()

    def setup(self):
        c = self.config
        self.token_embedder = nn.Embed(
            c.vocab_size, c.d_model, dtype=c.dtype, param_dtype=c.param_dtype,
            embedding_init=layers.param_init(nn.initializers.normal(stddev=1.0),
                                             ("vocab", "embed")))
        self.encoder = Encoder(c, self.token_embedder, self.additions)
        self.decoder = Decoder(c, self.token_embedder, self.additions)
        if self.prompt_length:
            self.prompt = additions_lib.SoftPrompt(self.prompt_length, c.d_model, c.param_dtype)
        extra = self.additions
        if extra.prefix_length:
            slots, _ = additions_lib.prefix_slots(c.num_layers, c.num_decoder_layers,
                                                  extra.prefix_placement)
            self.prefix = additions_lib.PrefixKeyValues(
                extra.prefix_length, slots, c.num_heads, c.d_kv, c.d_model, extra.prefix_hidden,
                c.dtype, c.param_dtype)

    def _prefix_table(self) -> Optional[Array]:
        return self.prefix() if self.additions.prefix_length else None

    def _check_unpacked(self, encoder_segment_ids: Optional[Array]) -> None:
        if self.prompt_length and encoder_segment_ids is not None:
            raise errors.ConfigError("prompt tuning does not support packed inputs (encoder "
                                     "segment ids were given); build batches with packing off")

    def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
               encoder_positions: Optional[Array] = None, *,
               enable_dropout: bool = False) -> Array:
        """Encoder output `[batch, prompt_length + length, d_model]` in the compute dtype."""
        self._check_unpacked(encoder_segment_ids)
        return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                            deterministic=not enable_dropout,
                            prompt=self.prompt() if self.prompt_length else None,
                            prefix_table=self._prefix_table())

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
            prompt_valid = additions_lib.prompt_valid(
                encoder_input_tokens.shape[0], self.prompt_length, self.prompt()[1])
            encoder_input_tokens = jnp.concatenate(
                [prompt_valid.astype(jnp.int32), encoder_input_tokens], 1)
        return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens,
                            decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                            decoder_positions, deterministic=not enable_dropout,
                            decode=decode, prefix_table=self._prefix_table())

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
        keys = [getattr(k, "key", None) for k in path]
        if "self_attention" not in keys:
            return x
        return x[:, rows] if "layers" in keys else x[rows]  # Scanned: [layers, batch, ...].
    return jax.tree_util.tree_map_with_path(select, cache)
