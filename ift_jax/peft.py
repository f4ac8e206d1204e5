"""Parameter-efficient fine-tuning: every method a trainable partition of one T5.

PEFT is a partition, not a fork of the model. Every method trains the same
`t5.Transformer`; what changes is (a) which extra params the model creates
and (b) which params are trainable (`METHODS`):

- `lora` / `qlora` (`ift_jax.lora`, on qwix): `x @ A @ B * scale` beside
  each targeted projection (`.../query/{kernel, kernel_lora_a,
  kernel_lora_b}`), rsLoRA's scale and DoRA's magnitude as options; QLoRA
  stores the targeted kernels in NF4.
- `prompt`: `Transformer(prompt_length=P)` owns `prompt/embedding [P, embed]`,
  prepended to the encoder input (Lester et al. 2021).
- `houlsby` / `pfeiffer`: bottleneck adapters after every attention sublayer
  and the MLP (Houlsby et al. 2019), or after the MLP only (Pfeiffer et al.
  2021): `.../<sublayer>_adapter/{down,up}/{kernel,bias}`.
- `ia3`: learned vectors scaling keys, values and the MLP's intermediate
  activations (Liu et al. 2022; HF PEFT's T5 default `k`, `v`, `wo`):
  `.../{key,value,wo}/ia3_scale`.
- `prefix`: per-layer key/value prefixes (Li & Liang 2021), `prefix/...`,
  optionally through a reparameterization MLP while training (`fold_prefix`
  folds it into the plain table for decoding and export).

The in-model pieces live in `ift_jax.models.additions`. `trainable_mask`
decides per method (or by a regex over param paths) which leaves train;
`split_params` / `merge_params` cut the tree in two so gradients and
optimizer state exist for the trainable part only. Paths and regexes as in
`ift_jax.param_trees`.

Typical run::

    config, base = hf.load_t5(hf_dir)
    method = peft.MethodConfig("ia3", ia3=peft.IA3Config())
    model, eval_model = peft.build_models(config, method)
    params = peft.init_adapters(model, base, rng)       # + new leaves; NF4 if QLoRA
    mask = peft.trainable_mask(params, method.name)
    trainable, frozen = peft.split_params(params, mask)
    grads = jax.grad(lambda t: loss(model.apply(
        {"params": peft.merge_params(t, frozen)}, ...)))(trainable)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src.core import qarray

from ift_jax import double_quant
from ift_jax import param_trees as trees
from ift_jax.lora import (  # noqa: F401  (the LoRA part of this module's API)
    DEFAULT_LORA_TARGETS, LORA_LEAVES, MAGNITUDE_LEAF, LoraConfig, apply_lora,
    kernel_module_paths, lora_a_init, lora_b_init, lora_targets, merge_lora)
from ift_jax.models import additions as additions_lib
from ift_jax.models import t5
from ift_jax.param_trees import PeftError, abstract_params, count_params  # noqa: F401

Array = jax.Array
PyTree = Any

METHODS = ("full", "lora", "qlora", "prompt", "houlsby", "pfeiffer", "ia3", "prefix")
ADAPTER_METHODS = {"houlsby": ("attention", "mlp"), "pfeiffer": ("mlp",)}
# Methods whose trained model is a plain T5 again once merged.
MERGEABLE = ("full", "lora", "qlora", "ia3")
PROMPT_PATH = ("prompt", "embedding")
IA3_LEAF = "ia3_scale"
IA3_DEFAULT_TARGETS = ("key", "value", "wo")  # HF PEFT's T5 default: k, v, wo (wo's input).
_WHY_NOT_MERGEABLE = {
    "prompt": "a soft prompt is extra input positions, not a weight of T5",
    "prefix": "prefix keys and values are extra attention positions, not a weight of T5",
    "houlsby": "bottleneck adapters add a nonlinear layer that no T5 weight can hold",
    "pfeiffer": "bottleneck adapters add a nonlinear layer that no T5 weight can hold",
}


# ----------------------------------------------------------------------------
# Method settings.


PROMPT_INITS = ("uniform", "vocab", "text")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """A soft prompt of `length` positions and how to initialize it.

    Attributes:
      init: `uniform` in [-init_range, init_range] (Lester: 0.5); `vocab`:
        rows sampled from the first `num_frequent` token embeddings
        (SentencePiece ids are roughly ordered by frequency); `text`: the
        embeddings of `init_token_ids` (e.g. a tokenized task description or
        the class labels), repeated/truncated to `length`.
    """

    length: int = 20
    init: str = "uniform"
    init_token_ids: tuple[int, ...] = ()
    num_frequent: int = 5000
    init_range: float = 0.5

    def __post_init__(self):
        if self.length < 1:
            raise PeftError(f"prompt length must be >= 1, got {self.length}")
        if self.init not in PROMPT_INITS:
            raise PeftError(f"prompt init {self.init!r} is not one of {PROMPT_INITS}")
        if self.init == "text" and not self.init_token_ids:
            raise PeftError("prompt init 'text' needs init_token_ids (the tokenized text)")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Bottleneck adapters: width, activation, near-identity init (see `Additions`)."""

    width: int = 64
    activation: str = "relu"
    init_std: float = 1e-2


@dataclasses.dataclass(frozen=True)
class IA3Config:
    """IA3 scales on the projections named (`additions.IA3_MODULES`)."""

    targets: tuple[str, ...] = IA3_DEFAULT_TARGETS


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    """Prefix tuning: `length` positions, `placement` (`all` | `peft`, see
    `additions.prefix_slots`), reparameterization MLP width `hidden` (0: none)."""

    length: int = 20
    placement: str = "all"
    hidden: int = 0


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """A method and its settings: what `build_models` builds and exports read.

    `name` is one of `METHODS`; the settings of that method must be given
    (`lora` for lora/qlora, `prompt`, `adapter` for houlsby/pfeiffer, `ia3`,
    `prefix`); `trainable_regex`, when set, decides alone what trains.
    """

    name: str = "full"
    lora: Optional[LoraConfig] = None
    prompt: Optional[PromptConfig] = None
    adapter: Optional[AdapterConfig] = None
    ia3: Optional[IA3Config] = None
    prefix: Optional[PrefixConfig] = None
    trainable_regex: Optional[str] = None

    def __post_init__(self):
        if self.name not in METHODS:
            raise PeftError(f"unknown PEFT method {self.name!r}; methods: {', '.join(METHODS)}")
        needs = {"lora": "lora", "qlora": "lora", "prompt": "prompt", "houlsby": "adapter",
                 "pfeiffer": "adapter", "ia3": "ia3", "prefix": "prefix"}.get(self.name)
        if needs and getattr(self, needs) is None:
            raise PeftError(f"method {self.name!r} needs MethodConfig.{needs} settings")

    def additions(self) -> additions_lib.Additions:
        """The in-layer modules of this method (none for full/LoRA/prompt)."""
        try:
            return additions_lib.Additions(**self._addition_fields())
        except ValueError as e:
            raise PeftError(str(e)) from None

    def _addition_fields(self) -> dict:
        fields: dict = {}
        if self.adapter is not None and self.name in ADAPTER_METHODS:
            fields.update(adapter_sites=ADAPTER_METHODS[self.name],
                          adapter_width=self.adapter.width,
                          adapter_activation=self.adapter.activation,
                          adapter_init_std=self.adapter.init_std)
        if self.ia3 is not None:
            fields.update(ia3_targets=tuple(self.ia3.targets))
        if self.prefix is not None:
            fields.update(prefix_length=self.prefix.length,
                          prefix_placement=self.prefix.placement,
                          prefix_hidden=self.prefix.hidden)
        return fields


def build_models(config: t5.T5Config, method: MethodConfig) -> tuple[nn.Module, nn.Module]:
    """`(training model, eval model)` of `method`; the same params fit both.

    The eval model differs only for LoRA with dropout (qwix has no
    deterministic switch, see `apply_lora(for_eval=True)`).
    """
    extra = method.additions()
    if extra.prefix_length:
        try:
            additions_lib.prefix_slots(config.num_layers, config.num_decoder_layers,
                                       extra.prefix_placement)
        except ValueError as e:
            raise PeftError(str(e)) from None
    model = t5.Transformer(config, additions=extra)
    if method.prompt is not None:
        model = apply_prompt_tuning(model, method.prompt)
    if method.lora is not None:
        return apply_lora(model, method.lora), apply_lora(model, method.lora, for_eval=True)
    return model, model


# ----------------------------------------------------------------------------
# Prompt tuning (Lester et al., 2021).


def apply_prompt_tuning(model: t5.Transformer, cfg: PromptConfig) -> t5.Transformer:
    """`model` with a `cfg.length`-position soft prompt (`prompt/embedding`)."""
    if not isinstance(model, t5.Transformer):
        raise PeftError(f"prompt tuning needs a t5.Transformer, got {type(model).__name__}")
    return model.clone(prompt_length=cfg.length)


def init_prompt(rng: Array, token_embedding_VxD: Array, cfg: PromptConfig) -> Array:
    """Initial `[length, d_model]` prompt, from the (pretrained) token embeddings."""
    vocab, d_model = token_embedding_VxD.shape
    dtype = token_embedding_VxD.dtype
    if cfg.init == "uniform":
        return jax.random.uniform(rng, (cfg.length, d_model), dtype, -cfg.init_range,
                                  cfg.init_range)
    if cfg.init == "vocab":
        pool = min(cfg.num_frequent, vocab)
        ids = jax.random.choice(rng, pool, (cfg.length,), replace=cfg.length > pool)
    else:
        bad = [i for i in cfg.init_token_ids if not 0 <= i < vocab]
        if bad:
            raise PeftError(f"prompt init_token_ids {bad} are outside the vocabulary "
                            f"(size {vocab})")
        ids = jnp.asarray(np.resize(np.asarray(cfg.init_token_ids), cfg.length))
    return jnp.take(jnp.asarray(token_embedding_VxD), ids, axis=0)


PROMPT_METRICS = ("cosine", "l2")


def prompt_neighbors(prompt_PxD: Any, embedding_VxD: Any, k: int = 5,
                     metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """The `k` vocabulary embeddings nearest each prompt position (Lester et al. 5.5).

    Returns:
      `(ids [P, k], distances [P, k])`, nearest first: `cosine` distance is
      `1 - cos(prompt, embedding)`, `l2` the Euclidean distance.
    """
    if metric not in PROMPT_METRICS:
        raise PeftError(f"metric {metric!r}; choose one of {PROMPT_METRICS}")
    prompt = np.asarray(prompt_PxD, np.float64)
    vocab = np.asarray(embedding_VxD, np.float64)
    if not 1 <= k <= vocab.shape[0]:
        raise PeftError(f"k={k}; the vocabulary has {vocab.shape[0]} embeddings")
    if metric == "cosine":
        unit = vocab / np.maximum(np.linalg.norm(vocab, axis=1, keepdims=True), 1e-12)
        p_unit = prompt / np.maximum(np.linalg.norm(prompt, axis=1, keepdims=True), 1e-12)
        dist = 1.0 - p_unit @ unit.T
    else:
        sq = ((prompt ** 2).sum(1)[:, None] - 2 * prompt @ vocab.T + (vocab ** 2).sum(1)[None])
        dist = np.sqrt(np.maximum(sq, 0.0))
    ids = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(dist, ids, axis=1)


# ----------------------------------------------------------------------------
# Putting base params and fresh adapters together.


def _is_adapter_leaf(key: tuple[str, ...]) -> bool:
    return (key[-1] in LORA_LEAVES + (MAGNITUDE_LEAF, IA3_LEAF) or key == PROMPT_PATH
            or key[0] == "prefix" or any(k.endswith("_adapter") for k in key))


def _new_leaf(key: tuple[str, ...], rng: Array, abstract: dict, base: dict,
              extra: additions_lib.Additions, prompt_cfg: Optional[PromptConfig]) -> Array:
    """Initial value of an adapter leaf the base params lack (see `init_adapters`)."""
    shape, dtype = abstract[key].shape, abstract[key].dtype
    if key == PROMPT_PATH:
        cfg = prompt_cfg or PromptConfig(length=shape[0])
        if cfg.length != shape[0]:
            raise PeftError(f"prompt_cfg.length={cfg.length} but the model's prompt has "
                            f"{shape[0]} positions")
        return init_prompt(rng, base[("token_embedder", "embedding")], cfg).astype(dtype)
    if key[-1] == "kernel_lora_a":
        return lora_a_init(rng, shape, dtype)
    if key[-1] == MAGNITUDE_LEAF:  # DoRA's m = ||W + scale * A @ B|| = ||W|| (B = 0).
        kernel = base[key[:-1] + ("kernel",)]
        n_in = abstract[key[:-1] + ("kernel_lora_a",)].shape[0]
        return jnp.linalg.norm(kernel.reshape(n_in, -1).astype(jnp.float32), axis=0
                               ).astype(dtype)
    if key[-1] == IA3_LEAF:
        return jnp.ones(shape, dtype)
    if key[0] == "prefix":
        return additions_lib.prefix_init(key[-1], rng, shape, dtype, abstract)
    if any(k.endswith("_adapter") for k in key) and key[-1] == "kernel":
        return jax.nn.initializers.truncated_normal(extra.adapter_init_std)(rng, shape, dtype)
    return jnp.zeros(shape, dtype)  # LoRA B (as PEFT), adapter biases.


def init_adapters(model: nn.Module, base_params: PyTree, rng: Array,
                  prompt_cfg: Optional[PromptConfig] = None) -> dict:
    """Full params of a PEFT `model`: `base_params` plus freshly initialized adapters.

    LoRA A and B get the initializers `LoraConfig.rule` gives qwix
    (`lora_a_init`, HF PEFT's; B zero, so the model starts as the base
    model), DoRA's magnitude the norms of the base kernels; QLoRA's base
    kernels are quantized here; the prompt gets `init_prompt(prompt_cfg)`
    from the base token embeddings (Lester's uniform init when `prompt_cfg` is
    None); IA3 scales start at 1, adapters near the identity, prefixes as
    `additions.PrefixKeyValues`. Only shapes are taken from the model
    (`jax.eval_shape`), so no random base weights are ever materialized.

    Args:
      model: from `build_models` (or `apply_lora` / `apply_prompt_tuning`).
      base_params: unboxed params of the plain `t5.Transformer(config)`
        (numpy arrays, e.g. from `hf.load_t5`, are turned into jax arrays).
    """
    abstract = trees.unbox(abstract_params(model))
    abstract_flat, base_flat = trees.flatten(abstract), trees.flatten(trees.unbox(base_params))
    missing = [trees.path(k) for k in abstract_flat
               if k not in base_flat and not _is_adapter_leaf(k)]
    unknown = [trees.path(k) for k in base_flat if k not in abstract_flat]
    if missing or unknown:
        raise PeftError(f"base params do not fit the model: missing {trees.listing(missing)}; "
                        f"unexpected {trees.listing(unknown)}")
    # jax arrays, not numpy: qwix only recognizes jax arrays as weights, and
    # silently skips the adapters of a numpy kernel.
    base_flat = {k: jnp.asarray(v) for k, v in base_flat.items()}
    full_precision = dict(base_flat)
    quantized = [v for v in abstract_flat.values() if trees.is_quantized(v)]
    if quantized:
        # The model's own quantizer: with double quantization, scales in 8 bits.
        arrays = (double_quant.DOUBLE_QUANT_ARRAYS
                  if any(double_quant.is_double_quantized(v) for v in quantized) else qarray)
        base_flat = trees.flatten(qwix.quantize_params(
            trees.unflatten(base_flat), abstract, _qarray_module=arrays))
    extra = getattr(model, "additions", additions_lib.Additions())
    new_keys = [k for k in abstract_flat if k not in base_flat]
    new = {key: _new_leaf(key, r, abstract_flat, full_precision, extra, prompt_cfg)
           for key, r in zip(new_keys, jax.random.split(rng, max(len(new_keys), 1)))}
    if prompt_cfg is not None and PROMPT_PATH not in new:
        raise PeftError("prompt_cfg given but the model has no prompt; build it with "
                        "apply_prompt_tuning")
    return trees.unflatten({**base_flat, **new})


# ----------------------------------------------------------------------------
# Trainable partition.


def method_trains(method: str, key: tuple[str, ...]) -> bool:
    """Whether `method` trains the leaf at `key` (without a `trainable_regex`)."""
    if method == "full":
        return True
    if method in ("lora", "qlora"):
        return key[-1] in LORA_LEAVES + (MAGNITUDE_LEAF,)
    if method in ADAPTER_METHODS:
        return any(k.endswith("_adapter") for k in key)
    if method == "ia3":
        return key[-1] == IA3_LEAF
    if method == "prefix":
        return key[0] == "prefix"
    return key == PROMPT_PATH


def trainable_mask(params: PyTree, method: str,
                   trainable_regex: Optional[str] = None) -> dict:
    """Nested dict of bools with `params`' dict structure: True where the leaf trains.

    Args:
      params: the full param tree (boxed, unboxed or abstract).
      method: one of `METHODS`: `full` (all), `lora` / `qlora`
        (`kernel_lora_a/b`, DoRA's `kernel_lora_magnitude`), `prompt`
        (`prompt/embedding`), `houlsby` / `pfeiffer` (`*_adapter/...`),
        `ia3` (`ia3_scale`), `prefix` (`prefix/...`).
      trainable_regex: when given, it alone decides: a leaf trains iff its
        path fullmatches (e.g. `.*layer_norm.*`, or
        `.*(kernel_lora_[ab]|layer_norm/scale)` for LoRA plus norms).

    Raises:
      PeftError: unknown method, nothing trainable, or a quantized (QLoRA)
        kernel selected.
    """
    if method not in METHODS:
        raise PeftError(f"unknown PEFT method {method!r}; methods: {', '.join(METHODS)}")
    flat = trees.flatten(params)
    if trainable_regex is not None:
        pattern = re.compile(trainable_regex)
        mask = {k: bool(pattern.fullmatch(trees.path(k))) for k in flat}
    else:
        mask = {k: method_trains(method, k) for k in flat}
    if not any(mask.values()):
        rule = (f"trainable_regex {trainable_regex!r}" if trainable_regex is not None
                else f"method {method!r}")
        hint = {"lora": " (build the model with peft.apply_lora)",
                "qlora": " (build the model with peft.apply_lora(quantize=True))",
                "prompt": " (build the model with peft.apply_prompt_tuning)"}.get(
                    method, " (build the model with peft.build_models)")
        hint = "" if method == "full" else hint
        raise PeftError(f"{rule} leaves no trainable param{hint}; param paths: "
                        f"{trees.listing([trees.path(k) for k in flat])}")
    quantized = [trees.path(k) for k, m in mask.items() if m and trees.is_quantized(flat[k])]
    if quantized:
        raise PeftError(f"quantized (QLoRA) kernels cannot be trained: "
                        f"{trees.listing(quantized)}")
    return trees.unflatten(mask)


def split_params(params: PyTree, mask: PyTree) -> tuple[dict, dict]:
    """`(trainable, frozen)`: two nested dicts, each holding only its own leaves.

    A leaf is in exactly one of them (absent keys, no placeholders), so
    `jax.grad` and optax see only the trainable leaves.
    """
    flat, flat_mask = trees.flatten(params), trees.flatten(mask)
    if flat.keys() != flat_mask.keys():
        diff = sorted(trees.path(k) for k in flat.keys() ^ flat_mask.keys())
        raise PeftError(f"mask does not have the params' structure; differs at "
                        f"{trees.listing(diff)}")
    trainable = {k: v for k, v in flat.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
    return trees.unflatten(trainable), trees.unflatten(frozen)


def merge_params(trainable: PyTree, frozen: PyTree) -> dict:
    """Inverse of `split_params`: the full param tree (works on traced values)."""
    flat_t, flat_f = trees.flatten(trainable), trees.flatten(frozen)
    both = sorted(trees.path(k) for k in flat_t.keys() & flat_f.keys())
    if both:
        raise PeftError(f"params both trainable and frozen: {trees.listing(both)}")
    return trees.unflatten({**flat_f, **flat_t})


def with_adapter(base_params: PyTree, adapter: PyTree) -> dict:
    """Base params (no adapter leaves) plus one adapter: switching adapters on one base.

    Load the base once, then call this per adapter (e.g. from
    `peft_formats.load_peft`); only the small adapter arrays are new each
    time. Leaves become jax arrays, since qwix skips LoRA on numpy params.
    """
    base_flat = trees.flatten(base_params)
    in_base = sorted(trees.path(k) for k in base_flat if _is_adapter_leaf(k))
    if in_base:
        raise PeftError(f"base params already hold adapter leaves: {trees.listing(in_base)}")
    adapter_flat = trees.flatten(adapter)
    stray = sorted(trees.path(k) for k in adapter_flat if not _is_adapter_leaf(k))
    if stray:
        raise PeftError(f"adapter holds base-model params: {trees.listing(stray)}")
    return merge_params(jax.tree.map(jnp.asarray, adapter), base_params)


# ----------------------------------------------------------------------------
# Decoding and export forms.


def fold_prefix(config: t5.T5Config, params: PyTree, prefix: PrefixConfig) -> dict:
    """Params whose prefix is the plain table `prefix/key_values`: the MLP's output.

    The result fits the model built with `dataclasses.replace(prefix,
    hidden=0)` and computes the same function; params without the MLP are
    returned as they are.
    """
    flat = trees.flatten(trees.unbox(params))
    if ("prefix", "key_values") in flat or not prefix.hidden:
        return params
    slots, _ = additions_lib.prefix_slots(config.num_layers, config.num_decoder_layers,
                                          prefix.placement)
    module = additions_lib.PrefixKeyValues(prefix.length, slots, config.num_heads, config.d_kv,
                                           config.d_model, prefix.hidden, jnp.float32,
                                           config.param_dtype)
    table = module.apply({"params": trees.unflatten(
        {k[1:]: v for k, v in flat.items() if k[0] == "prefix"})})
    rest = {k: v for k, v in flat.items() if k[0] != "prefix"}
    rest[("prefix", "key_values")] = table.astype(config.param_dtype)
    return trees.unflatten(rest)


def merge_ia3(params: PyTree) -> dict:
    """Plain params: every `ia3_scale` multiplied into its kernel, the scales dropped.

    `wo`'s scale multiplies its input rows, the others their output columns.
    """
    flat = trees.flatten(trees.unbox(params))
    merged = {}
    for key, leaf in flat.items():
        if key[-1] == IA3_LEAF:
            continue
        scale = flat.get(key[:-1] + (IA3_LEAF,)) if key[-1] == "kernel" else None
        if scale is not None:
            kernel = jnp.asarray(leaf, jnp.float32)
            scale = jnp.asarray(scale, jnp.float32)
            if key[-2] in additions_lib.IA3_INPUT_SCALED:
                kernel = kernel * scale.reshape(scale.shape + (1,) * (kernel.ndim - scale.ndim))
            else:
                kernel = kernel * scale
            leaf = kernel.astype(leaf.dtype)
        merged[key] = leaf
    return trees.unflatten(merged)


def why_not_mergeable(method: str) -> Optional[str]:
    """Why a run of `method` cannot be merged into a plain T5, or None when it can."""
    return None if method in MERGEABLE else _WHY_NOT_MERGEABLE[method]


def merged_params(params: PyTree, method: MethodConfig) -> dict:
    """Params of the plain `t5.Transformer(config)` computing what `method`'s model does.

    Raises:
      PeftError: the method cannot merge (prompt, prefix, adapters), with why.
    """
    if method.name not in MERGEABLE:
        raise PeftError(f"method {method.name!r} cannot be merged into a plain T5: "
                        f"{_WHY_NOT_MERGEABLE[method.name]}")
    if method.prompt is not None or method.prefix is not None:
        raise PeftError(f"method {method.name!r} with a soft prompt or prefix cannot be "
                        f"merged into a plain T5: {_WHY_NOT_MERGEABLE['prompt']}")
    if method.lora is not None:
        params = merge_lora(params, method.lora)
    return merge_ia3(params) if method.name == "ia3" else trees.unbox(params)
