"""Vocabularies for tasks: SentencePiece from a path, bytes, and training a SentencePiece model.

Tasks are registered once at import time, but the vocabulary is a property of
the *run* (FLAN-T5's `spiece.model` for real checkpoints, bytes for the
self-contained default). So every task's features use `TASK_VOCABULARY`, a
`DeferredVocabulary` that resolves on first use to:

1. whatever `set_vocabulary(spec)` chose (the trainer calls it from its config),
2. else the `IFT_JAX_VOCAB` environment variable,
3. else `byte` (seqio's `ByteVocabulary`: ids 0 pad, 1 eos, 2 unk, bytes + 3).

A spec is `"byte"` or a path to a SentencePiece `.model` file.
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterable, Optional

import seqio

from ift_jax import errors
from ift_jax.data import sentencepiece_file

ENV_VAR = "IFT_JAX_VOCAB"
DEFAULT_SPEC = "byte"


def make_vocabulary(spec: str, extra_ids: int = 0) -> seqio.Vocabulary:
    """`"byte"` -> ByteVocabulary; a path -> SentencePieceVocabulary (T5 ids), the file
    checked first (seqio opens it lazily: a damaged one would fail at the first use).

    Raises:
      MissingError, DataError: no such file, or not a SentencePiece model.
    """
    if spec == "byte":
        return seqio.ByteVocabulary(extra_ids=extra_ids)
    sentencepiece_file.check(spec)
    return seqio.SentencePieceVocabulary(spec, extra_ids=extra_ids)


class DeferredVocabulary(seqio.Vocabulary):
    """A vocabulary chosen at run time rather than at task registration."""

    def __init__(self):
        self._spec: Optional[str] = None
        self._vocab: Optional[seqio.Vocabulary] = None
        super().__init__(extra_ids=0)

    def set(self, spec: str) -> None:
        vocab = make_vocabulary(spec)
        self._spec, self._vocab = spec, vocab

    @property
    def spec(self) -> str:
        self._resolve()
        return self._spec

    def _resolve(self) -> seqio.Vocabulary:
        if self._vocab is None:
            self.set(os.environ.get(ENV_VAR) or DEFAULT_SPEC)
        return self._vocab

    # Everything below delegates to the resolved vocabulary.
    @property
    def eos_id(self):
        return self._resolve().eos_id

    @property
    def unk_id(self):
        return self._resolve().unk_id

    @property
    def pad_id(self):
        return self._resolve().pad_id

    @property
    def bos_id(self):
        return self._resolve().bos_id

    @property
    def extra_ids(self):
        return self._resolve().extra_ids

    @property
    def vocab_size(self):
        return self._resolve().vocab_size

    @property
    def _base_vocab_size(self):
        return self._resolve()._base_vocab_size

    def _encode(self, s):
        return self._resolve()._encode(s)

    def _decode(self, ids):
        return self._resolve()._decode(ids)

    def _encode_tf(self, s):
        return self._resolve()._encode_tf(s)

    def _decode_tf(self, ids):
        return self._resolve()._decode_tf(ids)

    def encode(self, s):
        return self._resolve().encode(s)

    def decode(self, ids):
        return self._resolve().decode(ids)

    def encode_tf(self, s):
        return self._resolve().encode_tf(s)

    def decode_tf(self, ids):
        return self._resolve().decode_tf(ids)

    def __eq__(self, other):
        return self is other

    def __hash__(self):
        return id(self)

    def __repr__(self):
        return f"DeferredVocabulary({self._spec or 'unresolved'})"


TASK_VOCABULARY = DeferredVocabulary()


def set_vocabulary(spec: str) -> None:
    """Chooses the vocabulary all registered tasks tokenize with."""
    TASK_VOCABULARY.set(spec)


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int, *,
                        character_coverage: float = 1.0, model_type: str = "unigram",
                        max_sentences: int = 1_000_000) -> str:
    """Trains a SentencePiece model with T5's special ids; returns the `.model` path.

    T5 conventions: pad=0, eos=1, unk=2, no bos, so the result drops into a
    T5 config (and `make_vocabulary`) unchanged.
    """
    import sentencepiece as spm

    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False,
                                     encoding="utf-8") as f:
        count = 0
        for text in texts:
            for line in text.splitlines():
                if line.strip():
                    f.write(line.strip() + "\n")
                    count += 1
        corpus = f.name
    if count == 0:
        raise errors.DataError("no text to train a SentencePiece model on")
    try:
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=model_prefix, vocab_size=vocab_size,
            character_coverage=character_coverage, model_type=model_type,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, hard_vocab_limit=False, minloglevel=2)
    finally:
        os.remove(corpus)
    return model_prefix + ".model"
