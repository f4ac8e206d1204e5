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

Typical use::

    bank = serving.AdapterBank.build(config, base, {name: peft_formats.load_peft(d, config)
                                                    for name, d in adapters.items()})
    tokens = serving.greedy(bank, encoder_tokens, ["a", "b", None, "a"], max_decode_length=64)

`ift-jax predict --init_from=BASE --adapter=NAME=DIR ... --input=FILE` is
`parse_adapters` + `row_check` (for `input_rows.read_rows`) + `predict_rows`:
each row's optional `adapter` field names its adapter, and the rows are
decoded in input order, `eval.batch_size` rows per batch, whatever their mix.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from ift_jax import decoding, errors, evaluation, model_setup, peft, peft_formats, progress, runs
from ift_jax.data import vocabularies
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



# ----------------------------------------------------------------------------
# `ift-jax predict --init_from=BASE --adapter=NAME=DIR ...`.


def parse_adapters(specs: Sequence[str]) -> dict[str, str]:
    """`{name: dir}` of `--adapter=NAME=DIR` flags, in their order.

    Raises:
      ConfigError: a flag without `NAME=` or a name given twice.
    """
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path:
            raise errors.ConfigError(f"--adapter={spec}: give NAME=DIR, e.g. "
                                     f"--adapter=summarize=adapters/summarize")
        if name in adapters:
            raise errors.ConfigError(f"--adapter name {name!r} is given twice "
                                     f"({adapters[name]} and {path}); names must be unique")
        adapters[name] = path
    return adapters


def row_check(names: Sequence[str]) -> Callable[[dict], Optional[str]]:
    """For `input_rows.read_rows(check=...)`: a row's `adapter` must be one of `names`,
    or absent / null (the base model)."""
    known = ", ".join(names) or "none (add --adapter=NAME=DIR)"

    def check(row: dict) -> Optional[str]:
        name = row.get("adapter")
        if name is None or (isinstance(name, str) and name in names):
            return None
        if not isinstance(name, str):
            return f"'adapter' must be an --adapter NAME (a string), not {json.dumps(name)}"
        return (f"unknown adapter {name!r}; known: {known} (leave 'adapter' out for the "
                f"base model)")
    return check


def load_bank(init_from: str, adapter_dirs: Mapping[str, str]) -> AdapterBank:
    """The base of `init_from` (`runs.load_base`) and the HF PEFT adapters in `adapter_dirs`,
    stacked.

    Raises:
      CheckpointError: an adapter directory that does not fit the base, naming the
        adapter, the tensor and both shapes.
      PeftError: an adapter whose method cannot share a batch (see `AdapterBank.build`).
    """
    config, base = runs.load_base(init_from)
    loaded = {}
    for name, path in adapter_dirs.items():
        try:
            loaded[name] = peft_formats.load_peft(path, config)
        except errors.CheckpointError as e:
            raise type(e)(f"--adapter={name}={path}: {e}") from None
    return AdapterBank.build(config, base, loaded)


def decode_rows(bank: AdapterBank, tokens: Sequence[Sequence[int]],
                adapter_names: Sequence[Optional[str]], *, batch_size: int,
                max_decode_length: int, eos_id: int = 1) -> list[np.ndarray]:
    """Greedy tokens of each row of `tokens` with its adapter, `batch_size` rows (of any
    adapters) per batch, in order; every batch padded to one shape (one program)."""
    width, size = max(len(t) for t in tokens), min(batch_size, len(tokens))
    outputs = []
    for start in progress.track(range(0, len(tokens), size), desc="predict batches",
                                unit="batch"):
        batch = np.zeros((size, width), np.int32)
        for i, ids in enumerate(tokens[start:start + size]):
            batch[i, :len(ids)] = ids
        names = list(adapter_names[start:start + size])
        out = greedy(bank, batch, names + [None] * (size - len(names)),
                     max_decode_length=max_decode_length, eos_id=eos_id)
        outputs += list(out[:len(names)])
    return outputs


def predict_rows(config: ml_collections.ConfigDict, adapter_dirs: Mapping[str, str],
                 rows: Sequence[dict], *, max_decode_length: Optional[int] = None
                 ) -> list[dict]:
    """`rows` with a greedy `prediction`, row r decoded with the adapter its `adapter`
    field names (absent: the base model `config.init_from`).

    Inputs are tokenized with the config's vocabulary (`model_setup.vocabulary_spec`)
    and cut to `data.inputs_length`; rows go `eval.batch_size` at a time, all padded to
    one shape, so one program decodes them all (one device).
    """
    vocab = vocabularies.make_vocabulary(model_setup.vocabulary_spec(config))
    bank = load_bank(config.init_from, adapter_dirs)
    length = config.data.inputs_length
    outputs = decode_rows(bank, [vocab.encode(r["inputs"])[:length - 1] + [vocab.eos_id]
                                 for r in rows], [r.get("adapter") for r in rows],
                          batch_size=config.eval.batch_size, eos_id=vocab.eos_id,
                          max_decode_length=max_decode_length or config.eval.max_decode_length)
    predicted = []
    for row, output in zip(rows, outputs):
        text, bad = evaluation.decode_tokens(vocab, output)
        predicted.append({**row, "prediction": text.strip(),
                          **({"invalid_utf8": True} if bad else {})})
    return predicted
