"""What a relaunch changes: the saved config of a workdir vs the new one.

A run resumed with other `train.steps`, learning rate or mixture trains
something else than the workdir says (the learning rate of a cosine schedule
jumps at the resume step). `diff(saved, new)` lists every field that differs,
`check(changes, allowed)` refuses unless each changed key is allowed, with one
line that lists the changes and the flag that accepts them:

    workdir runs/a was trained with another config: train.steps 200 -> 400,
    optimizer.learning_rate 0.003 -> 0.001; to resume with these changes pass
    --allow_config_changes=train.steps,optimizer.learning_rate (or use another --workdir)

An allowed entry names a key (`train.steps`) or a whole section (`eval` allows
every `eval.*`). Values are compared as `config.json` stores them (JSON), so a
tuple and a list with the same items are equal.

A key the saved config lacks because it was added to ift_jax after the run
started is no change when it holds its default: a new key's default is the old
behaviour (`configs/default.py` keeps that promise), so a run started before
`model.remat` existed resumes with `model.remat="none"` without a flag. Given a
non-default value, it is a change like any other.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

from ift_jax.errors import ConfigError

ABSENT = "(absent)"  # The old or new value of a key only one side has.


@dataclasses.dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    return value if value is ABSENT else json.dumps(value)


def as_json_dict(config: Any) -> dict:
    """A ConfigDict (or mapping) as `config.json` holds it."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; an empty section is kept as `{}`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def diff(saved: Mapping[str, Any], new: Any, defaults: Any = None) -> list[Change]:
    """Every field whose value differs, sorted by key.

    Args:
      saved: the workdir's `config.json`, as loaded by `json.load`.
      new: the relaunch's ConfigDict (or a mapping like `saved`).
      defaults: the default config (a ConfigDict or mapping); a key absent from
        `saved` whose new value equals its default here is no change (a key added to
        ift_jax since the run started). None: every absent key is a change.
    """
    old_flat, new_flat = flatten(as_json_dict(saved)), flatten(as_json_dict(new))
    default_flat = flatten(as_json_dict(defaults)) if defaults is not None else {}

    def added_at_default(key: str) -> bool:
        return (key not in old_flat and key in default_flat
                and new_flat.get(key, ABSENT) == default_flat[key])

    return [Change(key, old_flat.get(key, ABSENT), new_flat.get(key, ABSENT))
            for key in sorted(set(old_flat) | set(new_flat))
            if old_flat.get(key, ABSENT) != new_flat.get(key, ABSENT)
            and not added_at_default(key)]


def is_allowed(key: str, allowed: Sequence[str]) -> bool:
    return any(key == entry or key.startswith(entry + ".") for entry in allowed)


def check(changes: Sequence[Change], allowed: Sequence[str] = (), workdir: str = "") -> None:
    """Raises `ConfigError` unless every changed key is allowed (see module docstring)."""
    refused = [c for c in changes if not is_allowed(c.key, allowed)]
    if not refused:
        return
    where = f"workdir {workdir}" if workdir else "the workdir"
    keys = ",".join(sorted({*allowed, *(c.key for c in refused)}))
    raise ConfigError(
        f"{where} was trained with another config: {'; '.join(map(str, refused))}; to "
        f"resume with these changes pass --allow_config_changes={keys} (or use another "
        f"--workdir)")


def check_allowed_keys(allowed: Sequence[str], config: Any) -> None:
    """Refuses `--allow_config_changes` entries that are neither a key nor a section of
    `config` (a typo would otherwise allow nothing)."""
    flat = flatten(as_json_dict(config))
    for entry in allowed:
        if not any(is_allowed(key, [entry]) for key in flat):
            raise ConfigError(f"--allow_config_changes: {entry!r} is not a config key or "
                              f"section; e.g. train.steps or eval")


def records(changes: Sequence[Change], step: int) -> list[dict]:
    """The accepted changes as JSON rows (e.g. one line each in the workdir's
    `config_changes.jsonl`): `{"step", "key", "old", "new"}`."""
    return [{"step": step, "key": c.key, "old": c.old, "new": c.new} for c in changes]
