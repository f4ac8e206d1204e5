"""IA3, prefix tuning, prompt tuning, rsLoRA and DoRA compute what HF PEFT computes;
bottleneck adapters what the papers' formula inserted into HF T5 computes (CPU, fp32).

Each test copies HF's trainable values into our params (randomized, so that no
comparison is trivial), then compares the loss and the gradient of every
trainable tensor at relative error <= 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import hf_reference
from ift_jax import hf, peft
from ift_jax import lora as lora_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed")

TOLERANCE = 1e-5
# Three layers each way, d_model = heads * d_kv (PEFT's prefix layout needs it): PEFT's
# prefix slots for the decoder layers are then (0, 1), (4, 5), (2, 3), none shared.
DIMS = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=3,
            num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(hf_dir, our config, our base params) of a random tiny FLAN-T5-like checkpoint."""
    hf_dir = str(tmp_path_factory.mktemp("three_layers"))
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**DIMS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # Norm scales of 1.0 would hide mapping errors.
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(hf_dir)
    config, params = hf.load_t5(hf_dir)
    return hf_dir, config, jax.tree.map(jnp.asarray, params)


def hf_model(hf_dir):
    return transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()


def batch(config, seed=0):
    return hf_reference.make_batch(config.vocab_size, enc_len=11, dec_len=8, enc_pad=3,
                                   dec_pad=2, seed=seed)


def hf_loss(model, enc, dec, targets):
    labels = torch.as_tensor(np.where(targets > 0, targets, -100))
    return model(input_ids=torch.as_tensor(enc),
                 attention_mask=torch.as_tensor((enc > 0).astype(np.int64)),
                 decoder_input_ids=torch.as_tensor(dec), labels=labels).loss


def our_loss(model, params, enc, dec, targets):
    logits = model.apply({"params": params}, enc, dec, targets)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
    weights = targets > 0
    return (nll * weights).sum() / weights.sum()


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


# Our module path from an HF T5 module name, written out here (not taken from hf.py)
# so that the tests check the mapping instead of reusing it.
_HF_BLOCKS = {("encoder", "0", "SelfAttention"): "attention",
              ("decoder", "0", "SelfAttention"): "self_attention",
              ("decoder", "1", "EncDecAttention"): "encoder_decoder_attention",
              ("encoder", "1", "DenseReluDense"): "mlp", ("decoder", "2", "DenseReluDense"): "mlp"}
_HF_PROJ = {"q": "query", "k": "key", "v": "value", "o": "out"}


def our_module(hf_name):
    stack, _, block, _, sub, owner, proj = hf_name.split(".")[-7:]
    return (stack, f"layers_{block}", _HF_BLOCKS[(stack, sub, owner)], _HF_PROJ.get(proj, proj))


def compare(model, params, method, enc, dec, targets, ref, pairs, unread_rows=0):
    """Loss and the gradient of every trainable param, ours vs `ref`'s.

    `pairs`: {HF param name: (our leaf path, our array -> HF layout)};
    `unread_rows`: params HF has and never reads (PEFT's seq2seq prompt table).
    """
    trainable, frozen = peft.split_params(params, peft.trainable_mask(params, method))
    loss, grads = jax.jit(jax.value_and_grad(lambda t: our_loss(
        model, peft.merge_params(t, frozen), enc, dec, targets)))(trainable)
    ref_params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert sorted(ref_params) == sorted(pairs)
    assert peft.count_params(trainable) + unread_rows == sum(
        p.numel() for p in ref_params.values())
    ref_loss = hf_loss(ref, enc, dec, targets)
    ref_loss.backward()
    assert abs(float(loss) - ref_loss.item()) / abs(ref_loss.item()) <= TOLERANCE
    flat = traverse_util.flatten_dict(grads)
    for name, (path, to_hf) in pairs.items():
        assert rel(to_hf(np.asarray(flat[path])), ref_params[name].grad.numpy()) <= TOLERANCE, name


def randomize(ref, substring, fn, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if substring in name:
                p.copy_(fn(p, torch.randn(p.shape, generator=gen)))


def with_values(params, values):
    flat = traverse_util.flatten_dict(params)
    flat.update({k: jnp.asarray(v) for k, v in values.items()})
    return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------
# IA3.


def test_ia3_loss_and_grads_match_hf_peft(checkpoint):
    hf_dir, config, base = checkpoint
    ref = hf_peft.get_peft_model(hf_model(hf_dir), hf_peft.IA3Config(task_type="SEQ_2_SEQ_LM"))
    ref.eval()
    randomize(ref, "ia3_l", lambda p, r: 1.0 + 0.3 * r)
    method = peft.MethodConfig("ia3", ia3=peft.IA3Config())
    model, _ = peft.build_models(config, method)
    params = peft.init_adapters(model, base, jax.random.key(0))
    values, pairs = {}, {}
    for name, p in ref.named_parameters():
        if "ia3_l" in name:
            path = our_module(name.split(".ia3_l")[0]) + ("ia3_scale",)
            shape = np.shape(traverse_util.flatten_dict(params)[path])
            values[path] = p.detach().numpy().reshape(shape)
            pairs[name] = (path, lambda g, s=tuple(p.shape): g.reshape(s))
    assert len(pairs) == 3 * 3 + 3 * 5  # k, v, wo per encoder; + cross k, v per decoder.
    enc, dec, targets = batch(config)
    compare(model, with_values(params, values), "ia3", enc, dec, targets, ref, pairs)


# ----------------------------------------------------------------------------
# Prefix tuning (HF PEFT's placement) and prompt tuning.


@pytest.mark.parametrize("hidden", [0, 16])
def test_prefix_tuning_loss_and_grads_match_hf_peft(checkpoint, hidden):
    hf_dir, config, base = checkpoint
    p = 3
    ref_cfg = hf_peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=p,
                                         prefix_projection=bool(hidden),
                                         encoder_hidden_size=hidden or None)
    torch.manual_seed(2)
    ref = hf_peft.get_peft_model(hf_model(hf_dir), ref_cfg).eval()
    method = peft.MethodConfig("prefix", prefix=peft.PrefixConfig(p, "peft", hidden))
    model, _ = peft.build_models(config, method)
    params = peft.init_adapters(model, base, jax.random.key(0))
    encoder = "prompt_encoder.default."
    weights = {n.removeprefix(encoder): t.detach().numpy() for n, t in ref.named_parameters()
               if n.startswith(encoder)}
    slots = 2 * config.num_layers
    if hidden:
        ours = {"embedding": weights["embedding.weight"],
                "mlp_in_kernel": weights["transform.0.weight"].T,
                "mlp_in_bias": weights["transform.0.bias"],
                "mlp_out_kernel": weights["transform.2.weight"].T,
                "mlp_out_bias": weights["transform.2.bias"]}
        layouts = {"embedding.weight": ("embedding", lambda g: g),
                   "transform.0.weight": ("mlp_in_kernel", lambda g: g.T),
                   "transform.0.bias": ("mlp_in_bias", lambda g: g),
                   "transform.2.weight": ("mlp_out_kernel", lambda g: g.T),
                   "transform.2.bias": ("mlp_out_bias", lambda g: g)}
    else:
        ours = {"key_values": weights["embedding.weight"].reshape(p, slots, 4, 8)}
        layouts = {"embedding.weight": ("key_values", lambda g: g.reshape(p, -1))}
    params = with_values(params, {("prefix", k): v for k, v in ours.items()})
    pairs = {encoder + n: (("prefix", ours_name), fn) for n, (ours_name, fn) in layouts.items()}
    enc, dec, targets = batch(config, seed=1)
    compare(model, params, "prefix", enc, dec, targets, ref, pairs)


def test_prompt_tuning_loss_and_grads_match_hf_peft(checkpoint):
    """PEFT's seq2seq prompt table has 2P rows; its forward reads the first P only."""
    hf_dir, config, base = checkpoint
    p = 4
    torch.manual_seed(3)
    ref = hf_peft.get_peft_model(hf_model(hf_dir), hf_peft.PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=p)).eval()
    table = ref.prompt_encoder.default.embedding.weight
    method = peft.MethodConfig("prompt", prompt=peft.PromptConfig(length=p))
    model, _ = peft.build_models(config, method)
    params = with_values(peft.init_adapters(model, base, jax.random.key(0)),
                         {("prompt", "embedding"): table.detach().numpy()[:p]})
    enc, dec, targets = batch(config, seed=2)
    compare(model, params, "prompt", enc, dec, targets, ref, {
        "prompt_encoder.default.embedding.weight": (
            ("prompt", "embedding"), lambda g: np.concatenate([g, np.zeros_like(g)]))},
        unread_rows=p * config.d_model)


# ----------------------------------------------------------------------------
# LoRA variants.


# `all` covers every kernel layout: [embed, heads, kv], [heads, kv, embed], [embed, mlp]...
LORA_CASES = {
    "rslora_all_linear": dict(use_rslora=True, targets="all"),
    "dora_all_linear": dict(use_dora=True, targets="all"),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_variants_loss_and_grads_match_hf_peft(checkpoint, case):
    hf_dir, config, base = checkpoint
    options = dict(LORA_CASES[case])
    targets = options.pop("targets", "qv")
    modules = ["q", "v"] if targets == "qv" else ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
    torch.manual_seed(4)
    ref = hf_peft.get_peft_model(hf_model(hf_dir), hf_peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=modules, task_type="SEQ_2_SEQ_LM",
        **options)).eval()
    randomize(ref, "lora_", lambda p, r: 0.1 * r)  # As test_peft_parity: 0.2 drifts to 1.07e-5.
    randomize(ref, "lora_magnitude", lambda p, r: p * (1 + 0.2 * r), seed=1)
    cfg = peft.LoraConfig(rank=4, alpha=8.0, target_regex=lora_lib.target_regex(targets),
                          **options)
    method = peft.MethodConfig("lora", lora=cfg)
    model, _ = peft.build_models(config, method)
    params = peft.init_adapters(model, base, jax.random.key(0))
    values, pairs = {}, {}
    for name, p in ref.named_parameters():
        if not p.requires_grad:
            continue
        module, _, kind = name.partition(".lora_")
        leaf = {"A.default.weight": "kernel_lora_a", "B.default.weight": "kernel_lora_b",
                "magnitude_vector.default.weight": lora_lib.MAGNITUDE_LEAF}[kind]
        path = our_module(module) + (leaf,)
        to_hf = (lambda g: g) if leaf == lora_lib.MAGNITUDE_LEAF else (lambda g: g.T)
        values[path] = to_hf(p.detach().numpy())  # A transposed is its own inverse.
        pairs[name] = (path, to_hf)
    enc, dec, targets_ = batch(config, seed=3)
    compare(model, with_values(params, values), "lora", enc, dec, targets_, ref, pairs)


def test_dora_magnitude_starts_as_hf_peft_inits_it(checkpoint):
    hf_dir, config, base = checkpoint
    ref = hf_peft.get_peft_model(hf_model(hf_dir), hf_peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q", "wo"], use_dora=True))
    cfg = peft.LoraConfig(rank=4, alpha=8.0, use_dora=True, target_regex=r".*/(query|wo)")
    model, _ = peft.build_models(config, peft.MethodConfig("lora", lora=cfg))
    flat = traverse_util.flatten_dict(peft.init_adapters(model, base, jax.random.key(0)))
    for name, p in ref.named_parameters():
        if "lora_magnitude" in name:
            ours = flat[our_module(name.split(".lora_")[0]) + (lora_lib.MAGNITUDE_LEAF,)]
            assert rel(ours, p.detach().numpy()) <= TOLERANCE, name


# ----------------------------------------------------------------------------
# Bottleneck adapters: the formula inserted into HF T5 by forward hooks.


def _torch_adapter(params):
    tensors = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in params.items()}

    def adapter(h):  # Houlsby et al. 2019, eq. for the adapter layer: h + f(h Wd + bd) Wu + bu.
        down = torch.relu(h @ tensors["down/kernel"] + tensors["down/bias"])
        return h + down @ tensors["up/kernel"] + tensors["up/bias"]
    return adapter, tensors


def _hook_adapters(ref, flat_params):
    """Adapters on HF T5's sublayer outputs (before dropout and the residual sum)."""
    grads_of = {}
    owners = ("SelfAttention", "EncDecAttention", "DenseReluDense")
    for name, module in ref.named_modules():
        parts = name.split(".")
        if len(parts) != 6 or parts[-1] not in owners:
            continue
        stack, _, block, _, sub, owner = parts
        sublayer = _HF_BLOCKS[(stack, sub, owner)]
        prefix = (stack, f"layers_{block}", f"{sublayer}_adapter")
        adapter_params = {"/".join(k[3:]): v for k, v in flat_params.items() if k[:3] == prefix}
        if not adapter_params:
            continue
        adapter, tensors = _torch_adapter(adapter_params)
        grads_of.update({prefix + tuple(k.split("/")): t for k, t in tensors.items()})

        def hook(mod, args, out, adapter=adapter):
            return (adapter(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else adapter(out)
        module.register_forward_hook(hook)
    return grads_of


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer"])
def test_bottleneck_adapters_match_the_formula_inserted_into_hf_t5(checkpoint, method):
    hf_dir, config, base = checkpoint
    adapter_cfg = peft.AdapterConfig(width=5, init_std=0.3)  # Far from the identity.
    model, _ = peft.build_models(config, peft.MethodConfig(method, adapter=adapter_cfg))
    params = peft.init_adapters(model, base, jax.random.key(0))
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()
            if any(p.endswith("_adapter") for p in k)}
    rng = np.random.default_rng(0)  # Biases start at 0: give them values too.
    flat = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
            if k[-1] == "bias" else v for k, v in flat.items()}
    sites = 3 * 2 + 3 * 3 if method == "houlsby" else 3 + 3
    assert len(flat) == 4 * sites
    ref = hf_model(hf_dir)
    for p in ref.parameters():
        p.requires_grad_(False)
    tensors = _hook_adapters(ref, flat)
    enc, dec, targets = batch(config, seed=4)
    trainable, frozen = peft.split_params(with_values(params, flat),
                                          peft.trainable_mask(params, method))
    loss, grads = jax.jit(jax.value_and_grad(lambda t: our_loss(
        model, peft.merge_params(t, frozen), enc, dec, targets)))(trainable)
    ref_loss = hf_loss(ref, enc, dec, targets)
    ref_loss.backward()
    assert abs(float(loss) - ref_loss.item()) / abs(ref_loss.item()) <= TOLERANCE
    assert abs(ref_loss.item() - hf_loss(hf_model(hf_dir), enc, dec, targets).item()) > 1e-2
    flat_grads = traverse_util.flatten_dict(grads)
    assert set(flat_grads) == set(tensors)
    for path, tensor in tensors.items():
        assert rel(flat_grads[path], tensor.grad.numpy()) <= TOLERANCE, path


def test_adapters_start_near_the_identity(checkpoint):
    _, config, base = checkpoint
    model, _ = peft.build_models(config, peft.MethodConfig("houlsby",
                                                           adapter=peft.AdapterConfig(width=8)))
    params = peft.init_adapters(model, base, jax.random.key(0))
    enc, dec, _ = batch(config)
    plain = peft.build_models(config, peft.MethodConfig())[0].apply({"params": base}, enc, dec)
    assert 0 < rel(model.apply({"params": params}, enc, dec), plain) < 0.05
    kernel = traverse_util.flatten_dict(params)[
        ("encoder", "layers_0", "mlp_adapter", "down", "kernel")]
    assert np.abs(kernel).max() <= 2 * 1e-2 and np.asarray(kernel).std() > 3e-3


def test_prefix_placement_all_uses_every_block_and_peft_only_decoder_self_attention():
    slots, table = peft.additions_lib.prefix_slots(3, 3, "peft")
    assert slots == 6 and table == {("decoder", 0): (0, 1), ("decoder", 1): (4, 5),
                                    ("decoder", 2): (2, 3)}
    slots, table = peft.additions_lib.prefix_slots(2, 1, "all")
    assert slots == 2 * 2 + 4 and sorted(table) == [("cross", 0), ("decoder", 0),
                                                    ("encoder", 0), ("encoder", 1)]
    with pytest.raises(ValueError, match="num_decoder_layers <= num_layers"):
        peft.additions_lib.prefix_slots(1, 3, "peft")
