"""Instruction templates that turn a source example into an (inputs, targets) pair.

Two kinds, matching the two public collections:

* `PatternTemplate` — FLAN's `(inputs, targets)` pattern tuples with `str.format`
  fields such as `{dialogue}`; the special `{options_}` renders the example's
  `options` list as FLAN does (`format_options`).
* `JinjaTemplate` — promptsource's jinja strings, input and target separated by
  `|||`, with an optional `answer_choices` jinja string. Templates are rendered in
  jinja's immutable sandbox, so a template can read an example but cannot reach
  Python internals, and within bounds of time, size and call depth
  (`ift_jax.data.bounded_jinja`), so it cannot run or grow without end either.

Also here: `validate_templates` (checked once per task, before any data flows),
`choose_template` (which template an example gets, stable across processes) and
FLAN-style few-shot formatting with deterministic exemplar choice.

Pure Python: nothing here imports tensorflow, seqio or jax.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Union

import jinja2
import jinja2.exceptions
import jinja2.meta

from ift_jax import errors
from ift_jax.data import bounded_jinja

OPTIONS_FIELD = "options_"
SEPARATOR = "|||"


class TemplateError(errors.DataError):
    """A template that cannot be built, validated or rendered."""


def format_options(choices: Iterable[object]) -> str:
    """Renders answer options the way FLAN's `{options_}` field does.

    Args:
      choices: the options, e.g. `["yes", "no"]`.

    Returns:
      `"OPTIONS:\\n- yes\\n- no"`.
    """
    return "OPTIONS:" + "".join(f"\n- {choice}" for choice in choices)


def _sorted_names(names: Iterable[str]) -> str:
    return ", ".join(sorted(names)) or "(none)"


# --- FLAN pattern templates ------------------------------------------------------------


def _format_fields(text: str) -> list[str]:
    """Field names of a `str.format` string, nested format specs included."""
    names = []
    for _, field_name, format_spec, _ in string.Formatter().parse(text):
        if field_name is not None:
            names.append(field_name)
        if format_spec:
            names.extend(_format_fields(format_spec))
    return names


def _root_field(field_name: str) -> str:
    """`a[0].b` -> `a`: the example key a format field reads."""
    return re.split(r"[.\[]", field_name, maxsplit=1)[0]


@functools.lru_cache(maxsize=None)
def _specs(text: str) -> tuple[str, ...]:
    """The format specs of a `str.format` string's fields (`>20` of `{text:>20}`)."""
    return tuple(spec for _, _, spec, _ in string.Formatter().parse(text) if spec)


def _width_problem(spec: str, values: Mapping) -> str | None:
    """Why formatting with `spec` would make more than `bounded_jinja.MAX_CHARS`
    characters (a width like `{text:>999999999}`, or one taken from the example)."""
    widths = [int(n) for n in re.findall(r"\d+", re.sub(r"\{[^{}]*\}", "", spec))]
    for name in _format_fields(spec):
        value = values.get(_root_field(name))
        if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
            widths.append(int(value))
    if widths and max(widths) > bounded_jinja.MAX_CHARS:
        return (f"format spec {spec!r} would make {max(widths):,} characters, more than "
                f"{bounded_jinja.MAX_CHARS:,}")
    return None


@dataclasses.dataclass(frozen=True)
class PatternTemplate:
    """A FLAN pattern: `str.format` strings for the inputs and the targets.

    Attributes:
      name: unique within a task, e.g. `"samsum_0"`.
      inputs: e.g. `"{dialogue}\\n\\nBriefly summarize that dialogue."`.
      targets: e.g. `"{summary}"`.
    """

    name: str
    inputs: str
    targets: str

    def __post_init__(self):
        for text in (self.inputs, self.targets):
            try:
                field_names = _format_fields(text)
            except ValueError as exc:
                raise TemplateError(f"template {self.name!r}: bad format string: {exc}") from exc
            for field_name in field_names:
                self._check_field_name(field_name)
            for spec in _specs(text):
                problem = _width_problem(spec, {})
                if problem:
                    raise TemplateError(f"template {self.name!r}: {problem}")

    def _check_field_name(self, field_name: str) -> None:
        root = _root_field(field_name)
        if not root or root.isdigit():
            raise TemplateError(f"template {self.name!r} uses positional field "
                                f"{{{field_name}}}; name the example field instead")
        # str.format can walk attributes; dunder access is how format strings leak internals.
        if re.search(r"\.\s*_", field_name):
            raise TemplateError(f"template {self.name!r}: unsafe access refused in "
                                f"{{{field_name}}}")

    @classmethod
    def from_tuples(cls, prefix: str,
                    tuples: Iterable[tuple[str, str]]) -> list[PatternTemplate]:
        """Templates named `f"{prefix}_{i}"` from FLAN `(inputs, targets)` tuples."""
        return [cls(f"{prefix}_{i}", inputs, targets)
                for i, (inputs, targets) in enumerate(tuples)]

    def _roots(self) -> set[str]:
        return {_root_field(f) for text in (self.inputs, self.targets)
                for f in _format_fields(text)}

    def fields(self) -> frozenset[str]:
        """Example fields this template reads (`{options_}` reads `options`)."""
        roots = self._roots()
        if OPTIONS_FIELD in roots:
            roots = (roots - {OPTIONS_FIELD}) | {"options"}
        return frozenset(roots)

    def answer_choices_for(self, example: Mapping) -> list[str] | None:
        """The example's `options`, or None when it has none."""
        options = example.get("options")
        return None if options is None else [str(option) for option in options]

    def render(self, example: Mapping) -> tuple[str, str]:
        """Formats the example into `(inputs, targets)`.

        Raises:
          TemplateError: the example lacks a field the template reads, or a field
            does not support the indexing or format spec the template applies.
        """
        missing = self.fields() - example.keys()
        if missing:
            raise TemplateError(f"template {self.name!r} needs field(s) "
                                f"{_sorted_names(missing)}; example has fields: "
                                f"{_sorted_names(example.keys())}")
        values = dict(example)
        if OPTIONS_FIELD in self._roots():
            values[OPTIONS_FIELD] = format_options(example["options"])
        for spec in (s for text in (self.inputs, self.targets) for s in _specs(text)
                     if "{" in s):
            problem = _width_problem(spec, values)
            if problem:
                raise TemplateError(f"template {self.name!r}: {problem}")
        try:
            return self.inputs.format_map(values), self.targets.format_map(values)
        except (LookupError, AttributeError, TypeError, ValueError) as exc:
            raise TemplateError(f"template {self.name!r}: cannot format example: "
                                f"{type(exc).__name__}: {exc}") from exc


# --- promptsource jinja templates ------------------------------------------------------

_ENV = bounded_jinja.BoundedEnvironment(undefined=jinja2.StrictUndefined)
_NOT_FIELDS = frozenset(_ENV.globals) | {"loop", "answer_choices"}
# promptsource hides `|||` inside example values so only the template's own splits.
_PIPE_PLACEHOLDER = "\x00PIPE\x00"


@functools.lru_cache(maxsize=None)
def _compile(source: str) -> jinja2.Template:
    """Compiled once per distinct source; the templates stay plain, picklable data."""
    return _ENV.from_string(source)


@functools.lru_cache(maxsize=None)
def _undeclared(source: str) -> frozenset[str]:
    return frozenset(jinja2.meta.find_undeclared_variables(_ENV.parse(source)))


def _escape_pipes(example: Mapping) -> dict:
    return {k: v.replace(SEPARATOR, _PIPE_PLACEHOLDER) if isinstance(v, str) else v
            for k, v in example.items()}


def _unescape_pipes(text: str) -> str:
    return text.replace(_PIPE_PLACEHOLDER, SEPARATOR)


@dataclasses.dataclass(frozen=True)
class JinjaTemplate:
    """A promptsource template: `inputs ||| targets` in one jinja string.

    Attributes:
      name: unique within a task.
      jinja: the template, e.g. `"{{review_body}} ... ||| {{answer_choices[star_rating-1]}}"`.
      answer_choices: optional jinja string rendered with the example and split on
        `|||`, e.g. `"1 ||| 2 ||| 3 ||| 4 ||| 5"`; the template sees the list as
        the variable `answer_choices`.
    """

    name: str
    jinja: str
    answer_choices: str | None = None

    def __post_init__(self):
        for source in (self.jinja, self.answer_choices):
            if source is not None:
                self._compiled(source)
        if SEPARATOR not in self.jinja:
            raise TemplateError(f"template {self.name!r} has no {SEPARATOR!r} "
                                f"separating inputs from targets")
        if self.answer_choices is None and "answer_choices" in _undeclared(self.jinja):
            raise TemplateError(f"template {self.name!r} uses answer_choices but defines none")

    def _compiled(self, source: str) -> jinja2.Template:
        try:
            return _compile(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"template {self.name!r}: jinja syntax error on line "
                                f"{exc.lineno}: {exc.message}") from exc
        except RecursionError:
            raise TemplateError(f"template {self.name!r} is nested too deeply to parse "
                                f"({len(source):,} characters)") from None

    def fields(self) -> frozenset[str]:
        """Example fields the template and its answer_choices read."""
        sources = [self.jinja] + ([self.answer_choices] if self.answer_choices else [])
        return frozenset().union(*(_undeclared(s) for s in sources)) - _NOT_FIELDS

    def _render_source(self, source: str, context: Mapping) -> str:
        compiled = self._compiled(source)
        try:
            with bounded_jinja.bounded():
                return compiled.render(context)
        except bounded_jinja.LimitExceeded as exc:
            raise TemplateError(f"template {self.name!r}: rendering stopped: {exc}") from None
        except RecursionError:
            raise TemplateError(f"template {self.name!r}: rendering stopped: recursion "
                                f"deeper than Python allows") from None
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"template {self.name!r}: unsafe access refused: "
                                f"{exc}") from exc
        except jinja2.UndefinedError as exc:
            fields = _sorted_names(k for k in context if k != "answer_choices")
            raise TemplateError(f"template {self.name!r}: {exc.message}; example has "
                                f"fields: {fields}") from exc
        except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError,
                ValueError) as exc:
            raise TemplateError(f"template {self.name!r}: cannot render example: "
                                f"{type(exc).__name__}: {exc}") from exc

    def _choices(self, escaped_example: Mapping) -> list[str] | None:
        if self.answer_choices is None:
            return None
        rendered = self._render_source(self.answer_choices, escaped_example)
        return [_unescape_pipes(choice.strip()) for choice in rendered.split(SEPARATOR)]

    def answer_choices_for(self, example: Mapping) -> list[str] | None:
        """The rendered answer choices, or None when the template defines none."""
        return self._choices(_escape_pipes(example))

    def render(self, example: Mapping) -> tuple[str, str]:
        """Renders the example into `(inputs, targets)`, each stripped.

        Raises:
          TemplateError: a missing field, an unsafe access, or output without `|||`.
        """
        context = _escape_pipes(example)
        choices = self._choices(context)
        if choices is not None:
            context["answer_choices"] = choices
        rendered = self._render_source(self.jinja, context)
        if SEPARATOR not in rendered:
            raise TemplateError(f"template {self.name!r} rendered without {SEPARATOR!r} "
                                f"for this example; its inputs and targets cannot be split")
        inputs, targets = rendered.split(SEPARATOR, 1)
        return _unescape_pipes(inputs.strip()), _unescape_pipes(targets.strip())


Template = Union[PatternTemplate, JinjaTemplate]


# --- per-task checks and choice --------------------------------------------------------


def validate_templates(task_name: str, templates: Sequence[Template],
                       available_fields: Iterable[str]) -> None:
    """Checks a task's templates against the fields its source provides.

    Args:
      task_name: used in error messages.
      templates: the task's templates.
      available_fields: the fields every source example has.

    Raises:
      TemplateError: no templates, duplicate names, or a template reading a field
        the source does not have.
    """
    if not templates:
        raise TemplateError(f"task {task_name!r} has no templates")
    names = [t.name for t in templates]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TemplateError(f"task {task_name!r} has duplicate template names: "
                            f"{', '.join(duplicates)}")
    available = frozenset(available_fields)
    for template in templates:
        missing = sorted(template.fields() - available)
        if missing:
            noun = "field" if len(missing) == 1 else "fields"
            used = ", ".join(f"{{{m}}}" for m in missing)
            raise TemplateError(f"template {template.name!r} uses {noun} {used}; task "
                                f"{task_name!r} has fields: {_sorted_names(available)}")


def _stable_int(*parts: object) -> int:
    """A 64-bit integer from sha256, identical in every process (unlike `hash`)."""
    key = ":".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def choose_template(templates: Sequence[Template], seed: int, example_id: str) -> int:
    """The index of the template an example is rendered with.

    Deterministic in `(seed, example_id)` and roughly uniform over the templates.

    Raises:
      TemplateError: `templates` is empty.
    """
    if not templates:
        raise TemplateError("cannot choose a template from an empty list")
    return _stable_int("template", seed, example_id) % len(templates)


# --- few-shot --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FewShotFormat:
    """How FLAN joins exemplars and the final input.

    Attributes:
      input_target_sep: between an exemplar's inputs and its targets.
      example_sep: between exemplars, and before the final inputs.
      prefix: before everything.
    """

    input_target_sep: str = "\n"
    example_sep: str = "\n\n"
    prefix: str = ""


def format_few_shot(exemplars: Sequence[tuple[str, str]], inputs: str,
                    fmt: FewShotFormat = FewShotFormat()) -> str:
    """Prefix, then each `(inputs, targets)` exemplar, then the inputs to answer.

    Args:
      exemplars: rendered `(inputs, targets)` pairs; may be empty.
      inputs: the rendered inputs of the example being asked.
      fmt: separators and prefix.

    Returns:
      `prefix + in1 + sep + tgt1 + example_sep + ... + inputs`.
    """
    shots = [f"{x}{fmt.input_target_sep}{y}{fmt.example_sep}" for x, y in exemplars]
    return fmt.prefix + "".join(shots) + inputs


def choose_exemplars(num_candidates: int, k: int, seed: int, example_id: str,
                     exclude: int | None = None) -> list[int]:
    """`k` distinct candidate indices for an example's few-shot prompt.

    Args:
      num_candidates: size of the exemplar pool.
      k: how many to pick.
      seed: run seed.
      example_id: the example the prompt is for; the choice is deterministic in it.
      exclude: an index never picked (the example itself, when the pool holds it).

    Raises:
      TemplateError: `k` is negative or the pool has fewer than `k` usable candidates.
    """
    pool = [i for i in range(num_candidates) if i != exclude]
    if not 0 <= k <= len(pool):
        raise TemplateError(f"cannot choose {k} exemplars from {len(pool)} candidates "
                            f"(num_candidates={num_candidates}, exclude={exclude})")
    return random.Random(_stable_int("exemplars", seed, example_id)).sample(pool, k)
