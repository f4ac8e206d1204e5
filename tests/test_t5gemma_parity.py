"""Our T5Gemma and T5Gemma 2 (text) are the same functions as transformers' (PyTorch, CPU,
fp32): logits, encoder outputs, loss and every gradient, on 4 random configs each
(`t5gemma_reference`), padded on both sides; packed rows equal their segments run
alone; bf16 compute stays close; scanned and rematerialized stacks change nothing;
prompt tuning, IA3, adapters and LoRA hook in."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import t5gemma_reference as ref
from ift_jax import errors, lora, scan_layout
from ift_jax.models import t5gemma, t5gemma_config, t5gemma_hf
from ift_jax.models.additions import Additions

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TOLERANCE = 1e-5  # Max abs difference of fp32 logits (logits here reach 3-18).
CASES = [("t5gemma", c) for c in ref.T5GEMMA_CASES] + [("t5gemma2", c)
                                                        for c in ref.T5GEMMA2_CASES]


def _eoi(variant, case):
    return ref.T5GEMMA2_CASES[case]["eoi"] if variant == "t5gemma2" else None


@pytest.fixture(scope="module", params=CASES, ids=["/".join(c) for c in CASES])
def checkpoint(request, tmp_path_factory):
    """(variant, case, torch model, our config, our params as jax arrays)."""
    variant, case = request.param
    hf_model = ref.build(variant, case)
    hf_dir = str(tmp_path_factory.mktemp(case))
    hf_model.save_pretrained(hf_dir)
    config, params = t5gemma_hf.load(hf_dir)
    return variant, case, hf_model, config, jax.tree.map(jnp.asarray, params)


def _batch(checkpoint, seed=0):
    variant, case, *_ = checkpoint
    return ref.make_batch(96, seed=seed, eoi=_eoi(variant, case))


def test_logits_and_encoder_outputs_match_transformers(checkpoint):
    variant, case, hf_model, config, params = checkpoint
    enc, dec, targets = _batch(checkpoint)
    with torch.no_grad():
        out = ref.hf_forward(hf_model, enc, dec, start=config.decoder_start_token_id)
    model = t5gemma.Transformer(config)
    logits = model.apply({"params": params}, enc, dec, targets)
    encoded = model.apply({"params": params}, enc, method="encode")
    logit_diff = np.abs(np.asarray(logits) - out.logits.numpy()).max()
    encoded_diff = np.abs(np.asarray(encoded) - out.encoder_last_hidden_state.numpy()).max()
    print(f"{variant}/{case}: max |logits diff| {logit_diff:.2e}, "
          f"max |encoder diff| {encoded_diff:.2e}")
    assert logits.dtype == jnp.float32
    assert logit_diff <= TOLERANCE and encoded_diff <= TOLERANCE


def _loss(model, params, enc, dec, targets):
    """Mean token NLL over real targets (transformers' loss with labels -100 at pads)."""
    logits = model.apply({"params": params}, enc, dec, targets)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    weights = targets > 0
    return (nll * weights).sum() / weights.sum()


def test_loss_and_every_gradient_match_transformers(checkpoint):
    variant, case, hf_model, config, params = checkpoint
    enc, dec, targets = _batch(checkpoint, seed=1)
    hf_model.zero_grad()
    out = ref.hf_forward(hf_model, enc, dec, start=config.decoder_start_token_id, labels=targets)
    out.loss.backward()
    hf_grads = {name.replace("model.encoder.text_model.", "model.encoder."): p.grad.numpy()
                for name, p in hf_model.named_parameters() if p.grad is not None}
    loss, grads = jax.value_and_grad(_loss, argnums=1)(t5gemma.Transformer(config), params,
                                                        enc, dec, targets)
    assert abs(float(loss) - out.loss.item()) <= 1e-5 * out.loss.item()
    flat = traverse_util.flatten_dict(grads)
    errors_by_name = {}
    for t in t5gemma_hf.tensor_map(config):
        expected = hf_grads[t.hf_name]
        ours = t.to_hf(np.asarray(flat[t.path]))
        # Relative to the tensor's largest entry; a window of 1 makes some gradients
        # exactly zero (one key: the softmax is constant), which must stay near zero.
        scale = np.abs(expected).max() or 1e-2
        errors_by_name[t.hf_name] = np.abs(ours - expected).max() / scale
    worst = max(errors_by_name, key=errors_by_name.get)
    print(f"{variant}/{case}: worst relative gradient error {errors_by_name[worst]:.2e} "
          f"({worst})")
    assert errors_by_name[worst] <= 1e-5


def _pack(first, second, lengths_first, lengths_second):
    """Row i of `first` (its first `lengths_first[i]` entries) followed by row i of
    `second`, with segment ids 1, 2 and positions restarting at 0."""
    width = first.shape[1] + second.shape[1]
    tokens, segments, positions = (np.zeros((len(first), width), np.int32) for _ in range(3))
    for i, (n, m) in enumerate(zip(lengths_first, lengths_second)):
        tokens[i, :n + m] = np.concatenate([first[i, :n], second[i, :m]])
        segments[i, :n], segments[i, n:n + m] = 1, 2
        positions[i, :n], positions[i, n:n + m] = np.arange(n), np.arange(m)
    return tokens, segments, positions


def test_packed_rows_equal_their_segments_run_alone(checkpoint):
    """transformers has no packed path for T5Gemma; the reference is the unpacked model."""
    *_, config, params = checkpoint
    (enc, dec, targets), (enc2, dec2, targets2) = _batch(checkpoint, 2), _batch(checkpoint, 3)
    enc_lengths = [(enc > 0).sum(1), (enc2 > 0).sum(1)]
    dec_lengths = [(targets > 0).sum(1), (targets2 > 0).sum(1)]
    packed_enc, enc_seg, enc_pos = _pack(enc, enc2, *enc_lengths)
    packed_dec, dec_seg, dec_pos = _pack(dec, dec2, *dec_lengths)
    packed_targets, _, _ = _pack(targets, targets2, *dec_lengths)
    model = t5gemma.Transformer(config)
    logits = np.asarray(model.apply({"params": params}, packed_enc, packed_dec, packed_targets,
                                    enc_seg, dec_seg, enc_pos, dec_pos))
    alone = [np.asarray(model.apply({"params": params}, e, d, t))
             for e, d, t in ((enc, dec, targets), (enc2, dec2, targets2))]
    for row, (n, m) in enumerate(zip(*dec_lengths)):
        np.testing.assert_allclose(logits[row, :n], alone[0][row, :n], atol=2e-5)
        np.testing.assert_allclose(logits[row, n:n + m], alone[1][row, :m], atol=2e-5)


def test_bf16_compute_stays_close_with_fp32_params_and_logits(checkpoint):
    *_, hf_model, config, params = checkpoint
    enc, dec, targets = _batch(checkpoint, seed=4)
    with torch.no_grad():
        expected = ref.hf_forward(hf_model, enc, dec, start=config.decoder_start_token_id).logits
    logits = t5gemma.Transformer(config.replace(dtype=jnp.bfloat16)).apply(
        {"params": params}, enc, dec, targets)
    assert logits.dtype == jnp.float32
    error = np.abs(np.asarray(logits) - expected.numpy()).max() / np.abs(expected.numpy()).max()
    assert error < 5e-2


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_layers_give_the_same_logits_and_gradients(checkpoint, remat):
    """One compiled body serves sliding and full layers (the type is a scanned input)."""
    _, case, _, config, params = checkpoint
    if case not in ("mqa_capped", "mqa_linear_rope"):
        pytest.skip("two mixed-type cases cover the scanned stack")
    enc, dec, targets = _batch(checkpoint, seed=5)
    scanned_config = config.replace(scan_layers=True, remat=remat)
    scanned = scan_layout.to_layout(params, True)
    base_loss, base_grads = jax.value_and_grad(_loss, argnums=1)(
        t5gemma.Transformer(config), params, enc, dec, targets)
    loss, grads = jax.value_and_grad(_loss, argnums=1)(
        t5gemma.Transformer(scanned_config), scanned, enc, dec, targets)
    np.testing.assert_allclose(float(loss), float(base_loss), rtol=1e-6)
    unstacked = scan_layout.to_layout(jax.tree.map(np.asarray, grads), False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 unstacked, jax.tree.map(np.asarray, base_grads))


def test_prompt_tuning_equals_transformers_fed_the_prompt_embeddings(checkpoint):
    """What HF PEFT's prompt tuning computes: `inputs_embeds = [prompt; embed(ids)]`, the
    encoder mask extended by ones. T5Gemma scales the prompt with the tokens (its stack
    scales what it is fed); T5Gemma 2's embedding layer scales, so its prompt is not."""
    _, case, hf_model, config, params = checkpoint
    if case not in ("mqa_capped", "gqa2_odd_window"):
        pytest.skip("one case per variant")
    enc, dec, targets = _batch(checkpoint, seed=6)
    prompt = np.random.default_rng(7).normal(0, 0.5, (3, config.encoder.d_model)).astype(
        np.float32)
    model = t5gemma.Transformer(config, prompt_length=3)
    logits = model.apply({"params": {**params, "prompt": {"embedding": prompt}}}, enc, dec,
                         targets)
    input_embeddings = hf_model.get_input_embeddings()
    with torch.no_grad():
        tokens = input_embeddings(torch.as_tensor(enc, dtype=torch.long))
        embeds = torch.cat([torch.as_tensor(prompt)[None].expand(len(enc), -1, -1), tokens], 1)
        mask = torch.cat([torch.ones(len(enc), 3, dtype=torch.long),
                          torch.as_tensor(enc > 0, dtype=torch.long)], 1)
        hf_dec = np.array(dec)
        hf_dec[:, 0] = config.decoder_start_token_id
        expected = hf_model(inputs_embeds=embeds, attention_mask=mask,
                            decoder_input_ids=torch.as_tensor(hf_dec, dtype=torch.long),
                            decoder_attention_mask=torch.as_tensor(hf_dec > 0, dtype=torch.long))
    # A few more fp32 ops than the plain forward (the concatenated embeddings).
    assert np.abs(np.asarray(logits) - expected.logits.numpy()).max() <= 2 * TOLERANCE


def test_ia3_and_adapters_at_identity_leave_the_model_unchanged(checkpoint):
    *_, config, params = checkpoint
    enc, dec, targets = _batch(checkpoint, seed=8)
    base = t5gemma.Transformer(config).apply({"params": params}, enc, dec, targets)
    extra = Additions(adapter_sites=("attention", "mlp"), adapter_width=4,
                      ia3_targets=("key", "value", "out", "wi_0", "wi_1", "wo"))
    model = t5gemma.Transformer(config, additions=extra)
    full = model.init(jax.random.key(0), enc, dec)["params"]
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, nn.unbox(full)))
    assert any(k[-1] == "ia3_scale" for k in flat) and any("mlp_adapter" in k for k in flat)
    base_flat = traverse_util.flatten_dict(params)
    # Base weights; IA3 scales start at 1; zeroed up projections make adapters the identity.
    merged = {k: np.zeros_like(v) if "up" in k and any("_adapter" in p for p in k)
              else base_flat.get(k, v) for k, v in flat.items()}
    logits = model.apply({"params": traverse_util.unflatten_dict(merged)}, enc, dec, targets)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(base), atol=1e-6)


def test_lora_finds_the_attention_projections_and_starts_as_the_base_model(checkpoint):
    *_, config, params = checkpoint
    enc, dec, targets = _batch(checkpoint, seed=9)
    base_model = t5gemma.Transformer(config)
    cfg = lora.LoraConfig(rank=2, alpha=4.0)
    names = {"/".join(p.split("/")[-2:]) for p in lora.lora_targets(base_model, cfg)}
    expected = {"attention/query", "attention/value", "self_attention/query",
                "self_attention/value"}
    if not config.merged_attention:
        expected |= {"encoder_decoder_attention/query", "encoder_decoder_attention/value"}
    assert names == expected
    model = lora.apply_lora(base_model, cfg)
    flat = traverse_util.flatten_dict(nn.unbox(model.init(jax.random.key(0), enc, dec)["params"]))
    flat.update(traverse_util.flatten_dict(params))  # Base weights; LoRA B starts at 0.
    assert any(k[-1] == "kernel_lora_b" for k in flat)
    logits = model.apply({"params": traverse_util.unflatten_dict(flat)}, enc, dec, targets)
    base = base_model.apply({"params": params}, enc, dec, targets)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(base), atol=1e-6)


def test_prefix_tuning_is_refused_in_one_line():
    config = t5gemma_config.get_config("t5gemma-tiny")
    model = t5gemma.Transformer(config, additions=Additions(prefix_length=2))
    with pytest.raises(errors.ConfigError, match="prefix tuning is not supported"):
        model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 3), jnp.int32))
