"""LoRA and prompt tuning compute what HF PEFT / transformers compute (CPU, fp32)."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import hf_reference
from hf_reference import make_hf_checkpoint
from ift_jax import hf, peft, peft_formats
from ift_jax.models import t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed")

TOLERANCE = 1e-5
RANK, ALPHA = 4, 8.0  # scale alpha / rank = 2 (not 1), so a missing scale shows.


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(hf_dir, our config, our base params) of a tiny FLAN-T5-like checkpoint."""
    hf_dir = str(tmp_path_factory.mktemp("v1_1"))
    make_hf_checkpoint("v1_1", hf_dir)
    config, params = hf.load_t5(hf_dir)
    return hf_dir, config, jax.tree.map(jnp.asarray, params)  # qwix skips numpy kernels.


def hf_model(hf_dir):
    return transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()


def hf_lora_model(hf_dir, target_modules=("q", "v"), seed=0):
    """HF PEFT LoRA model with random A *and* B (PEFT inits B to zero)."""
    cfg = hf_peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(target_modules),
                             lora_dropout=0.0, task_type="SEQ_2_SEQ_LM")
    model = hf_peft.get_peft_model(hf_model(hf_dir), cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


# Our module path from a HF T5 module name, written out here (not taken from
# hf.py) so the test checks the mapping instead of reusing it.
_HF_STACK_LAYERS = {("encoder", "0", "SelfAttention"): "attention",
                    ("decoder", "0", "SelfAttention"): "self_attention",
                    ("decoder", "1", "EncDecAttention"): "encoder_decoder_attention"}
_HF_PROJ = {"q": "query", "k": "key", "v": "value", "o": "out"}


def our_module(hf_name):
    stack, _, block, _, sub, attention, proj = hf_name.split(".")
    return (stack, f"layers_{block}", _HF_STACK_LAYERS[(stack, sub, attention)],
            _HF_PROJ[proj])


def lora_params_from_hf(model, base_params):
    """Our LoRA params holding the HF model's A (as `[in, r]`) and B (as `[r, out]`)."""
    params = jax.tree.map(lambda x: x, base_params)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        module = name.removeprefix("base_model.model.").split(".lora_")[0]
        node = params
        for key in our_module(module):
            node = node[key]
        leaf = "kernel_lora_a" if ".lora_A." in name else "kernel_lora_b"
        node[leaf] = jnp.asarray(p.detach().numpy().T)
    return params


def make_batch(vocab_size, seed=0):
    return hf_reference.make_batch(vocab_size, enc_len=13, dec_len=9, enc_pad=4, dec_pad=3,
                                   seed=seed)


def hf_loss(model, enc, dec, targets, inputs_embeds=None, attention_mask=None):
    labels = torch.as_tensor(np.where(targets > 0, targets, -100))
    if attention_mask is None:
        attention_mask = torch.as_tensor((enc > 0).astype(np.int64))
    inputs = ({"inputs_embeds": inputs_embeds} if inputs_embeds is not None
              else {"input_ids": torch.as_tensor(enc)})
    return model(**inputs, attention_mask=attention_mask,
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


def test_lora_loss_grads_and_sgd_steps_match_hf_peft(checkpoint):
    hf_dir, config, base = checkpoint
    ref = hf_lora_model(hf_dir)
    model = peft.apply_lora(t5.Transformer(config), peft.LoraConfig(rank=RANK, alpha=ALPHA))
    params = lora_params_from_hf(ref, base)
    trainable, frozen = peft.split_params(params, peft.trainable_mask(params, "lora"))
    ref_trainable = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert peft.count_params(trainable) == sum(p.numel() for p in ref_trainable.values())
    enc, dec, targets = make_batch(config.vocab_size)

    @jax.jit
    def loss_and_grads(t):
        return jax.value_and_grad(lambda t: our_loss(
            model, peft.merge_params(t, frozen), enc, dec, targets))(t)

    with torch.no_grad(), ref.disable_adapter():
        base_loss = hf_loss(ref, enc, dec, targets).item()
    # 0.1, not larger: at 0.5 the loss overshoots (8.7, 5.6, 6.0, 5.2) and
    # fp32 rounding grows to ~1e-4 by step 3, against a float64 reference too.
    lr = 0.1
    optimizer = torch.optim.SGD(list(ref_trainable.values()), lr=lr)
    for step in range(4):
        loss, grads = loss_and_grads(trainable)
        optimizer.zero_grad()
        ref_loss = hf_loss(ref, enc, dec, targets)
        ref_loss.backward()
        assert abs(float(loss) - ref_loss.item()) / abs(ref_loss.item()) <= TOLERANCE, step
        if step == 0:
            assert abs(base_loss - ref_loss.item()) > 1e-2  # The adapters matter.
            ours = lora_params_from_hf_grads(ref_trainable, grads)
            for name, (g, ref_g) in ours.items():
                assert rel(g, ref_g) <= TOLERANCE, name
        optimizer.step()
        trainable = jax.tree.map(lambda p, g: p - lr * g, trainable, grads)


def lora_params_from_hf_grads(ref_trainable, grads):
    """{hf name: (our grad transposed to HF layout, HF grad)}."""
    pairs = {}
    for name, p in ref_trainable.items():
        module = name.removeprefix("base_model.model.").split(".lora_")[0]
        node = grads
        for key in our_module(module):
            node = node[key]
        ours = node["kernel_lora_a" if ".lora_A." in name else "kernel_lora_b"]
        pairs[name] = (np.asarray(ours).T, p.grad.numpy())
    assert len(pairs) == 24  # 2 encoder + 2x2 decoder attention blocks, q and v, A and B.
    return pairs


def test_prompt_tuning_loss_and_grad_match_hf_inputs_embeds(checkpoint):
    hf_dir, config, base = checkpoint
    prompt_cfg = peft.PromptConfig(length=5)
    model = peft.apply_prompt_tuning(t5.Transformer(config), prompt_cfg)
    params = peft.init_adapters(model, base, jax.random.key(0), prompt_cfg)
    trainable, frozen = peft.split_params(params, peft.trainable_mask(params, "prompt"))
    enc, dec, targets = make_batch(config.vocab_size, seed=1)
    loss, grads = jax.jit(jax.value_and_grad(lambda t: our_loss(
        model, peft.merge_params(t, frozen), enc, dec, targets)))(trainable)

    ref = hf_model(hf_dir)
    prompt = torch.nn.Parameter(torch.tensor(np.asarray(params["prompt"]["embedding"])))
    tokens = ref.shared(torch.as_tensor(enc))
    embeds = torch.cat([prompt[None].expand(enc.shape[0], -1, -1), tokens], dim=1)
    mask = np.concatenate([np.ones((enc.shape[0], 5)), enc > 0], axis=1).astype(np.int64)
    ref_loss = hf_loss(ref, enc, dec, targets, embeds, torch.as_tensor(mask))
    ref_loss.backward()
    assert abs(float(loss) - ref_loss.item()) / abs(ref_loss.item()) <= TOLERANCE
    assert rel(grads["prompt"]["embedding"], prompt.grad.numpy()) <= TOLERANCE


def our_lora(checkpoint, target_regex=peft.DEFAULT_LORA_TARGETS, seed=0):
    _, config, base = checkpoint
    cfg = peft.LoraConfig(rank=RANK, alpha=ALPHA, target_regex=target_regex)
    model = peft.apply_lora(t5.Transformer(config), cfg)
    params = peft.init_adapters(model, base, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (0.3 * jax.random.normal(next(keys), x.shape)
                      if p[-1].key in peft.LORA_LEAVES else x), params)
    return cfg, model, params


def hf_logits(model, enc, dec):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(enc),
                     attention_mask=torch.as_tensor((enc > 0).astype(np.int64)),
                     decoder_input_ids=torch.as_tensor(dec)).logits.numpy()


@pytest.mark.parametrize("target_regex,target_modules", [
    (peft.DEFAULT_LORA_TARGETS, ["q", "v"]),
    # A subset of blocks and other kernel layouts: full module names.
    (r"encoder/layers_1/attention/(query|out)|decoder/layers_0/mlp/wo", None),
])
def test_exported_adapter_loads_in_peft_with_our_logits(checkpoint, tmp_path, target_regex,
                                                        target_modules):
    hf_dir, config, _ = checkpoint
    cfg, model, params = our_lora(checkpoint, target_regex)
    out = str(tmp_path / "adapter")
    method = peft.MethodConfig("lora", lora=cfg)
    peft_formats.save_peft(out, config, params, method, base_model_name_or_path=hf_dir)
    with open(os.path.join(out, peft_formats.ADAPTER_CONFIG)) as f:
        adapter = json.load(f)
    assert adapter["peft_type"] == "LORA" and adapter["task_type"] == "SEQ_2_SEQ_LM"
    assert (adapter["r"], adapter["lora_alpha"]) == (RANK, ALPHA)
    if target_modules:
        assert adapter["target_modules"] == target_modules
    else:
        assert adapter["target_modules"] == [
            "decoder.block.0.layer.2.DenseReluDense.wo",
            "encoder.block.1.layer.0.SelfAttention.o",
            "encoder.block.1.layer.0.SelfAttention.q"]

    ref = hf_peft.PeftModel.from_pretrained(hf_model(hf_dir), out).eval()
    enc, dec, _ = make_batch(config.vocab_size, seed=2)
    ours = model.apply({"params": params}, enc, dec)
    assert rel(ours, hf_logits(ref, enc, dec)) <= TOLERANCE
    assert rel(ours, hf_logits(hf_model(hf_dir), enc, dec)) > 1e-2  # Adapters took effect.

    loaded = peft_formats.load_peft(out, config)
    trainable, _ = peft.split_params(params, peft.trainable_mask(params, "lora"))
    assert jax.tree.structure(loaded.params) == jax.tree.structure(trainable)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0),
                 loaded.params, trainable)
    assert (loaded.method.lora.rank, loaded.method.lora.alpha) == (RANK, ALPHA)
    assert peft.lora_targets(t5.Transformer(config), loaded.method.lora) == peft.lora_targets(
        t5.Transformer(config), cfg)


def test_merged_lora_exports_as_a_plain_hf_t5(checkpoint, tmp_path):
    hf_dir, config, _ = checkpoint
    cfg, model, params = our_lora(checkpoint)
    hf.save_t5(str(tmp_path), config, peft.merge_lora(params, cfg))
    enc, dec, _ = make_batch(config.vocab_size, seed=5)
    assert rel(hf_logits(hf_model(str(tmp_path)), enc, dec),
               model.apply({"params": params}, enc, dec)) <= TOLERANCE


def test_lora_a_starts_as_hf_peft_inits_it():
    """PEFT's default init (`reset_lora_parameters`: `kaiming_uniform_(a=sqrt(5))`,
    uniform in ±1/sqrt(in)) on q, o and the MLP's wo, whose inputs differ (d_model,
    heads·d_kv, d_ff): our A, from qwix's init and from `init_adapters`, has the
    same shapes, bound and spread."""
    dims = dict(vocab_size=64, d_model=256, d_kv=16, num_heads=4, d_ff=512, num_layers=1,
                num_decoder_layers=1, feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    ref = hf_peft.get_peft_model(
        transformers.T5ForConditionalGeneration(transformers.T5Config(
            **dims, tie_word_embeddings=False)),
        hf_peft.LoraConfig(r=16, lora_alpha=16, target_modules=["q", "o", "wo"]))
    hf_a = {}
    for name, p in ref.named_parameters():
        if ".lora_A." in name:
            hf_proj = name.split(".lora_A.")[0].split(".")[-1]
            proj = {"q": "query", "o": "out", "wo": "wo"}[hf_proj]
            hf_a.setdefault(proj, []).append(p.detach().numpy().T)
    config = t5.get_config("tiny", **dims)
    model = peft.apply_lora(t5.Transformer(config), peft.LoraConfig(
        rank=16, alpha=16.0, target_regex=".*(attention/(query|out)|mlp/wo)"))
    enc, dec = jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)
    from_qwix = nn.unbox(model.init(jax.random.key(0), enc, dec)["params"])
    base = nn.unbox(t5.Transformer(config).init(jax.random.key(1), enc, dec)["params"])
    from_init_adapters = peft.init_adapters(model, base, jax.random.key(2))
    for ours in (from_qwix, from_init_adapters):
        our_a = {}
        for key, value in traverse_util.flatten_dict(ours).items():
            if key[-1] == "kernel_lora_a":
                our_a.setdefault(key[-2], []).append(np.asarray(value))
        assert our_a.keys() == hf_a.keys()
        for proj, mats in hf_a.items():
            assert sorted(m.shape for m in our_a[proj]) == sorted(m.shape for m in mats)
            theirs, mine = np.concatenate(mats), np.concatenate(our_a[proj])
            bound = 1 / np.sqrt(mats[0].shape[0])
            assert np.abs(theirs).max() <= bound and np.abs(mine).max() <= bound, proj
            assert np.abs(mine).max() == pytest.approx(np.abs(theirs).max(), rel=0.01), proj
            assert mine.std() == pytest.approx(theirs.std(), rel=0.06), proj
