"""Decoding: greedy and beam search equal HF `generate`, the cache (cross-attention
projected once, shared by beams) changes nothing, sampling filters as HF's warpers,
and LoRA, QLoRA and prompt-tuned models decode with their adapters."""

import flax.linen as nn
import jax
import numpy as np
import jax.numpy as jnp
import pytest

from hf_reference import make_hf_checkpoint
from ift_jax import decoding, hf, peft
from ift_jax.models import t5

EOS = 1
MAX_LEN = 10


def _encoder_batch(vocab_size):
    """Four inputs, three of them padded."""
    enc = np.random.default_rng(0).integers(2, vocab_size, (4, 9))
    enc[1, 6:] = 0
    enc[2, 4:] = 0
    enc[3, 2:] = 0
    return enc


def _make_eos_likely(hf_model, params, config, token):
    """EOS's output row becomes 1.05x the row of `token`: EOS replaces `token` when chosen.

    Random tiny models almost never emit EOS; this makes rows stop at
    different steps. Applied to both models (for tied models, to the shared
    embedding, so EOS's input embedding changes in both too).
    """
    import torch
    if config.tie_word_embeddings:
        table = params["token_embedder"]["embedding"]
        params["token_embedder"]["embedding"] = table.at[EOS].set(1.05 * table[token])
        weight = hf_model.shared.weight
    else:
        kernel = params["decoder"]["logits_dense"]["kernel"]
        params["decoder"]["logits_dense"]["kernel"] = kernel.at[:, EOS].set(1.05 * kernel[:, token])
        weight = hf_model.lm_head.weight
    with torch.no_grad():
        weight[EOS] = 1.05 * weight[token]


@pytest.fixture(scope="module", params=["v1_1", "v1_1+eos", "v1_0", "v1_0+eos"])
def checkpoint(request, tmp_path_factory):
    """(HF model, config, params, encoder tokens); '+eos' cases make EOS frequent."""
    case = request.param.split("+")[0]
    hf_dir = str(tmp_path_factory.mktemp(case))
    _, hf_model = make_hf_checkpoint(case, hf_dir)
    config, params = hf.load_t5(hf_dir)
    params = jax.tree.map(jnp.asarray, params)
    enc = _encoder_batch(config.vocab_size)
    if request.param.endswith("+eos"):
        plain = np.asarray(decoding.greedy(t5.Transformer(config), params, jnp.asarray(enc),
                                           max_decode_length=MAX_LEN)[0])
        token = np.bincount(plain[:, 2:].ravel()).argmax()  # Frequent, but not at once.
        _make_eos_likely(hf_model, params, config, token)
    hf_model.eos_likely = request.param.endswith("+eos")
    return hf_model, config, params, enc


def hf_generate(hf_model, enc, **kwargs):
    """HF `generate` tokens without the start token, 0 after EOS, padded to MAX_LEN."""
    import torch
    with torch.no_grad():
        out = hf_model.generate(
            torch.as_tensor(enc), attention_mask=torch.as_tensor((enc > 0).astype(np.int64)),
            max_new_tokens=MAX_LEN, do_sample=False, decoder_start_token_id=0,
            eos_token_id=EOS, pad_token_id=0, **kwargs).numpy()
    assert (out[:, 0] == 0).all()
    return _zero_after_eos(np.pad(out[:, 1:], ((0, 0), (0, MAX_LEN + 1 - out.shape[1]))))


def _zero_after_eos(tokens):
    after = np.cumsum(tokens == EOS, axis=1) - (tokens == EOS) > 0
    return np.where(after, 0, tokens)


def test_greedy_equals_hf_generate(checkpoint):
    hf_model, config, params, enc = checkpoint
    ours, _ = decoding.greedy(t5.Transformer(config), params, jnp.asarray(enc),
                              max_decode_length=MAX_LEN)
    expected = hf_generate(hf_model, enc, num_beams=1)
    np.testing.assert_array_equal(np.asarray(ours), expected)


def test_greedy_eos_cases_stop_rows_at_different_steps(checkpoint):
    hf_model, _, _, enc = checkpoint
    tokens = hf_generate(hf_model, enc, num_beams=1)
    ended = (tokens == EOS).any(axis=1)
    assert (ended.any() and not ended.all()) if hf_model.eos_likely else not ended.any()


@pytest.mark.parametrize("length_penalty", [1.0, 0.6, 2.0])
def test_beam_search_equals_hf_generate(checkpoint, length_penalty):
    hf_model, config, params, enc = checkpoint
    ours, _ = decoding.beam_search(t5.Transformer(config), params, jnp.asarray(enc),
                                   num_beams=4, max_decode_length=MAX_LEN,
                                   length_penalty=length_penalty)
    expected = hf_generate(hf_model, enc, num_beams=4, length_penalty=length_penalty,
                           early_stopping=False)
    np.testing.assert_array_equal(np.asarray(ours), expected)


def _beam_scores(model, params, enc, tokens, length_penalty):
    """Summed log-probs of `tokens` (up to EOS) by a full forward, length-penalized."""
    dec = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    logprobs = jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray(enc), dec))
    picked = jnp.take_along_axis(logprobs, tokens[..., None], -1)[..., 0]
    length = jnp.where((tokens == EOS).any(1), jnp.argmax(tokens == EOS, 1) + 1, MAX_LEN)
    return jnp.sum(picked * (jnp.arange(MAX_LEN) < length[:, None]), 1) / length ** length_penalty


def test_beam_score_is_sum_logprob_over_generated_length(checkpoint):
    _, config, params, enc = checkpoint
    model = t5.Transformer(config)
    tokens, scores = decoding.beam_search(model, params, jnp.asarray(enc), num_beams=4,
                                          max_decode_length=MAX_LEN, length_penalty=0.6)
    np.testing.assert_allclose(scores, _beam_scores(model, params, enc, tokens, 0.6),
                               rtol=1e-4)


def test_cached_greedy_equals_uncached(checkpoint):
    _, config, params, enc = checkpoint
    model = t5.Transformer(config)
    cached, _ = decoding.greedy(model, params, jnp.asarray(enc), max_decode_length=MAX_LEN)
    uncached = decoding.greedy_uncached(model, params, jnp.asarray(enc),
                                        max_decode_length=MAX_LEN)
    np.testing.assert_array_equal(cached, uncached)


def _decode_steps(model, params, encoded, enc, dec, encoded_later):
    """Logits `[batch, steps, vocab]` of `decode=True` steps over `dec`, and the last cache.

    Steps after the first get `encoded_later` in place of `encoded`.
    """
    cache = t5.init_cache(model.config, dec.shape[0], dec.shape[1], enc.shape[1])
    step = jax.jit(lambda cache, encoded, tokens: model.apply(
        {"params": params, "cache": cache}, encoded, enc, tokens, method="decode",
        decode=True, mutable=["cache"]))
    logits = []
    for i in range(dec.shape[1]):
        out, mutated = step(cache, encoded if i == 0 else encoded_later, dec[:, i:i + 1])
        logits.append(out[:, 0])
        cache = mutated["cache"]
    return jnp.stack(logits, 1), cache


def test_cross_attention_keys_and_values_come_from_the_first_step(checkpoint):
    """Later steps read the cached projections: a zeroed encoder output changes nothing."""
    _, config, params, enc = checkpoint
    model = t5.Transformer(config)
    targets = np.random.default_rng(1).integers(2, config.vocab_size, (4, MAX_LEN))
    dec = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
    full = model.apply({"params": params}, enc, dec)
    encoded = model.apply({"params": params}, enc, method="encode")
    stepped, cache = _decode_steps(model, params, encoded, enc, dec, jnp.zeros_like(encoded))
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)
    cross = cache["decoder"]["layers_0"]["encoder_decoder_attention"]
    assert cross["cached_key"].shape == (4, enc.shape[1], config.num_heads, config.d_kv)


def test_beams_sharing_an_encoder_row_decode_as_repeated_rows(checkpoint):
    """Decoder rows grouped over one encoder row (beam search) get the logits of
    the same rows each with its own copy of the input."""
    _, config, params, enc = checkpoint
    model, beams = t5.Transformer(config), 3
    targets = np.random.default_rng(2).integers(2, config.vocab_size, (4 * beams, MAX_LEN))
    dec = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
    repeated = np.repeat(enc, beams, axis=0)
    full = model.apply({"params": params}, repeated, dec)
    encoded = model.apply({"params": params}, enc, method="encode")
    stepped, cache = _decode_steps(model, params, encoded, enc, dec, encoded)
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)
    cross = cache["decoder"]["layers_0"]["encoder_decoder_attention"]
    assert cross["cached_key"].shape[0] == 4  # Per input, not per beam.


def test_greedy_scores_are_logprobs_of_the_tokens(checkpoint):
    _, config, params, enc = checkpoint
    model = t5.Transformer(config)
    tokens, scores = decoding.greedy(model, params, jnp.asarray(enc), max_decode_length=MAX_LEN)
    dec = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    logprobs = jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray(enc), dec))
    picked = jnp.take_along_axis(logprobs, tokens[..., None], -1)[..., 0]
    real = jnp.cumsum(tokens == EOS, 1) - (tokens == EOS) == 0  # Up to and incl. EOS.
    np.testing.assert_allclose(scores, jnp.sum(picked * real, 1), rtol=1e-5)


# ----------------------------------------------------------------------------
# Sampling.


@pytest.fixture(scope="module")
def tiny():
    config = t5.get_config("tiny", dropout_rate=0.0)
    enc = jnp.asarray(_encoder_batch(config.vocab_size))
    params = t5.Transformer(config).init(jax.random.key(0), enc, enc[:, :3])["params"]
    return config, nn.unbox(params), enc


def test_sampling_with_top_k_1_is_greedy(tiny):
    config, params, enc = tiny
    model = t5.Transformer(config)
    greedy, _ = decoding.greedy(model, params, enc, max_decode_length=MAX_LEN)
    sampled, _ = decoding.sample(model, params, enc, jax.random.key(3),
                                 max_decode_length=MAX_LEN, temperature=0.7, top_k=1)
    np.testing.assert_array_equal(sampled, greedy)


def test_sampling_is_deterministic_per_rng(tiny):
    config, params, enc = tiny
    model = t5.Transformer(config)
    draw = [decoding.sample(model, params, enc, jax.random.key(seed),
                            max_decode_length=MAX_LEN)[0] for seed in (0, 0, 1)]
    np.testing.assert_array_equal(draw[0], draw[1])
    assert not np.array_equal(draw[0], draw[2])


def test_top_p_keeps_the_smallest_nucleus():
    probs = jnp.array([[0.5, 0.05, 0.3, 0.15], [0.9, 0.04, 0.03, 0.03]])
    logits = jnp.log(probs)
    kept = np.isfinite(decoding.filter_logits(logits, top_p=0.8))
    np.testing.assert_array_equal(kept, [[True, False, True, False],
                                         [True, False, False, False]])
    kept = np.isfinite(decoding.filter_logits(logits, top_p=0.81))
    np.testing.assert_array_equal(kept[0], [True, False, True, True])


def test_top_k_keeps_the_k_largest():
    logits = jnp.array([[0.1, 2.0, -1.0, 1.0]])
    kept = np.isfinite(decoding.filter_logits(logits, top_k=2))
    np.testing.assert_array_equal(kept, [[False, True, False, True]])


def test_top_p_sampling_never_leaves_the_nucleus(tiny):
    config, params, enc = tiny
    model = t5.Transformer(config)
    tokens, _ = decoding.sample(model, params, enc, jax.random.key(5), max_decode_length=1,
                                top_p=0.3, temperature=1.0)
    logits = model.apply({"params": params}, enc, jnp.zeros((4, 1), jnp.int32))[:, 0]
    allowed = np.isfinite(decoding.filter_logits(logits, top_p=0.3))
    assert allowed[np.arange(4), np.asarray(tokens[:, 0])].all()
    assert (allowed.sum(1) < config.vocab_size).all()


# ----------------------------------------------------------------------------
# LoRA.


def _randomize_lora(params):
    """qwix inits B to zero, which would make the adapters no-ops."""
    keys = iter(jax.random.split(jax.random.key(2), 1000))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(next(keys), x.shape, x.dtype)
        if getattr(p[-1], "key", None) in peft.LORA_LEAVES else x, params)


def test_lora_model_decodes_like_merged_params(tiny):
    config, params, enc = tiny
    lora_cfg = peft.LoraConfig(rank=4)
    lora_model = peft.apply_lora(t5.Transformer(config), lora_cfg, for_eval=True)
    lora_params = _randomize_lora(peft.init_adapters(lora_model, params, jax.random.key(1)))
    merged = peft.merge_lora(lora_params, lora_cfg)
    plain = t5.Transformer(config)
    ours, _ = decoding.greedy(lora_model, lora_params, enc, max_decode_length=MAX_LEN)
    expected, _ = decoding.greedy(plain, merged, enc, max_decode_length=MAX_LEN)
    base, _ = decoding.greedy(plain, params, enc, max_decode_length=MAX_LEN)
    np.testing.assert_array_equal(ours, expected)
    assert not np.array_equal(ours, base)  # The adapters matter.
    beams, _ = decoding.beam_search(lora_model, lora_params, enc, num_beams=3,
                                    max_decode_length=MAX_LEN)
    merged_beams, _ = decoding.beam_search(plain, merged, enc, num_beams=3,
                                           max_decode_length=MAX_LEN)
    np.testing.assert_array_equal(beams, merged_beams)


def test_qlora_prompt_model_decodes_like_its_full_forward(tiny):
    """Cached decoding projects the (QLoRA-adapted) cross-attention keys and values of
    `[prompt; input]` once; greedy and beam search agree with full forwards."""
    config, params, enc = tiny
    prompt_cfg = peft.PromptConfig(length=3)
    model = peft.apply_lora(peft.apply_prompt_tuning(t5.Transformer(config), prompt_cfg),
                            peft.LoraConfig(rank=4, quantize=True, tile_size=4), for_eval=True)
    params = peft.init_adapters(model, params, jax.random.key(1), prompt_cfg)
    params = _randomize_lora(params)
    greedy, _ = decoding.greedy(model, params, enc, max_decode_length=MAX_LEN)
    uncached = decoding.greedy_uncached(model, params, enc, max_decode_length=MAX_LEN)
    np.testing.assert_array_equal(greedy, uncached)
    tokens, scores = decoding.beam_search(model, params, enc, num_beams=3,
                                          max_decode_length=MAX_LEN)
    np.testing.assert_allclose(scores, _beam_scores(model, params, enc, tokens, 1.0),
                               rtol=1e-4)
