"""The `ift-jax` command line."""

import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import seqio

from ift_jax import cli, hf
from ift_jax.models import t5


def test_model_info_prints_every_param_with_axes_and_the_total(capsys):
    assert cli.main(["model-info", "--model=tiny"]) == 0
    out = capsys.readouterr().out
    assert "encoder/layers_0/attention/query/kernel" in out
    assert "(embed, heads, kv)" in out
    assert f"total params: {t5.param_count(t5.get_config('tiny')):,}" in out


def test_model_info_loads_and_checks_a_hf_directory(tmp_path, capsys):
    config = t5.get_config("tiny", vocab_size=64)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                          nn.unbox(t5.abstract_variables(config)["params"]))
    hf.save_t5(str(tmp_path), config, params)
    assert cli.main(["model-info", f"--hf_dir={tmp_path}"]) == 0
    assert f"total params: {t5.param_count(config):,}" in capsys.readouterr().out


def test_bad_checkpoint_is_one_error_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["model-info", f"--hf_dir={tmp_path}/missing"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such directory" in err


def test_python_dash_m_runs_the_same_command():
    result = subprocess.run([sys.executable, "-m", "ift_jax", "model-info", "--model=tiny"],
                            capture_output=True, text=True, check=True)
    assert "total params:" in result.stdout


def _ift_jax(*args, env=None):
    import os
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ift_jax", *args], capture_output=True,
                          text=True, env=full_env)


def test_tasks_list_works_without_any_data():
    result = _ift_jax("tasks", "list", env={"IFT_JAX_DATA_DIR": "/nonexistent"})
    assert result.returncode == 0, result.stderr
    assert "dialogsum_all_templates" in result.stdout and "ift_multitask" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("samsum "))
    assert " 7 " in row and "rouge" in row


def test_tasks_preview_shows_rendered_examples_and_template(capsys):
    assert cli.main(["tasks", "preview", "synthetic_sentiment", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== synthetic_sentiment [validation]") == 2
    assert "template=synthetic_sentiment_" in out and "OPTIONS:" in out


def test_tasks_stats_reports_percentiles_and_truncation(capsys):
    assert cli.main(["tasks", "stats", "dialogsum", "--split=validation",
                     "--inputs_length=512", "--targets_length=128"]) == 0
    out = capsys.readouterr().out
    assert "dialogsum [validation] (500 examples" in out
    inputs_row = next(line for line in out.splitlines() if line.strip().startswith("inputs"))
    reported = int(inputs_row.split(" of 500 (")[0].split()[-1])
    # Independent count: byte tokens plus EOS beyond the 512 limit.
    rendered = seqio.get_mixture_or_task("dialogsum").source.rendered("validation")
    expected = sum(len(x.encode("utf-8")) + 1 > 512 for x in rendered["inputs"])
    assert reported == expected > 0


def test_tasks_on_missing_data_is_one_error_line():
    result = _ift_jax("tasks", "preview", "samsum", env={"IFT_JAX_DATA_DIR": "/nonexistent"})
    assert result.returncode == 2
    # TensorFlow's C++ start-up logging may precede it; ours is one line.
    ours = [line for line in result.stderr.splitlines() if line.startswith("ift-jax")]
    assert len(ours) == 1 and "expected /nonexistent/samsum/validation.jsonl" in ours[0]


def test_tasks_train_spm_writes_a_model(tmp_path, capsys):
    prefix = str(tmp_path / "synthetic")
    assert cli.main(["tasks", "train-spm", "synthetic_extraction", f"--output={prefix}",
                     "--vocab_size=200"]) == 0
    assert (tmp_path / "synthetic.model").exists()


def test_train_with_an_unknown_config_key_lists_the_valid_ones(tmp_path):
    result = _ift_jax("train", f"--workdir={tmp_path}", "--config.train.stepz=3")
    assert result.returncode == 2
    ours = [line for line in result.stderr.splitlines() if line.startswith("ift-jax")]
    assert ours == ["ift-jax train: error: unknown config key 'train.stepz'; valid keys of "
                    "train: batch_size, checkpoint_every, early_stopping, keep_checkpoints, "
                    "log_every, num_microbatches, seed, steps"]


def test_train_with_a_missing_init_from_says_so(tmp_path):
    result = _ift_jax("train", f"--workdir={tmp_path}/w", f"--config.init_from={tmp_path}/none")
    assert result.returncode == 2
    assert f"init_from '{tmp_path}/none': no such file or directory" in result.stderr


def test_an_error_raised_by_the_config_file_is_shown(capsys):
    assert cli.main(["train", "--config=configs/flan_t5.py:base", "--workdir=/tmp/never"]) == 2
    assert "unknown preset key 'base'; keys: size, method" in capsys.readouterr().err


def test_compilation_cache_is_on_by_default_and_can_be_turned_off(tmp_path, monkeypatch):
    import jax
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        monkeypatch.setenv(cli.CACHE_ENV, "off")
        assert cli.use_compilation_cache() is None
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv(cli.CACHE_ENV, str(tmp_path / "xla"))
        assert cli.use_compilation_cache() == str(tmp_path / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        monkeypatch.setenv(cli.CACHE_ENV, str(tmp_path / "other"))  # A set cache stays.
        assert cli.use_compilation_cache() == str(tmp_path / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


# --- help --------------------------------------------------------------------------


def _subcommands(parser, prefix=()):
    """Every command path of an argparse parser, nested ones (tasks list, ...) too."""
    import argparse
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append(prefix + (name,))
                found += _subcommands(sub, prefix + (name,))
    return found


def test_every_subcommand_has_help_that_exits_0(capsys):
    commands = _subcommands(cli.build_parser())
    assert {("train",), ("sweep",), ("convert",), ("tasks", "list")} <= set(commands)
    for command in [(), *commands]:
        for flag in ("--help", "-h"):
            assert cli.main([*command, flag]) == 0, (command, flag)
            out = capsys.readouterr().out
            assert out.startswith("usage: ift-jax"), (command, out[:200])


def test_train_help_shows_the_config_tree_with_values_and_comments(capsys):
    assert cli.main(["train", "--helpfull"]) == 0
    out = capsys.readouterr().out
    assert "--workdir=DIR" in out and "--allow_config_changes=KEY,..." in out
    assert "config configs/default.py" in out
    assert re.search(r"\n    every = 100 +# Steps; 0 = no evaluation during training\.\n", out)
    assert "  # Start-up order: resume from the workdir, else init_from" in out
    assert "    steps = 200\n" in out


def test_train_help_of_a_preset_shows_its_values_overrides_and_own_comments(capsys):
    assert cli.main(["train", "--config=configs/flan_t5.py:size=small,method=prompt", "-h",
                     "--config.train.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "config configs/flan_t5.py:size=small,method=prompt" in out
    assert "learning_rate = 0.3" in out and "steps = 7\n" in out
    assert "init_from = ''" in out and "# Required: the HF FLAN-T5 directory of this size." in out
    # A comment inside an `if` branch of the file describes that branch only: left out.
    assert "One prompt per example" not in out


def test_sweep_help_lists_the_points(capsys):
    assert cli.main(["sweep", "--help", "--config=configs/sweeps/lora_rank.py:tiny"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ift-jax sweep") and "--dry_run" in out
    assert "  lora_rank=4: --config.peft.lora_rank=4" in out


# --- refused before any work -------------------------------------------------------


def _one_error_line(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_config_file_problems_name_the_file_line_and_type(tmp_path, capsys):
    (tmp_path / "raises.py").write_text(
        "import ml_collections\n\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
        "    return c['nonexistent_key']\n")
    (tmp_path / "broken.py").write_text("import ml_collections\nx = undefined_name\n")
    (tmp_path / "empty.py").write_text("def get_config():\n    pass\n")
    workdir = tmp_path / "run"
    cases = {
        "missing.py": "no such file",
        "raises.py": f"{tmp_path}/raises.py:5: get_config() raised KeyError: ",
        "broken.py": f"{tmp_path}/broken.py:2: importing {tmp_path}/broken.py raised "
                     "NameError: name 'undefined_name' is not defined",
        "empty.py": "get_config() returned NoneType",
    }
    for name, message in cases.items():
        err = _one_error_line(capsys, ["train", f"--config={tmp_path}/{name}",
                                       f"--workdir={workdir}"])
        assert err.startswith(f"ift-jax train: error: --config={tmp_path}/{name}: "), err
        assert message in err, err
    assert not workdir.exists()


def test_an_error_in_an_ift_jax_config_points_at_its_line(capsys):
    err = _one_error_line(capsys, ["train", "--config=configs/flan_t5.py:size=huge",
                                   "--workdir=/tmp/never"])
    import re
    assert re.search(r"configs/flan_t5\.py:\d+: get_config\('size=huge'\) raised ValueError: "
                     r"size='huge'; choose one of small", err), err


def test_positionals_and_arguments_after_a_double_dash_are_refused(tmp_path, capsys):
    err = _one_error_line(capsys, ["train", f"--workdir={tmp_path}/w", "stray"])
    assert "unexpected argument 'stray'" in err
    err = _one_error_line(capsys, ["train", f"--workdir={tmp_path}/w", "--",
                                   "--config.train.steps=5"])
    assert "does not take arguments after '--'" in err and "--config.train.steps=5" in err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("override, message", [
    ("train.steps=-1", "train.steps=-1 must be an integer >= 0"),
    ("train.steps=0", "optimizer.warmup_steps=20 is not below train.steps=0"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0 must be an integer >= 1"),
    ("train.log_every=0", "train.log_every=0 must be an integer >= 1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0 must be an integer >= 1"),
    ("train.num_microbatches=3", "train.num_microbatches=3 does not divide "
                                 "train.batch_size=32; set --config.train.num_microbatches "
                                 "to one of 1, 2, 4, 8, 16, 32"),
    ("mesh.fsdp=3", "train.batch_size=32 is not divisible by the data-parallel devices "
                    "(mesh.data x mesh.fsdp = 1 x 3 = 3)"),
    ("train.steps=10", "optimizer.warmup_steps=20 is not below train.steps=10"),
    ("optimizer.learning_rate=0.0", "optimizer.learning_rate=0.0 must be a number > 0"),
])
def test_bad_config_values_are_refused_before_the_workdir_exists(override, message, tmp_path,
                                                                capsys):
    err = _one_error_line(capsys, ["train", f"--workdir={tmp_path}/w", f"--config.{override}"])
    assert message in err and ("; set --config." in err or "e.g. --config." in err), err
    assert not (tmp_path / "w").exists()


def test_device_aware_checks_use_the_devices_jax_sees(tmp_path, capsys):
    # 8 fake devices here (conftest): the default mesh puts fsdp over all of them.
    err = _one_error_line(capsys, ["train", f"--workdir={tmp_path}/w",
                                   "--config.train.batch_size=12"])
    assert "train.batch_size=12 is not divisible by the data-parallel devices (mesh.data x " \
           "mesh.fsdp = 1 x 8 = 8); use a multiple of 8, e.g. --config.train.batch_size=16" in err
    err = _one_error_line(capsys, ["train", f"--workdir={tmp_path}/w", "--config.mesh.fsdp=2"])
    assert "needs 2 devices, 8 are available" in err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("argv, message", [
    (["--workdir=W", "--workdir=W2"], "--workdir is given twice (--workdir=W and --workdir=W2)"),
    (["--workdir=W", "-workdir", "W2"], "--workdir is given twice"),
    (["--workdir=W", "--allow_config_changes=train.steps", "--allow_config_changes=eval"],
     "--allow_config_changes is given twice"),
    (["--workdir=W", "--config.data.mixture", "--config.train.steps=5"],
     "--config.data.mixture has no value: the next argument '--config.train.steps=5' would be "
     "taken as it; write --config.data.mixture=VALUE"),
    (["--workdir", "--config.train.steps=5"], "--workdir has no value"),
    (["--config", "--workdir=W"], "--config has no value: the next argument '--workdir=W'"),
    (["--workdir=W", "--confg=configs/flan_t5.py"], "Unknown command line flag 'confg'"),
])
def test_command_lines_that_would_train_something_else_are_refused(argv, message, tmp_path,
                                                                   capsys, monkeypatch):
    # Each of these, given to absl as it is, trained the embedded default (or another
    # workdir) without a word.
    monkeypatch.chdir(tmp_path)
    err = _one_error_line(capsys, ["train", *argv])
    assert message in err, err
    assert not (tmp_path / "W").exists() and not (tmp_path / "W2").exists()


def test_space_separated_values_and_one_dash_flags_are_read_as_meant():
    from ift_jax import run_flags
    parsed = run_flags.parse_train(["-config", "configs/flan_t5.py:size=small", "-workdir", "w",
                                    "--config.train.steps", "50", "--config.eval.at_start"])
    assert parsed.config_spec == "configs/flan_t5.py:size=small" and parsed.workdir == "w"
    assert parsed.config.train.steps == 50 and parsed.config.eval.at_start is True
    parsed = run_flags.parse_train(["-config=configs/default.py", "--workdir=w", "--start_over"])
    assert parsed.config_spec == "configs/default.py" and parsed.start_over is True


def test_start_over_is_passed_to_training_only_when_given(tmp_path, monkeypatch):
    from ift_jax import train
    calls = []
    monkeypatch.setattr(train, "train_and_evaluate",
                        lambda config, workdir, **kw: calls.append(kw))
    assert cli.main(["train", f"--workdir={tmp_path}/a"]) == 0
    assert cli.main(["train", f"--workdir={tmp_path}/a", "--start_over"]) == 0
    assert calls == [{}, {"start_over": True}]


def test_allow_config_changes_names_must_be_config_keys(tmp_path, capsys):
    err = _one_error_line(capsys, ["train", f"--workdir={tmp_path}/w",
                                   "--allow_config_changes=train.steps,train.stepz"])
    assert "--allow_config_changes: 'train.stepz' is not a config key or section" in err


def test_allow_config_changes_is_passed_to_training_only_when_given(tmp_path, monkeypatch):
    from ift_jax import train
    calls = []
    monkeypatch.setattr(train, "train_and_evaluate",
                        lambda config, workdir, **kw: calls.append((workdir, kw)))
    assert cli.main(["train", f"--workdir={tmp_path}/a"]) == 0
    assert cli.main(["train", f"--workdir={tmp_path}/b",
                     "--allow_config_changes=train.steps,eval"]) == 0
    assert calls == [(f"{tmp_path}/a", {}),
                     (f"{tmp_path}/b", {"allow_config_changes": ("train.steps", "eval")})]


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    from ift_jax import errors, train

    def locked(config, workdir, **kw):
        raise errors.WorkdirInUseError(f"workdir {workdir} is in use")

    monkeypatch.setattr(train, "train_and_evaluate", locked)
    err = _one_error_line(capsys, ["train", f"--workdir={tmp_path}/a"])
    assert err == f"ift-jax train: error: workdir {tmp_path}/a is in use\n"

    def buggy(config, workdir, **kw):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train, "train_and_evaluate", buggy)
    with pytest.raises(ZeroDivisionError):
        cli.main(["train", f"--workdir={tmp_path}/a"])


# --- a quiet console -----------------------------------------------------------------

# What TensorFlow, XLA and absl print on a CPU-only machine when nothing silences them.
LIBRARY_NOISE = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog|libtpu|backend 'tpu'|cuInit|"
                           r"cuda|oneDNN|TensorRT|tensorflow|XLA", re.IGNORECASE)


def test_the_demo_prints_only_its_own_lines(tmp_path):
    """`make demo`, shortened: a fresh environment (no TF_CPP_MIN_LOG_LEVEL, no fake
    devices, no JAX_PLATFORMS), as a user's shell has it."""
    import os
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS", "JAX_PLATFORMS", "IFT_JAX_VERBOSE")}
    result = subprocess.run(
        [sys.executable, "-m", "ift_jax", "train", f"--workdir={tmp_path}/demo",
         "--config.train.steps=1", "--config.optimizer.schedule=constant",
         "--config.optimizer.warmup_steps=0", "--config.eval.every=0",
         "--config.train.batch_size=4", "--config.data.inputs_length=64",
         "--config.data.targets_length=16", "--config.model.num_layers=1",
         "--config.model.num_decoder_layers=1"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = (result.stderr + result.stdout).splitlines()
    assert [line for line in lines if LIBRARY_NOISE.search(line)] == []
    assert any("start-up: from scratch" in line for line in lines), lines
    assert any(line.startswith("step 1/1  loss") for line in lines), lines
