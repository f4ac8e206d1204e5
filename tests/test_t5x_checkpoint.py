"""t5x checkpoints in: the layout written here as t5x's Checkpointer writes it, read back,
converted to HF, and checked against transformers."""

import json
import os

import flax.linen as nn
import jax
import msgpack
import numpy as np
import pytest
import tensorstore as ts
from flax import serialization, traverse_util

from ift_jax import cli, errors, t5x_checkpoint
from ift_jax.models import t5

CASES = {
    # FLAN-T5 / T5 1.1: gated-gelu, untied logits.
    "v1_1": t5.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                        num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                        tie_word_embeddings=False, scale_decoder_outputs=False),
    # T5 1.0: relu, tied and scaled logits (t5x's logits_via_embedding).
    "v1_0": t5.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                        num_decoder_layers=2, num_heads=4, feed_forward_proj="relu",
                        tie_word_embeddings=True, scale_decoder_outputs=True),
    # Uneven: heads x d_kv != d_model, 1 encoder vs 3 decoder layers, 16 buckets; the
    # activation and max distance cannot be seen in the weights: given as overrides.
    "uneven": t5.T5Config(vocab_size=80, d_model=24, d_kv=10, d_ff=40, num_layers=1,
                          num_decoder_layers=3, num_heads=3, relative_attention_num_buckets=16,
                          relative_attention_max_distance=64, feed_forward_proj="gated-silu",
                          tie_word_embeddings=False, scale_decoder_outputs=False),
}
OVERRIDES = {"uneven": dict(feed_forward_proj="gated-silu", relative_attention_max_distance=64)}
# Stored as the arrays' own bfloat16 in TensorStore (t5x format 3 does this for bf16 runs).
BF16 = ("encoder/encoder_norm/scale",)
# Small arrays t5x writes into the msgpack index itself (unpartitioned leaves).
IN_INDEX = ("decoder/decoder_norm/scale",)


def _random_params(config, seed=0):
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(t5.abstract_variables(config)["params"])
    return jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)


def _t5x_array(path, value):
    """Our layout -> t5x's: attention kernels flattened to 2-D (DenseGeneral's param)."""
    if path[-1] == "kernel" and path[-2] in ("query", "key", "value"):
        return value.reshape(value.shape[0], -1)
    if path[-1] == "kernel" and path[-2] == "out" and value.ndim == 3:
        return value.reshape(-1, value.shape[-1])
    return value


def _write_array(folder, relative, value, dtype, spec_style):
    chunks = [max(1, n // 2) for n in value.shape]
    spec = {"driver": "zarr", "dtype": dtype,
            "kvstore": {"driver": "gfile" if spec_style == "gfile" else "file",
                        "path": relative},
            "metadata": {"chunks": chunks, "compressor": {"id": "gzip"},
                         "shape": list(value.shape)}}
    absolute = {**spec, "kvstore": {"driver": "file", "path": os.path.join(folder, relative)}}
    store = ts.open(absolute, create=True, open=True).result()
    store.write(value.astype(store.dtype.numpy_dtype)).result()
    if spec_style == "old":  # tensorstore < 0.1.14: the path beside the kvstore.
        spec = {**spec, "kvstore": {"driver": "file"}, "path": relative}
    return spec


def write_t5x_checkpoint(folder, params, step=1000):
    """A checkpoint folder as t5x's Checkpointer writes it: msgpack index + zarr arrays."""
    os.makedirs(folder)
    target = {}
    styles = ("file", "gfile", "old")
    for i, (path, value) in enumerate(traverse_util.flatten_dict(params).items()):
        name = "/".join(path)
        value = _t5x_array(path, np.asarray(value))
        if name in IN_INDEX:
            target[path] = value
        else:
            target[path] = _write_array(folder, "target." + ".".join(path), value,
                                        "bfloat16" if name in BF16 else "float32",
                                        styles[i % len(styles)])
    # Optimizer state whose arrays were never written: reading them would fail.
    missing = {"driver": "zarr", "dtype": "float32",
               "kvstore": {"driver": "file", "path": "state.param_states.x.v_row"},
               "metadata": {"chunks": [4], "compressor": {"id": "gzip"}, "shape": [4]}}
    contents = {"version": 3, "optimizer": {
        "target": traverse_util.unflatten_dict(target),
        "state": {"step": np.int32(step), "param_states": {"x": {"v_row": missing}}}}}
    with open(os.path.join(folder, "checkpoint"), "wb") as f:
        f.write(serialization.msgpack_serialize(contents))


def _expected(params):
    """What the reader must return: float32, bf16-stored arrays rounded through bf16."""
    flat = traverse_util.flatten_dict(params)
    for path in flat:
        if "/".join(path) in BF16:
            flat[path] = np.asarray(flat[path]).astype(jax.numpy.bfloat16).astype(np.float32)
    return traverse_util.unflatten_dict(flat)


@pytest.fixture(params=list(CASES))
def model_dir(request, tmp_path):
    config = CASES[request.param]
    params = _random_params(config)
    root = tmp_path / "t5x_model"
    write_t5x_checkpoint(str(root / "checkpoint_1000"), params)
    os.makedirs(root / "checkpoint_500")  # Older and empty: the latest one is read.
    return request.param, config, _expected(params), root


def test_params_and_config_come_back_from_the_t5x_layout(model_dir):
    case, config, params, root = model_dir
    loaded_config, loaded = t5x_checkpoint.load_t5x(str(root), **OVERRIDES.get(case, {}))
    assert loaded_config == config
    flat, got = traverse_util.flatten_dict(params), traverse_util.flatten_dict(loaded)
    assert set(flat) == set(got)
    for path, value in flat.items():
        assert got[path].dtype == np.float32
        np.testing.assert_array_equal(got[path], value, err_msg="/".join(path))
    assert t5x_checkpoint.checkpoint_step(str(root)) == 1000


def test_convert_writes_an_hf_directory_transformers_runs_with_the_same_logits(
        model_dir, tmp_path, capsys, small_sentencepiece):
    import torch
    import transformers
    case, config, params, root = model_dir
    vocab = small_sentencepiece
    out = tmp_path / "hf"
    flags = [f"--{k}={v}" for k, v in OVERRIDES.get(case, {}).items()]
    assert cli.main(["convert", f"--t5x_checkpoint={root}/checkpoint_1000", f"--output={out}",
                     f"--vocab={vocab}", *flags]) == 0
    assert f"wrote {out}: HF T5" in capsys.readouterr().out
    assert (out / "spiece.model").read_bytes() == vocab.read_bytes()
    assert json.loads((out / "config.json").read_text())["num_decoder_layers"] == (
        config.num_decoder_layers)

    rng = np.random.default_rng(1)
    enc = rng.integers(2, config.vocab_size, (2, 70))  # Past max distance 64: buckets matter.
    dec = rng.integers(2, config.vocab_size, (2, 9))
    ours = t5.Transformer(config).apply({"params": params}, enc, dec)
    model = transformers.T5ForConditionalGeneration.from_pretrained(str(out)).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.as_tensor(enc), decoder_input_ids=torch.as_tensor(dec)
                       ).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4)


def test_convert_refuses_a_vocab_that_is_no_sentencepiece_model_or_too_big(
        tmp_path, capsys, small_sentencepiece):
    params = _random_params(CASES["uneven"])  # vocab_size 80
    write_t5x_checkpoint(str(tmp_path / "checkpoint_1"), params)
    fake = tmp_path / "config.json"
    fake.write_text('{"model_type": "t5"}')
    out = tmp_path / "hf"
    argv = ["convert", f"--t5x_checkpoint={tmp_path / 'checkpoint_1'}", f"--output={out}"]
    assert cli.main([*argv, f"--vocab={fake}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"ift-jax convert: error: vocabulary {fake} is not a SentencePiece model (20 bytes")
    small = CASES["uneven"].replace(vocab_size=40)
    write_t5x_checkpoint(str(tmp_path / "checkpoint_2"), _random_params(small))
    assert cli.main(["convert", f"--t5x_checkpoint={tmp_path / 'checkpoint_2'}",
                     f"--output={out}", f"--vocab={small_sentencepiece}"]) == 2
    err = capsys.readouterr().err
    assert "more than the model's vocab_size 40" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_what_cannot_be_read_is_one_line_naming_it(tmp_path):
    params = _random_params(CASES["v1_1"])
    folder = tmp_path / "checkpoint_7"
    write_t5x_checkpoint(str(folder), params)
    query = folder / "target.encoder.layers_1.attention.query.kernel"
    for chunk in query.iterdir():
        if not chunk.name.startswith("."):
            chunk.write_bytes(b"truncated")  # A damaged gzip chunk.
    with pytest.raises(errors.CheckpointError, match=r"cannot read param "
                       r"encoder/layers_1/attention/query/kernel from .*query\.kernel"):
        t5x_checkpoint.load_t5x(str(folder))

    with pytest.raises(errors.CheckpointError, match=r"is not a t5x checkpoint: expected a "
                                                     r"'checkpoint' file .*found: notes\.txt"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("x")
        t5x_checkpoint.load_t5x(str(tmp_path / "other"))

    orbax = tmp_path / "orbax"
    orbax.mkdir()
    (orbax / "checkpoint").write_bytes(serialization.msgpack_serialize(
        {"_optimizer": {"target": {"x": "PLACEHOLDER://_optimizer.target.x"}}}))
    with pytest.raises(errors.CheckpointError, match="written through orbax"):
        t5x_checkpoint.load_t5x(str(orbax))

    (orbax / "checkpoint").write_text("not msgpack at all")
    with pytest.raises(errors.CheckpointError, match="is not a t5x msgpack checkpoint index"):
        t5x_checkpoint.load_t5x(str(orbax))


def test_params_of_another_architecture_are_named(tmp_path):
    params = _random_params(CASES["v1_1"])
    params["encoder"]["layers_0"]["mlp"]["wi_0"]["bias"] = np.zeros(48, np.float32)
    write_t5x_checkpoint(str(tmp_path / "c"), params)
    with pytest.raises(errors.CheckpointError, match="unexpected encoder/layers_0/mlp/wi_0/bias"):
        t5x_checkpoint.load_t5x(str(tmp_path / "c"))


def test_convert_of_a_missing_folder_is_one_error_line(tmp_path, capsys):
    assert cli.main(["convert", f"--t5x_checkpoint={tmp_path}/none",
                     f"--output={tmp_path}/hf"]) == 2
    err = capsys.readouterr().err
    assert err == (f"ift-jax convert: error: t5x checkpoint {tmp_path}/none: no such file or "
                   f"directory\n")
    assert not (tmp_path / "hf").exists()


def test_declared_sizes_and_nesting_are_checked_before_anything_is_allocated(
        tmp_path, capsys, monkeypatch):
    from ift_jax import declared_sizes
    monkeypatch.setattr(declared_sizes, "available_memory", lambda: 16 * 2 ** 30)
    folder = tmp_path / "checkpoint_1"
    write_t5x_checkpoint(str(folder), _random_params(CASES["v1_1"]))
    huge = {"driver": "zarr", "kvstore": {"driver": "file", "path": "target.huge"},
            "dtype": "float32", "metadata": {"shape": [200000, 200000], "chunks": [1024, 1024],
                                             "compressor": {"id": "gzip"}}}
    absolute = {**huge, "kvstore": {"driver": "file", "path": str(folder / "target.huge")}}
    ts.open(absolute, create=True, open=True).result()  # Metadata only: no chunk written.
    index = folder / "checkpoint"
    contents = serialization.msgpack_restore(index.read_bytes())
    contents["optimizer"]["target"]["token_embedder"]["embedding"] = huge
    index.write_bytes(serialization.msgpack_serialize(contents))
    out = tmp_path / "hf"
    assert cli.main(["convert", f"--t5x_checkpoint={folder}", f"--output={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ift-jax convert: error: {index}: reading its ")
    assert "298.0 GiB of host memory, and 16.0 GiB is available" in err[0]
    assert not out.exists()

    # 200 levels: within msgpack's own limit, past what the readers would recurse through.
    nested = b"\x81\xa1a" * 200 + b"\x80"
    index.write_bytes(b"\x82" + msgpack.packb("version") + msgpack.packb(3)
                      + msgpack.packb("optimizer") + b"\x81" + msgpack.packb("target") + nested)
    assert cli.main(["convert", f"--t5x_checkpoint={folder}", f"--output={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ift-jax convert: error: {index} nests deeper than 64 levels; a t5x index "
                   f"nests about 10: not a t5x checkpoint"]
