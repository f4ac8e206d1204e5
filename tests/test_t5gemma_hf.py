"""HF T5Gemma / T5Gemma 2 directories in and out (`t5gemma_hf`), presets against the
published sizes, and the Gemma SentencePiece tokenizer through seqio."""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

import t5gemma_reference as ref
from ift_jax import errors
from ift_jax.data import vocabularies
from ift_jax.models import t5gemma, t5gemma_config, t5gemma_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CASES = [("t5gemma", "unbalanced_gqa2"), ("t5gemma", "mha_untied"),
         ("t5gemma2", "mqa_linear_rope")]


@pytest.fixture(scope="module", params=CASES, ids=["/".join(c) for c in CASES])
def checkpoint(request, tmp_path_factory):
    """(variant, torch model, its directory, our config, our params)."""
    variant, case = request.param
    hf_model = ref.build(variant, case)
    hf_dir = str(tmp_path_factory.mktemp(case))
    hf_model.save_pretrained(hf_dir)
    config, params = t5gemma_hf.load(hf_dir)
    return variant, hf_model, hf_dir, config, params


def _model_class(variant):
    return (transformers.T5GemmaForConditionalGeneration if variant == "t5gemma"
            else transformers.T5Gemma2ForConditionalGeneration)


def _logits(hf_model, seed=0):
    """Logits of the torch model (eager attention on both sides: sdpa differs in ulps)."""
    enc, dec, _ = ref.make_batch(96, seed=seed)
    with torch.no_grad():
        return ref.hf_forward(hf_model, enc, dec).logits.numpy()


def _assert_same_params(a, b):
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]))


def test_saved_directory_loads_in_transformers_with_equal_logits(checkpoint, tmp_path):
    variant, hf_model, _, config, params = checkpoint
    t5gemma_hf.save(str(tmp_path), config, jax.tree.map(np.asarray, params))
    restored = _model_class(variant).from_pretrained(str(tmp_path), attn_implementation="eager")
    restored.eval()
    np.testing.assert_array_equal(_logits(restored), _logits(hf_model))
    config2, params2 = t5gemma_hf.load(str(tmp_path))
    assert config2 == config
    _assert_same_params(params2, params)


def test_scanned_params_save_and_load_in_either_layout(checkpoint, tmp_path):
    _, _, hf_dir, _, params = checkpoint
    scanned_config, scanned = t5gemma_hf.load(hf_dir, scan_layers=True)
    assert "layers" in scanned["encoder"] and "layers_0" not in scanned["encoder"]
    t5gemma_hf.save(str(tmp_path), scanned_config, scanned)
    _assert_same_params(t5gemma_hf.load(str(tmp_path))[1], params)


def test_t5gemma2_vision_tower_is_skipped_and_carried_over_from_base_dir(checkpoint, tmp_path):
    variant, hf_model, hf_dir, config, params = checkpoint
    if variant != "t5gemma2":
        pytest.skip("T5Gemma 2 only")
    assert "vision_tower" not in json.dumps(jax.tree.map(lambda x: 0, params))
    t5gemma_hf.save(str(tmp_path), config, params, base_dir=hf_dir)
    restored, info = _model_class(variant).from_pretrained(
        str(tmp_path), attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    base = hf_model.state_dict()
    for name, value in restored.state_dict().items():
        if "vision_tower" in name or "multi_modal_projector" in name:
            np.testing.assert_array_equal(value.numpy(), base[name].numpy())
    np.testing.assert_array_equal(_logits(restored.eval()), _logits(hf_model))


def test_sharded_safetensors_load_the_same_params(checkpoint, tmp_path):
    _, hf_model, _, _, params = checkpoint
    hf_model.save_pretrained(str(tmp_path), max_shard_size="40KB")
    assert os.path.exists(os.path.join(tmp_path, "model.safetensors.index.json"))
    _assert_same_params(t5gemma_hf.load(str(tmp_path))[1], params)


def test_bf16_and_torch_bin_checkpoints_load(checkpoint, tmp_path):
    """Gemma weights ship in bf16, which numpy's safetensors reader does not know."""
    variant, hf_model, hf_dir, _, params = checkpoint
    bf16_dir, bin_dir = str(tmp_path / "bf16"), str(tmp_path / "bin")
    _model_class(variant).from_pretrained(hf_dir, dtype=torch.bfloat16).save_pretrained(bf16_dir)
    _, loaded = t5gemma_hf.load(bf16_dir)
    rounded = jax.tree.map(lambda x: np.asarray(x, jax.numpy.bfloat16).astype(np.float32), params)
    _assert_same_params(loaded, rounded)
    os.makedirs(bin_dir)
    with open(os.path.join(hf_dir, "config.json")) as src, \
            open(os.path.join(bin_dir, "config.json"), "w") as dst:
        dst.write(src.read())
    torch.save(hf_model.state_dict(), os.path.join(bin_dir, "pytorch_model.bin"))
    _assert_same_params(t5gemma_hf.load(bin_dir)[1], params)


def _copy_with(hf_dir, out, edit_config=None, edit_tensors=None):
    from safetensors.numpy import save_file
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    tensors = t5gemma_hf.read_tensors(hf_dir)
    (edit_config or (lambda c: None))(config)
    (edit_tensors or (lambda t: None))(tensors)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              os.path.join(out, "model.safetensors"))
    return out


def test_in_memory_text_model_names_are_read_too(checkpoint, tmp_path):
    variant, _, hf_dir, _, params = checkpoint
    if variant != "t5gemma2":
        pytest.skip("T5Gemma 2 only")

    def rename(tensors):
        for name in list(tensors):
            if name.startswith("model.encoder.") and "vision" not in name and "multi" not in name:
                tensors[name.replace("model.encoder.", "model.encoder.text_model.")] = \
                    tensors.pop(name)
    out = _copy_with(hf_dir, str(tmp_path), edit_tensors=rename)
    _assert_same_params(t5gemma_hf.load(out)[1], params)


def _drop(name):
    return lambda tensors: tensors.pop(name)


def _set_rope(config):
    config["decoder"]["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4,
                                            "factor": 2.0}


@pytest.mark.parametrize("edit_config,edit_tensors,message", [
    (lambda c: c.update(model_type="t5"), None, "model_type='t5'"),
    (None, _drop("model.decoder.norm.weight"), "missing 1 tensor"),
    (None, lambda t: t.update(extra=np.zeros(2, np.float32)), "unexpected tensor"),
    (_set_rope, None, "rope_type 'yarn'"),
    (lambda c: c["decoder"].update(num_hidden_layers=3), None, "layer_types for 3 layers"),
    (lambda c: c["encoder"].update(hidden_size=16), None, "has shape"),
])
def test_unusable_directories_are_refused_in_one_line(checkpoint, tmp_path, edit_config,
                                                      edit_tensors, message):
    variant, _, hf_dir, _, _ = checkpoint
    if variant != "t5gemma":
        pytest.skip("one variant is enough for the messages")
    out = _copy_with(hf_dir, str(tmp_path), edit_config, edit_tensors)
    with pytest.raises(errors.CheckpointError, match=message) as e:
        t5gemma_hf.load(out)
    assert "\n" not in str(e.value)


def test_missing_directory_and_config_are_refused(tmp_path):
    with pytest.raises(errors.CheckpointError, match="no such directory"):
        t5gemma_hf.load(str(tmp_path / "nope"))
    with pytest.raises(errors.CheckpointError, match="has no config.json"):
        t5gemma_hf.load(str(tmp_path))


# ----------------------------------------------------------------------------
# Presets.

# keras-hub's published parameter counts of the converted HF checkpoints
# (keras-team/keras-hub, keras_hub/src/models/t5gemma/t5gemma_presets.py at
# 71453d08f59e): encoder and decoder embeddings counted, the tied head not.
KERAS_HUB_T5GEMMA_PARAMS = {
    "t5gemma-s-s": 312517632, "t5gemma-b-b": 591490560, "t5gemma-l-l": 1241761792,
    "t5gemma-ml-ml": 2200345344, "t5gemma-xl-xl": 3766980608,
    "t5gemma-2b-2b": 5596853760, "t5gemma-9b-2b": 12292375296,
    "t5gemma-9b-9b": 20333401088,
}

# google/t5gemma-2-270m-270m's text config as transformers prints it (the copy found
# in the code index; see docs/t5gemma.md), written out here independently of the preset.
T5GEMMA2_270M_TEXT = dict(
    hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, vocab_size=262144, sliding_window=512,
    query_pre_attn_scalar=256, max_position_embeddings=32768,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
    rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})


@pytest.mark.parametrize("name", list(KERAS_HUB_T5GEMMA_PARAMS))
def test_t5gemma_presets_have_the_published_parameter_counts(name):
    assert t5gemma.param_count(t5gemma_config.PRESETS[name]) == KERAS_HUB_T5GEMMA_PARAMS[name]


def _text_params(model):
    return sum(p.numel() for n, p in model.named_parameters()
               if "vision_tower" not in n and "multi_modal_projector" not in n)


@pytest.mark.parametrize("name", [n for n in t5gemma_config.PRESETS if "tiny" not in n])
def test_presets_count_what_transformers_builds_from_their_config_json(name):
    """Counted with `jax.eval_shape` here and by transformers on the meta device (no
    weights either side); config.json written by us and read back equal."""
    config = t5gemma_config.PRESETS[name]
    hf_config = t5gemma_hf.config_to_hf(config)
    assert t5gemma_hf.config_from_hf(hf_config) == config
    cls = transformers.T5GemmaConfig if config.variant == "t5gemma" else transformers.T5Gemma2Config
    fields = {k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        hf_model = _model_class(config.variant)(cls(**fields))
    assert t5gemma.param_count(config) == _text_params(hf_model)


def test_t5gemma2_270m_preset_is_the_published_config():
    text = T5GEMMA2_270M_TEXT
    published = transformers.T5Gemma2Config(
        encoder=dict(text_config=text, eoi_token_index=256000), decoder=text)
    ours = t5gemma_config.PRESETS["t5gemma2-270m-270m"]
    hf_config = published.to_dict()
    assert t5gemma_hf.config_from_hf(hf_config) == ours
    with torch.device("meta"):
        hf_model = transformers.T5Gemma2ForConditionalGeneration(published)
    assert t5gemma.param_count(ours) == _text_params(hf_model) == 368424832


@pytest.mark.parametrize("name,blog_total", [("t5gemma2-270m-270m", 370e6),
                                              ("t5gemma2-1b-1b", 1.7e9),
                                              ("t5gemma2-4b-4b", 7e9)])
def test_t5gemma2_presets_match_the_announced_totals(name, blog_total):
    """Google's announcement: ~370M, ~1.7B, ~7B parameters without the vision encoder
    (rounded figures; 1B and 4B are derived from the Gemma 3 configs)."""
    count = t5gemma.param_count(t5gemma_config.PRESETS[name])
    assert abs(count - blog_total) / blog_total < 0.02


# ----------------------------------------------------------------------------
# Tokenizer.


def _gemma_like_sentencepiece(path_prefix):
    """A tiny SentencePiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3)."""
    import sentencepiece as spm
    texts = ["the quick brown fox jumps over the lazy dog"] * 20 + \
        ["instruction tuning of encoder decoder models"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=path_prefix,
                                   vocab_size=40, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                   model_type="char", minloglevel=2)
    return path_prefix + ".model"


@pytest.mark.parametrize("name", ["t5gemma-2b-2b", "t5gemma2-270m-270m"])
def test_gemma_tokenizer_reaches_seqio_with_gemma_special_ids(tmp_path, name):
    config = t5gemma_config.PRESETS[name]
    model_file = _gemma_like_sentencepiece(str(tmp_path / "sp"))
    os.replace(model_file, os.path.join(tmp_path, t5gemma_hf.TOKENIZER))
    vocab = vocabularies.make_vocabulary(t5gemma_hf.tokenizer_path(str(tmp_path)))
    assert (vocab.pad_id, vocab.eos_id, vocab.bos_id, vocab.unk_id) == (0, 1, 2, 3)
    assert vocab.bos_id == config.decoder_start_token_id  # The decoder starts from BOS.
    ids = vocab.encode("the lazy fox")
    assert min(ids) > 3 and vocab.decode(ids) == "the lazy fox"


def test_missing_tokenizer_names_the_file(tmp_path):
    with pytest.raises(errors.MissingError, match="tokenizer.model"):
        t5gemma_hf.tokenizer_path(str(tmp_path))
