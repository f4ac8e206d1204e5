"""A batch mixing LoRA adapters, soft prompts and the base model decodes, row for row,
exactly the tokens each adapter decodes alone."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from ift_jax import (cli, decoding, evaluation, hf, input_rows, lora, peft, peft_formats,
                     serving)
from ift_jax.data import vocabularies
from ift_jax.models import t5

pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed")

TINY = t5.get_config("tiny", dropout_rate=0.0)
ADAPTERS = {  # Different ranks, scales, targets and prompt lengths.
    "lora_qv": peft.MethodConfig("lora", lora=peft.LoraConfig(rank=4, alpha=8.0)),
    "rslora_all": peft.MethodConfig("lora", lora=peft.LoraConfig(
        rank=2, alpha=4.0, use_rslora=True, target_regex=lora.target_regex("all"))),
    "prompt_3": peft.MethodConfig("prompt", prompt=peft.PromptConfig(length=3)),
    "prompt_5": peft.MethodConfig("prompt", prompt=peft.PromptConfig(length=5)),
    "prompt_and_lora": peft.MethodConfig("prompt", prompt=peft.PromptConfig(length=2),
                                         lora=peft.LoraConfig(rank=3, alpha=3.0)),
}
ROWS = ["prompt_5", "lora_qv", None, "rslora_all", "prompt_3", "lora_qv", "prompt_and_lora",
        "prompt_5"]


@pytest.fixture(scope="module")
def base():
    enc = np.ones((1, 8), np.int32)
    return nn.unbox(t5.Transformer(TINY).init(jax.random.key(0), enc, enc)["params"])


def adapter(base, method, seed):
    """A trained-looking adapter: its own leaves moved off their init (B included)."""
    model, _ = peft.build_models(TINY, method)
    params = peft.init_adapters(model, base, jax.random.key(seed))
    both = r"prompt/.*|.*kernel_lora_[ab]" if method.prompt and method.lora else None
    own, _ = peft.split_params(params, peft.trainable_mask(params, method.name, both))
    keys = iter(jax.random.split(jax.random.key(seed + 100), 100))
    own = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(next(keys), x.shape), own)
    return peft_formats.LoadedAdapter(method, own, {})


@pytest.fixture(scope="module")
def adapters(base):
    return {name: adapter(base, method, seed) for seed, (name, method)
            in enumerate(ADAPTERS.items())}


def inputs(batch, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, TINY.vocab_size, (batch, 10))
    for row, length in enumerate(rng.integers(4, 11, batch)):
        tokens[row, length:] = 0
    return tokens


def alone(base, loaded, tokens):
    """Greedy tokens of one adapter's own model on `tokens` (or the base model's)."""
    method = loaded.method if loaded else peft.MethodConfig()
    model = peft.build_models(TINY, method)[1]
    params = loaded.apply_to(base) if loaded else jax.tree.map(jax.numpy.asarray, base)
    return np.asarray(decoding.greedy(model, params, tokens, max_decode_length=8)[0])


def test_mixed_batch_gives_each_row_its_own_adapters_tokens(base, adapters):
    bank = serving.AdapterBank.build(TINY, base, adapters)
    tokens = inputs(len(ROWS))
    mixed = serving.greedy(bank, tokens, ROWS, max_decode_length=8)
    expected = np.stack([alone(base, adapters.get(name), tokens[r:r + 1])[0]
                         for r, name in enumerate(ROWS)])
    np.testing.assert_array_equal(mixed, expected)
    # The adapters matter: rows of one input under different adapters differ.
    same = np.repeat(tokens[:1], len(ADAPTERS) + 1, axis=0)
    per_adapter = serving.greedy(bank, same, [None, *ADAPTERS], max_decode_length=8)
    assert len({tuple(row) for row in per_adapter}) == len(ADAPTERS) + 1


def test_bank_stacks_ranks_and_prompts_to_the_largest(base, adapters):
    bank = serving.AdapterBank.build(TINY, base, adapters)
    a, b = bank.stacks.lora[("encoder", "layers_0", "attention", "query")]
    assert a.shape == (len(ADAPTERS) + 1, 64, 4) and b.shape == (len(ADAPTERS) + 1, 4, 64)
    assert not np.asarray(a[0]).any() and not np.asarray(b[0]).any()  # Row 0: the base.
    table, lengths = bank.stacks.prompt
    assert table.shape == (len(ADAPTERS) + 1, 5, 64)
    assert list(np.asarray(lengths)) == [0, 0, 0, 3, 5, 2]
    mlp = bank.stacks.lora[("decoder", "layers_1", "mlp", "wo")]
    assert np.asarray(mlp[0][2]).any() and not np.asarray(mlp[0][1]).any()  # rslora_all only.


def test_unknown_names_and_unbatchable_methods_are_refused(base, adapters):
    bank = serving.AdapterBank.build(TINY, base, adapters)
    with pytest.raises(peft.PeftError, match="unknown adapter\\(s\\) 'lora_kv'; known: "
                                             "lora_qv, rslora_all"):
        bank.row_ids(["lora_qv", "lora_kv"])
    for name, method, reason in (
            ("dora", peft.MethodConfig("lora", lora=peft.LoraConfig(rank=2, use_dora=True)),
             "DoRA rescales"),
            ("ia3", peft.MethodConfig("ia3", ia3=peft.IA3Config()),
             "its method 'ia3' changes the layers"),
            ("prefix", peft.MethodConfig("prefix", prefix=peft.PrefixConfig(2)),
             "its method 'prefix' changes the layers")):
        with pytest.raises(peft.PeftError, match=f"adapter '{name}' cannot be served in a "
                                                 f"mixed batch: {reason}"):
            serving.AdapterBank.build(TINY, base, {**adapters, name: adapter(base, method, 9)})
    norms = peft_formats.LoadedAdapter(ADAPTERS["lora_qv"], adapters["lora_qv"].params,
                                       {"encoder": {"encoder_norm": {"scale": np.ones(64)}}})
    with pytest.raises(peft.PeftError, match="replaces base weights"):
        serving.AdapterBank.build(TINY, base, {"norms": norms})


# ----------------------------------------------------------------------------
# `ift-jax predict --init_from=BASE --adapter=NAME=DIR ... --input=FILE`.

EXPORTABLE = ("lora_qv", "rslora_all", "prompt_3", "prompt_5")
TEXTS = ["Summarize: the cat sat.", "Translate: good morning", "yes or no?", "a",
         "Which word is an animal? otter chair", "Answer briefly: 2 + 2", "hello there",
         "one more row"]
FILE_ROWS = [None, "prompt_5", "lora_qv", "rslora_all", "prompt_3", "lora_qv", None, "prompt_5"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, base, adapters):
    """An HF base directory, the exportable adapters as HF PEFT directories, a mixed file."""
    root = tmp_path_factory.mktemp("served")
    hf.save_t5(str(root / "base"), TINY, base)
    dirs = {}
    for name in EXPORTABLE:
        dirs[name] = str(root / name)
        peft_formats.save_peft(dirs[name], TINY, adapters[name].params, adapters[name].method,
                               str(root / "base"))
    lines = [{"inputs": t, **({"adapter": a} if a else {})} for t, a in zip(TEXTS, FILE_ROWS)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root, dirs


def _flags(root, dirs):
    return ["predict", f"--init_from={root / 'base'}", "--vocab=byte",
            "--max_decode_length=8", *[f"--adapter={n}={d}" for n, d in dirs.items()]]


def test_mixed_file_decodes_each_row_as_its_adapter_alone(served, base):
    root, dirs = served
    rows = input_rows.read_rows(str(root / "rows.jsonl"), check=serving.row_check(list(dirs)))
    bank = serving.load_bank(str(root / "base"), dirs)
    vocab = vocabularies.make_vocabulary("byte")
    tokens = [vocab.encode(r["inputs"]) + [1] for r in rows]
    # Batches of 3: each mixes adapters, and the last one is padded with base rows.
    mixed = serving.decode_rows(bank, tokens, [r.get("adapter") for r in rows], batch_size=3,
                                max_decode_length=8)
    loaded = {n: peft_formats.load_peft(d, TINY) for n, d in dirs.items()}
    width = max(map(len, tokens))  # One shape for every row alone: fewer compilations.
    for row, ids, got in zip(rows, tokens, mixed):
        own = alone(base, loaded.get(row.get("adapter")), np.asarray([ids + [0] * (
            width - len(ids))]))[0]
        np.testing.assert_array_equal(got, own, err_msg=str(row))

    out = root / "predictions.jsonl"
    assert cli.main(_flags(root, dirs) + [f"--input={root / 'rows.jsonl'}",
                                          f"--output={out}"]) == 0
    predicted = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p.get("adapter") for p in predicted] == FILE_ROWS
    assert [p["prediction"] for p in predicted] == [
        evaluation.decode_tokens(vocab, t)[0].strip() for t in mixed]


def _one_line_error(capsys, argv, *fragments):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ift-jax predict: error: "), err
    for fragment in fragments:
        assert fragment in err, err


def test_predict_refuses_bad_adapters_and_rows_in_one_line(served, base, tmp_path, capsys):
    root, dirs = served
    flags = _flags(root, dirs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"inputs": "a", "adapter": "lora_qv"}\n\n{"inputs": "b", "adapter": '
                   '"lora_kv"}\n')
    _one_line_error(capsys, flags + [f"--input={bad}"], f"{bad}:3: unknown adapter 'lora_kv'; "
                    "known: lora_qv, rslora_all, prompt_3, prompt_5")
    rows = f"--input={root / 'rows.jsonl'}"
    # An adapter of another base: a wider model's LoRA.
    wide = t5.get_config("tiny", d_model=96, dropout_rate=0.0)
    method = ADAPTERS["lora_qv"]
    model, _ = peft.build_models(wide, method)
    enc = np.ones((1, 4), np.int32)
    other = peft.init_adapters(model, nn.unbox(t5.Transformer(wide).init(
        jax.random.key(1), enc, enc)["params"]), jax.random.key(2))
    peft_formats.save_peft(str(tmp_path / "wide"), wide, other, method, "wide")
    _one_line_error(capsys, flags + [f"--adapter=wide={tmp_path / 'wide'}", rows],
                    "--adapter=wide=", "tensor base_model.model.", "SelfAttention.q.lora_A."
                    "weight has shape (4, 96); this base model needs (4, 64)")
    # A method that changes the base's layers cannot share a batch.
    ia3 = peft.MethodConfig("ia3", ia3=peft.IA3Config())
    peft_formats.save_peft(str(tmp_path / "ia3"), TINY, adapter(base, ia3, 7).params, ia3,
                           "base")
    _one_line_error(capsys, flags + [f"--adapter=ia3={tmp_path / 'ia3'}", rows],
                    "adapter 'ia3' cannot be served in a mixed batch: its method 'ia3' "
                    "changes the layers")
    _one_line_error(capsys, flags + ["--adapter=lora_qv=x", rows], "'lora_qv' is given twice")
    _one_line_error(capsys, ["predict", f"--workdir={tmp_path}", "--adapter=a=b", rows],
                    "--adapter goes with --init_from")
