"""Human-readable description of a model's params: paths, shapes, logical axes, counts.

The same text goes to the terminal (`ift-jax model-info`) and, once training
exists, to `model-info.txt` in the workdir.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax


@dataclasses.dataclass(frozen=True)
class ParamRow:
    path: str
    shape: tuple[int, ...]
    dtype: str
    axes: tuple[str | None, ...] | None

    @property
    def count(self) -> int:
        return math.prod(self.shape)


def param_rows(boxed_params: Any) -> list[ParamRow]:
    """One row per param of a boxed tree (e.g. `abstract_variables(config)["params"]`)."""
    rows = []
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for path, leaf in leaves:
        axes = tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else None
        value = nn.unbox(leaf)
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        rows.append(ParamRow(name, tuple(value.shape), str(value.dtype), axes))
    return rows


def format_model_info(boxed_params: Any, header: str = "") -> str:
    """A fixed-width table of params followed by the total count."""
    rows = param_rows(boxed_params)
    width = max((len(r.path) for r in rows), default=10)
    lines = [header] if header else []
    lines.append(f"{'param':<{width}}  {'shape':<22} {'dtype':<9} {'logical axes':<32} count")
    for r in rows:
        axes = "-" if r.axes is None else "(" + ", ".join(str(a) for a in r.axes) + ")"
        lines.append(f"{r.path:<{width}}  {str(r.shape):<22} {r.dtype:<9} {axes:<32} "
                     f"{r.count:,}")
    lines.append(f"total params: {sum(r.count for r in rows):,}")
    return "\n".join(lines) + "\n"
