"""HF transformers T5 / FLAN-T5 / mT5 checkpoints in and out.

`load_t5(hf_dir)` reads a HF directory (`config.json` plus `model.safetensors`,
sharded safetensors with `model.safetensors.index.json`, or
`pytorch_model.bin[.index.json]`, the latter only through
`torch.load(weights_only=True)`) into a `T5Config` and a param tree in t5x
naming. `save_t5` writes the reverse, a directory that
`transformers.T5ForConditionalGeneration.from_pretrained` loads.
Adapters in HF PEFT's formats (every method) are `ift_jax.peft_formats`.

Tied embeddings and decoder-output scaling are two separate facts here
(transformers 5.x forces `tie_word_embeddings=True` and keeps v1.0 vs v1.1 in
`scale_decoder_outputs`). They are read as follows:

- tied: the file has no `lm_head.weight`, or one equal to `shared.weight`
  while config.json does not say `tie_word_embeddings: false`;
- scaled: config.json's `scale_decoder_outputs` when present (5.x), else its
  `tie_word_embeddings` (4.x; absent means true, HF's default).

Every user mistake (missing files, a non-T5 architecture, wrong shapes,
missing or unexpected tensors) raises `CheckpointError` with a one-line
message naming what is wrong.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, NamedTuple

import jax
import numpy as np

from ift_jax import declared_sizes, errors, export_folder, scan_layout
from ift_jax.models.t5 import T5Config

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"

SUPPORTED_MODEL_TYPES = ("t5", "mt5")

# Copies of `shared.weight` that older checkpoints also store.
_REDUNDANT = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

# HF T5Config defaults, used when config.json omits a key.
_HF_DEFAULTS = dict(num_decoder_layers=None, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, dropout_rate=0.1,
                    layer_norm_epsilon=1e-6, feed_forward_proj="relu")
_HF_REQUIRED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")


class CheckpointError(errors.CheckpointError):
    """A checkpoint directory that cannot be read as (or written to) a HF T5."""


class _Tensor(NamedTuple):
    """One HF tensor and how it maps to our param tree."""

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x):
    return x


def _transpose(x):
    return x.T


def _linear(hf_name, path, out_dim, in_dim):
    """HF nn.Linear weight [out, in] <-> our kernel [in, out]."""
    return _Tensor(hf_name, path, (out_dim, in_dim), _transpose, _transpose)


def _attention(c: T5Config, hf_prefix: str, path: tuple[str, ...]) -> list[_Tensor]:
    inner, d, h, k = c.num_heads * c.d_kv, c.d_model, c.num_heads, c.d_kv
    tensors = [
        _Tensor(f"{hf_prefix}.{hf}.weight", path + (ours, "kernel"), (inner, d),
                lambda w: w.T.reshape(d, h, k), lambda x: x.reshape(d, inner).T)
        for hf, ours in (("q", "query"), ("k", "key"), ("v", "value"))
    ]
    tensors.append(_Tensor(f"{hf_prefix}.o.weight", path + ("out", "kernel"), (d, inner),
                           lambda w: w.T.reshape(h, k, d), lambda x: x.reshape(inner, d).T))
    return tensors


def _mlp(c: T5Config, hf_prefix: str, path: tuple[str, ...]) -> list[_Tensor]:
    names = ["wi"] if not c.is_gated else ["wi_0", "wi_1"]
    tensors = [_linear(f"{hf_prefix}.{n}.weight", path + (n, "kernel"), c.d_ff, c.d_model)
               for n in names]
    tensors.append(_linear(f"{hf_prefix}.wo.weight", path + ("wo", "kernel"), c.d_model,
                           c.d_ff))
    return tensors


def _norm(hf_name: str, path: tuple[str, ...], d_model: int) -> _Tensor:
    return _Tensor(hf_name, path + ("scale",), (d_model,), _identity, _identity)


def _relpos(c: T5Config, stack: str) -> _Tensor:
    return _Tensor(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                   (stack, "relpos_bias", "rel_embedding"),
                   (c.relative_attention_num_buckets, c.num_heads), _transpose, _transpose)


def tensor_map(c: T5Config) -> list[_Tensor]:
    """Every HF tensor name of a T5 with config `c`, with its place in our tree."""
    d = c.d_model
    tensors = [_Tensor("shared.weight", ("token_embedder", "embedding"),
                       (c.vocab_size, d), _identity, _identity),
               _relpos(c, "encoder"), _relpos(c, "decoder")]
    for i in range(c.num_layers):
        hf, ours = f"encoder.block.{i}.layer", ("encoder", f"layers_{i}")
        tensors.append(_norm(f"{hf}.0.layer_norm.weight", ours + ("pre_attention_layer_norm",), d))
        tensors += _attention(c, f"{hf}.0.SelfAttention", ours + ("attention",))
        tensors.append(_norm(f"{hf}.1.layer_norm.weight", ours + ("pre_mlp_layer_norm",), d))
        tensors += _mlp(c, f"{hf}.1.DenseReluDense", ours + ("mlp",))
    tensors.append(_norm("encoder.final_layer_norm.weight", ("encoder", "encoder_norm"), d))
    for i in range(c.num_decoder_layers):
        hf, ours = f"decoder.block.{i}.layer", ("decoder", f"layers_{i}")
        tensors.append(_norm(f"{hf}.0.layer_norm.weight",
                             ours + ("pre_self_attention_layer_norm",), d))
        tensors += _attention(c, f"{hf}.0.SelfAttention", ours + ("self_attention",))
        tensors.append(_norm(f"{hf}.1.layer_norm.weight",
                             ours + ("pre_cross_attention_layer_norm",), d))
        tensors += _attention(c, f"{hf}.1.EncDecAttention",
                              ours + ("encoder_decoder_attention",))
        tensors.append(_norm(f"{hf}.2.layer_norm.weight", ours + ("pre_mlp_layer_norm",), d))
        tensors += _mlp(c, f"{hf}.2.DenseReluDense", ours + ("mlp",))
    tensors.append(_norm("decoder.final_layer_norm.weight", ("decoder", "decoder_norm"), d))
    if not c.tie_word_embeddings:
        tensors.append(_linear("lm_head.weight", ("decoder", "logits_dense", "kernel"),
                               c.vocab_size, d))
    return tensors


# ----------------------------------------------------------------------------
# config.json


def config_from_hf(hf_config: dict[str, Any], *, tie_word_embeddings: bool,
                   **overrides) -> T5Config:
    """`T5Config` from a HF config.json dict; tying is decided from the weights."""
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"config.json has model_type={model_type!r} (architectures="
            f"{hf_config.get('architectures')}); load_t5 reads T5-family models "
            f"with model_type in {SUPPORTED_MODEL_TYPES}")
    missing = [k for k in _HF_REQUIRED if k not in hf_config]
    if missing:
        raise CheckpointError(f"config.json lacks {', '.join(missing)}")
    values = {k: hf_config.get(k, default) for k, default in _HF_DEFAULTS.items()}
    values.update({k: hf_config[k] for k in _HF_REQUIRED})
    if "scale_decoder_outputs" in hf_config:
        scale = bool(hf_config["scale_decoder_outputs"])
    else:
        scale = hf_config.get("tie_word_embeddings", True) is not False
    try:
        return T5Config(**values, tie_word_embeddings=tie_word_embeddings,
                        scale_decoder_outputs=scale, **overrides)
    except ValueError as e:
        raise CheckpointError(f"config.json: {_first_line(e)}") from None


def config_to_hf(c: T5Config) -> dict[str, Any]:
    """config.json contents for `c`, readable by transformers 4.x and 5.x."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": c.vocab_size, "d_model": c.d_model, "d_kv": c.d_kv, "d_ff": c.d_ff,
        "num_layers": c.num_layers, "num_decoder_layers": c.num_decoder_layers,
        "num_heads": c.num_heads,
        "relative_attention_num_buckets": c.relative_attention_num_buckets,
        "relative_attention_max_distance": c.relative_attention_max_distance,
        "dropout_rate": c.dropout_rate, "layer_norm_epsilon": c.layer_norm_epsilon,
        "feed_forward_proj": c.feed_forward_proj,
        # 4.x ties and scales when this is true; 5.x reads scale_decoder_outputs
        # and unties whenever the file carries its own lm_head.weight. So the
        # released combinations (v1.0 tied+scaled, v1.1 untied) load in both.
        "tie_word_embeddings": c.tie_word_embeddings or c.scale_decoder_outputs,
        "scale_decoder_outputs": c.scale_decoder_outputs,
        "is_encoder_decoder": True,
        "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
        "initializer_factor": 1.0,
    }


# ----------------------------------------------------------------------------
# Reading weights.


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path} nests deeper than a config file does") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})"
                              ) from None


def _check_declared(hf_dir: str, config_path: str, hf_config: dict,
                    param_dtype: Any = np.float32) -> None:
    """The sizes config.json declares, against sane limits, the weight files' size and
    the host's memory, before anything of that size is made (`declared_sizes`)."""
    sizes = {k: hf_config.get(k, default) for k, default in _HF_DEFAULTS.items()
             if k in declared_sizes.LIMITS}
    sizes.update({k: hf_config.get(k) for k in _HF_REQUIRED})
    if sizes.get("num_decoder_layers") is None:
        sizes["num_decoder_layers"] = sizes.get("num_layers")
    declared_sizes.check_dimensions(sizes, config_path)
    if any(sizes.get(k) is None for k in _HF_REQUIRED):
        return  # config_from_hf names what is missing.
    params = declared_sizes.param_count(
        **{k: sizes[k] for k in (*_HF_REQUIRED, "num_decoder_layers",
                                 "relative_attention_num_buckets")},
        gated=str(hf_config.get("feed_forward_proj", "relu")).startswith("gated-"), tied=True)
    stored = sum(os.path.getsize(f) for f in _weight_files(hf_dir)[1])
    dtype = np.dtype(param_dtype)
    declared_sizes.check_memory(stored + dtype.itemsize * params, f"reading the {params:,} "
                                f"params config.json declares (as {dtype.name})", hf_dir)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _weight_files(hf_dir: str) -> tuple[str, list[str]]:
    """(`safetensors` | `torch`, files) in the order HF prefers them."""
    for index, kind in ((SAFETENSORS_INDEX, "safetensors"), (TORCH_BIN_INDEX, "torch")):
        path = os.path.join(hf_dir, index)
        if os.path.exists(path):
            files = sorted(set(_read_json(path).get("weight_map", {}).values()))
            absent = [f for f in files if not os.path.exists(os.path.join(hf_dir, f))]
            if absent:
                raise CheckpointError(f"{index} in {hf_dir} lists missing shards: "
                                      f"{', '.join(absent)}")
            return kind, [os.path.join(hf_dir, f) for f in files]
    for name, kind in ((SAFETENSORS, "safetensors"), (TORCH_BIN, "torch")):
        if os.path.exists(os.path.join(hf_dir, name)):
            return kind, [os.path.join(hf_dir, name)]
    raise CheckpointError(
        f"{hf_dir} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, "
        f"{TORCH_BIN} or {TORCH_BIN_INDEX} (found: {', '.join(sorted(os.listdir(hf_dir)))})")


def _read_safetensors(files: Iterable[str]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except Exception as e:  # safetensors raises its own error types.
            raise CheckpointError(f"cannot read {f}: {_first_line(e)}") from None
    return tensors


def _read_torch(files: Iterable[str]) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading pytorch_model.bin needs torch: "
                              "pip install 'ift-jax[hf]'") from None
    tensors = {}
    for f in files:
        try:
            # weights_only: never run pickled code from a checkpoint.
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {f} with torch.load(weights_only=True): "
                                  f"{_first_line(e)}") from None
        tensors.update({k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
                        for k, v in state.items()})
    return tensors


def read_hf_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """All tensors of a HF checkpoint directory as numpy arrays, by HF name."""
    kind, files = _weight_files(hf_dir)
    return _read_safetensors(files) if kind == "safetensors" else _read_torch(files)


def _is_tied(tensors: dict[str, np.ndarray], hf_config: dict) -> bool:
    if "lm_head.weight" not in tensors:
        return True
    same = (tensors["shared.weight"].shape == tensors["lm_head.weight"].shape
            and np.array_equal(tensors["shared.weight"], tensors["lm_head.weight"]))
    return same and hf_config.get("tie_word_embeddings", True) is not False


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _check_names(expected: set[str], present: set[str], where: str) -> None:
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing:
        raise CheckpointError(f"{where} is missing {len(missing)} tensor(s): "
                              f"{', '.join(missing)}")
    if unexpected:
        raise CheckpointError(f"{where} has {len(unexpected)} unexpected tensor(s): "
                              f"{', '.join(unexpected)}")


def load_t5(hf_dir: str, **config_overrides) -> tuple[T5Config, dict]:
    """Loads a HF T5 / FLAN-T5 / mT5 directory.

    Args:
      hf_dir: directory with `config.json` and weights (see module docstring).
      **config_overrides: `T5Config` fields to set, e.g. `dtype=jnp.bfloat16`
        or `dropout_rate=0.0`; architecture fields come from config.json.

    Returns:
      `(config, params)`: params is the `params` collection of
      `Transformer(config)` (layers stacked if `scan_layers=True` is among the
      overrides) as host numpy arrays in `config.param_dtype`, ready
      for `jax.device_put` with shardings.

    Raises:
      CheckpointError: with a one-line message naming what is wrong.
    """
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: no such directory")
    unfinished = export_folder.problem(hf_dir)
    if unfinished:
        raise CheckpointError(unfinished)
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{hf_dir} has no config.json; expected a HF T5 directory "
                              f"(config.json + {SAFETENSORS} or {TORCH_BIN})")
    hf_config = _read_json(config_path)
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{config_path} holds a JSON {type(hf_config).__name__}, not "
                              f"an object")
    config_from_hf(hf_config, tie_word_embeddings=True)  # Architecture checks first.
    try:
        _check_declared(hf_dir, config_path, hf_config,  # Before anything of those sizes.
                        config_overrides.get("param_dtype", np.float32))
    except errors.CheckpointError as e:
        raise CheckpointError(str(e)) from None
    tensors = read_hf_tensors(hf_dir)
    if "shared.weight" not in tensors:
        raise CheckpointError(f"{hf_dir} is missing 1 tensor(s): shared.weight")
    tied = _is_tied(tensors, hf_config)
    config = config_from_hf(hf_config, tie_word_embeddings=tied, **config_overrides)
    if tied:
        tensors.pop("lm_head.weight", None)
    for name in _REDUNDANT:
        tensors.pop(name, None)

    table = tensor_map(config)
    _check_names({t.hf_name for t in table}, set(tensors), hf_dir)
    dtype = np.dtype(config.param_dtype)
    params: dict = {}
    for t in table:
        value = tensors[t.hf_name]
        if tuple(value.shape) != t.hf_shape:
            raise CheckpointError(
                f"{hf_dir}: tensor {t.hf_name} has shape {tuple(value.shape)}, "
                f"config.json implies {t.hf_shape}")
        _set(params, t.path, np.ascontiguousarray(t.to_ours(value.astype(dtype))))
    return config, scan_layout.to_layout(params, config.scan_layers)


def save_t5(out_dir: str, config: T5Config, params: dict, *, dtype: Any = np.float32) -> None:
    """Writes `params` as a HF directory (`config.json` + `model.safetensors`).

    Args:
      params: the `params` collection of `Transformer(config)` (jax or numpy
        arrays, fully addressable from this process); a scanned stack
        (`model.scan_layers`) is written one block per layer.
      dtype: dtype of the stored tensors (fp32 by default, as FLAN-T5 ships).
    """
    from safetensors.numpy import save_file
    table = tensor_map(config)
    params = scan_layout.to_layout(params, False)  # HF's layout: one block per layer.
    tensors = {}
    for t in table:
        try:
            value = np.asarray(jax.device_get(_get(params, t.path)))
        except KeyError:
            raise CheckpointError(f"params lack {'/'.join(t.path)} needed for "
                                  f"{t.hf_name}") from None
        value = t.to_hf(value)
        if tuple(value.shape) != t.hf_shape:
            raise CheckpointError(f"param {'/'.join(t.path)} gives {t.hf_name} of shape "
                                  f"{tuple(value.shape)}, config implies {t.hf_shape}")
        tensors[t.hf_name] = np.ascontiguousarray(value.astype(dtype))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_hf(config), f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(out_dir, SAFETENSORS), metadata={"format": "pt"})
