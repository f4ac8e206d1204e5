"""Flax linen T5Gemma and T5Gemma 2 (text), numerically equal to HF transformers.

What this module owns (the architectures and sizes are
`ift_jax.models.t5gemma_config`'s, the blocks `ift_jax.models.gemma_layers`'):

- `Transformer`: the encoder-decoder with `ift_jax.models.t5.Transformer`'s call
  signature (`__call__`, `encode`, `decode` with a KV cache, segment ids and
  positions for packed inputs, `prompt_length`, `additions`, `model.remat`,
  `model.scan_layers`), so the trainer, decoding, losses and PEFT code drive it
  as they drive T5.
- Shape-only helpers: `abstract_variables`, `param_count`, `init_cache`, and
  `select_cache_rows` (beam search's reordering of the cache).

The two variants (`T5GemmaConfig.variant`, HF's `model_type`):

- `t5gemma` (Gemma 2 blocks): separate encoder and decoder embeddings (the
  decoder's tied to the output), the decoder's own cross-attention block,
  attention-logit soft-capping, one rotary embedding.
- `t5gemma2` (Gemma 3 blocks): one embedding table shared by encoder, decoder
  and output (plus the end-of-image embedding), q/k RMS norms, local and
  global rotary embeddings (the global one linearly scaled), and the decoder's
  merged attention: one softmax over its own keys and the encoder's, with one
  set of projections. transformers ignores `attn_logit_softcapping` here, and
  so does this module. The vision tower is not part of this model.

Both: RMS norms with a `1 + w` scale before and after attention and MLP,
grouped-query attention scaled by `query_pre_attn_scalar ** -0.5`, local
sliding-window and global layers as `layer_types` says, a GeGLU MLP
(`layers.MlpBlock`: `wi_0` = gate, `wi_1` = up, `wo` = down), embeddings
scaled by `sqrt(d_model)`, final-logit soft-capping. Decoder inputs follow the
house convention (a 0 opens each target, `t5x`/seqio's shift): a 0 at decoder
position 0 is read as `decoder_start_token_id` (Gemma's BOS, 2), so batches,
`ift_jax.decoding` and losses need no change.

Param tree (`layers_N` unrolled; `layers` with a leading axis when scanned)::

    token_embedder/embedding                      [vocab, embed]  (encoder's; shared in v2)
    token_embedder/eoi_embedding                  [embed]          (t5gemma2)
    encoder/layers_N/{pre,post}_attention_layer_norm/scale
    encoder/layers_N/attention/{query/kernel [embed, heads, kv],
        key,value/kernel [embed, heads (the KV heads), kv], out/kernel [heads, kv, embed],
        query_norm,key_norm/scale [kv] (t5gemma2)}
    encoder/layers_N/{pre,post}_mlp_layer_norm/scale, mlp/{wi_0,wi_1,wo}/kernel
    encoder/encoder_norm/scale
    decoder/token_embedder/embedding              (t5gemma: the decoder's own)
    decoder/layers_N/{pre,post}_self_attention_layer_norm, self_attention/...
    decoder/layers_N/{pre,post}_cross_attention_layer_norm,
        encoder_decoder_attention/...             (t5gemma)
    decoder/layers_N/{pre,post}_mlp_layer_norm, mlp/...
    decoder/decoder_norm/scale
    decoder/logits_dense/kernel                   (untied only)
    prompt/embedding                              (prompt tuning only)

Norm params hold HF's zero-centred weight (the scale applied is `1 + scale`).
Prefix tuning is refused (its interplay with rotary positions and sliding
windows is not defined here yet); the other `Additions` work as in T5.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ift_jax import errors
from ift_jax.models import additions as additions_lib
from ift_jax.models import gemma_layers as gl
from ift_jax.models import layers
from ift_jax.models.additions import Additions
from ift_jax.models.t5gemma_config import FULL, SLIDING, StackConfig, T5GemmaConfig

Array = jax.Array
DType = Any

# ----------------------------------------------------------------------------
# Layers.

_EMBED_AXES = ("activation_batch", "activation_length", "activation_embed")
Biases = tuple[Array, Array]  # (full layers', sliding layers')
Ropes = tuple[tuple[Array, Array], tuple[Array, Array]]


def _norm(c: T5GemmaConfig, stack: StackConfig, name: str) -> gl.RMSNorm:
    return gl.RMSNorm(stack.rms_norm_eps, c.param_dtype, name=name)


def _attention(c: T5GemmaConfig, stack: StackConfig, extra: Additions,
               name: str) -> gl.Attention:
    return gl.Attention(stack.num_heads, stack.num_kv_heads, stack.head_dim,
                        stack.query_pre_attn_scalar, c.attention_softcap(stack),
                        stack.rms_norm_eps if c.merged_attention else None,
                        c.attention_dropout_rate, c.initializer_range, c.dtype, c.param_dtype,
                        ia3=extra.ia3_targets, name=name)


def _mlp(c: T5GemmaConfig, stack: StackConfig, extra: Additions) -> layers.MlpBlock:
    return layers.MlpBlock(stack.d_ff, (stack.activation, "linear"), c.dropout_rate, c.dtype,
                           c.param_dtype, ia3=extra.ia3_targets, name="mlp")


def _residual(c: T5GemmaConfig, extra: Additions, site: str, name: str, x: Array, y: Array,
              deterministic: bool) -> Array:
    """`x + dropout(y)`, with `y` through the sublayer's bottleneck adapter if `site` has one
    (after the post-norm: the adapter sees what the residual sum would add)."""
    if site in extra.adapter_sites:
        y = additions_lib.BottleneckAdapter(
            extra.adapter_width, extra.adapter_activation, extra.adapter_init_std, c.dtype,
            c.param_dtype, name=f"{name}_adapter")(y)
    y = nn.Dropout(c.dropout_rate)(y, deterministic=deterministic)
    return layers.constrain(x + y, _EMBED_AXES)


def _pick(layer_type: Optional[str], is_sliding: Optional[Array], full: Any, sliding: Any) -> Any:
    """The sliding or full variant of a (pytree) input: chosen statically for an unrolled
    layer, by the scanned flag for a scanned one (one compiled body serves both types)."""
    if layer_type is not None:
        return sliding if layer_type == SLIDING else full
    if full is sliding:
        return full
    return jax.tree.map(lambda s, f: jnp.where(is_sliding, s, f), sliding, full)


class EncoderLayer(nn.Module):
    """One encoder block. `layer_type` None: scanned, the type arrives as `is_sliding`."""

    config: T5GemmaConfig
    extra: Additions = Additions()
    deterministic: bool = True
    layer_type: Optional[str] = None
    scanned: bool = False

    @nn.compact
    def __call__(self, x: Array, biases: Biases, ropes: Ropes,
                 is_sliding: Optional[Array] = None) -> Any:
        c, s, extra, det = self.config, self.config.encoder, self.extra, self.deterministic
        bias = _pick(self.layer_type, is_sliding, *biases)
        rope = _pick(self.layer_type, is_sliding, *ropes)
        y = _norm(c, s, "pre_attention_layer_norm")(x)
        y = _attention(c, s, extra, "attention")(y, self_bias=bias, rope=rope,
                                                 deterministic=det)
        y = _norm(c, s, "post_attention_layer_norm")(y)
        x = _residual(c, extra, "attention", "attention", x, y, det)
        y = _mlp(c, s, extra)(_norm(c, s, "pre_mlp_layer_norm")(x), deterministic=det)
        y = _norm(c, s, "post_mlp_layer_norm")(y)
        x = _residual(c, extra, "mlp", "mlp", x, y, det)
        return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
    """One decoder block: self- and cross-attention (t5gemma) or merged (t5gemma2), MLP."""

    config: T5GemmaConfig
    extra: Additions = Additions()
    deterministic: bool = True
    decode: bool = False
    layer_type: Optional[str] = None
    scanned: bool = False

    @nn.compact
    def __call__(self, x: Array, encoded: Array, biases: Biases, cross_bias: Array,
                 ropes: Ropes, cache_index: Optional[Array] = None,
                 is_sliding: Optional[Array] = None) -> Any:
        c, s, extra, det = self.config, self.config.decoder, self.extra, self.deterministic
        bias = _pick(self.layer_type, is_sliding, *biases)
        rope = _pick(self.layer_type, is_sliding, *ropes)
        # Decoding steps (not cache creation, whose encoder output is a dummy)
        # project the encoder output once and keep its keys and values.
        reuse = cache_index is not None
        merged = dict(encoded=encoded, cross_bias=cross_bias, reuse_cross=reuse)
        y = _norm(c, s, "pre_self_attention_layer_norm")(x)
        y = _attention(c, s, extra, "self_attention")(
            y, self_bias=bias, rope=rope, deterministic=det, decode=self.decode,
            cache_index=cache_index, **(merged if c.merged_attention else {}))
        y = _norm(c, s, "post_self_attention_layer_norm")(y)
        x = _residual(c, extra, "attention", "self_attention", x, y, det)
        if not c.merged_attention:
            y = _norm(c, s, "pre_cross_attention_layer_norm")(x)
            y = _attention(c, s, extra, "encoder_decoder_attention")(y, deterministic=det,
                                                                     **merged)
            y = _norm(c, s, "post_cross_attention_layer_norm")(y)
            x = _residual(c, extra, "attention", "encoder_decoder_attention", x, y, det)
        y = _mlp(c, s, extra)(_norm(c, s, "pre_mlp_layer_norm")(x), deterministic=det)
        y = _norm(c, s, "post_mlp_layer_norm")(y)
        x = _residual(c, extra, "mlp", "mlp", x, y, det)
        return (x, None) if self.scanned else x


def _run_layers(c: T5GemmaConfig, cls: type, stack: StackConfig, kwargs: dict, args: tuple,
                x: Array, training: bool) -> Array:
    """`stack`'s layers over `x`: unrolled (`layers_N`, types static) or scanned (`layers`,
    one body, the layer type a scanned input), rematerialized when `c.remat` says so."""
    if training and c.remat != "none":
        # In a scan the loop already keeps XLA from merging recomputation and forward.
        cls = nn.remat(cls, policy=layers.remat_policy(c.remat), prevent_cse=not c.scan_layers)
    if c.scan_layers:
        sliding = jnp.asarray([t == SLIDING for t in stack.layer_types])
        scanned = nn.scan(cls, variable_axes={"params": 0, "cache": 0},
                          split_rngs={"params": True, "dropout": True},
                          in_axes=(nn.broadcast,) * len(args) + (0,), length=stack.num_layers,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = scanned(c, **kwargs, scanned=True, name="layers")(x, *args, sliding)
        return x
    for i, layer_type in enumerate(stack.layer_types):
        x = cls(c, **kwargs, layer_type=layer_type, name=f"layers_{i}")(x, *args)
    return x


# ----------------------------------------------------------------------------
# Masks (boolean, turned into additive biases once per stack) and positions.


def _to_bias(mask: Array) -> Array:
    return jnp.where(mask, 0.0, gl.NEG_INF).astype(jnp.float32)


def _key_mask(key_valid_BxK: Array, query_segments: Optional[Array],
              key_segments: Optional[Array]) -> Array:
    """`[B, 1, Q or 1, K]`: the key is a real token of the query's segment (keys only, as
    HF: padded query rows stay finite)."""
    mask = key_valid_BxK[:, None, None, :]
    if query_segments is not None:
        mask = mask & (query_segments[:, None, :, None] == key_segments[:, None, None, :])
    return mask


def _offsets(query_pos: Array, key_pos: Array) -> Array:
    """`q - k` as `[B, 1, Q, K]` (positions restart per packed segment, so windows and
    causality hold within each)."""
    return query_pos[:, None, :, None] - key_pos[:, None, None, :]


def _stack_biases(c: T5GemmaConfig, stack: StackConfig, mask: Array, offsets: Array,
                  causal: bool) -> Biases:
    """Biases of the full and the sliding layers (one array if the stack has one kind)."""
    full = mask & (offsets >= 0) if causal else mask
    if SLIDING not in stack.layer_types:
        return (_to_bias(full),) * 2
    lo, hi = c.window_bounds(stack, causal)
    sliding = mask & (offsets >= lo) & (offsets <= hi)
    if FULL not in stack.layer_types:
        return (_to_bias(sliding),) * 2
    return _to_bias(full), _to_bias(sliding)


def _ropes(c: T5GemmaConfig, stack: StackConfig, positions: Array) -> Ropes:
    full = gl.rope_tables(positions, stack.head_dim, stack.rope_global, c.dtype)
    if stack.rope_local == stack.rope_global:
        return full, full
    return full, gl.rope_tables(positions, stack.head_dim, stack.rope_local, c.dtype)


def _positions(tokens_BxL: Array, positions_BxL: Optional[Array]) -> Array:
    if positions_BxL is not None:
        return positions_BxL
    return jnp.arange(tokens_BxL.shape[1], dtype=jnp.int32)[None, :]


def _embed_scale(x: Array, d_model: int) -> Array:
    # T5Gemma scales in the stack, with the normalizer in the hidden dtype (as HF).
    return x * jnp.asarray(d_model ** 0.5, jnp.float32).astype(x.dtype)


# ----------------------------------------------------------------------------
# Stacks and the full model.


class Encoder(nn.Module):
    config: T5GemmaConfig
    embedder: nn.Module
    extra: Additions = Additions()

    @nn.compact
    def __call__(self, tokens_BxL: Array, segment_ids_BxL: Optional[Array] = None,
                 positions_BxL: Optional[Array] = None, *, deterministic: bool,
                 prompt: Optional[tuple[Array, Optional[Array]]] = None) -> Array:
        """Encodes `[prompt; tokens]`: `[batch, prompt_len + length, d_model]`."""
        c, s = self.config, self.config.encoder
        if c.merged_attention:  # The embedding layer scales (the prompt stays as it is).
            x = self.embedder.scaled(tokens_BxL).astype(c.dtype)
        else:
            x = self.embedder.lookup(tokens_BxL).astype(c.dtype)
        valid = tokens_BxL > 0
        pos = _positions(tokens_BxL, positions_BxL)
        if prompt is not None:
            x, valid, pos = additions_lib.prepend_prompt(*prompt, x, valid, pos)
        if not c.merged_attention:  # The stack scales whatever it is fed, prompt included.
            x = _embed_scale(x, s.d_model)
        x = layers.constrain(nn.Dropout(c.dropout_rate)(x, deterministic=deterministic),
                             _EMBED_AXES)
        mask = _key_mask(valid, segment_ids_BxL, segment_ids_BxL)
        biases = _stack_biases(c, s, mask, _offsets(pos, pos), causal=False)
        x = _run_layers(c, EncoderLayer, s, dict(extra=self.extra, deterministic=deterministic),
                        (biases, _ropes(c, s, pos)), x, training=not deterministic)
        x = _norm(c, s, "encoder_norm")(x)
        return layers.constrain(nn.Dropout(c.dropout_rate)(x, deterministic=deterministic),
                                _EMBED_AXES)


class Decoder(nn.Module):
    """The decoder stack and the output logits; `embedder` None: its own table (t5gemma)."""

    config: T5GemmaConfig
    embedder: Optional[nn.Module] = None
    extra: Additions = Additions()

    @nn.compact
    def __call__(self, encoded: Array, encoder_tokens_BxS: Array, tokens_BxL: Array,
                 encoder_segment_ids: Optional[Array] = None,
                 segment_ids_BxL: Optional[Array] = None,
                 positions_BxL: Optional[Array] = None, *,
                 deterministic: bool, decode: bool = False) -> Array:
        c, s = self.config, self.config.decoder
        embedder = self.embedder
        if embedder is None:  # T5Gemma: the decoder's own table.
            embedder = gl.Embedder(c.vocab_size, s.d_model, c.initializer_range, c.param_dtype,
                                   name="token_embedder")
        cache_index = None
        if decode and self.has_variable("cache", "cache_index"):
            biases, cache_index, query_pos = self._decode_step_biases()
            cross_mask = (encoder_tokens_BxS > 0)[:, None, None, :]
            tokens_BxL = self._start_tokens(tokens_BxL, query_pos)
        else:
            if decode:  # Cache creation: reserve the step counter.
                self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            query_pos = _positions(tokens_BxL, positions_BxL)
            tokens_BxL = self._start_tokens(tokens_BxL, query_pos)
            mask = _key_mask(tokens_BxL > 0, segment_ids_BxL, segment_ids_BxL)
            biases = _stack_biases(c, s, mask, _offsets(query_pos, query_pos), causal=True)
            cross_mask = _key_mask(encoder_tokens_BxS > 0, segment_ids_BxL, encoder_segment_ids)

        if c.merged_attention:
            x = embedder.scaled(tokens_BxL).astype(c.dtype)
        else:
            x = _embed_scale(embedder.lookup(tokens_BxL).astype(c.dtype), s.d_model)
        x = layers.constrain(nn.Dropout(c.dropout_rate)(x, deterministic=deterministic),
                             _EMBED_AXES)
        kwargs = dict(extra=self.extra, deterministic=deterministic, decode=decode)
        args = (encoded, biases, _to_bias(cross_mask), _ropes(c, s, query_pos), cache_index)
        x = _run_layers(c, DecoderLayer, s, kwargs, args, x,
                        training=not (deterministic or decode))
        x = _norm(c, s, "decoder_norm")(x)
        x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
        return self._logits(embedder, x)

    def _start_tokens(self, tokens_BxL: Array, positions: Array) -> Array:
        """A 0 opening a target (position 0) is the decoder start token (Gemma's BOS)."""
        start = (tokens_BxL == 0) & (positions == 0)
        return jnp.where(start, self.config.decoder_start_token_id, tokens_BxL)

    def _decode_step_biases(self) -> tuple[Biases, Array, Array]:
        """Biases of the single query at the cache index over all cached keys."""
        c, s = self.config, self.config.decoder
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        cur = index.value
        key_pos = jnp.arange(self._cache_length(), dtype=jnp.int32)[None, :]
        query_pos = jnp.reshape(cur, (1, 1))
        index.value = cur + 1
        mask = jnp.ones(key_pos.shape, bool)[:, None, None, :]
        return _stack_biases(c, s, mask, _offsets(query_pos, key_pos), causal=True), cur, \
            query_pos

    def _cache_length(self) -> int:
        cache = self.scope.variables()["cache"]
        if self.config.scan_layers:  # [layers, batch, length, kv_heads, head_dim]
            return cache["layers"]["self_attention"]["cached_key"].shape[2]
        return cache["layers_0"]["self_attention"]["cached_key"].shape[1]

    def _logits(self, embedder: nn.Module, x_BxLxD: Array) -> Array:
        c = self.config
        if c.tie_word_embeddings:
            logits = embedder.attend(x_BxLxD.astype(c.dtype))
        else:
            logits = layers.DenseGeneral((c.vocab_size,), ("embed", "vocab"),
                                         c.initializer_range, dtype=c.dtype,
                                         param_dtype=c.param_dtype, name="logits_dense")(x_BxLxD)
        logits = logits.astype(jnp.float32)
        if c.final_logit_softcapping is not None:
            cap = c.final_logit_softcapping
            logits = jnp.tanh(logits / cap) * cap
        return layers.constrain(logits, ("activation_batch", "activation_length",
                                         "activation_vocab"))


class Transformer(nn.Module):
    """T5Gemma encoder-decoder with t5x's call signature. Returns fp32 logits `[B, L, V]`.

    Attributes:
      prompt_length: prompt tuning's soft-prompt positions (0: none), prepended
        to the encoder input as in `t5.Transformer`.
      additions: adapters and IA3 scales inside the layers; prefix tuning is
        refused (see the module docstring).
    """

    config: T5GemmaConfig
    prompt_length: int = 0
    additions: Additions = Additions()

    def setup(self):
        c = self.config
        if self.additions.prefix_length:
            raise errors.ConfigError("prefix tuning is not supported for T5Gemma models; use "
                                     "LoRA, prompt tuning, IA3 or adapters")
        self.token_embedder = gl.Embedder(
            c.vocab_size, c.encoder.d_model, c.initializer_range, c.param_dtype,
            c.eoi_token_id if c.merged_attention else None)
        self.encoder = Encoder(c, self.token_embedder, self.additions)
        self.decoder = Decoder(c, self.token_embedder if c.merged_attention else None,
                               self.additions)
        if self.prompt_length:
            self.prompt = additions_lib.SoftPrompt(self.prompt_length, c.encoder.d_model,
                                                   c.param_dtype)

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
                            prompt=self.prompt() if self.prompt_length else None)

    def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Optional[Array] = None,
               encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               decoder_positions: Optional[Array] = None, *, enable_dropout: bool = False,
               decode: bool = False) -> Array:
        """Logits from the decoder; as `t5.Transformer.decode` (cache, beams sharing rows).

        `decoder_target_tokens` is accepted for the common signature and not
        read: decoder padding is masked from the inputs (HF's default), whose
        opening 0 is the start token here.
        """
        del decoder_target_tokens
        self._check_unpacked(encoder_segment_ids)
        if self.prompt_length:  # The decoder attends to the prompt positions too.
            prompt_valid = additions_lib.prompt_valid(
                encoder_input_tokens.shape[0], self.prompt_length, self.prompt()[1])
            encoder_input_tokens = jnp.concatenate(
                [prompt_valid.astype(jnp.int32), encoder_input_tokens], 1)
        return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens,
                            encoder_segment_ids, decoder_segment_ids, decoder_positions,
                            deterministic=not enable_dropout, decode=decode)

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


def abstract_variables(config: T5GemmaConfig, batch: int = 1, encoder_length: int = 8,
                       decoder_length: int = 8) -> dict:
    """`jax.eval_shape` of `init`: boxed ShapeDtypeStructs, no memory allocated."""
    model = Transformer(config)
    enc, dec = _dummy_inputs(batch, encoder_length, decoder_length)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), enc, dec))


def param_count(config: T5GemmaConfig) -> int:
    """Number of parameters, from shapes only."""
    params = nn.unbox(abstract_variables(config)["params"])
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def init_cache(config: T5GemmaConfig, batch: int, max_decode_length: int,
               encoder_length: int) -> dict:
    """Zeroed `cache` collection for `decode=True` steps of up to `max_decode_length`."""
    model = Transformer(config)
    enc, dec = _dummy_inputs(batch, encoder_length, max_decode_length)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), enc, dec, decode=True))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes))


def select_cache_rows(cache: dict, rows: Array) -> dict:
    """The cache of decoder rows `rows` (beam search continues the beams it keeps).

    Only the decoder's own keys and values (`cached_key`, `cached_value`) belong
    to decoder rows; the step counter is shared and the encoder's keys and
    values (`cross_key`, `cross_value`) belong to the inputs.
    """
    def select(path, x):
        keys = [getattr(k, "key", None) for k in path]
        if keys[-1] not in ("cached_key", "cached_value"):
            return x
        return x[:, rows] if "layers" in keys else x[rows]  # Scanned: [layers, batch, ...].
    return jax.tree_util.tree_map_with_path(select, cache)
