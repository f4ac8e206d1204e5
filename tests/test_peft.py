"""LoRA, QLoRA and prompt tuning on our T5, and the trainable partition (no torch)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ift_jax import partitioning, peft
from ift_jax.models import t5

# qwix 0.1.8 on flax 0.12 warns once per param access.
pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed")

TINY = t5.get_config("tiny", dropout_rate=0.0)
LORA = peft.LoraConfig(rank=4, alpha=8.0)
PROMPT = peft.PromptConfig(length=3)

# Tiny: 2 encoder layers (1 attention each) + 2 decoder layers (2 each), q and v.
DEFAULT_TARGETS = sorted(
    [f"encoder/layers_{i}/attention/{p}" for i in range(2) for p in ("query", "value")]
    + [f"decoder/layers_{i}/{a}/{p}" for i in range(2)
       for a in ("self_attention", "encoder_decoder_attention") for p in ("query", "value")])


@pytest.fixture(scope="module")
def base_params():
    enc, dec, _ = make_batch()  # Same shapes as the tests: eager ops compile once.
    return nn.unbox(t5.Transformer(TINY).init(jax.random.key(0), enc, dec)["params"])


def make_batch(batch=2, enc_len=12, dec_len=7, seed=0):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, TINY.vocab_size, (batch, enc_len))
    enc[1, enc_len - 4:] = 0
    targets = rng.integers(2, TINY.vocab_size, (batch, dec_len))
    targets[1, dec_len - 2:] = 0
    dec = np.concatenate([np.zeros((batch, 1), int), targets[:, :-1]], axis=1)
    return jnp.asarray(enc), jnp.asarray(dec), jnp.asarray(targets)


def token_loss(logits, targets):
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    weights = targets > 0
    return (nll * weights).sum() / weights.sum()


def randomize_lora(params, seed=0, scale=0.1):
    """qwix inits B to zero, which makes every LoRA comparison trivial."""
    keys = iter(jax.random.split(jax.random.key(seed), 1000))

    def fill(path, x):
        if getattr(path[-1], "key", None) in peft.LORA_LEAVES:
            return scale * jax.random.normal(next(keys), x.shape, x.dtype)
        return x
    return jax.tree_util.tree_map_with_path(fill, params)


def lora_model_and_params(base_params, cfg=LORA, seed=0, scale=0.1):
    """LoRA model and params; random A and B, or qwix's init (B = 0) if scale is None."""
    model = peft.apply_lora(t5.Transformer(TINY), cfg)
    params = peft.init_adapters(model, base_params, jax.random.key(seed))
    return model, params if scale is None else randomize_lora(params, seed, scale)


@pytest.fixture(scope="module")
def lora(base_params):
    return lora_model_and_params(base_params)


@pytest.fixture(scope="module")
def qlora(base_params):
    return lora_model_and_params(base_params, QLORA)


@pytest.fixture(scope="module")
def prompt(base_params):
    return prompt_model_and_params(base_params)


def relative_error(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max() / np.abs(ref).max()


QLORA = peft.LoraConfig(rank=4, alpha=8.0, quantize=True, tile_size=4)


def prompt_model_and_params(base_params, cfg=PROMPT, seed=0):
    model = peft.apply_prompt_tuning(t5.Transformer(TINY), cfg)
    return model, peft.init_adapters(model, base_params, jax.random.key(seed), cfg)


# ----------------------------------------------------------------------------
# LoRA structure.


def test_default_targets_are_query_and_value_of_every_attention_block():
    assert peft.lora_targets(t5.Transformer(TINY), peft.LoraConfig()) == DEFAULT_TARGETS


def test_lora_params_sit_beside_kernels_with_logical_axes():
    params = peft.abstract_params(peft.apply_lora(t5.Transformer(TINY), LORA))
    query = params["encoder"]["layers_0"]["attention"]["query"]
    assert set(query) == {"kernel", "kernel_lora_a", "kernel_lora_b"}
    assert query["kernel_lora_a"].value.shape == (64, 4)
    assert query["kernel_lora_a"].names == ("embed", None)
    assert query["kernel_lora_b"].value.shape == (4, 4 * 16)  # [rank, heads * kv]
    assert query["kernel_lora_b"].names == (None, "heads")
    assert set(params["encoder"]["layers_0"]["attention"]["key"]) == {"kernel"}
    flat = jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    adapted = {"/".join(k.key for k in p[:-1]) for p, _ in flat if p[-1].key == "kernel_lora_a"}
    assert sorted(adapted) == DEFAULT_TARGETS


def test_flan_t5_base_lora_r32_on_q_v_trains_3538944_params():
    params = peft.abstract_params(peft.apply_lora(t5.Transformer(t5.get_config("base")),
                                                  peft.LoraConfig(rank=32)))
    trainable, frozen = peft.split_params(params, peft.trainable_mask(params, "lora"))
    assert peft.count_params(trainable) == 3_538_944
    assert peft.count_params(frozen) == 247_577_856


def test_target_regex_matching_no_kernel_lists_module_paths():
    cfg = peft.LoraConfig(target_regex=r".*/SelfAttention/q")
    with pytest.raises(peft.PeftError) as error:
        peft.apply_lora(t5.Transformer(TINY), cfg)
    message = str(error.value)
    assert ".*/SelfAttention/q" in message
    assert "encoder/layers_N/attention/query" in message
    assert "decoder/logits_dense" in message


def test_lora_model_starts_as_the_base_model(base_params):
    # numpy base params (as hf.load_t5 gives) become jax arrays: qwix ignores numpy kernels.
    model, params = lora_model_and_params(jax.tree.map(np.asarray, base_params), scale=None)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    enc, dec, _ = make_batch()
    np.testing.assert_array_equal(model.apply({"params": params}, enc, dec),
                                  t5.Transformer(TINY).apply({"params": base_params}, enc, dec))
    lora_a = params["encoder"]["layers_0"]["attention"]["query"]["kernel_lora_a"]
    assert np.abs(lora_a).max() > 0  # Only B starts at zero.


def test_lora_a_is_uniform_in_one_over_sqrt_fan_in_from_qwix_and_init_adapters():
    # HF PEFT's default (kaiming_uniform_(a=sqrt(5))); compared with peft itself in
    # test_peft_parity.py. The out kernel's A has heads*kv = 32 inputs, query's 64.
    config = TINY.replace(d_kv=8)
    model = peft.apply_lora(t5.Transformer(config), peft.LoraConfig(
        rank=8, alpha=8.0, target_regex=".*/attention/(query|out)"))
    enc, dec, _ = make_batch()
    base = nn.unbox(t5.Transformer(config).init(jax.random.key(0), enc, dec)["params"])
    for params in (nn.unbox(model.init(jax.random.key(1), enc, dec)["params"]),
                   peft.init_adapters(model, base, jax.random.key(1))):
        attention = params["encoder"]["layers_0"]["attention"]
        for proj, fan_in in (("query", 64), ("out", 32)):
            lora_a = np.asarray(attention[proj]["kernel_lora_a"])
            assert lora_a.shape == (fan_in, 8)
            assert 0.9 < np.abs(lora_a).max() * np.sqrt(fan_in) <= 1.0, proj


@pytest.mark.parametrize("target_regex", [
    peft.DEFAULT_LORA_TARGETS,                      # [embed, heads, kv] kernels
    r"encoder/layers_1/attention/out|.*/mlp/(wi_0|wo)",  # [heads, kv, embed], [embed, mlp]...
    r"decoder/logits_dense",
])
def test_merge_lora_gives_the_lora_models_logits(base_params, target_regex):
    cfg = peft.LoraConfig(rank=4, alpha=8.0, target_regex=target_regex)
    model, params = lora_model_and_params(base_params, cfg)
    enc, dec, _ = make_batch()
    lora_logits = model.apply({"params": params}, enc, dec)
    merged = peft.merge_lora(params, cfg)
    assert jax.tree.structure(merged) == jax.tree.structure(base_params)
    plain_logits = t5.Transformer(TINY).apply({"params": merged}, enc, dec)
    base_logits = t5.Transformer(TINY).apply({"params": base_params}, enc, dec)
    assert relative_error(lora_logits, base_logits) > 1e-2  # The adapters do something.
    assert relative_error(plain_logits, lora_logits) < 1e-5


def test_lora_dropout_applies_always_and_for_eval_model_removes_it(base_params):
    cfg = peft.LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    train_model, params = lora_model_and_params(base_params, cfg)
    eval_model = peft.apply_lora(t5.Transformer(TINY), cfg, for_eval=True)
    enc, dec, _ = make_batch()
    # enable_dropout=False does not switch qwix's LoRA dropout off.
    a, b = (train_model.apply({"params": params}, enc, dec, rngs={"dropout": jax.random.key(s)})
            for s in (0, 1))
    assert relative_error(a, b) > 1e-3
    merged = t5.Transformer(TINY).apply({"params": peft.merge_lora(params, cfg)}, enc, dec)
    assert relative_error(eval_model.apply({"params": params}, enc, dec), merged) < 1e-5


def test_model_methods_called_by_name_keep_the_adapters(lora):
    model, params = lora
    enc, dec, _ = make_batch()
    variables = {"params": params}
    encoded = model.apply(variables, enc, method="encode")
    logits = model.apply(variables, encoded, enc, dec, method="decode")
    np.testing.assert_allclose(logits, model.apply(variables, enc, dec), rtol=1e-6, atol=1e-6)
    # The base class's function skips qwix's interception (a pitfall to avoid).
    bypass = model.apply(variables, enc, method=t5.Transformer.encode)
    assert relative_error(bypass, encoded) > 1e-2


# ----------------------------------------------------------------------------
# QLoRA.

def test_qlora_stores_target_kernels_in_nf4_tiles(qlora):
    _, params = qlora
    attention = params["encoder"]["layers_0"]["attention"]
    qarray = attention["query"]["kernel"].array
    assert qarray.qvalue.dtype == jnp.uint4 and qarray.qvalue.shape == (64, 4, 16)
    assert qarray.scale.shape == (64 // 4, 4, 16)  # One scale per 4 inputs per output.
    assert attention["key"]["kernel"].dtype == jnp.float32
    assert params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"].dtype == jnp.float32


def test_qlora_forward_is_its_dequantized_merge_and_close_to_lora(qlora, lora):
    (qmodel, qparams), (lmodel, lparams) = qlora, lora  # Same seed: same A and B.
    enc, dec, _ = make_batch()
    qlogits = qmodel.apply({"params": qparams}, enc, dec)
    merged = t5.Transformer(TINY).apply({"params": peft.merge_lora(qparams, QLORA)}, enc, dec)
    assert relative_error(merged, qlogits) < 1e-5
    lora_logits = lmodel.apply({"params": lparams}, enc, dec)
    rms = float(jnp.sqrt(jnp.mean((qlogits - lora_logits) ** 2) / jnp.mean(lora_logits ** 2)))
    assert 1e-3 < rms < 0.1  # NF4 error: present, and small with 4-wide tiles.


def sgd_losses(model, params, method, steps=3, lr=0.5):
    enc, dec, targets = make_batch(seed=3)
    trainable, frozen = peft.split_params(params, peft.trainable_mask(params, method))

    @jax.jit
    def step(trainable):
        def loss_fn(t):
            logits = model.apply({"params": peft.merge_params(t, frozen)}, enc, dec)
            return token_loss(logits, targets)
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        return loss, jax.tree.map(lambda p, g: p - lr * g, trainable, grads)

    losses = []
    for _ in range(steps):
        loss, trainable = step(trainable)
        losses.append(float(loss))
    return losses


def test_qlora_sgd_steps_lower_the_loss(base_params):
    model, params = lora_model_and_params(base_params, QLORA, scale=None)
    losses = sgd_losses(model, params, "qlora")
    assert losses[-1] < losses[0] - 0.1, losses


# ----------------------------------------------------------------------------
# Prompt tuning.


def test_plain_transformer_has_no_prompt_and_prompt_model_one_extra_param(base_params):
    assert "prompt" not in base_params
    params = peft.abstract_params(peft.apply_prompt_tuning(t5.Transformer(TINY), PROMPT))
    prompt = params["prompt"]["embedding"]
    assert prompt.value.shape == (3, 64) and prompt.names == ("prompt_length", "embed")
    params.pop("prompt")
    assert jax.tree.structure(nn.unbox(params)) == jax.tree.structure(base_params)


def test_prompt_is_encoded_in_front_and_changes_the_logits(base_params, prompt):
    model, params = prompt
    enc, dec, _ = make_batch()
    encoded = model.apply({"params": params}, enc, method="encode")
    assert encoded.shape == (2, 3 + 12, 64)
    logits = model.apply({"params": params}, enc, dec)
    base = t5.Transformer(TINY).apply({"params": base_params}, enc, dec)
    assert relative_error(logits, base) > 1e-2


def test_prompt_with_packed_inputs_raises(prompt):
    model, params = prompt
    enc, dec, _ = make_batch()
    segments = jnp.ones_like(enc)
    with pytest.raises(ValueError, match="packed"):
        model.apply({"params": params}, enc, dec, None, segments, jnp.ones_like(dec))


def test_prompt_inits(base_params):
    embedding = base_params["token_embedder"]["embedding"]
    uniform = peft.init_prompt(jax.random.key(0), embedding, peft.PromptConfig(length=50))
    assert uniform.shape == (50, 64) and 0.45 < np.abs(uniform).max() <= 0.5
    vocab_cfg = peft.PromptConfig(length=8, init="vocab", num_frequent=10)
    rows = np.asarray(peft.init_prompt(jax.random.key(0), embedding, vocab_cfg))
    for row in rows:
        assert any(np.array_equal(row, embedding[i]) for i in range(10))
    text_cfg = peft.PromptConfig(length=5, init="text", init_token_ids=(7, 9))
    text = peft.init_prompt(jax.random.key(0), embedding, text_cfg)
    np.testing.assert_array_equal(text, embedding[np.array([7, 9, 7, 9, 7])])
    with pytest.raises(peft.PeftError, match="init_token_ids"):
        peft.PromptConfig(init="text")


def test_init_adapters_inits_prompt_from_base_embeddings(base_params):
    cfg = peft.PromptConfig(length=4, init="text", init_token_ids=(5, 6, 7, 8))
    _, params = prompt_model_and_params(base_params, cfg)
    np.testing.assert_array_equal(params["prompt"]["embedding"],
                                  base_params["token_embedder"]["embedding"][5:9])


def test_cached_decoding_with_prompt_and_lora_matches_full_forward(base_params):
    model = peft.apply_lora(peft.apply_prompt_tuning(t5.Transformer(TINY), PROMPT), LORA)
    params = randomize_lora(peft.init_adapters(model, base_params, jax.random.key(0), PROMPT))
    enc, dec, _ = make_batch()
    variables = {"params": params}
    full = model.apply(variables, enc, dec)
    encoded = model.apply(variables, enc, method="encode")
    cache = t5.init_cache(TINY, batch=2, max_decode_length=dec.shape[1],
                          encoder_length=enc.shape[1])

    @jax.jit
    def step(cache, tokens):
        logits, mutated = model.apply({**variables, "cache": cache}, encoded, enc, tokens,
                                      method="decode", decode=True, mutable=["cache"])
        return logits, mutated["cache"]

    for i in range(dec.shape[1]):
        logits, cache = step(cache, dec[:, i:i + 1])
        np.testing.assert_allclose(logits[:, 0], full[:, i], rtol=1e-5, atol=1e-5)


def test_prompt_tuning_sgd_steps_lower_the_loss(prompt):
    model, params = prompt
    losses = sgd_losses(model, params, "prompt")
    assert losses[-1] < losses[0] - 0.1, losses


def test_sharded_qlora_and_prompt_init_and_step_under_a_mesh(base_params):
    """The trainer's path: abstract params -> logical shardings -> jitted init and step."""
    mesh = partitioning.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    model = peft.apply_lora(peft.apply_prompt_tuning(t5.Transformer(TINY), PROMPT), QLORA)
    enc, dec, targets = make_batch()
    with partitioning.mesh_context(mesh):
        shardings = partitioning.logical_shardings(peft.abstract_params(model), mesh)
        params = jax.jit(lambda b, r: peft.init_adapters(model, b, r, PROMPT),
                         out_shardings=shardings)(base_params, jax.random.key(0))
        trainable, frozen = peft.split_params(
            params, peft.trainable_mask(params, "qlora", r".*(kernel_lora_[ab]|prompt/.*)"))
        grads = jax.jit(jax.grad(lambda t: token_loss(model.apply(
            {"params": peft.merge_params(t, frozen)}, enc, dec), targets)))(trainable)
    query = params["encoder"]["layers_0"]["attention"]["query"]
    assert query["kernel"].array.qvalue.sharding.spec == P("fsdp", "tensor", None)
    assert query["kernel_lora_b"].sharding.spec == P(None, "tensor")
    assert params["prompt"]["embedding"].sharding.spec == P(None, "fsdp")
    assert set(grads) == {"encoder", "decoder", "prompt"}


# ----------------------------------------------------------------------------
# Trainable partition.


def test_trainable_mask_per_method(base_params, lora, qlora, prompt):
    (_, lora_params), (_, qlora_params), (_, prompt_params) = lora, qlora, prompt

    def trainable_count(params, method, regex=None):
        mask = peft.trainable_mask(params, method, regex)
        return peft.count_params(peft.split_params(params, mask)[0])

    total = peft.count_params(base_params)
    lora_count = len(DEFAULT_TARGETS) * (64 * 4 + 4 * 64)
    assert trainable_count(base_params, "full") == total
    assert trainable_count(lora_params, "lora") == lora_count
    assert trainable_count(qlora_params, "qlora") == lora_count
    assert peft.count_params(qlora_params) == total + lora_count
    assert trainable_count(prompt_params, "prompt") == 3 * 64
    norms = (2 * 2 + 2 * 3 + 2) * 64  # Per layer norms plus the two final norms.
    assert trainable_count(base_params, "full", ".*layer_norm.*|.*_norm/scale") == norms
    assert trainable_count(lora_params, "lora", r".*(kernel_lora_[ab]|_norm/scale)") == (
        lora_count + norms)


def test_nothing_trainable_raises_listing_paths(base_params):
    with pytest.raises(peft.PeftError, match="apply_lora.*encoder/layers_N/mlp/wo/kernel"):
        peft.trainable_mask(base_params, "lora")
    with pytest.raises(peft.PeftError, match="apply_prompt_tuning"):
        peft.trainable_mask(base_params, "prompt")
    with pytest.raises(peft.PeftError, match="'.*/bias'.*token_embedder/embedding"):
        peft.trainable_mask(base_params, "full", ".*/bias")
    with pytest.raises(peft.PeftError, match="unknown PEFT method 'adapter'"):
        peft.trainable_mask(base_params, "adapter")


def test_quantized_kernels_cannot_be_trainable(qlora):
    _, params = qlora
    with pytest.raises(peft.PeftError, match="quantized.*attention/query/kernel"):
        peft.trainable_mask(params, "qlora", ".*attention/query/.*")


def test_split_and_merge_round_trip_with_disjoint_halves(base_params, qlora):
    _, params = qlora
    mask = peft.trainable_mask(params, "qlora")
    trainable, frozen = peft.split_params(params, mask)
    assert set(trainable["encoder"]["layers_0"]["attention"]["query"]) == set(peft.LORA_LEAVES)
    assert "kernel_lora_a" not in frozen["encoder"]["layers_0"]["attention"]["query"]
    assert "token_embedder" not in trainable
    merged = peft.merge_params(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, merged, params)
    with pytest.raises(peft.PeftError, match="both trainable and frozen"):
        peft.merge_params(trainable, params)
    with pytest.raises(peft.PeftError, match="structure"):
        peft.split_params(params, peft.trainable_mask(base_params, "full"))
