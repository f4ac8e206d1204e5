"""Progress with an ETA for long loops: a tqdm bar on a terminal, plain lines in logs.

    for task in progress.track(tasks, desc="eval step 100", unit="task"):
        ...

On a terminal (the stream's `isatty()`) this is a tqdm bar; anywhere else
(a log file, a pipe, CI) it prints a plain line at the first and last item and
at most every `every_s` seconds in between:

    eval step 100: 3/12 task (25%), elapsed 41s, ETA 2m03s

Pass `bar=False` where other output shares the terminal (the points of a sweep
print their own lines, which a bar would be redrawn through).
"""

from __future__ import annotations

import sys
import time
from typing import IO, Iterable, Iterator, Optional, TypeVar

import tqdm

T = TypeVar("T")


def format_seconds(seconds: float) -> str:
    """`75` -> `1m15s`, `3725` -> `1h02m05s`, `9` -> `9s`."""
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts done items out of `total` and shows the rate and ETA (see module docstring)."""

    def __init__(self, total: Optional[int], desc: str, unit: str = "it",
                 stream: Optional[IO[str]] = None, bar: Optional[bool] = None,
                 every_s: float = 30.0, clock=time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.done = 0
        self._clock, self._every_s = clock, every_s
        self._start = self._last_line = clock()
        use_bar = _is_terminal(self.stream) if bar is None else bar
        self._bar = tqdm.tqdm(total=total, desc=desc, unit=unit, file=self.stream,
                              dynamic_ncols=True) if use_bar else None

    def update(self, n: int = 1, note: str = "") -> None:
        """Marks `n` more items done; `note` says what is next or what just finished."""
        self.done += n
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
            return
        now = self._clock()
        last = self.total is not None and self.done >= self.total
        if self.done == n or last or now - self._last_line >= self._every_s:
            self._last_line = now
            print(self.line(note), file=self.stream, flush=True)

    def line(self, note: str = "") -> str:
        """`desc: done/total unit (pct%)[, note], elapsed E, ETA T` as of now."""
        elapsed = self._clock() - self._start
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        parts = [f"{self.desc}: {count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        if note:
            parts.append(note)
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if self.total is not None and 0 < self.done < self.total:
            parts.append(f"ETA {format_seconds(elapsed / self.done * (self.total - self.done))}")
        return ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # No isatty, or a closed stream.
        return False


def track(items: Iterable[T], total: Optional[int] = None, desc: str = "",
          unit: str = "it", **kwargs) -> Iterator[T]:
    """Yields `items`, counting each one done once the loop body has run."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit, **kwargs) as progress:
        for item in items:
            yield item
            progress.update()
