"""Every exportable method round-trips through HF PEFT's formats with our logits; merged
exports load in transformers; what cannot be exported is refused with the reason."""

import json
import os

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

TOLERANCE = 1e-5
LORA = dict(rank=4, alpha=8.0)
NORMS = r".*(kernel_lora_[ab]|layer_norm/scale)"
EXPORTABLE = {
    "rslora_all": peft.MethodConfig("lora", lora=peft.LoraConfig(
        **LORA, use_rslora=True, target_regex=lora.target_regex("all"))),
    "dora": peft.MethodConfig("lora", lora=peft.LoraConfig(**LORA, use_dora=True)),
    "lora_and_norms": peft.MethodConfig("lora", lora=peft.LoraConfig(**LORA),
                                        trainable_regex=NORMS),
    "ia3": peft.MethodConfig("ia3", ia3=peft.IA3Config()),
    "prompt": peft.MethodConfig("prompt", prompt=peft.PromptConfig(length=3)),
    "prefix_mlp": peft.MethodConfig("prefix", prefix=peft.PrefixConfig(3, "peft", 16)),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf_dir = str(tmp_path_factory.mktemp("v1_1"))
    hf_reference.make_hf_checkpoint("v1_1", hf_dir)
    config, params = hf.load_t5(hf_dir)
    return hf_dir, config, jax.tree.map(jnp.asarray, params)


def trained(config, base, method, seed=0):
    """Our model (eval) and params with every trainable leaf moved off its init."""
    model, eval_model = peft.build_models(config, method)
    params = peft.init_adapters(model, base, jax.random.key(seed))
    mask = peft.trainable_mask(params, method.name, method.trainable_regex)
    trainable, frozen = peft.split_params(params, mask)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    trainable = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape),
                             trainable)
    return eval_model, peft.merge_params(trainable, frozen)


def batch(config, seed=0):
    enc, dec, _ = hf_reference.make_batch(config.vocab_size, enc_len=10, dec_len=6, enc_pad=3,
                                          dec_pad=1, seed=seed)
    return enc, dec


def hf_logits(model, enc, dec):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(enc),
                     attention_mask=torch.as_tensor((enc > 0).astype(np.int64)),
                     decoder_input_ids=torch.as_tensor(dec)).logits.numpy()


def hf_base(hf_dir):
    return transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("name", list(EXPORTABLE))
def test_export_loads_in_peft_with_our_logits_and_reads_back(checkpoint, tmp_path, name):
    hf_dir, config, base = checkpoint
    method = EXPORTABLE[name]
    model, params = trained(config, base, method)
    out = str(tmp_path / name)
    peft_formats.save_peft(out, config, params, method, base_model_name_or_path=hf_dir)
    enc, dec = batch(config)
    ours = model.apply({"params": params}, enc, dec)
    ref = hf_peft.PeftModel.from_pretrained(hf_base(hf_dir), out).eval()
    assert rel(ours, hf_logits(ref, enc, dec)) <= TOLERANCE
    assert rel(ours, hf_logits(hf_base(hf_dir), enc, dec)) > 1e-2  # It took effect.

    loaded = peft_formats.load_peft(out, config)
    assert loaded.method.name == method.name
    loaded_model, _ = peft.build_models(config, loaded.method)
    again = loaded_model.apply({"params": loaded.apply_to(base)}, enc, dec)
    assert rel(again, ours) <= TOLERANCE


def test_lora_plus_norms_export_keeps_the_norms(checkpoint, tmp_path):
    hf_dir, config, base = checkpoint
    method = EXPORTABLE["lora_and_norms"]
    _, params = trained(config, base, method)
    peft_formats.save_peft(str(tmp_path), config, params, method, hf_dir)
    adapter = json.loads((tmp_path / peft_formats.ADAPTER_CONFIG).read_text())
    # The regex trains every block's pre-sublayer norm (not encoder_norm / decoder_norm).
    assert sorted(adapter["modules_to_save"]) == sorted(
        [f"encoder.block.{i}.layer.{j}.layer_norm" for i in range(2) for j in range(2)]
        + [f"decoder.block.{i}.layer.{j}.layer_norm" for i in range(2) for j in range(3)])
    loaded = peft_formats.load_peft(str(tmp_path), config)
    flat = traverse_util.flatten_dict(params)
    saved = traverse_util.flatten_dict(loaded.modules_to_save)
    assert len(saved) == 2 * 2 + 2 * 3
    for path, value in saved.items():
        np.testing.assert_array_equal(value, np.asarray(flat[path]))


# ----------------------------------------------------------------------------
# Adapters PEFT itself wrote.


def _randomized(model, substring, fn):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if substring in n:
                p.copy_(fn(p, torch.randn(p.shape, generator=gen)))
    return model


PEFT_WRITTEN = {
    "ia3": (lambda: hf_peft.IA3Config(task_type="SEQ_2_SEQ_LM"), "ia3_l",
            lambda p, r: 1 + 0.3 * r),
    "dora": (lambda: hf_peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8,
                                        use_dora=True, target_modules=["q", "v", "wo"]),
             "lora_", lambda p, r: p + 0.2 * r),
    "prompt": (lambda: hf_peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                  num_virtual_tokens=4), None, None),
    "prefix_projection": (lambda: hf_peft.PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, prefix_projection=True,
        encoder_hidden_size=8), None, None),
}


@pytest.mark.parametrize("name", list(PEFT_WRITTEN))
def test_adapters_saved_by_peft_run_in_our_model(checkpoint, tmp_path, name):
    hf_dir, config, base = checkpoint
    make_cfg, substring, fn = PEFT_WRITTEN[name]
    torch.manual_seed(5)
    ref = hf_peft.get_peft_model(hf_base(hf_dir), make_cfg()).eval()
    if substring:
        ref = _randomized(ref, substring, fn)
    ref.save_pretrained(str(tmp_path))
    loaded = peft_formats.load_peft(str(tmp_path), config)
    model, _ = peft.build_models(config, loaded.method)
    enc, dec = batch(config, seed=1)
    reloaded = hf_peft.PeftModel.from_pretrained(hf_base(hf_dir), str(tmp_path)).eval()
    ours = model.apply({"params": loaded.apply_to(base)}, enc, dec)
    assert rel(ours, hf_logits(reloaded, enc, dec)) <= TOLERANCE


# ----------------------------------------------------------------------------
# Merged exports and refusals.


@pytest.mark.parametrize("name", ["ia3", "dora"])
def test_merged_export_loads_in_transformers_with_our_logits(checkpoint, tmp_path, name):
    hf_dir, config, base = checkpoint
    model, params = trained(config, base, EXPORTABLE[name])
    peft_formats.save_merged(str(tmp_path), config, params, EXPORTABLE[name])
    enc, dec = batch(config, seed=2)
    assert rel(hf_logits(hf_base(str(tmp_path)), enc, dec),
               model.apply({"params": params}, enc, dec)) <= TOLERANCE


def test_methods_without_an_hf_form_are_refused_with_the_reason(checkpoint, tmp_path):
    hf_dir, config, base = checkpoint
    out = str(tmp_path)
    houlsby = peft.MethodConfig("houlsby", adapter=peft.AdapterConfig(width=4))
    prompt_and_lora = peft.MethodConfig(  # LoRA leaves trained beside a prompt: no HF module.
        "prompt", prompt=peft.PromptConfig(2), lora=peft.LoraConfig(**LORA),
        trainable_regex=r"prompt/embedding|.*kernel_lora_[ab]")
    for method, reason in (
            (houlsby, "HF PEFT has no bottleneck adapters"),
            (peft.MethodConfig("prefix", prefix=peft.PrefixConfig(2)),
             "prefix_placement 'all' has no HF PEFT form"),
            (prompt_and_lora, "no HF T5 module .*encoder/layers_N/attention/query/kernel_lora_a")):
        _, params = trained(config, base, method)
        with pytest.raises(peft.PeftError, match=reason):
            peft_formats.save_peft(out, config, params, method, hf_dir)
    for method, reason in ((houlsby, "nonlinear layer"), (prompt_and_lora, "input positions")):
        with pytest.raises(peft.PeftError, match=f"cannot be merged into a plain T5: .*{reason}"):
            peft_formats.save_merged(out, config, base, method)


def test_adapter_of_another_base_names_the_tensor_and_both_shapes(checkpoint, tmp_path):
    hf_dir, config, base = checkpoint
    method = EXPORTABLE["dora"]
    _, params = trained(config, base, method)
    peft_formats.save_peft(str(tmp_path), config, params, method, hf_dir)
    wider = config.replace(d_model=48)
    with pytest.raises(hf.CheckpointError) as error:
        peft_formats.load_peft(str(tmp_path), wider)
    message = str(error.value)
    assert "\n" not in message
    assert ("tensor base_model.model.decoder.block.0.layer.0.SelfAttention.q.lora_A.weight "
            "has shape (4, 32); this base model needs (4, 48)") in message
    (tmp_path / peft_formats.ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(hf.CheckpointError, match="peft_type 'LOHA'; ift_jax reads LORA"):
        peft_formats.load_peft(str(tmp_path), config)
    with pytest.raises(hf.CheckpointError, match="no adapter_config.json"):
        peft_formats.load_peft(os.path.dirname(str(tmp_path)), config)


def test_loaded_adapters_switch_on_one_base(checkpoint, tmp_path):
    """The serving case: one base in memory, adapters of several methods swapped on it."""
    hf_dir, config, base = checkpoint
    outputs = []
    enc, dec = batch(config, seed=3)
    for name in ("ia3", "prompt", "rslora_all"):
        model, params = trained(config, base, EXPORTABLE[name], seed=7)
        peft_formats.save_peft(str(tmp_path / name), config, params, EXPORTABLE[name], hf_dir)
        loaded = peft_formats.load_peft(str(tmp_path / name), config)
        swapped = peft.build_models(config, loaded.method)[0].apply(
            {"params": loaded.apply_to(base)}, enc, dec)
        assert rel(swapped, model.apply({"params": params}, enc, dec)) <= TOLERANCE
        outputs.append(np.asarray(swapped))
    assert min(rel(a, b) for i, a in enumerate(outputs) for b in outputs[i + 1:]) > 1e-2
