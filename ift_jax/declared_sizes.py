"""What a checkpoint says about itself, checked before anything that size is allocated.

A checkpoint is a file someone else wrote. Its own declarations decide how much
a loader allocates: an HF `config.json` says how many layers to expect (one with
`num_layers: 10000000` grew a process past 11 GB before anything said no), a t5x
index says how large each zarr array is (a declared 200,000 x 200,000 array
aborted the process with `std::bad_alloc`), and its msgpack may nest deeper than
the loaders recurse. As t5x and transformers would have it, nothing unbounded
comes from a file; here:

- `check_dimensions`: the sizes of a T5 (layers, widths, heads, vocabulary) are
  integers within `LIMITS`, far above any released T5 (XXL: 24 layers, d_ff
  10,240; mT5: 250,112 pieces);
- `param_count`: the parameters those sizes imply, from a closed form (no model
  is built: `t5.param_count` traces one, which is what must not happen here);
- `check_memory`: what a load will hold at once fits the host's available
  memory (`available_memory`: MemAvailable, and a cgroup's limit when lower);
- `nesting_depth`: how deep a parsed structure nests, found without recursion.

Each refusal is one `CheckpointError` line naming the file, the declared size
and the bound.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

from ift_jax import errors

GiB = 2 ** 30
LIMITS = {  # Per field; the largest released T5-family models are far below.
    "num_layers": 512, "num_decoder_layers": 512, "num_heads": 1024, "d_model": 65536,
    "d_kv": 4096, "d_ff": 1 << 20, "vocab_size": 1 << 22,
    "relative_attention_num_buckets": 4096,
}
MAX_NESTING = 64  # A t5x index nests ~10 deep (optimizer/target/encoder/layers_0/...).


def check_dimensions(values: Mapping[str, Any], where: str) -> None:
    """Every field of `LIMITS` present in `values` is an integer from 1 to its limit.

    Raises:
      CheckpointError: naming the field, its value and the limit.
    """
    for key, limit in LIMITS.items():
        value = values.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise errors.CheckpointError(f"{where}: {key}={value!r} is not a positive integer")
        if value > limit:
            raise errors.CheckpointError(
                f"{where}: {key}={value:,} is past the {limit:,} any T5 could have; the file "
                f"is damaged or not a T5 checkpoint")


def param_count(vocab_size: int, d_model: int, d_kv: int, d_ff: int, num_layers: int,
                num_decoder_layers: int, num_heads: int, relative_attention_num_buckets: int,
                gated: bool, tied: bool) -> int:
    """The parameters of a T5 of these sizes (as `t5.param_count`, without a model)."""
    inner = num_heads * d_kv
    attention = 4 * d_model * inner
    mlp = (3 if gated else 2) * d_model * d_ff
    encoder = num_layers * (attention + mlp + 2 * d_model) + d_model
    decoder = num_decoder_layers * (2 * attention + mlp + 3 * d_model) + d_model
    relpos = 2 * relative_attention_num_buckets * num_heads
    embeddings = vocab_size * d_model * (1 if tied else 2)
    return encoder + decoder + relpos + embeddings


def _cgroup_room() -> Optional[int]:
    """Bytes the process's cgroup (v2) may still allocate, if it has a limit."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="utf-8") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="utf-8") as f:
            used = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def available_memory() -> Optional[int]:
    """Bytes of host memory this process can still allocate, or None if unknown."""
    found = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            found = None
    room = _cgroup_room()
    return room if found is None else found if room is None else min(found, room)


def check_memory(needed: int, what: str, where: str) -> None:
    """Refuses a load that would hold `needed` bytes at once, more than is available.

    Raises:
      CheckpointError: naming what would be held, how much, and what is available.
    """
    available = available_memory()
    if available is not None and needed > available:
        raise errors.CheckpointError(
            f"{where}: {what} would take {needed / GiB:,.1f} GiB of host memory, and "
            f"{available / GiB:,.1f} GiB is available; load it on a larger host (or check "
            f"the file's declared sizes)")


def nesting_depth(value: Any, limit: int = MAX_NESTING) -> int:
    """How deep dicts and lists nest in `value` (0 for a leaf), counted without
    recursion; stops counting past `limit` (returns `limit + 1`)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list, tuple)):
            if depth + 1 > limit:
                return limit + 1
            deepest = max(deepest, depth + 1)
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return deepest
