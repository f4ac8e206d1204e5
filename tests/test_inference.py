"""`inference.Inference`: length buckets, sharded batches, rank classification in one call."""

import jax
import numpy as np
import pytest

from ift_jax import decoding, inference, partitioning
from ift_jax.models import t5

CONFIG = t5.get_config("tiny", vocab_size=64, d_model=32, d_ff=64, d_kv=8, num_heads=4,
                       num_layers=2, num_decoder_layers=2, dtype="float32")


@pytest.fixture(scope="module")
def model_and_params():
    model = t5.Transformer(CONFIG)
    rng = np.random.default_rng(0)
    params = model.init(jax.random.key(1), np.ones((1, 8), np.int32),
                        np.ones((1, 4), np.int32))["params"]
    # Larger weights than the init: logits far from uniform, so argmaxes are not near ties.
    params = jax.tree.map(lambda x: x * 3.0, params)
    return model, params, rng


def _rows(rng, count, low, high):
    return [list(rng.integers(2, 64, rng.integers(low, high))) + [1] for _ in range(count)]


def test_bucket_lengths_halve_down_to_multiples_of_eight():
    assert inference.bucket_lengths(192, 4) == [24, 48, 96, 192]
    assert inference.bucket_lengths(100, 3) == [32, 56, 100]
    assert inference.bucket_lengths(16, 4) == [8, 16]
    assert inference.bucket_lengths(64, 1) == [64]


def _sharded(params, mesh):
    abstract = t5.abstract_variables(CONFIG)["params"]
    shardings = partitioning.logical_shardings(abstract, mesh)
    return jax.device_put(params, shardings)


def test_sharded_bucketed_generation_equals_plain_greedy_row_by_row(model_and_params):
    model, params, rng = model_and_params
    inputs = _rows(rng, 11, 3, 60)  # Several buckets, one partial batch.
    mesh = partitioning.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    sharded = _sharded(params, mesh)
    assert any(len(set(s.device for s in x.addressable_shards)) > 1 and
               x.sharding.spec != jax.sharding.PartitionSpec()
               for x in jax.tree.leaves(sharded))
    runner = inference.Inference(model, sharded, mesh, batch_size=6, inputs_length=64,
                                 targets_length=16, num_buckets=3)
    assert runner.batch_size == 8  # A multiple of the 4 batch shards (data x fsdp).
    got = runner.generate(inputs, max_decode_length=6)
    for row, tokens in zip(inputs, got):
        padded = np.zeros((1, 64), np.int32)
        padded[0, :len(row)] = row
        want, _ = decoding.greedy(model, params, padded, max_decode_length=6)
        np.testing.assert_array_equal(tokens, np.asarray(want)[0])


def test_score_choices_equals_a_brute_force_loop_over_choices(model_and_params):
    model, params, rng = model_and_params
    inputs = _rows(rng, 5, 4, 30)
    letters = [[[3 + k, 1] for k in range(4)] for _ in inputs]  # "A".."D" + EOS each
    letters[2] = letters[2][:3]  # An example with fewer choices.
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    runner = inference.Inference(model, _sharded(params, mesh), mesh, batch_size=4,
                                 inputs_length=32, targets_length=8)
    got = runner.score_choices(inputs, letters)
    for row, choices, scores in zip(inputs, letters, got):
        assert scores.shape == (len(choices),)
        for choice, score in zip(choices, scores):
            enc = np.zeros((1, 32), np.int32)
            enc[0, :len(row)] = row
            dec = np.zeros((1, 8), np.int32)
            dec[0, :len(choice)] = choice
            ll, _, _ = decoding.score_targets(model, params, enc, dec)
            # fp32 on a (2, 2, 2) mesh vs one device: reductions split differently.
            assert score == pytest.approx(float(ll[0]), rel=1e-4)


def test_score_equals_score_targets(model_and_params):
    model, params, rng = model_and_params
    inputs, targets = _rows(rng, 6, 2, 40), _rows(rng, 6, 1, 12)
    mesh = partitioning.make_mesh({"fsdp": -1})
    runner = inference.Inference(model, _sharded(params, mesh), mesh, batch_size=8,
                                 inputs_length=48, targets_length=16)
    got = runner.score(inputs, targets)
    for row, target, values in zip(inputs, targets, got):
        enc = np.zeros((1, 48), np.int32)
        enc[0, :len(row)] = row
        dec = np.zeros((1, 16), np.int32)
        dec[0, :len(target)] = target
        want = [float(np.asarray(x)[0]) for x in
                decoding.score_targets(model, params, enc, dec)]
        np.testing.assert_allclose(values, want, rtol=1e-4, atol=1e-5)
