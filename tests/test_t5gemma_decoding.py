"""T5Gemma and T5Gemma 2 through `ift_jax.decoding`: greedy and beam search equal HF
`generate` token for token, with decoder sliding windows shorter than the outputs; cached
decoding steps equal the full forward; scanned stacks decode the same; teacher-forced
scoring is HF's log-likelihood."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t5gemma_reference as ref
from ift_jax import decoding, scan_layout
from ift_jax.models import t5gemma, t5gemma_hf

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

EOS = 1
MAX_LEN = 10  # Longer than every decoder window of the cases below (3, 3, 4, 3).
CASES = [("t5gemma", "mqa_capped", True), ("t5gemma", "mha_untied", False),
         ("t5gemma2", "mqa_linear_rope", True), ("t5gemma2", "gqa2_odd_window", False)]


def _encoder_batch():
    """Four inputs, three of them padded."""
    enc = np.random.default_rng(0).integers(3, 96, (4, 9))
    enc[1, 6:] = 0
    enc[2, 4:] = 0
    enc[3, 2:] = 0
    return enc.astype(np.int32)


def hf_generate(hf_model, enc, **kwargs):
    """HF `generate` tokens without the start token (2), 0 after EOS, padded to MAX_LEN."""
    with torch.no_grad():
        out = hf_model.generate(
            torch.as_tensor(enc, dtype=torch.long),
            attention_mask=torch.as_tensor(enc > 0, dtype=torch.long), max_new_tokens=MAX_LEN,
            do_sample=False, eos_token_id=EOS, pad_token_id=0, **kwargs).numpy()
    assert (out[:, 0] == 2).all()  # Gemma's BOS starts the decoder.
    tokens = np.pad(out[:, 1:], ((0, 0), (0, MAX_LEN + 1 - out.shape[1])))
    after = np.cumsum(tokens == EOS, axis=1) - (tokens == EOS) > 0
    return np.where(after, 0, tokens)


def _make_eos_likely(hf_model, enc):
    """EOS's output row becomes 1.05x that of a token greedy emits often but not at once,
    so rows stop at different steps (random models almost never emit EOS)."""
    plain = hf_generate(hf_model, enc, num_beams=1)
    token = np.bincount(plain[:, 2:].ravel()).argmax()
    weight = hf_model.get_output_embeddings().weight  # The (tied) table, or the lm head.
    with torch.no_grad():
        weight[EOS] = 1.05 * weight[token]


@pytest.fixture(scope="module", params=CASES, ids=[f"{v}/{c}{'+eos' * e}" for v, c, e in CASES])
def checkpoint(request, tmp_path_factory):
    """(torch model, our config, our params, encoder tokens, eos_likely)."""
    variant, case, eos_likely = request.param
    hf_model = ref.build(variant, case, embed_scale=0.2)
    enc = _encoder_batch()
    if eos_likely:
        _make_eos_likely(hf_model, enc)
    hf_dir = str(tmp_path_factory.mktemp(case))
    hf_model.save_pretrained(hf_dir)
    config, params = t5gemma_hf.load(hf_dir)
    return hf_model, config, jax.tree.map(jnp.asarray, params), enc, eos_likely


def test_greedy_equals_hf_generate(checkpoint):
    hf_model, config, params, enc, eos_likely = checkpoint
    ours, _ = decoding.greedy(t5gemma.Transformer(config), params, jnp.asarray(enc),
                              max_decode_length=MAX_LEN)
    expected = hf_generate(hf_model, enc, num_beams=1)
    np.testing.assert_array_equal(np.asarray(ours), expected)
    ended = (expected == EOS).any(axis=1)
    if eos_likely:  # Rows stop at different steps.
        assert ended.any() and not ended.all()
    else:  # Outputs past the windows that are not one repeated token.
        assert len(np.unique(expected)) > 4


@pytest.mark.parametrize("length_penalty", [1.0, 0.6])
def test_beam_search_equals_hf_generate(checkpoint, length_penalty):
    hf_model, config, params, enc, _ = checkpoint
    ours, _ = decoding.beam_search(t5gemma.Transformer(config), params, jnp.asarray(enc),
                                   num_beams=4, max_decode_length=MAX_LEN,
                                   length_penalty=length_penalty)
    expected = hf_generate(hf_model, enc, num_beams=4, length_penalty=length_penalty,
                           early_stopping=False)
    np.testing.assert_array_equal(np.asarray(ours), expected)


def test_cached_steps_equal_the_full_forward(checkpoint):
    """Teacher-forced one token at a time through the cache, past every sliding window."""
    _, config, params, enc, _ = checkpoint
    model = t5gemma.Transformer(config)
    targets = np.random.default_rng(1).integers(3, 96, (len(enc), MAX_LEN)).astype(np.int32)
    inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
    full = model.apply({"params": params}, enc, inputs)
    encoded = model.apply({"params": params}, enc, method="encode")
    cache = t5gemma.init_cache(config, len(enc), MAX_LEN, enc.shape[1])

    @jax.jit
    def step(cache, tokens):
        logits, mutated = model.apply({"params": params, "cache": cache}, encoded, enc, tokens,
                                      method="decode", decode=True, mutable=["cache"])
        return logits[:, 0], mutated["cache"]

    for i in range(MAX_LEN):
        logits, cache = step(cache, jnp.asarray(inputs[:, i:i + 1]))
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, i]), atol=2e-5)


def test_scanned_stack_decodes_the_same(checkpoint):
    hf_model, config, params, enc, eos_likely = checkpoint
    if not eos_likely:
        pytest.skip("one case per variant")
    scanned = scan_layout.to_layout(params, True)
    model = t5gemma.Transformer(config.replace(scan_layers=True))
    greedy, _ = decoding.greedy(model, scanned, jnp.asarray(enc), max_decode_length=MAX_LEN)
    beams, _ = decoding.beam_search(model, scanned, jnp.asarray(enc), num_beams=4,
                                    max_decode_length=MAX_LEN)
    np.testing.assert_array_equal(np.asarray(greedy), hf_generate(hf_model, enc, num_beams=1))
    np.testing.assert_array_equal(np.asarray(beams), hf_generate(
        hf_model, enc, num_beams=4, early_stopping=False))


def test_scores_are_hf_log_likelihoods(checkpoint):
    hf_model, config, params, enc, _ = checkpoint
    targets = np.random.default_rng(2).integers(3, 96, (len(enc), 5)).astype(np.int32)
    targets[:, 3], targets[:, 4] = EOS, 0
    targets[0, 4] = EOS
    targets[0, 3] = 7
    log_likelihood, _, count = decoding.score_targets(t5gemma.Transformer(config), params,
                                                      jnp.asarray(enc), jnp.asarray(targets))
    inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
    with torch.no_grad():
        logits = ref.hf_forward(hf_model, enc, inputs).logits
    log_probs = torch.log_softmax(logits, -1).numpy()
    picked = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(log_likelihood), (picked * (targets > 0)).sum(1),
                               atol=1e-4)
    np.testing.assert_array_equal(np.asarray(count), (targets > 0).sum(1))
    choices = np.stack([targets, np.roll(targets, 1, axis=0)], axis=1)
    by_choice = decoding.score_choices(t5gemma.Transformer(config), params, jnp.asarray(enc),
                                       jnp.asarray(choices))
    np.testing.assert_allclose(np.asarray(by_choice[:, 0]), np.asarray(log_likelihood),
                               atol=1e-4)
