"""`ift-jax inspect-prompt`: a prompt initialized from known tokens has exactly those
tokens nearest it; the report of a prompt run includes the neighbors."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import seqio

from ift_jax import cli, hf, prompt_neighbors, report, train
from ift_jax.models import t5
from test_train import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed")

INIT_TEXT = "otter!"


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory):
    """A prompt-tuning run (2 steps) of a random base whose prompt starts as the
    embeddings of INIT_TEXT (the prompt init reads the base's token embeddings)."""
    base = t5.get_config("tiny", vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_layers=1,
                         num_decoder_layers=1, dropout_rate=0.0)
    rng = np.random.default_rng(0)
    abstract = nn.unbox(t5.abstract_variables(base)["params"])
    base_dir = str(tmp_path_factory.mktemp("base"))
    hf.save_t5(base_dir, base, jax.tree.map(
        lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), abstract))
    config = tiny_config(steps=2, checkpoint_every=2)
    config.init_from = base_dir
    config.peft.method = "prompt"
    config.data.pack = False  # Prompt tuning prepends to unpacked inputs.
    config.peft.prompt_length = len(INIT_TEXT)
    config.peft.prompt_init = "text"
    config.peft.prompt_init_text = INIT_TEXT
    config.optimizer.learning_rate = 0.3
    workdir = str(tmp_path_factory.mktemp("prompt_run"))
    train.train_and_evaluate(config, workdir)
    return workdir


def test_token_text_of_the_byte_vocabulary():
    vocab = seqio.ByteVocabulary()
    assert [prompt_neighbors.token_text(vocab, i) for i in (0, 1, 2, 3 + ord("a"), 3 + 32,
                                                             3 + 10, 300)] == [
        "<pad>", "</s>", "<unk>", "a", "' '", "\\n", "<id 300>"]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_initial_prompt_has_its_init_tokens_at_rank_1(prompt_run, metric, capsys):
    assert cli.main(["inspect-prompt", f"--workdir={prompt_run}", "--step=0", "--k=3",
                     f"--metric={metric}"]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(prompt_run, "report", "prompt_neighbors.json")) as f:
        result = json.load(f)
    assert result["step"] == 0 and result["metric"] == metric and result["k"] == 3
    first = [position[0] for position in result["positions"]]
    assert [n["token"] for n in first] == list(INIT_TEXT)
    assert [n["id"] for n in first] == [3 + ord(c) for c in INIT_TEXT]
    assert all(abs(n["distance"]) < 1e-5 for n in first)
    assert all(p[1]["distance"] > 1e-3 for p in result["positions"])  # The rest are farther.
    assert "| 0 | `o` (0.000)" in printed
    with open(os.path.join(prompt_run, "report", "prompt_neighbors.md")) as f:
        assert f.read() in printed


def test_trained_prompt_moves_and_the_report_shows_it(prompt_run):
    trained = prompt_neighbors.inspect(prompt_run, k=2)
    assert trained["step"] == 2
    assert any(p[0]["distance"] > 1e-4 for p in trained["positions"])  # Trained: moved.
    readme = report.write_report(prompt_run)
    with open(readme) as f:
        text = f.read()
    assert "## Soft prompt: nearest tokens" in text and "step 2" in text
    with open(os.path.join(prompt_run, "report", "prompt_neighbors.json")) as f:
        assert json.load(f)["step"] == 2


def test_bad_requests_are_one_line(prompt_run, tmp_path, capsys):
    assert cli.main(["inspect-prompt", f"--workdir={prompt_run}", "--k=100000"]) == 2
    assert "k=100000; the vocabulary has" in capsys.readouterr().err
    config = tiny_config()
    config.peft.method = "lora"
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    assert cli.main(["inspect-prompt", f"--workdir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "peft.method='lora' run; inspect-prompt reads" in err
