"""README.md and docs/*.md: every command shown is checked here or by CI.

Commands are the lines of ```bash / ```sh / ```shell / ```console blocks
(backslash continuations joined, comments dropped; in console blocks only
`$ ` lines). Each one is checked without running anything heavy:

- `ift-jax train ...`: parsed by the CLI's own flag machinery (config file,
  preset and every `--config.a.b=v` key must exist);
- `ift-jax sweep ...`: its points loaded and every point's `ift-jax train`
  parsed (`ift-jax sweep ... --dry_run`, which runs nothing);
- any other `ift-jax X ...`: parsed by the CLI's argparse parser;
- `python launch/tpu.py|slurm.py ...`: run with `--dry_run` (it prints the
  commands and runs nothing), and the `ift-jax` command it would start parsed;
- `make demo|test`, `pip install -e '.[extras]'`, `export NAME=VALUE`:
  exercised by CI (`.ci/run` runs `make test`, which installs the package);
  checked against the Makefile and setup.py.

Anything else fails, so new docs cannot show an unchecked command. ```python
blocks are run, with placeholder paths pointing at a tiny HF checkpoint and
PEFT adapter written here. Relative links and the `tests/...::test_name`
references must resolve.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import glob
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT)
                             for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
SHELL_LANGS = ("bash", "sh", "shell", "console")
# Fenced blocks must say what they are; these are not checked as commands.
OTHER_LANGS = ("python", "text", "json")
LAUNCHERS = ("launch/tpu.py", "launch/slurm.py")
# Commands the docs may show that nothing here can check, each with the reason.
# Keep it short: prefer showing a launcher's --dry_run over what it prints.
ALLOWED = {}
# Placeholder paths in Python snippets -> fixture paths (see `snippet_paths`).
PLACEHOLDERS = ("/path/to/flan-t5-base", "/path/to/adapter", "/path/to/output")


# ----------------------------------------------------------------------------
# Reading the docs.


def _blocks(path: str) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of every fenced block of a markdown file."""
    blocks, current = [], None
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fence = re.match(r"^\s*```\s*([\w+-]*)\s*$", line)
            if fence and current is None:
                current = (fence.group(1).lower(), number + 1, [])
            elif fence:
                blocks.append(current)
                current = None
            elif current is not None:
                current[2].append(line.rstrip("\n"))
    assert current is None, f"{path}: a ``` block opened on line {current[1] - 1} never closes"
    return blocks


def _command_lines(lang: str, start: int, lines: list[str]) -> list[tuple[int, str]]:
    """(line number, command) with continuations joined; comments and output dropped."""
    commands, pending, first = [], "", None
    for number, line in enumerate(lines, start):
        if lang == "console" and not pending:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        first = first if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        commands.append((first, pending + line))
        pending = ""
    assert not pending, f"line {first}: a continuation never ends"
    return commands


def _commands() -> list[tuple[str, str]]:
    """(where, command) for every command line of every shell block."""
    found = []
    for path in DOCS:
        for lang, start, lines in _blocks(path):
            if lang in SHELL_LANGS:
                found += [(f"{path}:{n}", c) for n, c in _command_lines(lang, start, lines)]
    return found


def _snippets() -> list[tuple[str, list[tuple[int, str]]]]:
    """(file, [(first line, code), ...]) for files with ```python blocks, in page order."""
    found = []
    for path in DOCS:
        code = [(start, "\n".join(lines)) for lang, start, lines in _blocks(path)
                if lang == "python"]
        if code:
            found.append((path, code))
    return found


COMMANDS = _commands()
SNIPPETS = _snippets()


# ----------------------------------------------------------------------------
# Checking one command.


def _words(command: str) -> list[str]:
    """The command's words, leading NAME=VALUE environment assignments removed."""
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]
    return words


def _is_python(word: str) -> bool:
    return os.path.basename(word) in ("python", "python3")


def _ift_jax_argv(words: list[str]) -> list[str] | None:
    """`ift-jax` / `.venv/bin/ift-jax` / `python -m ift_jax` -> the argv after it."""
    if words and os.path.basename(words[0]) == "ift-jax":
        return words[1:]
    if len(words) > 2 and _is_python(words[0]) and words[1:3] == ["-m", "ift_jax"]:
        return words[3:]
    return None


def _check_config_command(command_argv: list[str]) -> None:
    """`train` / `sweep` argv (after the subcommand name) through the real code paths."""
    from ift_jax import cli, sweeps
    name, argv = command_argv[0], command_argv[1:]
    if name == "train":
        cli._parse_config_flags("train", [a for a in argv if a != "--dry_run"])
        return
    if name == "plan":  # Parse only: compiling an XL step here would take minutes.
        from ift_jax import plan, run_flags
        values, rest = cli.split_plan_flags(argv)
        topology = values.get("--topology")
        assert topology in (None, *plan.TOPOLOGIES), (topology, list(plan.TOPOLOGIES))
        run_flags.parse_train(rest, require_workdir=False)
        return
    spec = next(a[len("--config="):] for a in argv if a.startswith("--config="))
    assert sweeps.load_points(spec)
    # An empty local root: the dry run then reads nothing (gs:// roots included).
    argv = [f"--workdir={tempfile.mkdtemp()}" if a.startswith("--workdir=") else a
            for a in argv if a != "--dry_run"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(["sweep", *argv, "--dry_run"])
    assert code == 0, out.getvalue()


def _check_ift_jax(argv: list[str]) -> None:
    from ift_jax import cli
    assert argv, "ift-jax without a command"
    if "--help" in argv or "-h" in argv:  # Help is cheap: run it; it must exit 0.
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = cli.main(argv)
        assert code == 0 and out.getvalue().startswith("usage: "), out.getvalue()[-2000:]
        return
    if argv[0] in cli.CONFIG_COMMANDS:
        _check_config_command(argv)
        return
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cli.build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"argparse rejected it (exit {e.code}): {err.getvalue()}")


def _launched_ift_jax(script: str, args: list[str]) -> list[str] | None:
    """The `ift-jax train|sweep` argv a launcher would start, or None (create, logs, ...)."""
    before = args[:args.index("--")] if "--" in args else args
    extra = args[args.index("--") + 1:] if "--" in args else []
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--config", "--workdir", "--job"):
        parser.add_argument(flag)
    parser.add_argument("--set", action="append", default=[])
    known, _ = parser.parse_known_args(before)
    if known.config is None:
        return None
    kind = "train"
    if script.endswith("tpu.py"):
        kind = known.job or ("sweep" if before and before[0] == "sweep" else "train")
    return [kind, f"--config={known.config}", f"--workdir={known.workdir}",
            *[f"--config.{kv}" for kv in known.set], *extra]


def _check_launcher(script: str, args: list[str]) -> None:
    if "--dry_run" not in args:  # Before `--`: what follows it goes to ift-jax.
        cut = args.index("--") if "--" in args else len(args)
        args = [*args[:cut], "--dry_run", *args[cut:]]
    result = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, f"--dry_run exited {result.returncode}: {result.stderr}"
    launched = _launched_ift_jax(script, args)
    if launched:
        _check_ift_jax(launched)


def _makefile_recipe(target: str) -> str:
    with open(os.path.join(ROOT, "Makefile")) as f:
        text = f.read()
    match = re.search(rf"^{target}:[^\n]*\n((?:\t[^\n]*\n)+)", text, re.M)
    assert match, f"Makefile has no target {target!r}"
    return match.group(1)


def _check_make(words: list[str]) -> None:
    assert words[1:] in (["demo"], ["test"]), "only `make demo` and `make test` are documented"
    recipe = _makefile_recipe(words[1])
    if words[1] == "demo":  # The embedded default: no --config, or configs/default.py.
        assert "ift-jax train" in recipe, recipe
        assert re.search(r"--config=(?!configs/default\.py)", recipe) is None, recipe
    else:
        assert "pytest tests" in recipe, recipe
        with open(os.path.join(ROOT, ".ci", "run")) as f:
            assert "make test" in f.read(), "CI (.ci/run) no longer runs `make test`"


def _setup_extras() -> set[str]:
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(getattr(t, "id", "") == "EXTRAS_REQUIRE" for t in node.targets)):
            return {ast.literal_eval(k) for k in node.value.keys}
    raise AssertionError("setup.py defines no EXTRAS_REQUIRE")


def _check_pip(words: list[str]) -> None:
    args = words[words.index("install") + 1:]
    targets = [a for a in args if not a.startswith("-")]
    assert targets, "pip install of nothing"
    for target in targets:
        match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
        assert match, f"{target!r}: the docs install this checkout (`.` or `.[extras]`) only"
        unknown = set(filter(None, (match.group(1) or "").split(","))) - _setup_extras()
        assert not unknown, f"extras {sorted(unknown)} are not in setup.py's EXTRAS_REQUIRE"


def check_command(command: str) -> str:
    """Checks one documented command; returns how it was checked."""
    words = _words(command)
    if not words or (words[0] == "export" and all("=" in w for w in words[1:])):
        return "environment"
    argv = _ift_jax_argv(words)
    if argv is not None:
        _check_ift_jax(argv)
        return "ift-jax"
    if len(words) > 1 and _is_python(words[0]) and words[1] in LAUNCHERS:
        _check_launcher(words[1], words[2:])
        return "launcher dry run"
    if words[0] == "make":
        _check_make(words)
        return "CI"
    if os.path.basename(words[0]) == "pip" and "install" in words:
        _check_pip(words)
        return "CI"
    if words[0] in ALLOWED:
        return "allowed"
    raise AssertionError("no check knows this command; show an ift-jax or launcher command "
                         "instead, or add a check to tests/test_docs.py")


# ----------------------------------------------------------------------------
# The tests.


def test_docs_show_commands_and_snippets():
    assert {"README.md", "docs/tasks.md", "docs/peft.md", "docs/scaling.md",
            "docs/checkpoints.md", "docs/dialogsum_recipe.md"} <= set(DOCS)
    assert len(COMMANDS) > 40 and SNIPPETS


def test_readme_starts_with_the_two_commands():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        head = f.read().split("\n## ", 1)[0]
    lang, _, lines = _blocks("README.md")[0]
    assert lang == "bash" and "```bash" in head
    assert [c for _, c in _command_lines(lang, 1, lines)] == [
        "make demo   # set up .venv and run the main job: ift-jax train on configs/default.py",
        "make test   # set up .venv and run the tests"]


@pytest.mark.parametrize("where,command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_is_valid(where, command, monkeypatch):
    monkeypatch.chdir(ROOT)  # Config paths in the docs are relative to the checkout.
    try:
        check_command(command)
    except (AssertionError, ValueError, FileNotFoundError, KeyError, StopIteration) as e:
        pytest.fail(f"{where}: `{command}`: {type(e).__name__}: {e}")


def test_every_fenced_block_names_a_known_language():
    for path in DOCS:
        for lang, start, _ in _blocks(path):
            assert lang in SHELL_LANGS + OTHER_LANGS, (
                f"{path}:{start - 1}: ```{lang} block; use one of {SHELL_LANGS + OTHER_LANGS}")


def test_json_blocks_parse():
    for path in DOCS:
        for lang, start, lines in _blocks(path):
            if lang == "json":
                try:
                    json.loads("\n".join(lines))
                except json.JSONDecodeError as e:
                    pytest.fail(f"{path}:{start}: not JSON: {e}")


def test_an_unknown_command_fails_the_check():
    with pytest.raises(AssertionError, match="no check knows this command"):
        check_command("curl https://example.com/install.sh")
    with pytest.raises(AssertionError, match="argparse rejected it"):
        check_command("ift-jax eval --workdir=x --no_such_flag")
    with pytest.raises(ValueError, match="unknown config key"):
        check_command("ift-jax train --workdir=x --config.train.stepz=3")
    with pytest.raises(ValueError, match="flan_t5.py:base"):  # The launcher's ift-jax argv.
        check_command("python launch/slurm.py --config=configs/flan_t5.py:base "
                      "--workdir=/shared/runs/base")


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_relative_links_point_to_existing_files():
    for path in DOCS:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            text = f.read()
        for target in _LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(path),
                                                     target.split("#")[0]))
            assert os.path.exists(resolved), f"{path}: link {target} -> {resolved} is missing"


_TEST_REF = re.compile(r"tests/(test_\w+\.py)(?:::(\w+))?")
_REPO_PATH = re.compile(r"`((?:ift_jax|configs|tasks|launch|tests|benchmarks|docs)/"
                        r"[\w./-]*?)(?::[\w=,]*)?`")


def test_referenced_tests_and_files_exist():
    for path in DOCS:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            text = f.read()
        for file, name in _TEST_REF.findall(text):
            with open(os.path.join(ROOT, "tests", file), encoding="utf-8") as f:
                source = f.read()
            assert not name or re.search(rf"^def {name}\(", source, re.M), (
                f"{path}: tests/{file}::{name} does not exist")
        for ref in _REPO_PATH.findall(text):
            if re.search(r"[<>*{}]|/X\.py$", ref):
                continue
            assert os.path.exists(os.path.join(ROOT, ref)), f"{path}: `{ref}` does not exist"


_CONFIG_KEY = re.compile(r"`((?:model|data|train|eval|optimizer|loss|peft|mesh)"
                         r"(?:\.\w+)+)(?:=[^`]*)?`")


def _config_has(config, key: str) -> bool:
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def _python_has(key: str) -> bool:
    """`peft.with_adapter` and the like: an attribute of the `ift_jax` module named first."""
    import importlib
    first, *rest = key.split(".")
    try:
        node = importlib.import_module(f"ift_jax.{first}")
    except ImportError:
        return False
    for part in rest:
        if not hasattr(node, part):
            return False
        node = getattr(node, part)
    return True


def test_config_keys_named_in_the_text_exist():
    """`eval.split`, `peft.lora_rank=16`, ... in the prose: config keys (or, for names
    like `peft.with_adapter`, functions of that ift_jax module)."""
    from ift_jax.configs import default
    config = default.get_config()
    for path in DOCS:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # Prose only.
        for key in _CONFIG_KEY.findall(text):
            if key.rsplit(".", 1)[-1] in ("py", "md", "json", "jsonl", "safetensors", "txt"):
                continue
            assert _config_has(config, key) or _python_has(key), (
                f"{path}: `{key}` is neither a config key (configs/default.py) nor a name "
                f"in ift_jax.{key.split('.')[0]}")


# ----------------------------------------------------------------------------
# Python snippets.


@pytest.fixture(scope="module")
def snippet_paths(tmp_path_factory):
    """A tiny HF T5 directory and a LoRA adapter for it, for the placeholder paths. The
    adapter has LoRA dropout, as the adapters of `configs/flan_t5.py` (0.05) have: the
    snippets must run on such adapters (the training model needs a dropout rng)."""
    import flax.linen as nn
    import jax
    import numpy as np
    from flax import traverse_util
    from ift_jax import hf, peft, peft_formats
    from ift_jax.models import t5

    root = tmp_path_factory.mktemp("snippets")
    config = t5.get_config("tiny", vocab_size=512)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.05 * rng.normal(size=s.shape)).astype(np.float32),
                          nn.unbox(t5.abstract_variables(config)["params"]))
    hf.save_t5(str(root / "base"), config, params)
    lora_cfg = peft.LoraConfig(rank=4, alpha=8.0, dropout=0.05)
    lora_params = peft.init_adapters(peft.apply_lora(t5.Transformer(config), lora_cfg),
                                     params, jax.random.key(0))
    flat = traverse_util.flatten_dict(lora_params)  # A nonzero B changes the logits.
    lora_params = traverse_util.unflatten_dict(
        {k: v + 0.01 if k[-1] == "kernel_lora_b" else v for k, v in flat.items()})
    peft_formats.save_peft(str(root / "adapter"), config, lora_params,
                           peft.MethodConfig("lora", lora=lora_cfg), "base")
    return dict(zip(PLACEHOLDERS, (str(root / "base"), str(root / "adapter"),
                                   str(root / "output"))))


@pytest.mark.parametrize("path,snippets", SNIPPETS, ids=[p for p, _ in SNIPPETS])
def test_python_snippets_run(path, snippets, snippet_paths):
    """A page's snippets run in order in one namespace, as a reader would run them."""
    import seqio
    import ift_jax.tasks  # noqa: F401  (registered before the snapshot below)
    tasks, mixtures = set(seqio.TaskRegistry.names()), set(seqio.MixtureRegistry.names())
    namespace = {"__name__": "docs_snippet"}
    try:
        for start, code in snippets:
            for placeholder, replacement in snippet_paths.items():
                code = code.replace(placeholder, replacement)
            exec(compile(code, f"{path}:{start}", "exec"), namespace)
    finally:  # Leave the registries as the other tests expect them.
        for name in set(seqio.MixtureRegistry.names()) - mixtures:
            seqio.MixtureRegistry.remove(name)
        for name in set(seqio.TaskRegistry.names()) - tasks:
            seqio.TaskRegistry.remove(name)
