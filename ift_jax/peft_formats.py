"""Adapters in and out of HF PEFT's formats, and merged HF exports, for every method.

`save_peft(out_dir, config, params, method, base)` writes an HF PEFT adapter
directory (`adapter_config.json` + `adapter_model.safetensors`) that
`peft.PeftModel.from_pretrained(T5ForConditionalGeneration..., out_dir)`
loads and runs as our model does; `load_peft(adapter_dir, config)` reads one
back (ours or PEFT's own) as a `LoadedAdapter`; `save_merged` writes the
plain HF T5 of a method that merges (full, the LoRA family, IA3).

Per method (tensor names under PEFT's `base_model.model.` prefix):

- LoRA / QLoRA / rsLoRA / DoRA: `<module>.lora_A.weight [r, in]` (our A.T),
  `lora_B.weight [out, r]` (B.T), DoRA's `lora_magnitude_vector [out]`.
  QLoRA adapters load onto the full-precision base, as PEFT loads them.
- IA3: `<module>.ia3_l`, `[out, 1]` for output-scaled projections, `[1, in]`
  for `wo` (PEFT's `feedforward_modules`).
- Prompt tuning: `prompt_embeddings [2P, d_model]`: PEFT's seq2seq table has
  one block per transformer submodule and its forward reads the first P rows
  only, so the second block is written as zeros.
- Prefix tuning: `prompt_embeddings [P, 2 * num_layers * d_model]`, the
  folded table (no MLP) in PEFT's layout; only `prefix_placement=peft`
  exports (see `additions.prefix_slots`).
- Trainable leaves beyond the method's own (a `trainable_regex` such as LoRA
  plus layer norms) go to `modules_to_save` as whole HF modules,
  `<module>.weight`; a leaf with no HF module is refused, by name.
- Bottleneck adapters: PEFT has no such method for T5; refused.

Every user mistake raises `hf.CheckpointError` (file side) or
`peft.PeftError` (method side) with one line naming the problem.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ift_jax import export_folder, hf, param_trees, peft
from ift_jax.hf import CheckpointError
from ift_jax.models import additions
from ift_jax.models.t5 import T5Config

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_SHORT = {"query": "q", "key": "k", "value": "v", "out": "o"}  # Other names are HF's own.
_NOT_EXPORTABLE = {
    "houlsby": "HF PEFT has no bottleneck adapters for T5; use the run itself",
    "pfeiffer": "HF PEFT has no bottleneck adapters for T5; use the run itself",
    "full": "a full fine-tune has no adapter; write the model itself (save_merged)",
}


@dataclasses.dataclass(frozen=True)
class LoadedAdapter:
    """An adapter read from an HF PEFT directory.

    Attributes:
      method: its settings; `peft.build_models(config, method)` builds its model.
      params: its own leaves (LoRA A/B/magnitude, IA3 scales, prompt, prefix).
      modules_to_save: base leaves it replaces (e.g. trained layer norms).
    """

    method: peft.MethodConfig
    params: dict
    modules_to_save: dict

    def apply_to(self, base_params: Any) -> dict:
        """The model's full params: `base_params` with this adapter on it (jax arrays:
        qwix skips LoRA on numpy kernels)."""
        flat = dict(traverse_util.flatten_dict(base_params))
        flat.update(traverse_util.flatten_dict(self.modules_to_save))
        base = jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))
        return peft.with_adapter(base, self.params)


# ----------------------------------------------------------------------------
# The HF side of our param paths.


def _hf_tensors(config: T5Config) -> dict[tuple[str, ...], Any]:
    """Our param path -> its `hf._Tensor` (HF name, shape, layout maps)."""
    return {t.path: t for t in hf.tensor_map(config)}


def _hf_module(config: T5Config, module_path: tuple[str, ...]) -> str:
    return _hf_tensors(config)[module_path + ("kernel",)].hf_name.removesuffix(".weight")


def _host(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(param_trees.unbox(x)), np.float32)


def _own_and_other_leaves(params: Any, method: peft.MethodConfig) -> tuple[dict, dict]:
    """(the method's own leaves, other trainable leaves), flat, as host arrays."""
    flat = traverse_util.flatten_dict(param_trees.unbox(params))
    own = {k: v for k, v in flat.items() if peft.method_trains(method.name, k)}
    others = {}
    if method.trainable_regex:
        pattern = re.compile(method.trainable_regex)
        others = {k: v for k, v in flat.items()
                  if k not in own and pattern.fullmatch("/".join(k))}
    return own, others


def _modules_to_save(config: T5Config, others: dict, adapted: set) -> tuple[list, dict]:
    """PEFT `modules_to_save` and their tensors for the other trainable leaves."""
    tensors_of = _hf_tensors(config)
    unknown = [p for p in others if p not in tensors_of]
    if unknown:
        paths = param_trees.listing(["/".join(p) for p in unknown])
        raise peft.PeftError(f"trainable params with no HF T5 module cannot be exported as "
                             f"modules_to_save: {paths}")
    clash = sorted("/".join(p) for p in others if p[:-1] in adapted)
    if clash:
        raise peft.PeftError(f"params both adapted and trained whole cannot be exported to HF "
                             f"PEFT: {param_trees.listing(clash)}")
    modules, tensors = [], {}
    for path, value in sorted(others.items()):
        t = tensors_of[path]
        modules.append(t.hf_name.removesuffix(".weight"))
        tensors[PREFIX + t.hf_name] = t.to_hf(_host(value))
    return modules, tensors


# ----------------------------------------------------------------------------
# Writing.


def _base_config(method_type: str, config: T5Config, base: str, modules: list) -> dict:
    return {"peft_type": method_type, "task_type": "SEQ_2_SEQ_LM",
            "base_model_name_or_path": base, "inference_mode": True,
            "modules_to_save": modules or None, "revision": None}


def _lora(config: T5Config, own: dict, cfg: peft.LoraConfig) -> tuple[dict, dict, set]:
    modules = sorted({k[:-1] for k in own if k[-1] == "kernel_lora_a"})
    if not modules:
        raise CheckpointError("params hold no LoRA adapters (no kernel_lora_a leaves)")
    tensors = {}
    for module in modules:
        name = PREFIX + _hf_module(config, module)
        tensors[f"{name}.lora_A.weight"] = _host(own[module + ("kernel_lora_a",)]).T
        tensors[f"{name}.lora_B.weight"] = _host(own[module + ("kernel_lora_b",)]).T
        if cfg.use_dora:
            tensors[f"{name}.lora_magnitude_vector"] = _host(own[module + (peft.MAGNITUDE_LEAF,)])
    names = [_hf_module(config, m) for m in modules]
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    every = {m for m in (k[:-1] for k in _hf_tensors(config) if k[-1] == "kernel")
             if _hf_module(config, m).rsplit(".", 1)[-1] in short}
    alpha = float(cfg.alpha)
    fields = {"r": cfg.rank, "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
              "lora_dropout": float(cfg.dropout),
              "target_modules": short if every == set(modules) else sorted(names),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": cfg.use_rslora,
              "use_dora": cfg.use_dora, "init_lora_weights": True}
    return fields, tensors, set(modules)


def _ia3(config: T5Config, own: dict, cfg: peft.IA3Config) -> tuple[dict, dict, set]:
    tensors = {}
    for key, value in sorted(own.items()):
        value = _host(value)
        shape = (1, -1) if key[-2] in additions.IA3_INPUT_SCALED else (-1, 1)
        tensors[PREFIX + _hf_module(config, key[:-1]) + ".ia3_l"] = value.reshape(shape)
    targets = sorted(_SHORT.get(t, t) for t in cfg.targets)
    fields = {"target_modules": targets, "fan_in_fan_out": False, "init_ia3_weights": True,
              "feedforward_modules": [t for t in targets if t in additions.IA3_INPUT_SCALED]}
    return fields, tensors, {k[:-1] for k in own}


def _prompt_learning_fields(config: T5Config, length: int) -> dict:
    return {"num_virtual_tokens": length, "token_dim": config.d_model,
            "num_transformer_submodules": 2, "num_attention_heads": config.num_heads,
            "num_layers": config.num_layers}


def _prompt(config: T5Config, own: dict, cfg: peft.PromptConfig) -> tuple[dict, dict, set]:
    prompt = _host(own[peft.PROMPT_PATH])
    table = np.concatenate([prompt, np.zeros_like(prompt)])  # PEFT never reads block 2.
    fields = {**_prompt_learning_fields(config, cfg.length), "prompt_tuning_init": "RANDOM",
              "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}
    return fields, {"prompt_embeddings": table}, set()


def _check_prefix_layout(config: T5Config, placement: str) -> None:
    if placement != "peft":
        raise peft.PeftError(f"prefix_placement {placement!r} has no HF PEFT form (PEFT puts "
                             f"prefixes in decoder self-attention only); train with 'peft'")
    if config.num_heads * config.d_kv != config.d_model:
        raise peft.PeftError(f"HF PEFT splits its prefix of d_model={config.d_model} into "
                             f"{config.num_heads} heads; this model's heads x d_kv is "
                             f"{config.num_heads * config.d_kv}")


def _prefix(config: T5Config, params: Any, cfg: peft.PrefixConfig) -> tuple[dict, dict, set]:
    _check_prefix_layout(config, cfg.placement)
    folded = peft.fold_prefix(config, params, cfg)
    table = _host(traverse_util.flatten_dict(folded)[("prefix", "key_values")])
    fields = {**_prompt_learning_fields(config, cfg.length), "prefix_projection": False,
              "encoder_hidden_size": config.d_model, "init_weights": None}
    return fields, {"prompt_embeddings": table.reshape(cfg.length, -1)}, set()


def why_not_exportable(method: str) -> Optional[str]:
    """Why a run of `method` has no HF PEFT adapter format, or None when it has one."""
    return _NOT_EXPORTABLE.get(method)


def save_peft(out_dir: str, config: T5Config, params: Any, method: peft.MethodConfig,
              base_model_name_or_path: str) -> None:
    """Writes `method`'s adapter of `params` as an HF PEFT directory (see module doc).

    Args:
      params: the run's full params (or just its trainable subtree).
      method: the run's `peft.MethodConfig` (`model_setup.method_config`).
      base_model_name_or_path: what PEFT records as the base model.

    Raises:
      peft.PeftError: the method (or a trained leaf) has no HF PEFT form.
    """
    from safetensors.numpy import save_file
    if method.name in _NOT_EXPORTABLE:
        raise peft.PeftError(f"method {method.name!r} cannot be written in HF PEFT format: "
                             f"{_NOT_EXPORTABLE[method.name]}")
    own, others = _own_and_other_leaves(params, method)
    kind, (fields, tensors, adapted) = {
        "lora": lambda: ("LORA", _lora(config, own, method.lora)),
        "qlora": lambda: ("LORA", _lora(config, own, method.lora)),
        "ia3": lambda: ("IA3", _ia3(config, own, method.ia3)),
        "prompt": lambda: ("PROMPT_TUNING", _prompt(config, own, method.prompt)),
        "prefix": lambda: ("PREFIX_TUNING", _prefix(config, params, method.prefix)),
    }[method.name]()
    modules, saved = _modules_to_save(config, others, adapted)
    adapter_config = {**_base_config(kind, config, base_model_name_or_path, modules), **fields}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in {**tensors, **saved}.items()}
    save_file(tensors, os.path.join(out_dir, ADAPTER_SAFETENSORS), metadata={"format": "pt"})


def save_merged(out_dir: str, config: T5Config, params: Any, method: peft.MethodConfig,
                dtype: Any = np.float32) -> None:
    """Writes the plain HF T5 that computes what `method`'s model does (`hf.save_t5`).

    Raises:
      peft.PeftError: the method cannot merge (prompt, prefix, adapters), with why.
    """
    hf.save_t5(out_dir, config, jax.device_get(peft.merged_params(params, method)),
               dtype=dtype)


# ----------------------------------------------------------------------------
# Reading.


def _read(adapter_dir: str) -> tuple[dict, dict[str, np.ndarray], str]:
    unfinished = export_folder.problem(adapter_dir)
    if unfinished:
        raise CheckpointError(unfinished)
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.exists(path):
        raise CheckpointError(f"{adapter_dir} has no {ADAPTER_CONFIG}; expected a HF PEFT "
                              f"adapter directory")
    weights = os.path.join(adapter_dir, ADAPTER_SAFETENSORS)
    if not os.path.exists(weights):
        raise CheckpointError(f"{adapter_dir} has no {ADAPTER_SAFETENSORS}")
    from safetensors.numpy import load_file
    try:
        with open(path, encoding="utf-8") as f:
            adapter = json.load(f)
        return adapter, load_file(weights), weights
    except (json.JSONDecodeError, OSError) as e:
        raise CheckpointError(f"cannot read {adapter_dir}: {e}") from None
    except Exception as e:  # safetensors raises its own error types.
        raise CheckpointError(f"cannot read {weights}: {str(e).splitlines()[0]}") from None


def _checked(where: str, name: str, value: np.ndarray, expected: tuple) -> np.ndarray:
    if tuple(value.shape) != tuple(expected):
        raise CheckpointError(f"{where}: tensor {name} has shape {tuple(value.shape)}; this "
                              f"base model needs {tuple(expected)} (an adapter of another "
                              f"base?)")
    return value


def _unsupported(adapter: dict, keys: tuple[str, ...]) -> list[str]:
    found = [k for k in keys if adapter.get(k)]
    if adapter.get("bias", "none") != "none":
        found.append(f"bias={adapter['bias']!r}")
    return found


def _module_tensors(config: T5Config, tensors: dict, suffixes: tuple[str, ...], where: str
                    ) -> tuple[dict, dict]:
    """Split tensor names into {(our module, suffix): value} and modules_to_save leaves."""
    modules = {hf_module: p[:-1] for p, hf_module in (
        (p, t.hf_name.removesuffix(".weight")) for p, t in _hf_tensors(config).items()
        if p[-1] == "kernel")}
    by_name = {t.hf_name: t for t in _hf_tensors(config).values()}
    adapted, saved = {}, {}
    for name, value in tensors.items():
        short = name.removeprefix(PREFIX)
        suffix = next((s for s in suffixes if short.endswith("." + s)), None)
        if suffix is not None and short[:-len(suffix) - 1] in modules:
            adapted[(modules[short[:-len(suffix) - 1]], suffix)] = value
        elif short in by_name:  # modules_to_save: a whole HF module's weight.
            t = by_name[short]
            saved[t.path] = t.to_ours(_checked(where, name, value, t.hf_shape))
        else:
            raise CheckpointError(f"{where}: unexpected tensor {name} for a T5 with this "
                                  f"config")
    return adapted, saved


def _load_lora(config: T5Config, adapter: dict, tensors: dict, where: str):
    bad = _unsupported(adapter, ("fan_in_fan_out", "rank_pattern", "alpha_pattern"))
    if bad:
        raise CheckpointError(f"{where} uses {', '.join(bad)}, which ift_jax's LoRA does not "
                              f"implement")
    rank = int(adapter["r"])
    adapted, saved = _module_tensors(
        config, tensors, ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"), where)
    kernels = _hf_tensors(config)
    params = {}
    for (module, suffix), value in adapted.items():
        out_dim, in_dim = kernels[module + ("kernel",)].hf_shape
        name = f"{PREFIX}{_hf_module(config, module)}.{suffix}"
        if suffix == "lora_A.weight":
            params[module + ("kernel_lora_a",)] = _checked(where, name, value, (rank, in_dim)).T
        elif suffix == "lora_B.weight":
            params[module + ("kernel_lora_b",)] = _checked(where, name, value, (out_dim, rank)).T
        else:
            params[module + (peft.MAGNITUDE_LEAF,)] = _checked(where, name, value, (out_dim,))
    modules = sorted({k[:-1] for k in params})
    for module in modules:
        leaves = ["kernel_lora_a", "kernel_lora_b"] + (
            [peft.MAGNITUDE_LEAF] if adapter.get("use_dora") else [])
        missing = [leaf for leaf in leaves if module + (leaf,) not in params]
        if missing:
            raise CheckpointError(f"{where}: {'/'.join(module)} lacks {', '.join(missing)}")
    if not modules:
        raise CheckpointError(f"{where} holds no LoRA tensors")
    cfg = peft.LoraConfig(rank=rank, alpha=float(adapter["lora_alpha"]),
                          dropout=float(adapter.get("lora_dropout", 0.0)),
                          target_regex="|".join(re.escape("/".join(m)) for m in modules),
                          use_rslora=bool(adapter.get("use_rslora")),
                          use_dora=bool(adapter.get("use_dora")))
    return peft.MethodConfig("lora", lora=cfg), params, saved


def _names(value: Any, where: str, key: str) -> list[str]:
    if isinstance(value, str):
        raise CheckpointError(f"{where}: {key} is the regex {value!r}; ift_jax reads IA3 "
                              f"target lists (e.g. ['k', 'v', 'wo'])")
    return sorted(value or [])


def _ia3_shape(config: T5Config, projection: str) -> tuple[int, ...]:
    """Our `ia3_scale` shape: the projection's output axes (`wo`: its input axis)."""
    if projection in ("query", "key", "value"):
        return (config.num_heads, config.d_kv)
    return (config.d_model,) if projection == "out" else (config.d_ff,)


def _load_ia3(config: T5Config, adapter: dict, tensors: dict, where: str):
    ours = {v: k for k, v in _SHORT.items()}
    targets = [ours.get(t, t) for t in _names(adapter.get("target_modules"), where,
                                              "target_modules")]
    feedforward = _names(adapter.get("feedforward_modules"), where, "feedforward_modules")
    expected = sorted(t for t in targets if t in additions.IA3_INPUT_SCALED)
    if feedforward != expected or any(t not in additions.IA3_MODULES for t in targets):
        outputs = ", ".join(m for m in additions.IA3_MODULES if m != "wo")
        raise CheckpointError(f"{where}: IA3 on {targets} with feedforward_modules "
                              f"{feedforward}; ift_jax scales the input of wo only and the "
                              f"output of {outputs}")
    adapted, saved = _module_tensors(config, tensors, ("ia3_l",), where)
    kernels = _hf_tensors(config)
    params = {}
    for (module, _), value in adapted.items():
        out_dim, in_dim = kernels[module + ("kernel",)].hf_shape
        shape = (1, in_dim) if module[-1] in additions.IA3_INPUT_SCALED else (out_dim, 1)
        name = f"{PREFIX}{_hf_module(config, module)}.ia3_l"
        params[module + (peft.IA3_LEAF,)] = _checked(where, name, value, shape).reshape(
            _ia3_shape(config, module[-1]))
    return peft.MethodConfig("ia3", ia3=peft.IA3Config(tuple(targets))), params, saved


def _prompt_table(config: T5Config, adapter: dict, tensors: dict, where: str) -> np.ndarray:
    if "prompt_embeddings" not in tensors:
        raise CheckpointError(f"{where} has no prompt_embeddings tensor")
    for key, ours in (("token_dim", config.d_model), ("num_layers", config.num_layers)):
        if adapter.get(key) not in (None, ours):
            raise CheckpointError(f"{where}: {key}={adapter[key]}; this base model has {ours}")
    return tensors["prompt_embeddings"]


def _load_prompt(config: T5Config, adapter: dict, tensors: dict, where: str):
    table = _prompt_table(config, adapter, tensors, where)
    length = int(adapter["num_virtual_tokens"])
    blocks = int(adapter.get("num_transformer_submodules") or 2)
    _checked(where, "prompt_embeddings", table, (blocks * length, config.d_model))
    method = peft.MethodConfig("prompt", prompt=peft.PromptConfig(length=length))
    return method, {peft.PROMPT_PATH: table[:length]}, {}


def _load_prefix(config: T5Config, adapter: dict, tensors: dict, where: str):
    try:
        _check_prefix_layout(config, "peft")
    except peft.PeftError as e:
        raise CheckpointError(f"{where}: {e}") from None
    table = _prompt_table(config, adapter, tensors, where)
    length = int(adapter["num_virtual_tokens"])
    _checked(where, "prompt_embeddings", table,
             (length, 2 * config.num_layers * config.d_model))
    method = peft.MethodConfig("prefix", prefix=peft.PrefixConfig(length, "peft", 0))
    key_values = table.reshape(length, 2 * config.num_layers, config.num_heads, config.d_kv)
    return method, {("prefix", "key_values"): key_values}, {}


_LOADERS = {"LORA": _load_lora, "IA3": _load_ia3, "PROMPT_TUNING": _load_prompt,
            "PREFIX_TUNING": _load_prefix}


def load_peft(adapter_dir: str, config: T5Config) -> LoadedAdapter:
    """Reads an HF PEFT adapter directory for a T5 with `config`.

    Raises:
      CheckpointError: missing files, a PEFT type or option ift_jax does not
        implement, or a tensor whose shape does not fit this base (named,
        with both shapes).
    """
    adapter, tensors, where = _read(adapter_dir)
    kind = adapter.get("peft_type")
    if kind not in _LOADERS:
        raise CheckpointError(f"{where}: peft_type {kind!r}; ift_jax reads "
                              f"{', '.join(_LOADERS)}")
    method, params, saved = _LOADERS[kind](config, adapter, tensors, where)
    dtype = np.dtype(config.param_dtype)
    cast = {k: np.ascontiguousarray(v, dtype) for k, v in params.items()}
    return LoadedAdapter(method, traverse_util.unflatten_dict(cast),
                         traverse_util.unflatten_dict(
                             {k: np.ascontiguousarray(v, dtype) for k, v in saved.items()}))
