"""Vocabularies: bytes by default, SentencePiece from a path, and training one on a task."""

import numpy as np
import pytest
import seqio

import ift_jax.tasks  # noqa: F401
from ift_jax import errors
from ift_jax.data import vocabularies


@pytest.fixture
def restore_vocabulary():
    yield
    vocabularies.TASK_VOCABULARY.set("byte")


def test_default_vocabulary_is_bytes_with_t5_special_ids():
    vocab = vocabularies.TASK_VOCABULARY
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    assert vocab.encode("hi") == [ord("h") + 3, ord("i") + 3]
    assert vocab.decode(vocab.encode("héllo")) == "héllo"


def test_trained_sentencepiece_drives_every_task(tmp_path, restore_vocabulary):
    texts = seqio.get_mixture_or_task("synthetic_support_summary").source.rendered("train")
    path = vocabularies.train_sentencepiece(texts["inputs"] + texts["targets"],
                                            str(tmp_path / "spm"), vocab_size=300)
    vocabularies.set_vocabulary(path)
    vocab = vocabularies.TASK_VOCABULARY
    # A small corpus may yield fewer pieces than asked (hard_vocab_limit=False).
    assert 50 < vocab.vocab_size <= 300
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    example = next(seqio.get_mixture_or_task("synthetic_support_summary").get_dataset(
        {"inputs": 256, "targets": 64}, split="validation", shuffle=False).as_numpy_iterator())
    assert example["inputs"].max() < vocab.vocab_size
    # Fewer pieces than bytes, and decoding gives the text back.
    assert len(example["inputs"]) < 0.6 * len(example["inputs_pretokenized"])
    assert vocab.decode(example["targets"][:-1].tolist()) == example[
        "targets_pretokenized"].decode()


def test_missing_sentencepiece_file_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="use 'byte' or the path of a .model file"):
        vocabularies.make_vocabulary(str(tmp_path / "spiece.model"))


def test_a_file_that_is_no_sentencepiece_model_is_refused_before_use(tmp_path):
    damaged = tmp_path / "spiece.model"
    damaged.write_bytes(b"\x00" * 64)
    with pytest.raises(errors.DataError, match=f"vocabulary {damaged} is not a SentencePiece "
                                               f"model \\(64 bytes"):
        vocabularies.make_vocabulary(str(damaged))


def test_nothing_to_train_on_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no text"):
        vocabularies.train_sentencepiece(["", "  "], str(tmp_path / "m"), 100)


def test_byte_vocabulary_round_trips_numpy_ids():
    vocab = vocabularies.make_vocabulary("byte")
    ids = np.asarray(vocab.encode("T5"))
    assert vocab.decode(ids.tolist()) == "T5"


def test_a_vocabulary_bigger_than_the_model_is_refused_leaving_no_checkpoints(tmp_path,
                                                                              capsys):
    from ift_jax import cli
    workdir = tmp_path / "run"
    assert cli.main(["train", f"--workdir={workdir}", "--config.model.vocab_size=200",
                     "--config.train.steps=2", "--config.optimizer.warmup_steps=0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "ift-jax train: error: vocabulary byte has 259 ids, more than the model's vocab_size "
        "200: ids past 199 have no embedding; use the model's own vocabulary (its "
        "spiece.model), or a model with more rows"]
    assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()
