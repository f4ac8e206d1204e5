"""Many adapters on one base, one batch: per-row LoRA A/B and soft prompts.

S-LoRA / Punica's idea for T5: the base weights are shared by every row, and
each row's adapter is gathered for it, instead of decoding the rows of each
adapter in turn. An `AdapterBank` stacks N adapters (index 0 is "no
adapter": zeros) so that a batch's params are one gather by row ids:

- LoRA: per targeted projection, `A [N+1, in, r_max]` and `B [N+1, r_max,
  out]`, each adapter's A/B padded with zeros to the largest rank and its B
  multiplied by its scale (rsLoRA included); a projection an adapter does not
  target holds zeros for it. The union model (`ift_jax.lora`'s per-row case)
  then adds `x_row @ A[row] @ B[row]`: exactly the adapter's own update.
- Soft prompts: `[N+1, P_max, d_model]` and each adapter's length; a row
  keeps its first `length` positions, masked beyond, with its tokens starting
  right after them (`additions.prepend_prompt`), as the prompt alone does.

Rows of one batch may mix LoRA adapters, prompts, both, and the base model.
Methods that change the base weights of a row (DoRA's per-kernel rescaling,
IA3, adapters, prefixes, `modules_to_save`) are refused: serve them alone or
merged (`peft_formats.save_merged`).

Typical use (what `ift-jax predict --adapter=NAME=DIR` wires)::

    bank = serving.AdapterBank.build(config, base, {name: peft_formats.load_peft(d, config)
                                                    for name, d in adapters.items()})
    tokens = serving.greedy(bank, encoder_tokens, ["a", "b", None, "a"], max_decode_length=64)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ift_jax import decoding, peft
from ift_jax.models import t5
from ift_jax.param_trees import PeftError

Array = jax.Array
_SERVABLE = ("lora", "qlora", "prompt")


@dataclasses.dataclass(frozen=True)
class _Stacks:
    """Row 0 is the base model; row i + 1 is adapter i."""

    lora: dict  # {module path: (A [N+1, in, r], B [N+1, r, out])}
    prompt: Optional[tuple[Array, Array]]  # ([N+1, P, d_model], lengths [N+1])


def _refusal(name: str, adapter: Any) -> Optional[str]:
    method = adapter.method
    if method.name not in _SERVABLE or method.ia3 or method.prefix or method.adapter:
        return f"its method {method.name!r} changes the layers of the model"
    if method.lora is not None and method.lora.use_dora:
        return "DoRA rescales every adapted kernel per output unit"
    if traverse_util.flatten_dict(adapter.modules_to_save):
        return "it replaces base weights (modules_to_save)"
    return None


def _lora_stacks(adapters: Sequence[Any]) -> tuple[dict, int, list]:
    loras = [(a.method.lora, traverse_util.flatten_dict(a.params)) if a.method.lora else None
             for a in adapters]
    modules = sorted({k[:-1] for x in loras if x for k in x[1] if k[-1] == "kernel_lora_a"})
    rank = max([cfg.rank for x in loras if x for cfg in (x[0],)], default=0)
    stacks = {}
    for module in modules:
        shapes = next(np.shape(f[module + ("kernel_lora_a",)]) + np.shape(
            f[module + ("kernel_lora_b",)])[1:] for x in loras if x for f in (x[1],)
            if module + ("kernel_lora_a",) in f)
        a_stack = np.zeros((len(adapters) + 1, shapes[0], rank), np.float32)
        b_stack = np.zeros((len(adapters) + 1, rank, shapes[2]), np.float32)
        for i, x in enumerate(loras, start=1):
            if x and module + ("kernel_lora_a",) in x[1]:
                cfg, flat = x
                a_stack[i, :, :cfg.rank] = np.asarray(flat[module + ("kernel_lora_a",)])
                b_stack[i, :cfg.rank] = cfg.scale * np.asarray(flat[module + ("kernel_lora_b",)])
        stacks[module] = (jnp.asarray(a_stack), jnp.asarray(b_stack))
    return stacks, rank, modules


def _prompt_stack(adapters: Sequence[Any], d_model: int) -> Optional[tuple[Array, Array]]:
    prompts = [np.asarray(traverse_util.flatten_dict(a.params)[peft.PROMPT_PATH])
               if a.method.prompt else None for a in adapters]
    longest = max((p.shape[0] for p in prompts if p is not None), default=0)
    if not longest:
        return None
    table = np.zeros((len(adapters) + 1, longest, d_model), np.float32)
    lengths = np.zeros((len(adapters) + 1,), np.int32)
    for i, p in enumerate(prompts, start=1):
        if p is not None:
            table[i, :p.shape[0]], lengths[i] = p, p.shape[0]
    return jnp.asarray(table), jnp.asarray(lengths)


@dataclasses.dataclass(frozen=True)
class AdapterBank:
    """N named adapters stacked for per-row gathers, and the one model serving them all.

    Attributes:
      model: the union model (LoRA on every projection any adapter targets,
        prompt slots for the longest prompt); built for eval.
      base: the base params (jax arrays), shared by every row.
      names: the adapters' names; a row names one of them or None (the base).
    """

    config: t5.T5Config
    model: nn.Module
    base: dict
    names: tuple[str, ...]
    stacks: _Stacks

    @classmethod
    def build(cls, config: t5.T5Config, base_params: Any,
              adapters: Mapping[str, Any]) -> "AdapterBank":
        """Stacks `adapters` ({name: `peft_formats.LoadedAdapter`}, or anything with
        `.method`, `.params` and `.modules_to_save`) over `base_params`.

        Raises:
          PeftError: an adapter that cannot share a batch, named with the reason.
        """
        for name, adapter in adapters.items():
            reason = _refusal(name, adapter)
            if reason:
                raise PeftError(f"adapter {name!r} cannot be served in a mixed batch: {reason};"
                                f" serve it alone or merged")
        ordered = list(adapters.values())
        lora_stacks, rank, modules = _lora_stacks(ordered)
        prompt = _prompt_stack(ordered, config.d_model)
        model = t5.Transformer(config, prompt_length=0 if prompt is None else
                               prompt[0].shape[1])
        if modules:  # Scale 1: each adapter's scale is in its stacked B.
            cfg = peft.LoraConfig(rank=rank, alpha=float(rank), target_regex="|".join(
                re.escape("/".join(m)) for m in modules))
            model = peft.apply_lora(model, cfg, for_eval=True)
        base = jax.tree.map(jnp.asarray, base_params)
        return cls(config, model, base, tuple(adapters), _Stacks(lora_stacks, prompt))

    def row_ids(self, adapter_names: Sequence[Optional[str]]) -> np.ndarray:
        """Stack row of each name (0 for None, the base model)."""
        index = {name: i for i, name in enumerate(self.names, start=1)}
        unknown = sorted({n for n in adapter_names if n is not None and n not in index})
        if unknown:
            raise PeftError(f"unknown adapter(s) {', '.join(map(repr, unknown))}; known: "
                            f"{', '.join(self.names) or 'none'}")
        return np.asarray([0 if n is None else index[n] for n in adapter_names], np.int32)

    def row_params(self, adapter_names: Sequence[Optional[str]]) -> dict:
        """The union model's params for a batch whose row r uses `adapter_names[r]`."""
        return _gather(self.base, self.stacks, jnp.asarray(self.row_ids(adapter_names)))


@jax.jit
def _gather(base: dict, stacks: _Stacks, ids: Array) -> dict:
    flat = dict(traverse_util.flatten_dict(base))
    for module, (a_stack, b_stack) in stacks.lora.items():
        flat[module + ("kernel_lora_a",)] = a_stack[ids]
        flat[module + ("kernel_lora_b",)] = b_stack[ids]
    if stacks.prompt is not None:
        table, lengths = stacks.prompt
        flat[("prompt", "embedding")], flat[("prompt", "length")] = table[ids], lengths[ids]
    return traverse_util.unflatten_dict(flat)


jax.tree_util.register_dataclass(_Stacks, data_fields=["lora", "prompt"], meta_fields=[])


def greedy(bank: AdapterBank, encoder_input_tokens: Any,
           adapter_names: Sequence[Optional[str]], *, max_decode_length: int,
           eos_id: int = 1) -> np.ndarray:
    """Greedy tokens `[batch, max_decode_length]`, row r decoded with `adapter_names[r]`.

    One batch, one compiled decode (`decoding.greedy`) whatever the mix of
    adapters: the rows' A, B and prompts are gathered, not looped over.
    """
    tokens = jnp.asarray(encoder_input_tokens)
    if len(adapter_names) != tokens.shape[0]:
        raise PeftError(f"{len(adapter_names)} adapter names for {tokens.shape[0]} rows")
    params = bank.row_params(adapter_names)
    out, _ = decoding.greedy(bank.model, params, tokens, max_decode_length=max_decode_length,
                             eos_id=eos_id)
    return np.asarray(out)

