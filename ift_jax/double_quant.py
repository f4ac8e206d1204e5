"""QLoRA's double quantization (Dettmers et al. 2023, section 3): NF4 scales in 8 bits.

qwix stores a QLoRA kernel as NF4 values and one fp32 scale per tile of
`tile_size` inputs (64: 32/64 = 0.5 bits per weight). Double quantization
stores those scales as FP8 (`float8_e4m3fn`) codes instead, after
subtracting their mean (one per kernel, in the scales' dtype, so the codes
are centred on zero), with one fp32 step per block of 256 scales: 8/64 +
32/(64 * 256) = 0.127 bits per weight, plus the mean's 32 bits per kernel. The
frozen param then holds a `DoubleQuantScale` where qwix's `QArray.scale`
was; the fp32 scales exist only inside a step, rebuilt by `expanded` just
before qwix's matmul dequantizes the kernel.

One difference from the paper's (bitsandbytes') layout: a block is not 256
consecutive scales of the flattened array but a rectangular tile of the
scale array (`block_tile`, filled from the last axis), so every leaf keeps
the kernel's rank and logical axes: it shards like the kernel, stacks and
scans layer by layer. Where the scale array's axes do not give 256 (tiny
models), blocks are smaller, never larger.

qwix (0.1.8) has no double quantization; its `PtqProvider` and
`quantize_params` take the module that quantizes weights
(`_qarray_module`), and `DOUBLE_QUANT_ARRAYS` is that module with the
scales double-quantized.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from qwix._src.core import qarray

Array = jax.Array

BLOCK = 256  # Scales per fp32 step (the paper's block size for the second level).
CODE_DTYPE = jnp.float8_e4m3fn  # "8-bit Floats" (paper): e4m3, 3 mantissa bits.
CODE_MAX = float(jnp.finfo(CODE_DTYPE).max)  # 448


@flax.struct.dataclass
class DoubleQuantScale:
    """A `QArray.scale` stored double-quantized: `codes * step + mean`.

    Attributes:
      codes: `float8_e4m3fn`, the scale's shape: `(scale - mean) / step`.
      step: fp32, one per block (`codes.shape / block_tile`): block absmax / 448.
      mean: shape `(1,) * ndim`: the mean of all the kernel's scales, in the
        scales' own dtype, which is this scale's `dtype` as qwix reads it (the
        dequantized kernel's, and QLoRA's A and B's).
    """

    codes: Array
    step: Array
    mean: Array

    shape = property(lambda self: self.codes.shape)
    ndim = property(lambda self: self.codes.ndim)
    dtype = property(lambda self: self.mean.dtype)

    def astype(self, dtype: Any) -> "DoubleQuantScale":
        """qwix's `QArray.astype` casts the scale: the dequantized kernel's dtype."""
        return self.replace(mean=self.mean.astype(dtype))

    def expand(self) -> Array:
        """The scales, in `dtype`, as qwix's `QArray.scale` holds them."""
        steps = qarray.call_with_generic_broadcast(
            jnp.multiply, self.codes.astype(jnp.float32), self.step)
        return (steps + self.mean.astype(jnp.float32)).astype(self.dtype)


def block_tile(shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, ...]:
    """Tile of at most `block` scales dividing `shape`, filled from the last axis."""
    tile, need = [], block
    for dim in reversed(shape):
        size = math.gcd(dim, need)
        tile.append(size)
        need //= size
    return tuple(reversed(tile))


def quantize_scale(scale: Array, block: int = BLOCK) -> DoubleQuantScale:
    """`scale` (fp32, any rank) double-quantized: mean-centred FP8 codes per block."""
    x = scale.astype(jnp.float32)
    mean = jnp.mean(x, keepdims=True).astype(scale.dtype)  # as stored: codes centre on it
    centred = x - mean.astype(jnp.float32)
    tile = block_tile(x.shape, block)
    split = qarray.split_axis(jnp.abs(centred), dict(enumerate(tile)))
    absmax = jnp.max(split, axis=tuple(range(1, 2 * x.ndim, 2)))
    step = jnp.where(absmax > 0, absmax / CODE_MAX, 1.0)
    codes = qarray.call_with_generic_broadcast(jnp.divide, centred, step)
    codes = jnp.clip(codes, -CODE_MAX, CODE_MAX).astype(CODE_DTYPE)
    return DoubleQuantScale(codes, step, mean)


def is_double_quantized(x: Any) -> bool:
    """Whether `x` is a QArray (or qwix `WithAux` of one) with a `DoubleQuantScale`."""
    x = getattr(x, "array", x)
    return isinstance(getattr(x, "scale", None), DoubleQuantScale)


def expanded(x: Any) -> Any:
    """A QArray with its `DoubleQuantScale` expanded to plain scales; else `x` itself."""
    if isinstance(x, qarray.QArray) and isinstance(x.scale, DoubleQuantScale):
        return dataclasses.replace(x, scale=x.scale.expand())
    return x


class _DoubleQuantArrays:
    """qwix's `qarray` module with weights' scales double-quantized (see module doc)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(qarray, name)

    @staticmethod
    def quantize(array: Array, how: qarray.HowToQuantize) -> qarray.QArray:
        quantized = qarray.quantize(array, how)
        return dataclasses.replace(quantized, scale=quantize_scale(quantized.scale))


DOUBLE_QUANT_ARRAYS = _DoubleQuantArrays()
