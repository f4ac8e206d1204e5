"""The `ift-jax` command line."""

import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np

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
