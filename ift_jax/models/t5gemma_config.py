"""T5Gemma / T5Gemma 2 architectures: `StackConfig`, `T5GemmaConfig` and the published sizes.

The model they describe is `ift_jax.models.t5gemma`; `ift_jax.models.t5gemma_hf`
reads and writes them as HF config.json files.

Sizes (`PRESETS`), with where each number comes from (docs/t5gemma.md has the
parameter counts they were checked against):

- T5Gemma (`t5gemma-{s,b,l,ml,xl,2b,9b}-...`): the Gemma 2 stacks of
  google-deepmind/gemma's `gemma/research/t5gemma/config.py` (Google's own
  T5Gemma code): width, MLP, layers, heads, head_dim, KV heads, window 4096,
  caps 50 / 30, `query_pre_attn_scalar = head_dim`; vocabulary 256,000 (the HF
  checkpoints' size, which makes every count equal keras-hub's published one).
- T5Gemma 2 (`t5gemma2-{270m,1b,4b}-...`): 270M-270M from a printed
  `google/t5gemma-2-270m-270m` config.json (window 512, rope 10k local and 1M
  global with linear factor 8, vocabulary 262,144, end-of-image 256,000);
  1B and 4B take their stacks from the Gemma 3 1B / 4B configs of
  google-deepmind/gemma (`gemma/gm/nn/_gemma.py`: windows 512 / 1024) and the
  rest from the 270M file, as no published T5Gemma 2 1B / 4B config.json
  could be read here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

from ift_jax import errors
from ift_jax.models import layers
from ift_jax.models.gemma_layers import Rope

DType = Any

SLIDING, FULL = "sliding_attention", "full_attention"
VARIANTS = ("t5gemma", "t5gemma2")


def layer_pattern(num_layers: int, period: int) -> tuple[str, ...]:
    """HF's default `layer_types`: every `period`-th layer global, the others sliding."""
    return tuple(FULL if (i + 1) % period == 0 else SLIDING for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """One stack (encoder or decoder), as HF's per-stack config describes it.

    Attributes:
      layer_types: `sliding_attention` / `full_attention` per layer.
      sliding_window: the local layers' window (HF's convention per variant:
        see `T5GemmaConfig.window_bounds`).
      rope_local, rope_global: rotary embeddings of sliding and full layers.
    """

    d_model: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: Optional[int] = 4096
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: Optional[float] = 50.0
    rope_local: Rope = Rope()
    rope_global: Rope = Rope()
    rms_norm_eps: float = 1e-6
    activation: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        problems = []
        if len(self.layer_types) != self.num_layers:
            problems.append(f"{len(self.layer_types)} layer_types for {self.num_layers} layers")
        if set(self.layer_types) - {SLIDING, FULL}:
            problems.append(f"layer_types must be {SLIDING!r} or {FULL!r}")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                            f"{self.num_kv_heads}")
        if SLIDING in self.layer_types and not self.sliding_window:
            problems.append("sliding layers need a sliding_window")
        if self.activation not in layers.ACTIVATIONS:
            problems.append(f"activation {self.activation!r} is not one of "
                            f"{sorted(layers.ACTIVATIONS)}")
        if problems:
            raise errors.ConfigError(f"T5Gemma stack config: {'; '.join(problems)}")

    def replace(self, **changes) -> "StackConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class T5GemmaConfig:
    """Architecture of a T5Gemma (`variant="t5gemma"`) or T5Gemma 2 text model.

    Attributes:
      final_logit_softcapping: `tanh(logits / c) * c`; None: off.
      eoi_token_id: T5Gemma 2's end-of-image token (its own embedding).
      decoder_start_token_id: what a 0 at decoder position 0 stands for.
      dropout_rate: on embeddings, sublayer outputs, MLP hidden and the final
        norm's output (HF's `dropout_rate`); attention_dropout_rate: on the
        attention weights.
      dtype, param_dtype, remat, scan_layers: as `t5.T5Config`'s.
    """

    encoder: StackConfig
    decoder: StackConfig
    variant: str = "t5gemma"
    vocab_size: int = 256000
    final_logit_softcapping: Optional[float] = 30.0
    tie_word_embeddings: bool = True
    eoi_token_id: Optional[int] = None
    decoder_start_token_id: int = 2
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    initializer_range: float = 0.02
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise errors.ConfigError(f"T5Gemma variant {self.variant!r}; use one of {VARIANTS}")
        if self.merged_attention and self.encoder.d_model != self.decoder.d_model:
            raise errors.ConfigError(
                f"t5gemma2 shares one embedding: encoder d_model {self.encoder.d_model} must "
                f"equal decoder d_model {self.decoder.d_model}")
        layers.remat_policy(self.remat)  # Validates remat early.

    @property
    def merged_attention(self) -> bool:
        """T5Gemma 2: shared embeddings, q/k norms, merged decoder attention."""
        return self.variant == "t5gemma2"

    def attention_softcap(self, stack: StackConfig) -> Optional[float]:
        # transformers' T5Gemma 2 attention never passes its softcap on.
        return None if self.merged_attention else stack.attn_logit_softcapping

    def window_bounds(self, stack: StackConfig, causal: bool) -> tuple[int, int]:
        """`(lo, hi)`: a sliding layer's query at q sees keys k with `lo <= q - k <= hi`.

        transformers: causal `q - W < k <= q`; T5Gemma's encoder `|q - k| <= W`;
        T5Gemma 2's encoder `(W + 1) // 2` keys back (itself included) and
        `W // 2` ahead.
        """
        w = stack.sliding_window
        if causal:
            return 0, w - 1
        if self.merged_attention:
            return -(w // 2), (w + 1) // 2 - 1
        return -w, w

    def replace(self, **changes) -> "T5GemmaConfig":
        return dataclasses.replace(self, **changes)


def _gemma2_stack(d_model, d_ff, num_layers, num_heads, head_dim, num_kv_heads) -> StackConfig:
    """A Gemma 2 block stack as google-deepmind/gemma's `research/t5gemma/config.py`
    builds it: local/global alternating, window 4096, logit cap 50, 1/sqrt(head_dim)."""
    return StackConfig(d_model, d_ff, num_layers, num_heads, num_kv_heads, head_dim,
                       layer_pattern(num_layers, 2), sliding_window=4096,
                       query_pre_attn_scalar=head_dim, attn_logit_softcapping=50.0)


def _gemma3_stack(d_model, d_ff, num_layers, num_heads, num_kv_heads, window) -> StackConfig:
    """A Gemma 3 block stack as T5Gemma 2 configures it (5 local : 1 global, head_dim
    256, rope 10k local and 1M global scaled by 8; see docs/t5gemma.md for sources)."""
    return StackConfig(d_model, d_ff, num_layers, num_heads, num_kv_heads, 256,
                       layer_pattern(num_layers, 6), sliding_window=window,
                       query_pre_attn_scalar=256, attn_logit_softcapping=None,
                       rope_local=Rope(10_000.0), rope_global=Rope(1_000_000.0, 8.0))


_G2 = {"s": (512, 1024, 8, 8, 64, 8), "b": (768, 2048, 12, 12, 64, 12),
       "l": (1024, 2816, 24, 16, 64, 16), "ml": (1152, 6912, 26, 4, 256, 4),
       "xl": (2048, 5120, 24, 32, 64, 32), "2b": (2304, 9216, 26, 8, 256, 4),
       "9b": (3584, 14336, 42, 16, 256, 8)}
_G3 = {"270m": (640, 2048, 18, 4, 1, 512), "1b": (1152, 6912, 26, 4, 1, 512),
       "4b": (2560, 10240, 34, 8, 4, 1024)}


def _t5gemma(encoder: str, decoder: str) -> T5GemmaConfig:
    return T5GemmaConfig(_gemma2_stack(*_G2[encoder]), _gemma2_stack(*_G2[decoder]))


def _t5gemma2(size: str) -> T5GemmaConfig:
    stack = _gemma3_stack(*_G3[size])
    return T5GemmaConfig(stack, stack, variant="t5gemma2", vocab_size=262144,
                         final_logit_softcapping=None, eoi_token_id=256000)


_TINY_STACK = StackConfig(64, 128, 2, 4, 2, 16, (SLIDING, FULL), sliding_window=4,
                          query_pre_attn_scalar=16)

PRESETS: dict[str, T5GemmaConfig] = {
    # Small enough for CPU tests; the structure of the real ones.
    "t5gemma-tiny": T5GemmaConfig(_TINY_STACK, _TINY_STACK, vocab_size=512),
    "t5gemma2-tiny": T5GemmaConfig(
        _TINY_STACK.replace(attn_logit_softcapping=None, rope_global=Rope(1e6, 8.0)),
        _TINY_STACK.replace(attn_logit_softcapping=None, rope_global=Rope(1e6, 8.0)),
        variant="t5gemma2", vocab_size=512, final_logit_softcapping=None, eoi_token_id=511),
    **{f"t5gemma-{e}-{d}": _t5gemma(e, d) for e, d in (
        ("s", "s"), ("b", "b"), ("l", "l"), ("ml", "ml"), ("xl", "xl"), ("2b", "2b"),
        ("9b", "2b"), ("9b", "9b"))},
    **{f"t5gemma2-{s}-{s}": _t5gemma2(s) for s in _G3},
}


def get_config(name: str, **overrides) -> T5GemmaConfig:
    """Returns preset `name` (see `PRESETS`) with `overrides` applied."""
    if name not in PRESETS:
        raise errors.ConfigError(f"unknown T5Gemma preset {name!r}; presets: "
                                 f"{', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
