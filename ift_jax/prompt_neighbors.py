"""What a trained soft prompt "means": its positions' nearest vocabulary tokens.

Lester et al. (2021, section 7) read a trained prompt by the tokens whose
embeddings lie nearest each prompt position. `inspect(workdir, step, k,
metric)` does that for a prompt-tuning run's checkpoint (`peft.prompt_neighbors`
on its `prompt/embedding` and `token_embedder/embedding`), decoding each id
with the run's vocabulary; `write(...)` also writes
`WORKDIR/report/prompt_neighbors.{md,json}` (`ift-jax inspect-prompt`, and
`ift-jax report` for prompt runs).

Token strings: SentencePiece pieces as the model sees them (`▁the`), bytes of
the byte vocabulary as characters (`' '` for a space, escapes for control bytes
and the bytes of multi-byte characters),
`<pad>`, `</s>`, `<unk>`, and `<extra_id_N>` / `<id N>` beyond the pieces.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np
import seqio
from flax import traverse_util

from ift_jax import fileio, model_setup, peft, runs
from ift_jax.data import vocabularies

JSON_FILE = "prompt_neighbors.json"
MARKDOWN_FILE = "prompt_neighbors.md"
_SPECIAL = {0: "<pad>", 1: "</s>", 2: "<unk>"}


def token_text(vocab: seqio.Vocabulary, token_id: int) -> str:
    """A readable form of one token id (see module doc)."""
    if token_id in _SPECIAL:
        return _SPECIAL[token_id]
    if isinstance(vocab, seqio.ByteVocabulary):
        if 3 <= token_id < 259:
            if token_id - 3 >= 128:  # A byte of a multi-byte UTF-8 character.
                return f"\\x{token_id - 3:02x}"
            char = chr(token_id - 3)
            return "' '" if char == " " else char if char.isprintable() else repr(char)[1:-1]
        return f"<id {token_id}>"
    pieces = vocab.tokenizer.get_piece_size()
    if token_id < pieces:
        return vocab.tokenizer.id_to_piece(token_id)
    if token_id < pieces + vocab.extra_ids:  # T5: extra_id_0 is the last id.
        return f"<extra_id_{pieces + vocab.extra_ids - 1 - token_id}>"
    return f"<id {token_id}>"


def neighbors(params: Any, vocab: seqio.Vocabulary, k: int = 5, metric: str = "cosine"
              ) -> list[list[dict]]:
    """Per prompt position, its `k` nearest tokens `{"id", "token", "distance"}`, nearest
    first, from a prompt run's full params."""
    flat = traverse_util.flatten_dict(params)
    if peft.PROMPT_PATH not in flat:
        raise peft.PeftError("these params have no soft prompt (prompt/embedding); "
                             "inspect-prompt reads prompt-tuning runs (peft.method=prompt)")
    ids, dists = peft.prompt_neighbors(np.asarray(flat[peft.PROMPT_PATH]),
                                       np.asarray(flat[("token_embedder", "embedding")]),
                                       k, metric)
    return [[{"id": int(i), "token": token_text(vocab, int(i)), "distance": float(d)}
             for i, d in zip(row_ids, row_dists)] for row_ids, row_dists in zip(ids, dists)]


def inspect(workdir: str, step: Optional[int] = None, k: int = 5, metric: str = "cosine"
            ) -> dict:
    """The neighbors of a prompt run's checkpoint `step` (default: the latest; 0 = its
    initial prompt) as `{"workdir", "step", "metric", "k", "positions": [...]}`.

    Raises:
      PeftError: the run has no soft prompt, or a bad `k` / `metric`.
      MissingError / CheckpointError: no such run or checkpoint.
    """
    if metric not in peft.PROMPT_METRICS:
        raise peft.PeftError(f"--metric={metric}; choose one of {', '.join(peft.PROMPT_METRICS)}")
    config = runs.read_config(workdir)
    if config.peft.method != "prompt":
        raise peft.PeftError(f"{workdir} is a peft.method={config.peft.method!r} run; "
                             f"inspect-prompt reads prompt-tuning runs (peft.method=prompt)")
    vocab = vocabularies.make_vocabulary(model_setup.vocabulary_spec(config))
    run = runs.Run.open(workdir)
    try:
        params, step = run.params(step)
        host = runs.host_params(params)
    finally:
        run.close()
    positions = neighbors(host, vocab, k, metric)
    return {"workdir": workdir, "step": step, "metric": metric, "k": k,
            "vocabulary": model_setup.vocabulary_spec(config), "positions": positions}


def markdown(result: dict) -> str:
    """A table: one row per prompt position, one column per rank, `token (distance)`."""
    def cell(n: dict) -> str:
        token = n["token"].replace("|", "\\|").replace("`", "'")
        return f"`{token}` ({n['distance']:.3f})"
    header = ["position"] + [f"rank {r + 1}" for r in range(result["k"])]
    distance = "1 - cosine" if result["metric"] == "cosine" else "Euclidean"
    lines = [f"Nearest vocabulary tokens of each soft-prompt position, step {result['step']}"
             f" (distance: {distance}).",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [f"| {p} | " + " | ".join(cell(n) for n in row) + " |"
              for p, row in enumerate(result["positions"])]
    return "\n".join(lines) + "\n"


def write(workdir: str, step: Optional[int] = None, k: int = 5, metric: str = "cosine"
          ) -> dict:
    """`inspect`, written to `WORKDIR/report/prompt_neighbors.{md,json}`; returns it."""
    result = inspect(workdir, step, k, metric)
    out_dir = os.path.join(workdir, "report")
    fileio.makedirs(out_dir)
    with fileio.open(os.path.join(out_dir, JSON_FILE), "w") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    with fileio.open(os.path.join(out_dir, MARKDOWN_FILE), "w") as f:
        f.write(markdown(result))
    return result

