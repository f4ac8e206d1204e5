"""Every shipped config preset builds a model, method and optimizer."""

import pytest

from ift_jax import model_setup
from ift_jax.configs import default, flan_t5


def test_default_config_is_the_tiny_synthetic_run():
    config = default.get_config()
    setup = model_setup.build(config)
    assert config.data.mixture == "ift_synthetic" and setup.method == "full"
    assert setup.t5_config.vocab_size >= 259  # holds the byte vocabulary


@pytest.mark.parametrize("method", flan_t5.METHODS)
@pytest.mark.parametrize("task", list(flan_t5.TASKS))
def test_flan_t5_methods_build(method, task):
    config = flan_t5.get_config(f"size=small,method={method},task={task}")
    setup = model_setup.build(config)
    assert setup.method == method and config.data.mixture == flan_t5.TASKS[task]
    assert setup.t5_config.d_model == 512


@pytest.mark.parametrize("size", flan_t5.SIZES)
def test_flan_t5_sizes_pick_their_preset(size):
    config = flan_t5.get_config(f"size={size},method=full,runlocal")
    assert model_setup.build(config).t5_config == model_setup.t5_config(config.model)


def test_flan_t5_prompt_tuning_uses_lesters_settings():
    config = flan_t5.get_config("method=prompt")
    assert (config.optimizer.name, config.optimizer.learning_rate) == ("adafactor", 0.3)
    assert config.peft.prompt_length == 100 and not config.data.pack


def test_bad_preset_keys_and_values_are_named():
    with pytest.raises(ValueError, match="unknown preset key 'sise'"):
        flan_t5.get_config("sise=base")
    with pytest.raises(ValueError, match="method='adapter'; choose one of full, lora"):
        flan_t5.get_config("method=adapter")
