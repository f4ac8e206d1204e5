"""Parameter-efficient fine-tuning: LoRA, QLoRA, prompt tuning, trainable partitions.

PEFT is a partition, not a fork of the model. Every method trains the same
`t5.Transformer`; what changes is (a) which extra params the model creates
and (b) which params are trainable:

- LoRA / QLoRA (`apply_lora`): qwix intercepts the `jax.lax.dot_general` of
  every matched projection and adds `x @ A @ B * alpha / rank`. The LoRA
  params live beside the kernel they adapt
  (`encoder/layers_0/attention/query/{kernel, kernel_lora_a, kernel_lora_b}`)
  and keep logical axes. With `quantize=True` the matched kernels are stored
  as NF4 (qwix `WithAux(QArray)` leaves), the rest stays in float.
- Prompt tuning (`apply_prompt_tuning`): `Transformer(prompt_length=P)`
  owns `prompt/embedding [P, embed]`, prepended to the encoder input.
- `trainable_mask` decides per method (or by a regex over param paths)
  which leaves train; `split_params` / `merge_params` cut the tree in two so
  gradients and optimizer state exist for the trainable part only.

Param trees are nested dicts; a *leaf* is whatever is not a dict (an array,
a boxed `nn.Partitioned`, a QLoRA `WithAux` kernel, a `ShapeDtypeStruct`).
Paths are `/`-joined dict keys (`decoder/layers_1/self_attention/value/kernel`)
and regexes are `re.fullmatch`ed against them (qwix does the same with module
paths, which are param paths without the last key).

Typical LoRA run::

    config, base = hf.load_t5(hf_dir)
    model = peft.apply_lora(t5.Transformer(config), lora_cfg)
    eval_model = peft.apply_lora(t5.Transformer(config), lora_cfg, for_eval=True)
    params = peft.init_adapters(model, base, rng)       # + A, B; NF4 if quantize
    mask = peft.trainable_mask(params, "lora")
    trainable, frozen = peft.split_params(params, mask)
    grads = jax.grad(lambda t: loss(model.apply(
        {"params": peft.merge_params(t, frozen)}, ...)))(trainable)
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src.providers import ptq as qwix_ptq  # WithAux: QLoRA's kernel leaves

from ift_jax import errors
from ift_jax.models import t5

Array = jax.Array
PyTree = Any

METHODS = ("full", "lora", "qlora", "prompt")
LORA_LEAVES = ("kernel_lora_a", "kernel_lora_b")
PROMPT_PATH = ("prompt", "embedding")

# HF PEFT's T5 default (`q`, `v`), cross-attention included.
DEFAULT_LORA_TARGETS = r".*/(attention|self_attention|encoder_decoder_attention)/(query|value)"

# Model methods qwix must wrap: training calls `__call__`, decoding `encode`/`decode`.
_INTERCEPTED_METHODS = ("__call__", "encode", "decode")
_MAX_LISTED = 40


class PeftError(errors.ConfigError):
    """A PEFT setting that does not fit the model or its params."""


# ----------------------------------------------------------------------------
# Param-tree plumbing.


def _flatten(tree: PyTree) -> dict[tuple[str, ...], Any]:
    if not isinstance(tree, (dict, flax.core.FrozenDict)):
        raise TypeError(f"expected a nested dict of params, got {type(tree).__name__}")
    return flax.traverse_util.flatten_dict(tree)


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    return flax.traverse_util.unflatten_dict(flat) if flat else {}


def _path(key: tuple[str, ...]) -> str:
    return "/".join(str(k) for k in key)


def _listing(paths: list[str]) -> str:
    """Paths for an error message, `layers_<i>` folded to `layers_N` (every layer)."""
    folded = list(dict.fromkeys(re.sub(r"/layers_\d+/", "/layers_N/", p) for p in paths))
    shown = ", ".join(folded[:_MAX_LISTED])
    more = len(folded) - _MAX_LISTED
    note = " (layers_N: each layer)" if folded != paths else ""
    return shown + (f", ... ({more} more)" if more > 0 else "") + note


def _unbox(tree: PyTree) -> PyTree:
    """`nn.unbox` without sharding constraints, so it works eagerly under a mesh."""
    def unbox(x):
        if isinstance(x, nn.Partitioned):
            return x.unbox(apply_constraint=False)
        return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x
    return jax.tree.map(unbox, tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _is_quantized(leaf: Any) -> bool:
    return isinstance(_unbox(leaf), qwix_ptq.WithAux)


def abstract_params(model: nn.Module) -> PyTree:
    """Boxed `ShapeDtypeStruct` params of `model` (LoRA / prompt included); no memory used.

    Safe under `partitioning.mesh_context`, unlike a LoRA model's own `init`:
    qwix 0.1.8 applies the kernel's logical constraint (3 axes) to the new 2-D
    A/B while creating them, which fails whenever axis rules are active.
    """
    enc, dec = jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    with nn.logical_axis_rules(()):  # Shapes only: no constraints to apply.
        return jax.eval_shape(lambda: model.init(rngs, enc, dec))["params"]


def count_params(tree: PyTree) -> int:
    """Number of scalars in a param tree (a QLoRA kernel counts its full logical shape)."""
    leaves = _flatten(tree).values() if isinstance(tree, (dict, flax.core.FrozenDict)) else (
        [tree])
    return sum(math.prod(_unbox(leaf).shape) for leaf in leaves)


# ----------------------------------------------------------------------------
# LoRA and QLoRA (qwix).


def lora_a_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """HF PEFT's default LoRA A: uniform in ±1/sqrt(fan_in), fan_in = the inputs.

    PEFT (`init_lora_weights=True`) runs `kaiming_uniform_(a=sqrt(5))` on
    `lora_A.weight [r, in]`: bound = sqrt(6 / ((1 + 5)·in)) = 1/sqrt(in). qwix's
    default, he-uniform (bound sqrt(6/in)), is sqrt(6) wider, so learning rates
    from PEFT recipes would not carry over. A is `[in, r]` here (qwix flattens
    the kernel's contracting axes), so fan_in is every axis but the last.
    """
    bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def lora_b_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """LoRA B starts at zero (as PEFT), so a LoRA model starts as its base model."""
    del key
    return jnp.zeros(shape, dtype)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA (`quantize=False`) or QLoRA (`quantize=True`) on the projections matched.

    Attributes:
      rank, alpha: the update is `x @ A @ B * alpha / rank` (as HF PEFT).
      dropout: on the adapter's input only. qwix applies it on every call
        when > 0; build eval/decoding models with `for_eval=True`.
      target_regex: fullmatched against module paths such as
        `decoder/layers_0/encoder_decoder_attention/query`.
      quantize, weight_qtype, tile_size: QLoRA's frozen base kernels in
        `weight_qtype` with one scale per `tile_size` inputs per output.
    """

    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    target_regex: str = DEFAULT_LORA_TARGETS
    quantize: bool = False
    weight_qtype: str = "nf4"
    tile_size: int = 64

    def __post_init__(self):
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise PeftError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1; got "
                            f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def rule(self, for_eval: bool = False) -> qwix.LoraRule:
        return qwix.LoraRule(
            module_path=self.target_regex, rank=self.rank, alpha=self.alpha,
            dropout=0.0 if for_eval else self.dropout,
            weight_qtype=self.weight_qtype if self.quantize else None,
            tile_size=self.tile_size if self.quantize else None,
            lora_a_initializer=lora_a_init, lora_b_initializer=lora_b_init)


def kernel_module_paths(model: nn.Module) -> list[str]:
    """Paths of the modules of `model` that own a `kernel` (what LoRA can target)."""
    flat = _flatten(abstract_params(model))
    return sorted({_path(k[:-1]) for k in flat if k[-1] == "kernel"})


def lora_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Module paths `cfg.target_regex` selects; raises `PeftError` if none."""
    try:
        pattern = re.compile(cfg.target_regex)
    except re.error as e:
        raise PeftError(f"LoRA target_regex {cfg.target_regex!r} is not a regex: {e}") from None
    paths = kernel_module_paths(model)
    targets = [p for p in paths if pattern.fullmatch(p)]
    if not targets:
        raise PeftError(
            f"LoRA target_regex {cfg.target_regex!r} matches no projection kernel (it is "
            f"fullmatched against module paths); modules with a kernel: {_listing(paths)}")
    return targets


def apply_lora(model: nn.Module, cfg: LoraConfig, *, for_eval: bool = False) -> nn.Module:
    """`model` with LoRA (or QLoRA) adapters on the kernels `cfg.target_regex` matches.

    The result is a linen module with the same call signature; its `init`
    also creates `kernel_lora_a [in, rank]` and `kernel_lora_b [rank, out]`
    (inputs/outputs flattened, e.g. `[rank, heads * kv]` for a query kernel).

    Pitfalls (both silently give the base model's output):
      - params must be jax arrays: qwix recognizes a kernel only if it is a
        `jax.Array` (tracers under jit are; numpy arrays are not).
      - call other methods by name (`model.apply(v, x, method="encode")`),
        not as `method=t5.Transformer.encode`, which skips qwix's wrapper.

    Args:
      for_eval: build the model with LoRA dropout 0 (same params). qwix has
        no deterministic switch, so training and eval/decoding use two models.

    Raises:
      PeftError: the regex matches no kernel (the message lists them all).
    """
    lora_targets(model, cfg)
    provider = qwix.LoraProvider([cfg.rule(for_eval)])
    methods = [m for m in _INTERCEPTED_METHODS if hasattr(type(model), m)]
    return qwix.apply_lora_to_model(model, provider, methods=methods)


def _dequantize(leaf: qwix_ptq.WithAux) -> Array:
    return qwix.dequantize(leaf.array)


def merge_lora(params: PyTree, cfg: LoraConfig) -> dict:
    """Plain params for `t5.Transformer(config)`: `W + A @ B * alpha / rank`, A and B dropped.

    Other params (a prompt included) are kept as they are. QLoRA kernels are
    dequantized first, so the result is the function the QLoRA model computes
    (in float), not the original full-precision weights.
    """
    flat = _flatten(_unbox(params))
    merged = {}
    for key, leaf in flat.items():
        if key[-1] in LORA_LEAVES:
            continue
        leaf = _dequantize(leaf) if _is_quantized(leaf) else leaf
        lora_a = flat.get(key[:-1] + ("kernel_lora_a",)) if key[-1] == "kernel" else None
        if lora_a is not None:
            lora_b = flat[key[:-1] + ("kernel_lora_b",)]
            if lora_a.shape[-1] != cfg.rank:
                raise PeftError(f"{_path(key[:-1])}: kernel_lora_a has rank "
                                f"{lora_a.shape[-1]}, LoraConfig.rank is {cfg.rank}")
            delta = jnp.matmul(lora_a.astype(jnp.float32), lora_b.astype(jnp.float32),
                               precision=jax.lax.Precision.HIGHEST)
            leaf = (jnp.asarray(leaf, jnp.float32) + cfg.scale * delta.reshape(leaf.shape)
                    ).astype(leaf.dtype)
        merged[key] = leaf
    return _unflatten(merged)


# ----------------------------------------------------------------------------
# Prompt tuning (Lester et al., 2021).


PROMPT_INITS = ("uniform", "vocab", "text")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """A soft prompt of `length` positions and how to initialize it.

    Attributes:
      init: `uniform` in [-init_range, init_range] (Lester: 0.5); `vocab`:
        rows sampled from the first `num_frequent` token embeddings
        (SentencePiece ids are roughly ordered by frequency); `text`: the
        embeddings of `init_token_ids` (e.g. a task description or the class
        labels), repeated/truncated to `length`.
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


# ----------------------------------------------------------------------------
# Putting base params and fresh adapters together.


def _is_adapter(key: tuple[str, ...]) -> bool:
    return key[-1] in LORA_LEAVES or key == PROMPT_PATH


def init_adapters(model: nn.Module, base_params: PyTree, rng: Array,
                  prompt_cfg: Optional[PromptConfig] = None) -> dict:
    """Full params of a PEFT `model`: `base_params` plus freshly initialized adapters.

    LoRA A and B get the initializers `LoraConfig.rule` gives qwix
    (`lora_a_init`, HF PEFT's; B zero, so the model starts as the base
    model); QLoRA's base kernels are quantized here; the prompt gets
    `init_prompt(prompt_cfg)` from the base token embeddings (Lester's
    uniform init when `prompt_cfg` is None). Only
    shapes are taken from the model (`jax.eval_shape`), so no random base
    weights are ever materialized.

    Args:
      model: built by `apply_lora` and/or `apply_prompt_tuning`.
      base_params: unboxed params of the plain `t5.Transformer(config)`
        (numpy arrays, e.g. from `hf.load_t5`, are turned into jax arrays).
    """
    abstract = _unbox(abstract_params(model))
    abstract_flat, base_flat = _flatten(abstract), _flatten(_unbox(base_params))
    missing = [_path(k) for k in abstract_flat if k not in base_flat and not _is_adapter(k)]
    unknown = [_path(k) for k in base_flat if k not in abstract_flat]
    if missing or unknown:
        raise PeftError(f"base params do not fit the model: missing {_listing(missing)}; "
                        f"unexpected {_listing(unknown)}")
    # jax arrays, not numpy: qwix only recognizes jax arrays as weights, and
    # silently skips the adapters of a numpy kernel.
    base_flat = {k: jnp.asarray(v) for k, v in base_flat.items()}
    if any(_is_quantized(v) for v in abstract_flat.values()):
        base_flat = _flatten(qwix.quantize_params(_unflatten(base_flat), abstract))
    new_keys = [k for k in abstract_flat if k not in base_flat]
    new = {}
    for key, r in zip(new_keys, jax.random.split(rng, max(len(new_keys), 1))):
        shape, dtype = abstract_flat[key].shape, abstract_flat[key].dtype
        if key == PROMPT_PATH:
            cfg = prompt_cfg or PromptConfig(length=shape[0])
            if cfg.length != shape[0]:
                raise PeftError(f"prompt_cfg.length={cfg.length} but the model's prompt has "
                                f"{shape[0]} positions")
            embedding = base_flat[("token_embedder", "embedding")]
            new[key] = init_prompt(r, embedding, cfg).astype(dtype)
        elif key[-1] == "kernel_lora_a":
            new[key] = lora_a_init(r, shape, dtype)
        else:
            new[key] = lora_b_init(r, shape, dtype)
    if prompt_cfg is not None and PROMPT_PATH not in new:
        raise PeftError("prompt_cfg given but the model has no prompt; build it with "
                        "apply_prompt_tuning")
    return _unflatten({**base_flat, **new})


# ----------------------------------------------------------------------------
# Trainable partition.


def trainable_mask(params: PyTree, method: str,
                   trainable_regex: Optional[str] = None) -> dict:
    """Nested dict of bools with `params`' dict structure: True where the leaf trains.

    Args:
      params: the full param tree (boxed, unboxed or abstract).
      method: `full` (all), `lora` / `qlora` (`kernel_lora_a/b` only),
        `prompt` (`prompt/embedding` only).
      trainable_regex: when given, it alone decides: a leaf trains iff its
        path fullmatches (e.g. `.*layer_norm.*`, or
        `.*(kernel_lora_[ab]|layer_norm/scale)` for LoRA plus norms).

    Raises:
      PeftError: unknown method, nothing trainable, or a quantized (QLoRA)
        kernel selected.
    """
    if method not in METHODS:
        raise PeftError(f"unknown PEFT method {method!r}; methods: {', '.join(METHODS)}")
    flat = _flatten(params)
    if trainable_regex is not None:
        pattern = re.compile(trainable_regex)
        mask = {k: bool(pattern.fullmatch(_path(k))) for k in flat}
    elif method == "full":
        mask = {k: True for k in flat}
    elif method in ("lora", "qlora"):
        mask = {k: k[-1] in LORA_LEAVES for k in flat}
    else:
        mask = {k: k == PROMPT_PATH for k in flat}
    if not any(mask.values()):
        rule = (f"trainable_regex {trainable_regex!r}" if trainable_regex is not None
                else f"method {method!r}")
        hint = {"lora": " (build the model with peft.apply_lora)",
                "qlora": " (build the model with peft.apply_lora(quantize=True))",
                "prompt": " (build the model with peft.apply_prompt_tuning)"}.get(method, "")
        raise PeftError(f"{rule} leaves no trainable param{hint}; param paths: "
                        f"{_listing([_path(k) for k in flat])}")
    quantized = [_path(k) for k, m in mask.items() if m and _is_quantized(flat[k])]
    if quantized:
        raise PeftError(f"quantized (QLoRA) kernels cannot be trained: {_listing(quantized)}")
    return _unflatten(mask)


def split_params(params: PyTree, mask: PyTree) -> tuple[dict, dict]:
    """`(trainable, frozen)`: two nested dicts, each holding only its own leaves.

    A leaf is in exactly one of them (absent keys, no placeholders), so
    `jax.grad` and optax see only the trainable leaves.
    """
    flat, flat_mask = _flatten(params), _flatten(mask)
    if flat.keys() != flat_mask.keys():
        diff = sorted(_path(k) for k in flat.keys() ^ flat_mask.keys())
        raise PeftError(f"mask does not have the params' structure; differs at "
                        f"{_listing(diff)}")
    trainable = {k: v for k, v in flat.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
    return _unflatten(trainable), _unflatten(frozen)


def merge_params(trainable: PyTree, frozen: PyTree) -> dict:
    """Inverse of `split_params`: the full param tree (works on traced values)."""
    flat_t, flat_f = _flatten(trainable), _flatten(frozen)
    both = sorted(_path(k) for k in flat_t.keys() & flat_f.keys())
    if both:
        raise PeftError(f"params both trainable and frozen: {_listing(both)}")
    return _unflatten({**flat_f, **flat_t})


def with_adapter(base_params: PyTree, adapter: PyTree) -> dict:
    """Base params (no LoRA leaves) plus one adapter: switching adapters on one base.

    Load the base once, then call this per adapter (e.g. from
    `hf.load_peft_adapter`); only the small adapter arrays are new each time.
    Leaves become jax arrays, since qwix skips LoRA on numpy params.
    """
    base_flat = _flatten(base_params)
    lora_in_base = sorted(_path(k) for k in base_flat if k[-1] in LORA_LEAVES)
    if lora_in_base:
        raise PeftError(f"base params already hold LoRA leaves: {_listing(lora_in_base)}")
    adapter_flat = _flatten(adapter)
    stray = sorted(_path(k) for k in adapter_flat if k[-1] not in LORA_LEAVES)
    if stray:
        raise PeftError(f"adapter holds non-LoRA params: {_listing(stray)}")
    return merge_params(jax.tree.map(jnp.asarray, adapter), base_params)
