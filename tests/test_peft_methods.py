"""Adapters, IA3, prefix tuning and the LoRA variants on our T5 (no torch): structure,
cached decoding, merging and folding, FLOPs, config reading, soft-prompt neighbours."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ift_jax import decoding, lora, model_setup, peft
from ift_jax.configs import default
from ift_jax.models import t5

pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed")

TINY = t5.get_config("tiny", dropout_rate=0.0)
METHODS = {
    "houlsby": peft.MethodConfig("houlsby", adapter=peft.AdapterConfig(width=8)),
    "pfeiffer": peft.MethodConfig("pfeiffer", adapter=peft.AdapterConfig(width=8)),
    "ia3": peft.MethodConfig("ia3", ia3=peft.IA3Config()),
    "prefix": peft.MethodConfig("prefix", prefix=peft.PrefixConfig(length=3)),
    "prefix_peft_mlp": peft.MethodConfig("prefix", prefix=peft.PrefixConfig(3, "peft", 16)),
    "dora_rslora_all": peft.MethodConfig("lora", lora=peft.LoraConfig(
        rank=4, alpha=8.0, use_dora=True, use_rslora=True,
        target_regex=lora.target_regex("all"))),
}


@pytest.fixture(scope="module")
def base_params():
    enc, dec = make_batch()
    return nn.unbox(t5.Transformer(TINY).init(jax.random.key(0), enc, dec)["params"])


def make_batch(batch=2, enc_len=12, dec_len=7, seed=0):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, TINY.vocab_size, (batch, enc_len))
    enc[1, enc_len - 4:] = 0
    dec = rng.integers(2, TINY.vocab_size, (batch, dec_len))
    dec[:, 0] = 0
    return jnp.asarray(enc), jnp.asarray(dec)


def trained(base_params, method, seed=0, scale=0.3):
    """Model and params of `method` with its trainable params moved off their init."""
    model, eval_model = peft.build_models(TINY, method)
    params = peft.init_adapters(model, base_params, jax.random.key(seed))
    trainable, frozen = peft.split_params(params, peft.trainable_mask(params, method.name))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    trainable = jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape),
                             trainable)
    return eval_model, peft.merge_params(trainable, frozen)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def trainable_paths(params, method):
    mask = traverse_util.flatten_dict(peft.trainable_mask(params, method))
    return sorted("/".join(k) for k, m in mask.items() if m)


# ----------------------------------------------------------------------------
# Structure.


def test_each_method_trains_only_its_own_leaves(base_params):
    counts = {}
    for name, method in METHODS.items():
        model, _ = peft.build_models(TINY, method)
        params = peft.init_adapters(model, base_params, jax.random.key(0))
        paths = trainable_paths(params, method.name)
        counts[name] = peft.count_params(peft.split_params(
            params, peft.trainable_mask(params, method.name))[0])
        assert paths and not any(p in traverse_util.flatten_dict(base_params) for p in
                                 (tuple(q.split("/")) for q in paths)), name
    d, w, inner, ff = 64, 8, 4 * 16, 128
    adapter = d * w + w + w * d + d
    # Tiny: 2 encoder layers (attention, mlp), 2 decoder layers (self, cross, mlp).
    assert counts["houlsby"] == (2 * 2 + 2 * 3) * adapter
    assert counts["pfeiffer"] == (2 + 2) * adapter
    assert counts["ia3"] == 2 * (2 * inner + ff) + 2 * (4 * inner + ff)
    assert counts["prefix"] == 3 * (2 * 2 + 4 * 2) * inner  # P x slots x heads*kv.
    lora_out = {"query": inner, "key": inner, "value": inner, "out": d, "wi_0": ff,
                "wi_1": ff, "wo": d}
    lora_in = {"query": d, "key": d, "value": d, "out": inner, "wi_0": d, "wi_1": d,
               "wo": ff}
    per_block = {p: 4 * (lora_in[p] + lora_out[p]) + lora_out[p] for p in lora_in}
    attention = sum(per_block[p] for p in ("query", "key", "value", "out"))
    mlp = sum(per_block[p] for p in ("wi_0", "wi_1", "wo"))
    assert counts["dora_rslora_all"] == 2 * (attention + mlp) + 2 * (2 * attention + mlp)


def test_lora_target_presets():
    model = t5.Transformer(TINY)
    qv = peft.lora_targets(model, peft.LoraConfig(target_regex=lora.target_regex("")))
    assert qv == peft.lora_targets(model, peft.LoraConfig(target_regex=lora.target_regex("qv")))
    assert all(p.endswith(("/query", "/value")) for p in qv) and len(qv) == 12
    every = peft.lora_targets(model, peft.LoraConfig(target_regex=lora.target_regex("all")))
    kernels = lora.kernel_module_paths(model)
    assert every == [p for p in kernels if p != "decoder/logits_dense"]
    assert lora.target_regex(".*/mlp/wo") == ".*/mlp/wo"
    assert peft.LoraConfig(rank=16, alpha=8.0, use_rslora=True).scale == 2.0
    with pytest.raises(peft.PeftError, match="DoRA on QLoRA"):
        peft.LoraConfig(use_dora=True, quantize=True)


def test_ia3_and_lora_variants_start_as_the_base_model(base_params):
    enc, dec = make_batch()
    plain = t5.Transformer(TINY).apply({"params": base_params}, enc, dec)
    for name in ("ia3", "dora_rslora_all"):
        model, _ = peft.build_models(TINY, METHODS[name])
        params = peft.init_adapters(model, base_params, jax.random.key(0))
        assert rel(model.apply({"params": params}, enc, dec), plain) < 1e-6, name


def test_method_settings_are_checked():
    with pytest.raises(peft.PeftError, match="method 'ia3' needs MethodConfig.ia3"):
        peft.MethodConfig("ia3")
    with pytest.raises(peft.PeftError, match="IA3 targets \\['k'\\]"):
        peft.MethodConfig("ia3", ia3=peft.IA3Config(("k",))).additions()
    with pytest.raises(peft.PeftError, match="unknown PEFT method 'adapters'"):
        peft.MethodConfig("adapters")
    with pytest.raises(peft.PeftError, match="'peft' needs num_decoder_layers <= num_layers"):
        peft.build_models(TINY.replace(num_decoder_layers=3), METHODS["prefix_peft_mlp"])


# ----------------------------------------------------------------------------
# Decoding: the KV cache (prefixes are params, put in front of the cache).


@pytest.mark.parametrize("name", list(METHODS))
def test_cached_greedy_equals_uncached_greedy(base_params, name):
    model, params = trained(base_params, METHODS[name])
    enc, _ = make_batch(seed=1)
    cached, _ = decoding.greedy(model, params, enc, max_decode_length=6)
    uncached = decoding.greedy_uncached(model, params, enc, max_decode_length=6)
    np.testing.assert_array_equal(cached, uncached)


def test_cached_prefix_logits_equal_the_full_forward(base_params):
    model, params = trained(base_params, METHODS["prefix"])
    enc, dec = make_batch()
    variables = {"params": params}
    full = model.apply(variables, enc, dec)
    encoded = model.apply(variables, enc, method="encode")
    cache = t5.init_cache(TINY, batch=2, max_decode_length=dec.shape[1],
                          encoder_length=enc.shape[1])
    for i in range(dec.shape[1]):
        logits, mutated = model.apply({**variables, "cache": cache}, encoded, enc,
                                      dec[:, i:i + 1], method="decode", decode=True,
                                      mutable=["cache"])
        cache = mutated["cache"]
        np.testing.assert_allclose(logits[:, 0], full[:, i], rtol=1e-5, atol=1e-5)


def test_beam_search_with_prefixes_scores_its_tokens_as_the_full_forward(base_params):
    """Beams share their input's cache rows; the prefixes must follow every beam."""
    model, params = trained(base_params, METHODS["prefix"])
    enc, _ = make_batch(seed=2)
    tokens, scores = decoding.beam_search(model, params, enc, max_decode_length=5,
                                          num_beams=3, length_penalty=0.0)
    log_likelihood, _, _ = decoding.score_targets(model, params, enc, tokens)
    np.testing.assert_allclose(scores, log_likelihood, rtol=1e-5)


# ----------------------------------------------------------------------------
# Merged and folded forms.


@pytest.mark.parametrize("name", ["ia3", "dora_rslora_all"])
def test_merged_params_compute_the_methods_function(base_params, name):
    model, params = trained(base_params, METHODS[name])
    enc, dec = make_batch()
    merged = peft.merged_params(params, METHODS[name])
    assert jax.tree.structure(merged) == jax.tree.structure(base_params)
    ours = model.apply({"params": params}, enc, dec)
    assert rel(ours, t5.Transformer(TINY).apply({"params": base_params}, enc, dec)) > 1e-2
    assert rel(t5.Transformer(TINY).apply({"params": merged}, enc, dec), ours) < 1e-5


@pytest.mark.parametrize("name, reason", [
    ("houlsby", "nonlinear layer"), ("prefix", "extra attention positions")])
def test_unmergeable_methods_are_refused_with_the_reason(base_params, name, reason):
    with pytest.raises(peft.PeftError, match=f"cannot be merged into a plain T5: .*{reason}"):
        peft.merged_params(base_params, METHODS[name])
    with pytest.raises(peft.PeftError, match="soft prompt"):
        peft.merged_params(base_params, peft.MethodConfig("prompt", prompt=peft.PromptConfig()))


def test_fold_prefix_gives_the_plain_table_of_the_same_function(base_params):
    method = METHODS["prefix_peft_mlp"]
    model, params = trained(base_params, method)
    folded = peft.fold_prefix(TINY, params, method.prefix)
    assert set(folded["prefix"]) == {"key_values"}
    assert folded["prefix"]["key_values"].shape == (3, 2 * 2, 4, 16)
    plain = dataclasses.replace(method, prefix=dataclasses.replace(method.prefix, hidden=0))
    plain_model, _ = peft.build_models(TINY, plain)
    enc, dec = make_batch()
    np.testing.assert_allclose(plain_model.apply({"params": folded}, enc, dec),
                               model.apply({"params": params}, enc, dec), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# FLOPs and config.


def test_training_flops_count_adapter_kernels_and_prefix_keys(base_params):
    enc_len, dec_len = 32, 8

    def flops(name):
        params = peft.abstract_params(peft.build_models(TINY, METHODS[name])[0])
        mask = peft.trainable_mask(params, METHODS[name].name)
        return model_setup.training_flops_per_token(TINY, enc_len, dec_len, params, mask)

    frozen = model_setup.training_flops_per_token(
        TINY, enc_len, dec_len, t5.abstract_variables(TINY)["params"],
        jax.tree.map(lambda _: False, nn.unbox(t5.abstract_variables(TINY)["params"])))
    tokens = enc_len + dec_len
    adapter = 2 * 64 * 8  # down + up kernel per position.
    positions = 2 * enc_len * 2 + 2 * dec_len * 3  # Houlsby sites per example.
    assert flops("houlsby") - frozen == pytest.approx(6 * adapter * positions / tokens)
    assert flops("ia3") == pytest.approx(frozen)
    inner, p = 4 * 16, 3
    extra = 12 * inner * p * (2 * enc_len + 2 * dec_len * 2)  # enc self, dec self + cross.
    assert flops("prefix") - frozen == pytest.approx(extra / tokens)
    assert flops("prefix_peft_mlp") - frozen == pytest.approx(
        12 * inner * p * 2 * dec_len / tokens)


@pytest.mark.parametrize("method", peft.METHODS)
def test_every_method_builds_from_the_default_config(method):
    config = default.get_config()
    config.peft.method = method
    config.peft.prompt_length, config.peft.prefix_length = 4, 2
    setup = model_setup.build(config)
    params = peft.abstract_params(setup.model)
    assert peft.count_params(peft.split_params(params, setup.trainable_mask(params))[0]) > 0


def test_prompt_init_text_is_tokenized_with_the_runs_vocabulary():
    c = default.get_config().peft
    c.prompt_init, c.prompt_init_text, c.prompt_length = "text", "Hi", 4
    cfg = model_setup.prompt_config(c, vocabulary=lambda: "byte")
    assert cfg.init_token_ids == (ord("H") + 3, ord("i") + 3)  # Byte ids: byte + 3.
    c.prompt_init_ids = "7 9"
    assert model_setup.prompt_config(c).init_token_ids == (7, 9)
    c.prompt_init_ids = ""
    with pytest.raises(peft.PeftError, match="needs the run's vocabulary"):
        model_setup.prompt_config(c)


# ----------------------------------------------------------------------------
# Soft-prompt neighbours (Lester et al. 2021, section 7).


@pytest.mark.parametrize("metric", peft.PROMPT_METRICS)
def test_a_prompt_initialized_from_tokens_has_them_as_nearest_neighbours(base_params, metric):
    embedding = base_params["token_embedder"]["embedding"]
    ids = (17, 300, 42, 17, 5)
    prompt = peft.init_prompt(jax.random.key(0), embedding,
                              peft.PromptConfig(length=5, init="text", init_token_ids=ids))
    nearest, dist = peft.prompt_neighbors(prompt, embedding, k=3, metric=metric)
    assert nearest.shape == dist.shape == (5, 3)
    assert tuple(nearest[:, 0]) == ids
    np.testing.assert_allclose(dist[:, 0], 0.0, atol=1e-5)
    assert (np.diff(dist, axis=1) >= 0).all() and (dist[:, 1] > 1e-3).all()
    moved = np.asarray(prompt) + 0.05 * np.random.default_rng(0).standard_normal(prompt.shape)
    assert tuple(peft.prompt_neighbors(moved, embedding, k=1, metric=metric)[0][:, 0]) == ids
    with pytest.raises(peft.PeftError, match="metric 'dot'"):
        peft.prompt_neighbors(prompt, embedding, metric="dot")
