"""Rendering jinja templates someone else wrote, within bounds of time, size and depth.

A promptsource template is a small program run on every example. jinja's
immutable sandbox keeps it away from Python's internals, but not from
unbounded work: two nested `range(100000)` loops, `{{ text * 100000 }}` in a
loop, `"x".ljust(10**9)`, a string doubled in a namespace, a macro that calls
itself. Each used to grow a process to gigabytes or end in a 1,400-line
traceback. `BoundedEnvironment` renders inside a budget (`bounded()`):

- time: `MAX_SECONDS` per render, checked at every loop iteration (every
  `{% for %}` iterates through `_iterate`, put there when the template is
  parsed), every call (macros, functions, methods) and every piece of output;
- size: `MAX_CHARS` for any string or list a template makes, checked *before*
  the operations that can multiply sizes (`*`, `+`, `**`, `%`, `~`, the
  methods and filters that take widths or counts, `join`, `replace`) and after
  every call and filter;
- depth: `MAX_DEPTH` nested calls (a macro calling itself), well inside
  Python's own recursion limit.

Going past a bound raises `LimitExceeded`, whose message names the bound and
what reached it; `templates.JinjaTemplate` turns it into one line naming the
template (and the data layer adds the task). `lipsum` (a global that makes
text of any size) is sized before it runs.

Pure Python: nothing here imports tensorflow, seqio or jax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import string
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import jinja2.sandbox
from jinja2 import nodes
from jinja2.visitor import NodeTransformer

MAX_SECONDS = 5.0  # Real templates render in well under a millisecond.
MAX_CHARS = 4_000_000  # About a thousand times T5's longest inputs.
MAX_DEPTH = 64  # Nested calls; promptsource's templates use a handful at most.
_MAX_INT_BITS = 1 << 16  # `**` results: bigger numbers print past MAX_CHARS anyway.
_ITERATE, _JOIN = "__ift_jax_iterate__", "__ift_jax_join__"
# printf-style conversions: `%-10.3f`, `%(name)20s`, `%*d` (width from the arguments).
_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?")
_DIGITS = re.compile(r"\d+")
# str methods and filters whose integer arguments say how much they make.
_WIDTH_METHODS = ("ljust", "rjust", "center", "zfill", "expandtabs")
_SIZED_FILTERS = ("center", "indent", "batch", "slice", "wordwrap")


class LimitExceeded(Exception):
    """A render went past a bound; the message names which and what reached it."""


@dataclasses.dataclass
class _Budget:
    deadline: float
    max_chars: int
    depth: int = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise LimitExceeded(f"rendering took longer than {MAX_SECONDS:g} s (a loop or "
                                f"recursion that does not end soon)")


_local = threading.local()
_UNBOUNDED = _Budget(float("inf"), MAX_CHARS)


def _budget() -> _Budget:
    return getattr(_local, "budget", None) or _UNBOUNDED


@contextlib.contextmanager
def bounded(max_seconds: Optional[float] = None,
            max_chars: Optional[int] = None) -> Iterator[None]:
    """Renders in this block (this thread) run within the bounds."""
    outer = getattr(_local, "budget", None)
    _local.budget = _Budget(time.monotonic() + (MAX_SECONDS if max_seconds is None
                                                else max_seconds),
                            MAX_CHARS if max_chars is None else max_chars)
    try:
        yield
    finally:
        _local.budget = outer


def _check_size(size: int, what: str) -> None:
    if size > _budget().max_chars:
        raise LimitExceeded(f"{what} would make {size:,} characters or items, more than "
                            f"{_budget().max_chars:,}")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _check_result(value: Any, what: str) -> Any:
    _check_size(_size(value), what)
    return value


def _percent_widths(text: str, args: Any, what: str) -> None:
    """Widths and precisions of a printf-style string (`%999999999d`), and those taken
    from its arguments (`%*d`)."""
    stars = False
    for match in _PERCENT.finditer(text):
        for width in match.groups():
            stars |= width == "*"
            if width and width != "*":
                _check_size(int(width), what)
    if stars:
        _check_ints(args if isinstance(args, tuple) else [args], what)


def _brace_widths(text: str, args: Iterable[Any], what: str) -> None:
    """Widths and precisions of a `str.format` string (`{:>999999999}`), and those taken
    from its arguments (`{:{}}`)."""
    try:
        specs = [spec for _, _, spec, _ in string.Formatter().parse(text) if spec]
    except ValueError:
        return  # Not a format string: `format` itself says so.
    for spec in specs:
        if "{" in spec:
            _check_ints(args, what)
        for number in _DIGITS.findall(spec):
            _check_size(int(number), what)


def _check_ints(args: Iterable[Any], what: str) -> None:
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool):
            _check_size(abs(arg), what)


def _iterate(iterable: Any) -> Iterator[Any]:
    """What every `{% for %}` loop iterates through: the deadline at each item."""
    budget = _budget()
    for item in iterable:
        budget.tick()
        yield item


def _join(*parts: Any) -> str:
    """The `~` operator, sized before it joins."""
    texts = [str(p) for p in parts]
    _check_size(sum(map(len, texts)), "'~'")
    return "".join(texts)


def _bounded_lipsum(lipsum: Any) -> Any:
    def bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
        _check_size(12 * int(n) * int(max), "lipsum")  # Words of up to ~12 characters.
        return lipsum(n, html, min, max)
    return bounded_lipsum


class _BoundLoopsAndJoins(NodeTransformer):
    """Routes every loop's iterable through `_iterate` and every `~` through `_join`."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name(_ITERATE, "load"), [node.iter], [], None, None,
                               lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Call(nodes.Name(_JOIN, "load"), node.nodes, [], None, None,
                          lineno=node.lineno)


def _str_method_size(method: Any, args: tuple, kwargs: dict) -> Optional[int]:
    """What a str method (`"x".ljust(n)`, `sep.join(items)`, ...) would make, where its
    arguments can make it large; None for the others."""
    text, name = method.__self__, method.__name__
    if name in _WIDTH_METHODS:
        _check_ints([*args, *kwargs.values()], f"str.{name}")
    if name == "join" and isinstance(args[0] if args else None, (list, tuple)):
        return sum(len(str(x)) for x in args[0]) + len(text) * max(len(args[0]) - 1, 0)
    if name == "replace" and len(args) >= 2:
        return _replaced_size(text, str(args[0]), str(args[1]))
    if name == "expandtabs" and args and isinstance(args[0], int):
        return len(text) * args[0]
    return None


def _replaced_size(text: str, old: str, new: str) -> int:
    count = len(text) + 1 if not old else text.count(old)
    return len(text) + count * (len(new) - len(old))


class BoundedEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """jinja's immutable sandbox with the bounds of the module docstring."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.globals.update({_ITERATE: _iterate, _JOIN: _join,
                             "lipsum": _bounded_lipsum(self.globals["lipsum"])})
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def _parse(self, source: str, name: Optional[str], filename: Optional[str]
               ) -> nodes.Template:
        tree = _BoundLoopsAndJoins().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree

    @staticmethod
    def concat(parts: Iterable[str]) -> str:
        """Output (of the template, a macro, a `{% set %}` block), sized as it is made."""
        budget, total, out = _budget(), 0, []
        for part in parts:
            budget.tick()
            total += len(part)
            _check_size(total, "the output")
            out.append(part)
        return "".join(out)

    def wrap_str_format(self, value: Any) -> Optional[Any]:
        """The sandbox's `str.format` / `format_map`, widths checked before it formats."""
        formatted = super().wrap_str_format(value)
        if formatted is None:
            return None

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            given = [*args, *kwargs.values()]
            if value.__name__ == "format_map" and args and isinstance(args[0], dict):
                given = list(args[0].values())
            _brace_widths(value.__self__, given, f"str.{value.__name__}")
            return formatted(*args, **kwargs)

        return bounded_format

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        if isinstance(getattr(__obj, "__self__", None), str):
            _check_size(_str_method_size(__obj, args, kwargs) or 0, f"str.{__obj.__name__}")
        if budget.depth >= MAX_DEPTH:
            raise LimitExceeded(f"calls nested deeper than {MAX_DEPTH} (a macro that calls "
                                f"itself without end?)")
        budget.depth += 1
        try:
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        return _check_result(result, "a call")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if _size(seq) and isinstance(times, int) and not isinstance(times, bool):
                _check_size(_size(seq) * max(times, 0), "'*'")
    elif operator == "+":
        _check_size(_size(left) + _size(right), "'+'")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int):
        if right > 0 and abs(left) > 1 and abs(left).bit_length() * right > _MAX_INT_BITS:
            raise LimitExceeded(f"'**' would make a number of about "
                                f"{abs(left).bit_length() * right:,} bits")
    elif operator == "%" and isinstance(left, str):
        _percent_widths(left, right, "'%'")


# Filters whose arguments set how much they make, and how much that is.
_FILTER_SIZES = {
    "center": lambda value, width=80, *a, **k: max(len(str(value)), int(width)),
    "indent": lambda value, width=4, *a, **k: len(str(value)) + (str(value).count("\n") + 1) * (
        int(width) if isinstance(width, int) else len(str(width))),
    "replace": lambda value, old, new, *a, **k: _replaced_size(str(value), str(old), str(new)),
    "join": lambda value, d="", *a, **k: sum(len(str(x)) for x in value) + len(str(d)) * len(
        value) if isinstance(value, (list, tuple)) else 0,
    "wordwrap": lambda value, width=79, break_long_words=True, wrapstring=None, *a, **k: len(
        str(value)) * (1 + len(wrapstring or "\n")),
}


def _bounded_filter(name: str, function: Any) -> Any:
    size = _FILTER_SIZES.get(name)

    def bounded_filter(*args: Any, **kwargs: Any) -> Any:
        _budget().tick()
        # Filters that take the environment or context get it first; the value follows.
        values = [a for a in args if not isinstance(a, (jinja2.Environment,
                                                        jinja2.runtime.Context,
                                                        jinja2.nodes.EvalContext))]
        if name in _SIZED_FILTERS:
            _check_ints([*values[1:], *kwargs.values()], f"filter {name!r}")
        if name == "format" and values:
            _percent_widths(str(values[0]), tuple(values[1:]), "filter 'format'")
        if size is not None and values:
            try:
                _check_size(size(*values, **kwargs), f"filter {name!r}")
            except (TypeError, ValueError):
                pass  # Bad arguments: the filter itself says so.
        return _check_result(function(*args, **kwargs), f"filter {name!r}")

    for attribute in ("jinja_pass_arg",):  # How jinja knows to pass environment or context.
        if hasattr(function, attribute):
            setattr(bounded_filter, attribute, getattr(function, attribute))
    bounded_filter.__name__ = getattr(function, "__name__", name)
    return bounded_filter
