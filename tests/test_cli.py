"""The `ift-jax` command line."""

import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
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
                    "train: batch_size, checkpoint_every, keep_checkpoints, log_every, "
                    "num_microbatches, seed, steps"]


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
