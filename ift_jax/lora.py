"""LoRA on qwix: LoRA, QLoRA, rsLoRA and DoRA; per-row adapters; merging; combinations.

qwix intercepts the `jax.lax.dot_general` of every projection whose module
path fullmatches `LoraConfig.target_regex` and adds `x @ A @ B * scale`; A
(`kernel_lora_a [in, r]`) and B (`kernel_lora_b [r, out]`, the kernel's input
and output axes flattened) live beside the kernel they adapt and keep its
logical axes. `_LoraProvider` extends qwix's provider with two cases qwix does
not have:

- DoRA (Liu et al. 2024, as HF PEFT computes it): the output is rescaled per
  output unit by `m / ||W + scale * A @ B||` (the norm over the kernel's
  inputs, treated as a constant in the gradient, paper section 4.3), with
  `m` the trained `kernel_lora_magnitude [out]`, which starts at `||W||`.
- Per-row adapters (`ift_jax.serving`): when A is `[batch, in, r]` and B
  `[batch, r, out]`, each example (row block of the projection's input) uses
  its own A and B, which already carry their adapter's scale.

QLoRA's double quantization (`LoraConfig.double_quant`) stores the NF4
scales in 8 bits (`ift_jax.double_quant`); the provider expands them just
before qwix's matmul. rsLoRA (Kalajdzievski 2023) only changes the scale to
`alpha / sqrt(r)`.
`combine` builds one adapter from several, as HF PEFT's `add_weighted_adapter`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
from flax import nnx
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src.core import dot_general as qwix_dot_general
from qwix._src.core import einsum as qwix_einsum
from qwix._src.providers import lora as qwix_lora
from qwix._src.providers import ptq as qwix_ptq
from qwix._src.utils import flax_util

from ift_jax import double_quant
from ift_jax import param_trees as trees
from ift_jax.param_trees import PeftError

Array = jax.Array
PyTree = Any

LORA_LEAVES = ("kernel_lora_a", "kernel_lora_b")
MAGNITUDE_LEAF = "kernel_lora_magnitude"  # DoRA's m.

# HF PEFT's T5 default (`q`, `v`), cross-attention included.
DEFAULT_LORA_TARGETS = r".*/(attention|self_attention|encoder_decoder_attention)/(query|value)"
# `all`: every linear layer of the blocks (PEFT's "all-linear": not the logits).
TARGET_PRESETS = {
    "qv": DEFAULT_LORA_TARGETS,
    "all": (r".*/(attention|self_attention|encoder_decoder_attention)/(query|key|value|out)"
            r"|.*/mlp/(wi|wi_0|wi_1|wo)"),
}

# Model methods qwix must wrap: training calls `__call__`, decoding `encode`/`decode`.
_INTERCEPTED_METHODS = ("__call__", "encode", "decode")
_HIGHEST = jax.lax.Precision.HIGHEST


def target_regex(spec: str) -> str:
    """`lora_targets` as given in a config: empty or a preset name, or a regex."""
    return TARGET_PRESETS.get(spec or "qv", spec)


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Rule(qwix.LoraRule):
    """qwix's rule with DoRA; `alpha / rank` is the scale actually applied."""

    dora: bool = False


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
      double_quant: QLoRA's scales stored in 8 bits (`ift_jax.double_quant`).
      use_rslora: scale `alpha / sqrt(rank)` instead (PEFT's `use_rslora`).
      use_dora: DoRA's magnitude and direction (PEFT's `use_dora`).
    """

    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    target_regex: str = DEFAULT_LORA_TARGETS
    quantize: bool = False
    weight_qtype: str = "nf4"
    tile_size: int = 64
    double_quant: bool = False
    use_rslora: bool = False
    use_dora: bool = False

    def __post_init__(self):
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise PeftError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1; got "
                            f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}")
        if self.use_dora and self.quantize:
            raise PeftError("DoRA on QLoRA's NF4 kernels is not implemented; use method "
                            "'lora' with lora_use_dora, or 'qlora' without it")
        if self.double_quant and not self.quantize:
            raise PeftError("double quantization is of QLoRA's NF4 scales; use method 'qlora' "
                            "(quantize=True) or leave qlora_double_quant off")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def rule(self, for_eval: bool = False) -> qwix.LoraRule:
        # qwix scales by alpha / rank: give it the alpha that makes that our scale.
        return _Rule(
            module_path=self.target_regex, rank=self.rank, alpha=self.scale * self.rank,
            dropout=0.0 if for_eval else self.dropout,
            weight_qtype=self.weight_qtype if self.quantize else None,
            tile_size=self.tile_size if self.quantize else None,
            lora_a_initializer=lora_a_init, lora_b_initializer=lora_b_init,
            dora=self.use_dora)


# ----------------------------------------------------------------------------
# The provider: qwix's LoRA plus DoRA and per-row adapters.


def _kernel_matrix(rhs: Array, rhs_ca: Sequence[int], rhs_ra: Sequence[int]) -> Array:
    """The kernel as `[in, out]`, both flattened in qwix's (A's and B's) order."""
    kernel = jnp.transpose(rhs, tuple(rhs_ca) + tuple(rhs_ra))
    n_in = math.prod(rhs.shape[i] for i in rhs_ca)
    return kernel.reshape(n_in, -1)


def dora_norm(kernel_IxO: Array, lora_a: Array, lora_b: Array, scale: float) -> Array:
    """`||W + scale * A @ B||` per output unit (over the inputs), in fp32."""
    w = kernel_IxO.astype(jnp.float32) + scale * jnp.matmul(
        lora_a.astype(jnp.float32), lora_b.astype(jnp.float32), precision=_HIGHEST)
    return jnp.linalg.norm(w, axis=0)


def _dot_general(lhs, rhs, dimension_numbers, **kwargs) -> Array:
    return qwix_dot_general.dot_general(lhs, double_quant.expanded(rhs), dimension_numbers,
                                        **kwargs)


def _einsum(einsum_str, lhs, rhs, **kwargs) -> Array:
    return qwix_einsum.einsum(einsum_str, lhs, double_quant.expanded(rhs), **kwargs)


class _LoraProvider(qwix.LoraProvider):
    """See the module docstring: per-row A/B, DoRA and double quantization; the rest is qwix's."""

    def __init__(self, rules, *, double_quant_scales: bool = False):
        super().__init__(rules)
        if double_quant_scales:
            # qwix's PtqProvider hooks (its constructor takes them; LoraProvider's does not):
            # weights quantized with 8-bit scales, expanded again inside the matmul.
            self._qarray_module = double_quant.DOUBLE_QUANT_ARRAYS
            self._dot_general_fn, self._einsum_fn = _dot_general, _einsum

    def dot_general(self, lhs, rhs, dimension_numbers, precision=None,
                    preferred_element_type=None, out_sharding=None):
        rule, _ = self._get_current_rule_and_op_id("dot_general", only_rule=True)
        name = flax_util.find_param(rhs, qwix_ptq.WithAux) if isinstance(rule, _Rule) else None
        module = flax_util.get_current_module()
        lora_a = module.get_variable("params", name + "_lora_a") if name else None
        per_row = lora_a is not None and flax_util.unbox(lora_a).ndim == 3
        if not (per_row or (name and rule.dora)):
            return super().dot_general(lhs, rhs, dimension_numbers, precision,
                                       preferred_element_type, out_sharding=out_sharding)
        res = qwix_ptq.PtqProvider.dot_general(self, lhs, rhs, dimension_numbers, precision,
                                               preferred_element_type, out_sharding=out_sharding)
        (lhs_ca, rhs_ca), (lhs_ba, rhs_ba) = dimension_numbers
        if lhs_ba or rhs_ba:
            raise PeftError(f"{name}: per-row LoRA and DoRA need a projection without batch "
                            f"dimensions")
        rhs_ra = tuple(i for i in range(rhs.ndim) if i not in rhs_ca)
        if per_row:
            return res + self._per_row_delta(lhs, lhs_ca, module, name, rhs, rhs_ra, res)
        return self._dora(lhs, rhs, res, rule, name, dimension_numbers, rhs_ra, precision)

    def _per_row_delta(self, lhs, lhs_ca, module, name, rhs, rhs_ra, res) -> Array:
        lora_a = flax_util.unbox(module.get_variable("params", name + "_lora_a"))
        lora_b = flax_util.unbox(module.get_variable("params", name + "_lora_b"))
        rows = lora_a.shape[0]
        free = tuple(i for i in range(lhs.ndim) if i not in lhs_ca)
        x = jnp.transpose(lhs, free + tuple(lhs_ca)).reshape(rows, -1, lora_a.shape[1])
        h = jnp.einsum("bni,bir->bnr", x, lora_a.astype(x.dtype))
        delta = jnp.einsum("bnr,bro->bno", h, lora_b.astype(x.dtype))
        return delta.reshape(res.shape).astype(res.dtype)

    def _dora(self, lhs, rhs, res, rule, name, dimension_numbers, rhs_ra, precision) -> Array:
        (lhs_ca, rhs_ca), _ = dimension_numbers
        contract = tuple(rhs.shape[i] for i in rhs_ca)
        remain = tuple(rhs.shape[i] for i in rhs_ra)
        lora_a, lora_b = qwix_lora._get_or_create_lora_params(  # noqa: SLF001 (qwix's own)
            name=name, rule=rule, a_shape=(math.prod(contract), rule.rank),
            b_shape=(rule.rank, math.prod(remain)),
            a_sharding_transpose=(rhs_ca[0], None), b_sharding_transpose=(None, rhs_ra[0]))
        scale = rule.alpha / rule.rank
        kernel = _kernel_matrix(rhs, rhs_ca, rhs_ra)
        magnitude = _get_or_create_magnitude(name, kernel, lora_a, lora_b, scale, rhs_ra[0])
        norm = jax.lax.stop_gradient(dora_norm(kernel, lora_a, lora_b, scale))
        factor = (magnitude.astype(jnp.float32) / norm).reshape(remain).astype(res.dtype)
        x, base = lhs, res
        if rule.dropout > 0:  # PEFT: the DoRA terms see the dropped-out input.
            x = nnx.Dropout(rule.dropout, deterministic=False)(
                lhs, rngs=flax_util.make_rng("dropout"))
            base = jax.lax.dot_general(x, rhs, dimension_numbers, precision=precision)
        lora_out = qwix_lora._compute_lora_delta(  # noqa: SLF001
            x, lora_a, lora_b, lhs_ca, (), contract, (), remain, rule.rank, precision=precision)
        return res + ((factor - 1) * base + factor * lora_out * scale)


def _get_or_create_magnitude(name: str, kernel_IxO: Array, lora_a: Array, lora_b: Array,
                             scale: float, out_axis: int) -> Array:
    module = flax_util.get_current_module()
    existing = module.get_variable("params", name + "_lora_magnitude")
    if existing is not None:
        return flax_util.unbox(existing)
    boxed = module.get_variable("params", name)

    def init(_):
        value = dora_norm(kernel_IxO, lora_a, lora_b, scale).astype(kernel_IxO.dtype)
        return flax_util.update_boxed(boxed, value=value, transpose=(out_axis,))
    return flax_util.get_or_create_param(name + "_lora_magnitude", init, need_rng=True)


# ----------------------------------------------------------------------------
# Building, targets and merging.


def kernel_module_paths(model: nn.Module) -> list[str]:
    """Paths of the modules of `model` that own a `kernel` (what LoRA can target)."""
    flat = trees.flatten(trees.abstract_params(model))
    return sorted({trees.path(k[:-1]) for k in flat if k[-1] == "kernel"})


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
            f"fullmatched against module paths); modules with a kernel: {trees.listing(paths)}")
    return targets


def apply_lora(model: nn.Module, cfg: LoraConfig, *, for_eval: bool = False) -> nn.Module:
    """`model` with LoRA (or QLoRA, DoRA) adapters on the kernels `cfg.target_regex` matches.

    The result is a linen module with the same call signature; its `init`
    also creates `kernel_lora_a [in, rank]` and `kernel_lora_b [rank, out]`
    (inputs/outputs flattened, e.g. `[rank, heads * kv]` for a query kernel),
    and with DoRA `kernel_lora_magnitude [out]`.

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
    provider = _LoraProvider([cfg.rule(for_eval)], double_quant_scales=cfg.double_quant)
    methods = [m for m in _INTERCEPTED_METHODS if hasattr(type(model), m)]
    return qwix.apply_lora_to_model(model, provider, methods=methods)


def _dequantize(leaf: Any) -> Array:
    if not trees.is_quantized(leaf):
        return leaf
    return qwix.dequantize(double_quant.expanded(leaf.array))


def merged_kernel(kernel: Array, lora_a: Array, lora_b: Array, cfg: LoraConfig,
                  magnitude: Optional[Array] = None) -> Array:
    """`W + scale * A @ B`, and with DoRA that times `m / ||W + scale * A @ B||`."""
    n_in = lora_a.shape[0]
    w = jnp.asarray(kernel, jnp.float32).reshape(n_in, -1)
    merged = w + cfg.scale * jnp.matmul(lora_a.astype(jnp.float32),
                                        lora_b.astype(jnp.float32), precision=_HIGHEST)
    if magnitude is not None:
        merged = merged * (magnitude.astype(jnp.float32) / jnp.linalg.norm(merged, axis=0))
    return merged.reshape(kernel.shape).astype(kernel.dtype)


def merge_lora(params: PyTree, cfg: LoraConfig) -> dict:
    """Plain params for the model without LoRA: kernels merged, A, B (and m) dropped.

    Other params (a prompt, IA3 scales, ...) are kept as they are. QLoRA
    kernels are dequantized first, so the result is the function the QLoRA
    model computes (in float), not the original full-precision weights.
    """
    flat = trees.flatten(trees.unbox(params))
    merged = {}
    for key, leaf in flat.items():
        if key[-1] in LORA_LEAVES + (MAGNITUDE_LEAF,):
            continue
        leaf = _dequantize(leaf)
        lora_a = flat.get(key[:-1] + ("kernel_lora_a",)) if key[-1] == "kernel" else None
        if lora_a is not None:
            if lora_a.shape[-1] != cfg.rank:
                raise PeftError(f"{trees.path(key[:-1])}: kernel_lora_a has rank "
                                f"{lora_a.shape[-1]}, LoraConfig.rank is {cfg.rank}")
            leaf = merged_kernel(leaf, lora_a, flat[key[:-1] + ("kernel_lora_b",)], cfg,
                                 flat.get(key[:-1] + (MAGNITUDE_LEAF,)))
        merged[key] = leaf
    return trees.unflatten(merged)


# ----------------------------------------------------------------------------
# Weighted combinations (HF PEFT's `add_weighted_adapter`).

COMBINATIONS = ("cat", "linear", "svd")


def _factors(adapters, key) -> list[tuple[int, Optional[np.ndarray], Optional[np.ndarray]]]:
    """Per adapter: (rank, A, B) of module `key`, A and B None where it is not targeted."""
    out = []
    for cfg, flat in adapters:
        a, b = flat.get(key + ("kernel_lora_a",)), flat.get(key + ("kernel_lora_b",))
        out.append((cfg.rank, None if a is None else np.asarray(a, np.float64),
                    None if b is None else np.asarray(b, np.float64)))
    return out


def combine(adapters: Sequence[tuple[LoraConfig, PyTree]], weights: Sequence[float],
            combination: str = "cat", svd_rank: Optional[int] = None
            ) -> tuple[LoraConfig, dict]:
    """One LoRA adapter from several: HF PEFT's `add_weighted_adapter`.

    Args:
      adapters: `(LoraConfig, params)` pairs; params hold (at least) their
        `kernel_lora_a` / `kernel_lora_b` leaves.
      weights: one per adapter (negative ones subtract).
      combination: `cat`: the exact weighted sum of the deltas
        `sum_i w_i * scale_i * A_i @ B_i`, rank `sum r_i` (A and B stacked);
        `svd`: that sum truncated to `svd_rank` (default the largest rank) by
        an SVD; `linear`: PEFT's cheap mix of the factors (equal ranks only),
        `A = sum sign_i sqrt|w_i s_i| A_i`, `B = sum sqrt|w_i s_i| B_i`, which
        is not the weighted sum of the deltas.

    Returns:
      `(LoraConfig, params)`: targets the union of the modules, scale 1
      (alpha = rank, as PEFT), dropout of the first adapter.
    """
    if combination not in COMBINATIONS:
        raise PeftError(f"combination {combination!r}; choose one of {COMBINATIONS}")
    if len(adapters) != len(weights) or not adapters:
        raise PeftError(f"{len(adapters)} adapters and {len(weights)} weights; give one "
                        f"weight per adapter")
    dora = [i for i, (cfg, _) in enumerate(adapters) if cfg.use_dora]
    if dora:
        raise PeftError(f"adapters {dora} use DoRA, whose magnitudes rescale each kernel and "
                        f"do not combine linearly")
    ranks = [cfg.rank for cfg, _ in adapters]
    if combination == "linear" and len(set(ranks)) > 1:
        raise PeftError(f"combination 'linear' needs equal ranks; got {ranks} (use 'cat')")
    flats = [(cfg, trees.flatten(trees.unbox(p))) for cfg, p in adapters]
    modules = sorted({k[:-1] for _, f in flats for k in f if k[-1] == "kernel_lora_a"})
    new_rank = {"cat": sum(ranks), "linear": ranks[0], "svd": svd_rank or max(ranks)}[
        combination]
    out = {}
    for key in modules:
        factors = _factors(flats, key)
        scaled = [(w * cfg.scale, r, a, b) for w, (cfg, _), (r, a, b)
                  in zip(weights, adapters, factors)]
        a, b = {"cat": _cat, "linear": _linear, "svd": _svd}[combination](scaled, new_rank)
        out[key + ("kernel_lora_a",)] = jnp.asarray(a, jnp.float32)
        out[key + ("kernel_lora_b",)] = jnp.asarray(b, jnp.float32)
    first = adapters[0][0]
    cfg = LoraConfig(rank=new_rank, alpha=float(new_rank), dropout=first.dropout,
                     target_regex="|".join(re.escape(trees.path(k)) for k in modules))
    return cfg, trees.unflatten(out)


def _shapes(scaled) -> tuple[int, int]:
    a, b = next((a, b) for _, _, a, b in scaled if a is not None)
    return a.shape[0], b.shape[1]


def _cat(scaled, new_rank):
    n_in, n_out = _shapes(scaled)
    a_parts = [ws * a if a is not None else np.zeros((n_in, r)) for ws, r, a, _ in scaled]
    b_parts = [b if b is not None else np.zeros((r, n_out)) for _, r, _, b in scaled]
    return np.concatenate(a_parts, axis=1), np.concatenate(b_parts, axis=0)


def _linear(scaled, new_rank):
    n_in, n_out = _shapes(scaled)
    a, b = np.zeros((n_in, new_rank)), np.zeros((new_rank, n_out))
    for ws, _, a_i, b_i in scaled:
        if a_i is not None:
            a = a + math.copysign(math.sqrt(abs(ws)), ws) * a_i
            b = b + math.sqrt(abs(ws)) * b_i
    return a, b


def _svd(scaled, new_rank):
    n_in, n_out = _shapes(scaled)
    delta = sum(ws * (a_i @ b_i) for ws, _, a_i, b_i in scaled if a_i is not None)
    # PEFT decomposes its [out, in] delta: B = U S, A = Vh, keeping new_rank values.
    u, s, vh = np.linalg.svd(delta.T, full_matrices=False)
    u, s, vh = u[:, :new_rank], s[:new_rank], vh[:new_rank]
    pad = new_rank - len(s)  # A rank above min(in, out): zero columns, as PEFT's full SVD.
    a, b = vh.T, (u * s).T
    return np.pad(a, ((0, 0), (0, pad))), np.pad(b, ((0, pad), (0, 0)))
