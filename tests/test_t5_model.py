"""Structure and behaviour of the Flax T5 itself (no reference needed)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ift_jax import partitioning
from ift_jax.models import t5

TINY = t5.get_config("tiny", dropout_rate=0.0)
TINY_V1_0 = TINY.replace(feed_forward_proj="relu", tie_word_embeddings=True,
                         scale_decoder_outputs=True)


def init_params(config, seed=0):
    enc, dec = jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)
    variables = t5.Transformer(config).init(jax.random.key(seed), enc, dec)
    return nn.unbox(variables["params"])


# Published sizes of FLAN-T5 (t5x naming: untied, one relpos table per stack).
@pytest.mark.parametrize("preset,count", [
    ("small", 76_961_152), ("base", 247_577_856), ("large", 783_150_080),
    ("xl", 2_849_757_184), ("xxl", 11_135_332_352)])
def test_preset_param_counts_match_published_flan_t5(preset, count):
    assert t5.param_count(t5.get_config(preset)) == count


@pytest.mark.parametrize("config", [TINY, TINY_V1_0, t5.get_config("base")],
                         ids=["v1_1", "v1_0", "base"])
def test_every_param_has_logical_axis_names(config):
    params = t5.abstract_variables(config)["params"]
    known = {name for name, _ in partitioning.DEFAULT_RULES}
    leaves = jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for path, leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
        assert len(leaf.names) == len(leaf.value.shape), jax.tree_util.keystr(path)
        assert set(leaf.names) <= known, (jax.tree_util.keystr(path), leaf.names)


def test_param_tree_uses_t5x_names():
    params = t5.abstract_variables(TINY)["params"]
    layer = params["encoder"]["layers_0"]
    assert set(layer) == {"pre_attention_layer_norm", "attention", "pre_mlp_layer_norm", "mlp"}
    assert set(layer["attention"]) == {"query", "key", "value", "out"}
    assert set(layer["mlp"]) == {"wi_0", "wi_1", "wo"}
    assert set(params["decoder"]["layers_0"]) == {
        "pre_self_attention_layer_norm", "self_attention", "pre_cross_attention_layer_norm",
        "encoder_decoder_attention", "pre_mlp_layer_norm", "mlp"}
    assert "logits_dense" in params["decoder"]
    assert params["encoder"]["relpos_bias"]["rel_embedding"].value.shape == (4, 32)
    tied = t5.abstract_variables(TINY_V1_0)["params"]
    assert "logits_dense" not in tied["decoder"]
    assert set(tied["encoder"]["layers_0"]["mlp"]) == {"wi", "wo"}


def _pack(parts):
    """Concatenates (tokens) parts into one row with segment ids and positions."""
    tokens = np.concatenate(parts)
    segments = np.concatenate([np.full(len(p), i + 1) for i, p in enumerate(parts)])
    positions = np.concatenate([np.arange(len(p)) for p in parts])
    return tokens, segments, positions


def _pad(x, length):
    return np.pad(x, (0, length - len(x)))


@pytest.mark.parametrize("config", [TINY, TINY_V1_0], ids=["v1_1", "v1_0"])
def test_packed_row_gives_same_logits_as_separate_examples(config):
    rng = np.random.default_rng(0)
    inputs = [rng.integers(2, config.vocab_size, n) for n in (7, 5)]
    targets = [rng.integers(2, config.vocab_size, n) for n in (4, 6)]
    dec_inputs = [np.concatenate([[0], t[:-1]]) for t in targets]
    params = init_params(config)
    model = t5.Transformer(config)

    enc, enc_seg, enc_pos = (_pad(x, 16)[None] for x in _pack(inputs))
    dec, dec_seg, dec_pos = (_pad(x, 12)[None] for x in _pack(dec_inputs))
    tgt = _pad(np.concatenate(targets), 12)[None]
    packed = model.apply({"params": params}, enc, dec, tgt, enc_seg, dec_seg, enc_pos,
                         dec_pos)

    start = 0
    for x, d, t in zip(inputs, dec_inputs, targets):
        alone = model.apply({"params": params}, x[None], d[None], t[None])
        np.testing.assert_allclose(packed[0, start:start + len(t)], alone[0],
                                   rtol=1e-5, atol=1e-5)
        start += len(t)


@pytest.mark.parametrize("config", [TINY, TINY_V1_0], ids=["v1_1", "v1_0"])
def test_cached_decoding_matches_full_forward(config):
    rng = np.random.default_rng(1)
    enc = rng.integers(2, config.vocab_size, (2, 11))
    enc[1, 7:] = 0
    targets = rng.integers(2, config.vocab_size, (2, 9))
    dec = np.concatenate([np.zeros((2, 1), int), targets[:, :-1]], axis=1)
    params = init_params(config)
    model = t5.Transformer(config)
    full = model.apply({"params": params}, enc, dec, targets)

    encoded = model.apply({"params": params}, enc, method=t5.Transformer.encode)
    cache = t5.init_cache(config, batch=2, max_decode_length=9, encoder_length=11)

    @jax.jit
    def step(cache, tokens):
        logits, mutated = model.apply(
            {"params": params, "cache": cache}, encoded, enc, tokens,
            method=t5.Transformer.decode, decode=True, mutable=["cache"])
        return logits, mutated["cache"]

    for i in range(dec.shape[1]):
        logits, cache = step(cache, dec[:, i:i + 1])
        np.testing.assert_allclose(logits[:, 0], full[:, i], rtol=1e-5, atol=1e-5)


def test_decoder_padding_does_not_change_real_positions():
    rng = np.random.default_rng(2)
    enc = rng.integers(2, TINY.vocab_size, (1, 10))
    targets = rng.integers(2, TINY.vocab_size, (1, 6))
    dec = np.concatenate([[[0]], targets[:, :-1]], axis=1)
    params = init_params(TINY)
    model = t5.Transformer(TINY)
    short = model.apply({"params": params}, enc, dec, targets)
    padded = model.apply({"params": params}, enc, np.pad(dec, ((0, 0), (0, 4))),
                         np.pad(targets, ((0, 0), (0, 4))))
    np.testing.assert_allclose(padded[:, :6], short, rtol=1e-5, atol=1e-5)


def test_dropout_acts_only_when_enabled():
    config = TINY.replace(dropout_rate=0.3)
    params = init_params(config)
    model = t5.Transformer(config)
    enc, dec = jnp.arange(2, 12)[None], jnp.arange(0, 6)[None]
    plain = model.apply({"params": params}, enc, dec)
    again = model.apply({"params": params}, enc, dec, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(plain, again)
    noisy = [model.apply({"params": params}, enc, dec, enable_dropout=True,
                         rngs={"dropout": jax.random.key(k)}) for k in (1, 2)]
    assert not np.allclose(noisy[0], plain)
    assert not np.allclose(noisy[0], noisy[1])


def test_bf16_compute_keeps_fp32_params_and_returns_fp32_logits():
    config = TINY.replace(dtype=jnp.bfloat16)
    variables = t5.Transformer(config).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32),
                                            jnp.ones((1, 8), jnp.int32))
    assert {x.dtype for x in jax.tree.leaves(nn.unbox(variables))} == {jnp.dtype("float32")}
    params = nn.unbox(variables["params"])
    enc, dec = jnp.arange(2, 12)[None], jnp.arange(0, 6)[None]
    logits = t5.Transformer(config).apply({"params": params}, enc, dec)
    reference = t5.Transformer(TINY).apply({"params": params}, enc, dec)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, reference, atol=0.1 * np.abs(reference).max())


def test_unknown_activation_names_the_supported_ones():
    with pytest.raises(ValueError, match="gated-<act>.*gelu_new"):
        TINY.replace(feed_forward_proj="gated-nonsense")


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="tiny, small, base, large, xl, xxl"):
        t5.get_config("huge")
