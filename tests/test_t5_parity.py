"""Our T5 is the same function as transformers' T5 (PyTorch, CPU, fp32)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import HF_CASES, UNTIED, hf_logits, make_batch, make_hf_checkpoint
from ift_jax import hf
from ift_jax.models import t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5


def relative_error(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max() / np.abs(ref).max()


@pytest.fixture(scope="module", params=list(HF_CASES))
def checkpoint(request, tmp_path_factory):
    """(case, hf_dir, built torch model, reloaded torch model, our config, our params)."""
    case = request.param
    hf_dir = str(tmp_path_factory.mktemp(case))
    built, reloaded = make_hf_checkpoint(case, hf_dir)
    config, params = hf.load_t5(hf_dir)
    return case, hf_dir, built, reloaded, config, params


def test_reference_is_unchanged_by_its_own_reload(checkpoint):
    case, hf_dir, built, reloaded, config, _ = checkpoint
    enc, dec, _ = make_batch(config.vocab_size)
    after, _ = hf_logits(reloaded, enc, dec, enc > 0)
    if case in UNTIED:
        # The file carries its own lm_head, which the reload must keep untied.
        file_head = hf.read_hf_tensors(hf_dir)["lm_head.weight"]
        np.testing.assert_array_equal(reloaded.lm_head.weight.detach().numpy(), file_head)
        assert reloaded.lm_head.weight.data_ptr() != reloaded.shared.weight.data_ptr()
        assert not config.tie_word_embeddings and not config.scale_decoder_outputs
    else:
        before, _ = hf_logits(built, enc, dec, enc > 0)
        np.testing.assert_array_equal(before, after)
        assert config.tie_word_embeddings and config.scale_decoder_outputs


def test_encoder_outputs_and_logits_match_transformers(checkpoint):
    _, _, _, reference, config, params = checkpoint
    enc, dec, _ = make_batch(config.vocab_size)
    ref_logits, ref_encoded = hf_logits(reference, enc, dec, enc > 0)
    model = t5.Transformer(config)
    logits = model.apply({"params": params}, enc, dec)
    encoded = model.apply({"params": params}, enc, method=t5.Transformer.encode)
    assert logits.dtype == jnp.float32
    assert relative_error(encoded, ref_encoded) <= TOLERANCE
    assert relative_error(logits, ref_logits) <= TOLERANCE


def test_loss_matches_transformers(checkpoint):
    _, _, _, reference, config, params = checkpoint
    enc, dec, targets = make_batch(config.vocab_size, seed=1)
    labels = np.where(targets > 0, targets, -100)
    with torch.no_grad():
        ref_loss = reference(input_ids=torch.as_tensor(enc),
                             attention_mask=torch.as_tensor((enc > 0).astype(np.int64)),
                             decoder_input_ids=torch.as_tensor(dec),
                             labels=torch.as_tensor(labels)).loss.item()
    logits = t5.Transformer(config).apply({"params": params}, enc, dec, targets)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    weights = targets > 0
    loss = float((token_nll * weights).sum() / weights.sum())
    assert abs(loss - ref_loss) / abs(ref_loss) <= TOLERANCE


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (8, 20)])
def test_relative_position_buckets_match_transformers(bidirectional, num_buckets,
                                                      max_distance):
    relative = np.arange(-400, 401)
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        torch.as_tensor(relative), bidirectional, num_buckets, max_distance).numpy()
    ours = t5.relative_position_bucket(jnp.asarray(relative, jnp.int32), bidirectional,
                                       num_buckets, max_distance)
    np.testing.assert_array_equal(np.asarray(ours), ref)


def test_save_t5_round_trip_loads_in_transformers(checkpoint, tmp_path):
    case, _, _, reference, config, params = checkpoint
    hf.save_t5(str(tmp_path), config, params)
    restored = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    enc, dec, _ = make_batch(config.vocab_size, seed=2)
    ref_logits, _ = hf_logits(reference, enc, dec, enc > 0)
    np.testing.assert_array_equal(hf_logits(restored, enc, dec, enc > 0)[0], ref_logits)
    config2, params2 = hf.load_t5(str(tmp_path))
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bf16_compute_stays_close_with_fp32_params_and_logits(checkpoint):
    _, hf_dir, _, reference, _, _ = checkpoint
    config, params = hf.load_t5(hf_dir, dtype=jnp.bfloat16)
    assert {p.dtype for p in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    enc, dec, _ = make_batch(config.vocab_size, seed=3)
    ref_logits, _ = hf_logits(reference, enc, dec, enc > 0)
    logits = t5.Transformer(config).apply({"params": params}, enc, dec)
    assert logits.dtype == jnp.float32
    assert relative_error(logits, ref_logits) < 5e-2


def _write_torch_shards(state, hf_dir, num_shards):
    names = sorted(state)
    weight_map = {}
    for i in range(num_shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        part = {n: state[n] for n in names[i::num_shards]}
        torch.save(part, os.path.join(hf_dir, shard))
        weight_map.update({n: shard for n in part})
    with open(os.path.join(hf_dir, hf.TORCH_BIN_INDEX), "w") as f:
        import json
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("layout", ["sharded_safetensors", "torch_bin", "sharded_torch_bin"])
def test_other_file_layouts_load_the_same_params(checkpoint, tmp_path, layout):
    case, hf_dir, _, reference, config, params = checkpoint
    out = str(tmp_path)
    if layout == "sharded_safetensors":
        reference.save_pretrained(out, max_shard_size="2KB")
        assert os.path.exists(os.path.join(out, hf.SAFETENSORS_INDEX))
    else:
        with open(os.path.join(hf_dir, "config.json")) as src, \
                open(os.path.join(out, "config.json"), "w") as dst:
            dst.write(src.read())
        state = {k: torch.as_tensor(v) for k, v in hf.read_hf_tensors(hf_dir).items()}
        if layout == "torch_bin":
            torch.save(state, os.path.join(out, hf.TORCH_BIN))
        else:
            _write_torch_shards(state, out, num_shards=3)
    config2, params2 = hf.load_t5(out)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)
