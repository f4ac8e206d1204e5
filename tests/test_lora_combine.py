"""Weighted combinations of LoRA adapters equal HF PEFT's `add_weighted_adapter`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import hf_reference
from ift_jax import hf, lora, peft, peft_formats

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed")

WEIGHTS = (0.7, -0.4)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """An HF checkpoint and two PEFT LoRA adapters of it (different targets and alphas)."""
    root = tmp_path_factory.mktemp("combine")
    hf_dir = str(root / "base")
    hf_reference.make_hf_checkpoint("v1_1", hf_dir)
    dirs = []
    for name, targets, alpha in (("a", ["q", "v"], 8), ("b", ["q", "wo"], 16)):
        torch.manual_seed(len(dirs))
        model = hf_peft.get_peft_model(hf_base(hf_dir), hf_peft.LoraConfig(
            r=4, lora_alpha=alpha, target_modules=targets, task_type="SEQ_2_SEQ_LM"))
        gen = torch.Generator().manual_seed(10 + len(dirs))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(str(root / name))
        dirs.append(str(root / name))
    return hf_dir, dirs


def hf_base(hf_dir):
    return transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("combination", lora.COMBINATIONS)
def test_combined_adapter_equals_peft_add_weighted_adapter(adapters, combination):
    hf_dir, (dir_a, dir_b) = adapters
    ref = hf_peft.PeftModel.from_pretrained(hf_base(hf_dir), dir_a, adapter_name="a")
    ref.load_adapter(dir_b, adapter_name="b")
    ref.add_weighted_adapter(["a", "b"], list(WEIGHTS), "mix", combination_type=combination)
    ref.set_adapter("mix")
    ref.eval()

    config, base = hf.load_t5(hf_dir)
    base = jax.tree.map(jnp.asarray, base)
    loaded = [peft_formats.load_peft(d, config) for d in (dir_a, dir_b)]
    cfg, params = lora.combine([(a.method.lora, a.params) for a in loaded], WEIGHTS,
                               combination)
    assert cfg.rank == {"cat": 8, "linear": 4, "svd": 4}[combination] and cfg.scale == 1.0
    model, _ = peft.build_models(config, peft.MethodConfig("lora", lora=cfg))
    enc, dec, _ = hf_reference.make_batch(config.vocab_size, enc_len=10, dec_len=6, enc_pad=2,
                                          dec_pad=1)
    ours = model.apply({"params": peft.merge_params(params, base)}, enc, dec)
    with torch.no_grad():
        theirs = ref(input_ids=torch.as_tensor(enc),
                     attention_mask=torch.as_tensor((enc > 0).astype(np.int64)),
                     decoder_input_ids=torch.as_tensor(dec)).logits.numpy()
    # PEFT's SVD runs in fp32, ours in fp64: 1.1e-5 apart on these weights.
    assert rel(ours, theirs) <= (3e-5 if combination == "svd" else 1e-5)
    first = peft.build_models(config, loaded[0].method)[0].apply(
        {"params": loaded[0].apply_to(base)}, enc, dec)
    assert rel(ours, first) > 1e-2  # Not just the first adapter.

    # The deltas themselves, module by module (cat is exactly sum_i w_i s_i A_i B_i).
    deltas = {}
    for key, a in traverse_util.flatten_dict(params).items():
        if key[-1] == "kernel_lora_a":
            deltas[key[:-1]] = np.asarray(a) @ np.asarray(params_at(params, key[:-1]))
    assert len(deltas) == 2 * 3 + 2 * 5  # Union: q, v (a), q, wo (b) in every block.
    if combination == "cat":
        for module, delta in deltas.items():
            expected = sum(w * a.method.lora.scale * _delta(a.params, module)
                           for w, a in zip(WEIGHTS, loaded))
            np.testing.assert_allclose(delta, expected, rtol=1e-5, atol=1e-6)


def params_at(params, module):
    node = params
    for key in module:
        node = node[key]
    return node["kernel_lora_b"]


def _delta(params, module):
    flat = traverse_util.flatten_dict(params)
    a = flat.get(module + ("kernel_lora_a",))
    if a is None:
        return 0.0
    return np.asarray(a, np.float64) @ np.asarray(flat[module + ("kernel_lora_b",)], np.float64)


def test_combinations_refuse_what_peft_refuses():
    a = peft.LoraConfig(rank=4)
    with pytest.raises(peft.PeftError, match="'linear' needs equal ranks; got \\[4, 8\\]"):
        lora.combine([(a, {}), (peft.LoraConfig(rank=8), {})], (1.0, 1.0), "linear")
    with pytest.raises(peft.PeftError, match="DoRA"):
        lora.combine([(peft.LoraConfig(use_dora=True), {})], (1.0,))
    with pytest.raises(peft.PeftError, match="2 adapters and 1 weights"):
        lora.combine([(a, {}), (a, {})], (1.0,))
