"""HF transformers T5Gemma / T5Gemma 2 directories in and out.

`load(hf_dir)` reads a directory written by `T5GemmaForConditionalGeneration` or
`T5Gemma2ForConditionalGeneration` (`config.json` plus `model.safetensors`,
sharded safetensors with an index, or `pytorch_model.bin[.index.json]`) into a
`t5gemma_config.T5GemmaConfig` and the param tree of `t5gemma.Transformer`. `save`
writes the reverse, a directory transformers loads with equal logits.

- Shard and index handling and `torch.load(weights_only=True)` are
  `ift_jax.hf`'s; safetensors files are read here, as bf16 (how Gemma weights
  ship) is a dtype numpy's safetensors reader does not know.
- T5Gemma 2: only the text weights are read; the vision tower and its
  projector (`model.encoder.vision_tower.*`, `...multi_modal_projector.*`)
  are skipped. `save(..., base_dir=...)` copies them (and the vision config)
  from the directory the model came from, so the result is again a complete
  multimodal checkpoint; without `base_dir` a one-layer placeholder vision
  config is written (transformers then initializes a tiny random tower; the
  text path is unaffected).
- Disk names are transformers' (5.x reads `model.encoder.layers...` of
  T5Gemma 2 into `encoder.text_model.layers...`; both spellings are read).
- `tokenizer_path`: the checkpoint's Gemma SentencePiece model for
  `ift_jax.data.vocabularies.make_vocabulary` (ids: pad 0, eos 1, bos 2, unk 3;
  the decoder starts from bos, see `t5gemma_config.T5GemmaConfig.decoder_start_token_id`).

Every user mistake raises `errors.CheckpointError` with one line naming it.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, NamedTuple, Optional

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from ift_jax import errors, hf, scan_layout
from ift_jax.models import t5gemma_config
from ift_jax.models.gemma_layers import Rope
from ift_jax.models.t5gemma_config import StackConfig, T5GemmaConfig

MODEL_TYPES = {"t5gemma": "T5GemmaForConditionalGeneration",
               "t5gemma2": "T5Gemma2ForConditionalGeneration"}
TOKENIZER = "tokenizer.model"
# T5Gemma 2 tensors that are not the text model's.
_NOT_TEXT = ("model.encoder.vision_tower.", "model.encoder.multi_modal_projector.")
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class _Tensor(NamedTuple):
    """One HF tensor and its place in our tree."""

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _same(hf_name, path, shape):
    return _Tensor(hf_name, path, shape, lambda w: w, lambda x: x)


def _linear(hf_name, path, out_dim, in_dim):
    """nn.Linear `[out, in]` <-> kernel `[in, out]`."""
    return _Tensor(hf_name, path, (out_dim, in_dim), lambda w: w.T, lambda x: x.T)


def _projections(s: StackConfig, hf_prefix: str, path: tuple, d_in: int,
                 qk_norm: bool) -> list[_Tensor]:
    """q/k/v/o of one attention block; k and v read `d_in`-wide inputs (the encoder's)."""
    d, h, kh, k = s.d_model, s.num_heads, s.num_kv_heads, s.head_dim
    out = [_Tensor(f"{hf_prefix}.q_proj.weight", path + ("query", "kernel"), (h * k, d),
                   lambda w: w.T.reshape(d, h, k), lambda x: x.reshape(d, h * k).T)]
    out += [_Tensor(f"{hf_prefix}.{n}_proj.weight", path + (ours, "kernel"), (kh * k, d_in),
                    lambda w: w.T.reshape(d_in, kh, k), lambda x: x.reshape(d_in, kh * k).T)
            for n, ours in (("k", "key"), ("v", "value"))]
    out.append(_Tensor(f"{hf_prefix}.o_proj.weight", path + ("out", "kernel"), (d, h * k),
                       lambda w: w.T.reshape(h, k, d), lambda x: x.reshape(h * k, d).T))
    if qk_norm:
        out += [_same(f"{hf_prefix}.{n}_norm.weight", path + (f"{ours}_norm", "scale"), (k,))
                for n, ours in (("q", "query"), ("k", "key"))]
    return out


def _mlp(s: StackConfig, hf_prefix: str, path: tuple) -> list[_Tensor]:
    return [_linear(f"{hf_prefix}.gate_proj.weight", path + ("wi_0", "kernel"), s.d_ff, s.d_model),
            _linear(f"{hf_prefix}.up_proj.weight", path + ("wi_1", "kernel"), s.d_ff, s.d_model),
            _linear(f"{hf_prefix}.down_proj.weight", path + ("wo", "kernel"), s.d_model, s.d_ff)]


def _norms(s: StackConfig, hf_prefix: str, path: tuple, pairs) -> list[_Tensor]:
    return [_same(f"{hf_prefix}.{hf_name}.weight", path + (ours, "scale"), (s.d_model,))
            for hf_name, ours in pairs]


def _encoder_layer(c: T5GemmaConfig, i: int) -> list[_Tensor]:
    s, hf_prefix, path = c.encoder, f"model.encoder.layers.{i}", ("encoder", f"layers_{i}")
    tensors = _projections(s, f"{hf_prefix}.self_attn", path + ("attention",), s.d_model,
                           c.merged_attention)
    tensors += _mlp(s, f"{hf_prefix}.mlp", path + ("mlp",))
    return tensors + _norms(s, hf_prefix, path, (
        ("pre_self_attn_layernorm", "pre_attention_layer_norm"),
        ("post_self_attn_layernorm", "post_attention_layer_norm"),
        ("pre_feedforward_layernorm", "pre_mlp_layer_norm"),
        ("post_feedforward_layernorm", "post_mlp_layer_norm")))


def _decoder_layer(c: T5GemmaConfig, i: int) -> list[_Tensor]:
    s, hf_prefix, path = c.decoder, f"model.decoder.layers.{i}", ("decoder", f"layers_{i}")
    tensors = _projections(s, f"{hf_prefix}.self_attn", path + ("self_attention",), s.d_model,
                           c.merged_attention)
    pairs = [("pre_self_attn_layernorm", "pre_self_attention_layer_norm"),
             ("post_self_attn_layernorm", "post_self_attention_layer_norm"),
             ("pre_feedforward_layernorm", "pre_mlp_layer_norm"),
             ("post_feedforward_layernorm", "post_mlp_layer_norm")]
    if not c.merged_attention:
        tensors += _projections(s, f"{hf_prefix}.cross_attn",
                                path + ("encoder_decoder_attention",), c.encoder.d_model, False)
        pairs += [("pre_cross_attn_layernorm", "pre_cross_attention_layer_norm"),
                  ("post_cross_attn_layernorm", "post_cross_attention_layer_norm")]
    return tensors + _mlp(s, f"{hf_prefix}.mlp", path + ("mlp",)) + _norms(s, hf_prefix, path,
                                                                           pairs)


def tensor_map(c: T5GemmaConfig) -> list[_Tensor]:
    """Every HF text tensor of a model with config `c` (disk names), with its place here."""
    e, d = c.encoder, c.decoder
    tensors = [_same("model.encoder.embed_tokens.weight", ("token_embedder", "embedding"),
                     (c.vocab_size, e.d_model))]
    if c.merged_attention:
        tensors.append(_same("model.encoder.embed_tokens.eoi_embedding",
                             ("token_embedder", "eoi_embedding"), (e.d_model,)))
    else:
        tensors.append(_same("model.decoder.embed_tokens.weight",
                             ("decoder", "token_embedder", "embedding"), (c.vocab_size, d.d_model)))
    for i in range(e.num_layers):
        tensors += _encoder_layer(c, i)
    for i in range(d.num_layers):
        tensors += _decoder_layer(c, i)
    tensors += [_same("model.encoder.norm.weight", ("encoder", "encoder_norm", "scale"),
                      (e.d_model,)),
                _same("model.decoder.norm.weight", ("decoder", "decoder_norm", "scale"),
                      (d.d_model,))]
    if not c.tie_word_embeddings:
        tensors.append(_linear("lm_head.out_proj.weight", ("decoder", "logits_dense", "kernel"),
                               c.vocab_size, d.d_model))
    return tensors


def _tied_copies(c: T5GemmaConfig) -> dict[str, str]:
    """Tensors a file may also carry that equal another (transformers ties them)."""
    copies = {}
    if c.tie_word_embeddings:
        copies["lm_head.out_proj.weight"] = ("model.encoder.embed_tokens.weight"
                                             if c.merged_attention
                                             else "model.decoder.embed_tokens.weight")
    if c.merged_attention:
        copies["model.decoder.embed_tokens.weight"] = "model.encoder.embed_tokens.weight"
        copies["model.decoder.embed_tokens.eoi_embedding"] = (
            "model.encoder.embed_tokens.eoi_embedding")
    return copies


# ----------------------------------------------------------------------------
# config.json


def _rope(params: Optional[dict], default_theta: float) -> Rope:
    params = params or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise errors.CheckpointError(f"config.json asks for rope_type {kind!r}; T5Gemma here "
                                     f"supports 'default' and 'linear'")
    return Rope(float(params.get("rope_theta", default_theta)),
                float(params.get("factor", 1.0)) if kind == "linear" else 1.0)


def _stack_from_hf(cfg: dict, variant: str, where: str) -> StackConfig:
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in cfg]
    if missing:
        raise errors.CheckpointError(f"config.json {where} lacks {', '.join(missing)}")
    layers_n, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    period = 2 if variant == "t5gemma" else cfg.get("sliding_window_pattern", 6)
    rope = cfg.get("rope_parameters") or {}
    if variant == "t5gemma":
        local = full = _rope(rope or {"rope_theta": cfg.get("rope_theta", 10_000.0)}, 10_000.0)
    else:  # Per layer type; older files keep rope_theta / rope_local_base_freq / rope_scaling.
        full = _rope(rope.get(t5gemma_config.FULL) or {"rope_theta": cfg.get("rope_theta", 1e6),
                                                **(cfg.get("rope_scaling") or {})}, 1e6)
        local = _rope(rope.get(t5gemma_config.SLIDING)
                      or {"rope_theta": cfg.get("rope_local_base_freq", 10_000.0)}, 10_000.0)
    defaults_softcap = 50.0 if variant == "t5gemma" else None
    try:
        return StackConfig(
            d_model=cfg["hidden_size"], d_ff=cfg["intermediate_size"], num_layers=layers_n,
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads", 4),
            head_dim=cfg.get("head_dim", 256),  # HF's class default, not hidden // heads.
            layer_types=cfg.get("layer_types") or t5gemma_config.layer_pattern(layers_n, period),
            sliding_window=cfg.get("sliding_window", 4096),
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256),
            attn_logit_softcapping=cfg.get("attn_logit_softcapping", defaults_softcap),
            rope_local=local, rope_global=full, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            activation=cfg.get("hidden_activation", "gelu_pytorch_tanh"))
    except ValueError as e:
        raise errors.CheckpointError(f"config.json {where}: {e}") from None


def config_from_hf(hf_config: dict, **overrides) -> T5GemmaConfig:
    """`T5GemmaConfig` from a T5Gemma / T5Gemma 2 config.json dict."""
    variant = hf_config.get("model_type")
    if variant not in MODEL_TYPES:
        raise errors.CheckpointError(
            f"config.json has model_type={variant!r} (architectures="
            f"{hf_config.get('architectures')}); t5gemma_hf reads {', '.join(MODEL_TYPES)}")
    enc = hf_config.get("encoder") or {}
    if variant == "t5gemma2":
        enc = enc.get("text_config") or {}
    dec = hf_config.get("decoder") or {}
    eoi = None
    if variant == "t5gemma2":
        eoi = hf_config.get("eoi_token_index",
                            (hf_config.get("encoder") or {}).get("eoi_token_index", 256000))
    try:
        return T5GemmaConfig(
            encoder=_stack_from_hf(enc, variant, "encoder"),
            decoder=_stack_from_hf(dec, variant, "decoder"), variant=variant,
            vocab_size=dec.get("vocab_size", hf_config.get("vocab_size", 256000)),
            final_logit_softcapping=dec.get("final_logit_softcapping",
                                            30.0 if variant == "t5gemma" else None),
            tie_word_embeddings=hf_config.get("tie_word_embeddings", True),
            eoi_token_id=eoi, decoder_start_token_id=dec.get("bos_token_id", 2),
            dropout_rate=hf_config.get("dropout_rate", 0.0),
            attention_dropout_rate=hf_config.get("attention_dropout", 0.0),
            initializer_range=dec.get("initializer_range", 0.02), **overrides)
    except ValueError as e:
        raise errors.CheckpointError(f"config.json: {e}") from None


def _rope_to_hf(rope: Rope) -> dict:
    if rope.factor == 1.0:
        return {"rope_type": "default", "rope_theta": rope.theta}
    return {"rope_type": "linear", "rope_theta": rope.theta, "factor": rope.factor}


def _stack_to_hf(c: T5GemmaConfig, s: StackConfig) -> dict:
    out = {"hidden_size": s.d_model, "intermediate_size": s.d_ff,
           "num_hidden_layers": s.num_layers, "num_attention_heads": s.num_heads,
           "num_key_value_heads": s.num_kv_heads, "head_dim": s.head_dim,
           "layer_types": list(s.layer_types), "sliding_window": s.sliding_window,
           "query_pre_attn_scalar": s.query_pre_attn_scalar,
           "attn_logit_softcapping": s.attn_logit_softcapping, "rms_norm_eps": s.rms_norm_eps,
           "hidden_activation": s.activation, "vocab_size": c.vocab_size,
           "final_logit_softcapping": c.final_logit_softcapping,
           "initializer_range": c.initializer_range, "pad_token_id": 0, "eos_token_id": 1,
           "bos_token_id": c.decoder_start_token_id, "tie_word_embeddings": c.tie_word_embeddings}
    if c.merged_attention:
        out["rope_parameters"] = {t5gemma_config.FULL: _rope_to_hf(s.rope_global),
                                  t5gemma_config.SLIDING: _rope_to_hf(s.rope_local)}
    else:
        out["rope_parameters"] = _rope_to_hf(s.rope_global)
    return out


# A one-layer SigLIP, so that a text-only T5Gemma 2 export loads without a base checkpoint.
_PLACEHOLDER_VISION = {"model_type": "siglip_vision_model", "hidden_size": 16,
                       "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 28, "patch_size": 14}


def config_to_hf(c: T5GemmaConfig, base: Optional[dict] = None) -> dict:
    """config.json for `c`; T5Gemma 2 keeps `base`'s vision settings (a base config.json)."""
    common = {"architectures": [MODEL_TYPES[c.variant]], "model_type": c.variant,
              "is_encoder_decoder": True, "dropout_rate": c.dropout_rate,
              "attention_dropout": c.attention_dropout_rate, "vocab_size": c.vocab_size,
              "tie_word_embeddings": c.tie_word_embeddings, "pad_token_id": 0,
              "eos_token_id": 1, "bos_token_id": c.decoder_start_token_id}
    decoder = _stack_to_hf(c, c.decoder)
    text = _stack_to_hf(c, c.encoder)
    if not c.merged_attention:
        return {**common, "encoder": text, "decoder": decoder}
    base_encoder = (base or {}).get("encoder") or {}
    encoder = {**{k: v for k, v in base_encoder.items() if k != "text_config"},
               "text_config": text, "eoi_token_index": c.eoi_token_id}
    encoder.setdefault("vision_config", _PLACEHOLDER_VISION)
    encoder.setdefault("mm_tokens_per_image", 4)
    extra = {k: v for k, v in (base or {}).items() if k in ("image_token_index",)}
    return {**common, **extra, "encoder": encoder, "decoder": decoder,
            "eoi_token_index": c.eoi_token_id}


# ----------------------------------------------------------------------------
# Reading and writing weights.


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file, memory-mapped (bf16 as `ml_dtypes.bfloat16`)."""
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            tensors[name] = data[start:end].view(dtype).reshape(info["shape"])
        return tensors
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise errors.CheckpointError(f"cannot read {path} as safetensors: {e}") from None


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """All tensors of a HF directory by disk name (`text_model.` dropped, as on disk)."""
    kind, files = hf._weight_files(hf_dir)  # pylint: disable=protected-access
    if kind == "safetensors":
        tensors = {}
        for f in files:
            tensors.update(_read_safetensors(f))
    else:
        tensors = hf._read_torch(files)  # pylint: disable=protected-access
    return {k.replace("model.encoder.text_model.", "model.encoder."): v
            for k, v in tensors.items()}


def _read_config(hf_dir: str) -> dict:
    if not os.path.isdir(hf_dir):
        raise errors.CheckpointError(f"{hf_dir}: no such directory")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise errors.CheckpointError(f"{hf_dir} has no config.json; expected a HF T5Gemma "
                                     f"directory (config.json + model.safetensors)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise errors.CheckpointError(f"{path} is not valid JSON ({e})") from None


def _drop_tied_copies(c: T5GemmaConfig, tensors: dict, hf_dir: str) -> None:
    for copy, source in _tied_copies(c).items():
        if copy in tensors and not np.array_equal(np.asarray(tensors[copy]),
                                                  np.asarray(tensors.get(source))):
            raise errors.CheckpointError(
                f"{hf_dir}: {copy} differs from {source}, which config.json ties it to; "
                f"set tie_word_embeddings to false in config.json to keep both")
        tensors.pop(copy, None)


def load(hf_dir: str, **config_overrides) -> tuple[T5GemmaConfig, dict]:
    """Loads a HF T5Gemma / T5Gemma 2 directory (text weights only).

    Args:
      **config_overrides: `T5GemmaConfig` fields, e.g. `dtype=jnp.bfloat16`,
        `dropout_rate=0.0`, `scan_layers=True`; the architecture is config.json's.

    Returns:
      `(config, params)`: host numpy arrays in `config.param_dtype`, stacked if
      `scan_layers=True` is among the overrides.
    """
    config = config_from_hf(_read_config(hf_dir), **config_overrides)
    tensors = read_tensors(hf_dir)
    _drop_tied_copies(config, tensors, hf_dir)
    if config.merged_attention:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(_NOT_TEXT)}
    table = tensor_map(config)
    _check_names({t.hf_name for t in table}, set(tensors), hf_dir)
    dtype = np.dtype(config.param_dtype)
    flat = {}
    for t in table:
        value = tensors[t.hf_name]
        if tuple(value.shape) != t.hf_shape:
            raise errors.CheckpointError(f"{hf_dir}: tensor {t.hf_name} has shape "
                                         f"{tuple(value.shape)}, config.json implies {t.hf_shape}")
        flat[t.path] = np.ascontiguousarray(t.to_ours(np.asarray(value).astype(dtype)))
    params = traverse_util.unflatten_dict(flat)
    return config, scan_layout.to_layout(params, config.scan_layers)


def _check_names(expected: set[str], present: set[str], where: str) -> None:
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing:
        raise errors.CheckpointError(f"{where} is missing {len(missing)} tensor(s): "
                                     f"{', '.join(missing)}")
    if unexpected:
        raise errors.CheckpointError(f"{where} has {len(unexpected)} unexpected tensor(s): "
                                     f"{', '.join(unexpected)}")


def save(out_dir: str, config: T5GemmaConfig, params: dict, *, dtype: Any = np.float32,
         base_dir: Optional[str] = None) -> None:
    """Writes `params` as a HF directory (`config.json` + `model.safetensors`).

    Args:
      params: the `params` collection of `t5gemma.Transformer(config)` (jax or
        numpy, either layer layout).
      dtype: of the stored tensors (fp32 by default; `ml_dtypes.bfloat16` writes
        BF16, as Gemma checkpoints ship).
      base_dir: the HF directory the model came from: T5Gemma 2's vision tower,
        projector and vision config are carried over from it.
    """
    from safetensors.numpy import save_file
    flat = traverse_util.flatten_dict(scan_layout.to_layout(params, False))
    tensors = {}
    for t in tensor_map(config):
        try:
            value = np.asarray(jax.device_get(flat[t.path]))
        except KeyError:
            raise errors.CheckpointError(f"params lack {'/'.join(t.path)} needed for "
                                         f"{t.hf_name}") from None
        tensors[t.hf_name] = np.ascontiguousarray(t.to_hf(value.astype(np.float32)).astype(dtype))
    base = None
    if base_dir is not None and config.merged_attention:
        base = _read_config(base_dir)
        tensors.update({k: np.ascontiguousarray(np.asarray(v).astype(np.float32).astype(dtype))
                        for k, v in read_tensors(base_dir).items() if k.startswith(_NOT_TEXT)})
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_hf(config, base), f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(out_dir, hf.SAFETENSORS), metadata={"format": "pt"})


def tokenizer_path(hf_dir: str) -> str:
    """The checkpoint's SentencePiece model, for `vocabularies.make_vocabulary`."""
    path = os.path.join(hf_dir, TOKENIZER)
    if not os.path.exists(path):
        raise errors.MissingError(f"{hf_dir} has no {TOKENIZER}; copy the Gemma tokenizer "
                                  f"from the original checkpoint next to config.json")
    return path
