"""Bad checkpoints get one clear line naming what is wrong."""

import json
import os
import pickle

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors.numpy

from ift_jax import hf
from ift_jax.models import t5

CONFIG = t5.get_config("tiny", vocab_size=64, num_layers=1, num_decoder_layers=1)


@pytest.fixture
def hf_dir(tmp_path):
    """A valid checkpoint written by `save_t5` from random params."""
    abstract = t5.abstract_variables(CONFIG)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                          nn.unbox(abstract))
    hf.save_t5(str(tmp_path), CONFIG, params)
    return str(tmp_path)


def _edit_tensors(hf_dir, edit):
    path = os.path.join(hf_dir, hf.SAFETENSORS)
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path)


def _edit_config(hf_dir, **changes):
    path = os.path.join(hf_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def _error(hf_dir) -> str:
    with pytest.raises(hf.CheckpointError) as info:
        hf.load_t5(hf_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_checkpoint_loads(hf_dir):
    config, _ = hf.load_t5(hf_dir)
    assert config == CONFIG


def test_missing_directory(tmp_path):
    assert "no such directory" in _error(str(tmp_path / "nope"))


def test_missing_config(hf_dir):
    os.remove(os.path.join(hf_dir, "config.json"))
    assert "has no config.json" in _error(hf_dir)


def test_missing_weights_lists_what_is_there(hf_dir):
    os.remove(os.path.join(hf_dir, hf.SAFETENSORS))
    message = _error(hf_dir)
    assert "has no weights" in message and "config.json" in message


def test_missing_index_shard(hf_dir):
    with open(os.path.join(hf_dir, hf.SAFETENSORS_INDEX), "w") as f:
        json.dump({"weight_map": {"shared.weight": "model-00001-of-00002.safetensors"}}, f)
    assert "missing shards: model-00001-of-00002.safetensors" in _error(hf_dir)


@pytest.mark.parametrize("model_type", ["bart", None])
def test_non_t5_architecture(hf_dir, model_type):
    _edit_config(hf_dir, model_type=model_type, architectures=["BartModel"])
    message = _error(hf_dir)
    assert f"model_type={model_type!r}" in message and "BartModel" in message


def test_shape_mismatch_names_tensor_and_both_shapes(hf_dir):
    _edit_config(hf_dir, d_ff=100)
    message = _error(hf_dir)
    assert "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in message
    assert "(128, 64)" in message and "(100, 64)" in message


def test_missing_tensors_are_listed(hf_dir):
    def drop(tensors):
        del tensors["decoder.final_layer_norm.weight"]
        del tensors["encoder.block.0.layer.0.SelfAttention.q.weight"]
    _edit_tensors(hf_dir, drop)
    message = _error(hf_dir)
    assert "missing 2 tensor(s)" in message
    assert "decoder.final_layer_norm.weight" in message
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in message


def test_unexpected_tensors_are_listed(hf_dir):
    def add(tensors):
        tensors["encoder.block.7.layer.0.layer_norm.weight"] = np.ones(64, np.float32)
    _edit_tensors(hf_dir, add)
    assert "unexpected tensor(s): encoder.block.7.layer.0.layer_norm.weight" in _error(hf_dir)


def test_pickled_code_in_torch_bin_is_refused(hf_dir):
    pytest.importorskip("torch")
    os.remove(os.path.join(hf_dir, hf.SAFETENSORS))

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(os.path.join(hf_dir, hf.TORCH_BIN), "wb") as f:
        pickle.dump({"shared.weight": Payload()}, f, protocol=2)
    assert "weights_only=True" in _error(hf_dir)


def test_save_t5_names_a_missing_param(tmp_path):
    with pytest.raises(hf.CheckpointError, match="params lack token_embedder/embedding"):
        hf.save_t5(str(tmp_path), CONFIG, {})


def test_declared_sizes_are_checked_before_anything_is_allocated(hf_dir, monkeypatch,
                                                                   capsys):
    from ift_jax import cli, declared_sizes
    _edit_config(hf_dir, num_layers=10000000)
    assert cli.main(["model-info", f"--hf_dir={hf_dir}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ift-jax model-info: error: {hf_dir}/config.json: num_layers=10,000,000 is past the "
        f"512 any T5 could have; the file is damaged or not a T5 checkpoint"]
    _edit_config(hf_dir, num_layers=1, d_model="768")
    assert "d_model='768' is not a positive integer" in _error(hf_dir)
    _edit_config(hf_dir, num_layers=24, d_model=4096, d_ff=10240, num_heads=64, d_kv=64)
    monkeypatch.setattr(declared_sizes, "available_memory", lambda: 8 * 2 ** 30)
    assert ("reading the 4,891,041,792 params config.json declares (as float32) would take "
            "18.2 GiB of host memory, and 8.0 GiB is available") in _error(hf_dir)


def test_the_declared_param_count_is_the_models():
    from ift_jax import declared_sizes
    for name in ("tiny", "small"):
        for tied, gated in ((False, True), (True, False)):
            c = t5.get_config(name, tie_word_embeddings=tied, scale_decoder_outputs=tied,
                              feed_forward_proj="gated-gelu" if gated else "relu",
                              num_decoder_layers=3)
            assert declared_sizes.param_count(
                c.vocab_size, c.d_model, c.d_kv, c.d_ff, c.num_layers, c.num_decoder_layers,
                c.num_heads, c.relative_attention_num_buckets, gated, tied) == t5.param_count(c)
