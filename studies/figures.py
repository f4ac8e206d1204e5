"""The studies' plots: matplotlib figures without pyplot (no display needed), saved
as PNG beside the page."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from ift_jax import fileio


def new(panels: int, width: float = 6.0 * 2, height: float = 4.5):
    """A figure with `panels` axes side by side: `(figure, axes)`."""
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, (axes if panels > 1 else axes[0])


def paired_barh(ax, labels: Sequence[str], first: Sequence[float], second: Sequence[float],
                names: tuple[str, str]) -> None:
    """Two horizontal bars per label (e.g. before / after)."""
    y = np.arange(len(labels))
    ax.barh(y + 0.2, first, height=0.4, label=names[0], color="0.7")
    ax.barh(y - 0.2, second, height=0.4, label=names[1], color="tab:blue")
    ax.set_yticks(y, labels, fontsize="x-small")
    ax.invert_yaxis()
    ax.legend(fontsize="small")
    ax.grid(axis="x", alpha=0.3)


def grouped_bars(ax, groups: Sequence[str], series: dict[str, Sequence[Optional[float]]]
                 ) -> None:
    """Vertical bars: one group per entry of `groups`, one bar per series (None: no bar)."""
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width,
               [np.nan if v is None else v for v in values], width, label=name)
    ax.set_xticks(x, groups, fontsize="small")
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)


def lines(ax, series: dict[str, Sequence[tuple[float, Optional[float]]]], xlabel: str,
          ylabel: str, title: str = "", logx: bool = False) -> None:
    """One line with markers per series of `(x, y)` points (None: skipped)."""
    for name, points in series.items():
        points = [(x, y) for x, y in points if y is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize="small")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)


def save(fig: Figure, path: str) -> str:
    with fileio.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    return path
