"""A SentencePiece `.model` file, checked before anything tokenizes with it.

seqio opens a SentencePiece model lazily, so a damaged `spiece.model` (or any
file handed over as one: `--vocab=config.json`) used to fail at the first
tokenization with a protobuf traceback, or not at all: a model of another
vocabulary gives token ids past the model's embedding, which a gather clamps
into garbage. `check(path)` parses the file and returns its piece count;
`check_fits(path, vocab_size)` also refuses more pieces than the model has
embedding rows.

Needs only `sentencepiece` (no TensorFlow), so the CLI, `runs` and `convert`
can call it.
"""

from __future__ import annotations

import functools
import os

from ift_jax import errors, fileio


@functools.lru_cache(maxsize=16)
def _pieces(path: str, size: int, mtime: float) -> int:
    del size, mtime  # In the cache key only: a file replaced on disk is read again.
    import sentencepiece
    with fileio.open(path, "rb") as f:
        data = f.read()
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except (RuntimeError, OSError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise errors.DataError(
            f"vocabulary {path} is not a SentencePiece model ({len(data):,} bytes that do "
            f"not parse: {reason}); give the model's own spiece.model (FLAN-T5: "
            f"cc_all.32000.100extra/sentencepiece.model) or 'byte'") from None
    return processor.GetPieceSize()


def check(path: str) -> int:
    """The number of pieces of the SentencePiece model at `path`.

    Raises:
      MissingError: no such file.
      DataError: the file is not a SentencePiece model.
    """
    if not fileio.exists(path) or fileio.isdir(path):
        raise errors.MissingError(
            f"vocabulary {path!r}: no such SentencePiece model file; use 'byte' or the path "
            f"of a .model file (e.g. FLAN-T5's spiece.model)")
    if fileio.is_remote(path):
        return _pieces(path, -1, -1.0)
    stat = os.stat(path)
    return _pieces(path, stat.st_size, stat.st_mtime)


BYTE_IDS = 259  # seqio's ByteVocabulary: pad, EOS, unk and the 256 bytes.


def check_fits(spec: str, vocab_size: int) -> int:
    """The ids vocabulary `spec` (`"byte"` or a SentencePiece file, `check`ed) uses,
    which must fit the model's `vocab_size` embedding rows.

    Raises:
      ConfigError: the vocabulary has more ids than the model has rows.
    """
    ids = BYTE_IDS if spec == "byte" else check(spec)
    if ids > vocab_size:
        raise errors.ConfigError(
            f"vocabulary {spec} has {ids:,} ids, more than the model's vocab_size "
            f"{vocab_size:,}: ids past {vocab_size - 1} have no embedding; use the model's own "
            f"vocabulary (its spiece.model), or a model with more rows")
    return ids
