"""The flags of `ift-jax train` and `ift-jax sweep`, and their `--help`.

Both take `--config=FILE[:arg]` (default configs/default.py), `--workdir` and any
number of `--config.KEY=VALUE` overrides (absl + ml_collections, as big_vision
and t5x users know them). The config file is loaded first, by
`config_files.load`, so a missing or broken file is one line naming file and
line; then absl applies the overrides to it. Positional arguments and anything
after `--` are refused: absl would ignore them and the embedded default would
train instead of what the user meant. So are two other silent substitutions:
a flag given twice (`--workdir`, `--allow_config_changes`, `--start_over`;
absl keeps the last), and a value-taking flag written with a space whose
"value" is the next flag (`--config.data.mixture --config.train.steps=5`
would set the mixture to that text and train the default steps). `-config`
with one dash is `--config`, as absl reads every other flag. `--help`, `-h`
and `--helpfull` print the usage, the flags and the chosen config's tree with
every value and comment.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from absl import flags
from ml_collections import config_dict, config_flags

from ift_jax import config_checks, config_diff, config_files, config_help
from ift_jax.errors import ConfigError

HELP_FLAGS = ("--help", "-h", "--helpfull")

TRAIN_USAGE = """\
usage: ift-jax train [--config=FILE[:arg]] --workdir=DIR [--config.KEY=VALUE ...]
                     [--allow_config_changes=KEY,...] [--start_over] [--verbose]

Trains a T5 with the config's method, evaluating as `eval` says; resumes from
WORKDIR's latest checkpoint when it has one (else init_from, else scratch).

flags:
  --config=FILE[:arg]   config file; FILE's get_config(arg) builds the config
                        (default: configs/default.py, the embedded default)
  --workdir=DIR         the run's folder: checkpoints, metrics, eval, report
  --config.KEY=VALUE    set any field below, e.g. --config.train.steps=100
  --allow_config_changes=KEY,...
                        resume although these fields (or sections, e.g. eval)
                        differ from WORKDIR/config.json
  --start_over          move an earlier run's files in WORKDIR (checkpoints,
                        metrics, eval) to WORKDIR/start_over-<time>/ and train
                        from init_from or scratch; needed when all of its
                        checkpoints were damaged (moved to checkpoints_damaged/)
  --verbose             keep the start-up logging of TensorFlow, XLA and absl
                        (also: IFT_JAX_VERBOSE=1)
  -h, --help, --helpfull
                        this help (with --config=FILE: that config)
"""

SWEEP_USAGE = """\
usage: ift-jax sweep --config=FILE[:arg] --workdir=ROOT [--dry_run] [--in_process]
                     [--points=NAME,...] [--config.KEY=VALUE ...] [--verbose]

Runs each point of FILE's get_sweep(arg) as its own `ift-jax train` in
ROOT/<point>/ (finished points are skipped) and writes ROOT/sweep_summary.*.

flags:
  --config=FILE[:arg]   a config file that also defines get_sweep(arg)
  --workdir=ROOT        one workdir per point below it
  --dry_run             print the points' commands, run nothing
  --in_process          run the points in this process (no start-up per point)
  --points=NAME,...     run only these points (names as --help lists them)
  --config.KEY=VALUE    set a field of every point, e.g. --config.train.steps=10
  --verbose             keep the start-up logging of TensorFlow, XLA and absl
  -h, --help, --helpfull
                        this help (with --config=FILE: that config and its points)
"""


@dataclasses.dataclass(frozen=True)
class TrainFlags:
    """What `ift-jax train`'s command line says."""
    config: config_dict.ConfigDict
    config_spec: str
    workdir: Optional[str]
    allow_config_changes: tuple[str, ...] = ()
    start_over: bool = False


def wants_help(argv: Sequence[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def config_spec(argv: Sequence[str]) -> tuple[str, list[str]]:
    """(`FILE[:arg]` of `--config=` or `--config FILE`, argv without it)."""
    specs, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-config="):  # One dash: absl's reading of any flag.
            arg = "-" + arg
        if arg.startswith("--config="):
            specs.append(arg[len("--config="):])
        elif arg in ("--config", "-config") and i + 1 < len(argv):
            if argv[i + 1].startswith("--"):
                raise ConfigError(f"{arg} has no value: the next argument {argv[i + 1]!r} "
                                  f"would be taken as it; write --config=FILE")
            specs.append(argv[i + 1])
            i += 1
        else:
            rest.append(arg)
        i += 1
    if len(specs) > 1:
        raise ConfigError(f"--config given {len(specs)} times ({', '.join(specs)}); give one "
                          f"config file and set fields with --config.KEY=VALUE")
    return (specs[0] if specs else config_files.default_path()), rest


def _refuse_stray_arguments(command: str, argv: Sequence[str]) -> None:
    if "--" in argv:
        after = list(argv[argv.index("--") + 1:])
        raise ConfigError(f"ift-jax {command} does not take arguments after '--' (got "
                          f"{after}); give flags such as --config.train.steps=100 before it, "
                          f"without '--'")


def parse_train(argv: Sequence[str], require_workdir: bool = True,
                validate: bool = True) -> TrainFlags:
    """`ift-jax train`'s argv (after the command name) -> `TrainFlags`.

    Raises:
      ConfigError: a missing or broken config file, an unknown flag or config key,
        a positional argument, `--`, a missing `--workdir`, or a config value
        `config_checks.validate` refuses.
    """
    _refuse_stray_arguments("train", argv)
    spec, rest = config_spec(argv)
    config = config_files.load(spec)
    _refuse_silent_substitutions(rest, config)
    values = flags.FlagValues()
    prog = "ift-jax train"
    try:
        # The override flags (--config.a.b=v) are found in `sys_argv`.
        config_flags.DEFINE_config_dict("config", config, flag_values=values,
                                        lock_config=True, sys_argv=[prog, *rest])
        flags.DEFINE_string("workdir", None, "run directory", flag_values=values)
        flags.DEFINE_list("allow_config_changes", [], "fields a resume may change",
                          flag_values=values)
        flags.DEFINE_bool("start_over", False, "move an earlier run aside and start again",
                          flag_values=values)
        positional = values([prog, *rest])[1:]
        config = values.config
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        raise ConfigError(unknown_key_message(config, rest) or _flag_error(e)) from None
    if positional:
        raise ConfigError(f"unexpected argument {positional[0]!r}: ift-jax train takes flags "
                          f"only (--config=FILE, --workdir=DIR, --config.KEY=VALUE)")
    if require_workdir and not values.workdir:
        raise ConfigError("--workdir is required")
    allowed = tuple(values.allow_config_changes)
    config_diff.check_allowed_keys(allowed, config)
    if validate:
        config_checks.validate(config)
    return TrainFlags(config, spec, values.workdir, allowed, values.start_over)


_OWN_FLAGS = ("workdir", "allow_config_changes", "start_over")
_VALUE_FLAGS = ("workdir", "allow_config_changes")


def _flag_name(arg: str) -> Optional[str]:
    """`--workdir=x` / `-workdir` -> `workdir`; None for a non-flag."""
    if not arg.startswith("-") or arg in ("-", "--"):
        return None
    name = arg.lstrip("-").split("=", 1)[0]
    return name[2:] if name.startswith("no") and name[2:] in _OWN_FLAGS else name


def _takes_value(name: str, config: Any) -> bool:
    """Whether flag `name` (no `=`) takes the next argument as its value."""
    if name in _VALUE_FLAGS:
        return True
    if not name.startswith("config."):
        return False
    value = config_checks.get(config, name[len("config."):])
    return value is not config_checks._MISSING and not isinstance(value, bool)


def _refuse_silent_substitutions(argv: Sequence[str], config: Any) -> None:
    """A flag given twice, or a value-taking flag whose space-separated value is the
    next flag: absl would accept both and train something else than asked."""
    seen: dict[str, str] = {}
    for i, arg in enumerate(argv):
        name = _flag_name(arg)
        if name in _OWN_FLAGS:
            if name in seen:
                raise ConfigError(f"--{name} is given twice ({seen[name]} and {arg}); give "
                                  f"it once")
            seen[name] = arg
        if name is None or "=" in arg or not _takes_value(name, config):
            continue
        following = argv[i + 1] if i + 1 < len(argv) else None
        if following is not None and following.startswith("--"):
            raise ConfigError(f"{arg} has no value: the next argument {following!r} would be "
                              f"taken as it; write {arg}=VALUE")


def _flag_error(error: Exception) -> str:
    """absl's first line, plus the last line of a traceback it quotes."""
    lines = [line for line in str(error).splitlines() if line.strip()] or [str(error)]
    first, last = lines[0], lines[-1]
    if "Traceback" in str(error) and last != first:
        return f"{first.rstrip(':')}: {last}"
    return first


def unknown_key_message(config: Any, argv: Sequence[str]) -> Optional[str]:
    """Names the first `--config.a.b=v` whose key does not exist, and the valid keys."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, path = config, arg[len("--config."):].split("=", 1)[0].split(".")
        for depth, key in enumerate(path):
            if not hasattr(node, "keys") or key not in node:
                where = ".".join(path[:depth]) or "config"
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(none)"
                return f"unknown config key {'.'.join(path)!r}; valid keys of {where}: {valid}"
            node = node[key]
    return None


def config_tree(config: Any, spec: str) -> str:
    """`config (SPEC): ...` and the tree with values and comments."""
    paths = [config_files.module_file(spec)]
    if paths[0] != config_files.default_path():
        paths.append(config_files.default_path())
    comments, order = config_help.merged_comments(paths)
    return (f"config {config_files.display_spec(spec)} (every field with its value and "
            f"comment; set one with --config.KEY=VALUE):\n"
            + config_help.format_tree(config, comments, order))


def train_help(argv: Sequence[str]) -> str:
    """The text `ift-jax train --help` prints (the config with argv's overrides)."""
    parsed = parse_train([a for a in argv if a not in HELP_FLAGS], require_workdir=False,
                         validate=False)
    return f"{TRAIN_USAGE}\n{config_tree(parsed.config, parsed.config_spec)}"


def sweep_help(argv: Sequence[str], points: Sequence[tuple[str, list[str]]] = ()) -> str:
    """The text `ift-jax sweep --help` prints; `points`: (name, overrides) of get_sweep."""
    spec, _ = config_spec([a for a in argv if a not in HELP_FLAGS])
    text = f"{SWEEP_USAGE}\n{config_tree(config_files.load(spec), spec)}"
    if points:
        text += f"\npoints of get_sweep() ({len(points)}), one workdir each:\n" + "".join(
            f"  {name}: {' '.join(flags_)}\n" for name, flags_ in points)
    return text
