"""Evaluation of generated text: predictions and metrics per task, written as DESIGN.md says.

For each task: run `predict_fn` on the task's inputs, decode, postprocess both
sides with the task's own `postprocess_fn`, apply its `metric_fns`, and write

- `predictions/step_<N>/<task>.jsonl`: one row per example,
  `{"inputs": str, "references": [str, ...], "prediction": str}` — exactly the
  strings the metrics were computed on, so anyone can recompute the scores;
- `eval/step_<N>.json`: `{"step": N, "tasks": {task: {metric: value, ...}}}`.

How predictions are made (greedy, beam, a LoRA or prompt-tuned model) is the
caller's `predict_fn`, so this module needs no model code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import seqio

PredictFn = Callable[[np.ndarray], np.ndarray]  # [batch, inputs_length] -> [batch, length]


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Which split of which tasks, at what lengths, how many examples."""

    tasks: tuple[str, ...]
    split: str = "validation"
    inputs_length: int = 512
    batch_size: int = 32
    max_examples: Optional[int] = None


def _examples(task: seqio.Task, spec: EvalSpec) -> list[dict]:
    dataset = task.get_dataset({"inputs": spec.inputs_length, "targets": 1 << 16},
                               split=spec.split, shuffle=False)
    limit = -1 if spec.max_examples is None else spec.max_examples
    examples = list(dataset.take(limit).as_numpy_iterator())
    if not examples:
        raise ValueError(f"task {task.name!r}: split {spec.split!r} has no examples to "
                         f"evaluate")
    return examples


def _batches(examples: list[dict], spec: EvalSpec) -> Iterator[np.ndarray]:
    """`[batch_size, inputs_length]` padded inputs; the last batch padded with empty rows."""
    for start in range(0, len(examples), spec.batch_size):
        chunk = examples[start:start + spec.batch_size]
        batch = np.zeros((spec.batch_size, spec.inputs_length), np.int32)
        for row, example in enumerate(chunk):
            tokens = example["inputs"][:spec.inputs_length]
            batch[row, :len(tokens)] = tokens
        yield batch


def decode_tokens(vocabulary: seqio.Vocabulary, ids: Sequence[int]) -> tuple[str, bool]:
    """Text up to the first EOS; (text, whether invalid UTF-8 had to be replaced)."""
    ids = [int(i) for i in ids]
    if vocabulary.eos_id in ids:
        ids = ids[:ids.index(vocabulary.eos_id)]
    ids = [i for i in ids if i != vocabulary.pad_id]
    if isinstance(vocabulary, seqio.ByteVocabulary) or (
            getattr(vocabulary, "spec", None) == "byte"):
        raw = bytes(i - 3 for i in ids if 3 <= i < 259)
        text = raw.decode("utf-8", errors="replace")
        return text, "\ufffd" in text and "\ufffd".encode() not in raw
    return vocabulary.decode(ids), False


def evaluate_task(task: seqio.Task, predict_fn: PredictFn, spec: EvalSpec
                  ) -> tuple[dict[str, float], list[dict], int]:
    """(metrics, prediction rows, number of predictions with invalid UTF-8)."""
    vocabulary = task.output_features["targets"].vocabulary
    examples = _examples(task, spec)
    outputs: list[np.ndarray] = []
    for batch in _batches(examples, spec):
        outputs.extend(np.asarray(predict_fn(batch)))
    rows, invalid = [], 0
    for example, output in zip(examples, outputs):
        text, bad = decode_tokens(vocabulary, output)
        invalid += bad
        prediction = task.postprocess_fn(text, example=example, is_target=False)
        references = task.postprocess_fn(example["targets_pretokenized"].decode("utf-8"),
                                          example=example, is_target=True)
        references = [references] if isinstance(references, str) else list(references)
        rows.append({"inputs": example["inputs_pretokenized"].decode("utf-8"),
                     "references": references, "prediction": prediction})
    return score(task, rows), rows, invalid


def score(task: seqio.Task, rows: Sequence[dict]) -> dict[str, float]:
    """The task's metrics over prediction rows (one reference stays a plain string)."""
    targets = [r["references"] if len(r["references"]) > 1 else r["references"][0]
               for r in rows]
    predictions = [r["prediction"] for r in rows]
    metrics: dict[str, float] = {}
    for metric_fn in task.metric_fns:
        metrics.update({k: float(v) for k, v in metric_fn(targets, predictions).items()})
    return metrics


def write_step(workdir: str, step: int, results: dict[str, dict[str, float]],
               rows: dict[str, list[dict]]) -> str:
    """Writes `eval/step_<N>.json` and the predictions files; returns the JSON path."""
    pred_dir = os.path.join(workdir, "predictions", f"step_{step}")
    os.makedirs(pred_dir, exist_ok=True)
    for task, task_rows in rows.items():
        with open(os.path.join(pred_dir, f"{task}.jsonl"), "w", encoding="utf-8") as f:
            for row in task_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    path = os.path.join(workdir, "eval", f"step_{step}.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"step": step, "tasks": results}, f, indent=2, sort_keys=True)
    os.replace(tmp, path)  # The JSON appears last: its presence means "step done".
    return path


def evaluate(workdir: str, step: int, predict_fn: PredictFn, spec: EvalSpec
             ) -> dict[str, dict[str, float]]:
    """Evaluates every task of `spec` at `step` and writes the results."""
    results, rows = {}, {}
    for name in spec.tasks:
        task = seqio.get_mixture_or_task(name)
        results[name], rows[name], invalid = evaluate_task(task, predict_fn, spec)
        if invalid:
            results[name]["invalid_utf8_predictions"] = float(invalid)
            logging.warning("%s: %d predictions were not valid UTF-8 (replaced)", name,
                            invalid)
    write_step(workdir, step, results, rows)
    return results


def finished_steps(workdir: str) -> list[int]:
    """Steps whose `eval/step_<N>.json` exists (evaluation finished)."""
    directory = os.path.join(workdir, "eval")
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in os.listdir(directory):
        if name.startswith("step_") and name.endswith(".json"):
            steps.append(int(name[len("step_"):-len(".json")]))
    return sorted(steps)


def recompute(workdir: str, step: int, task_name: str) -> dict[str, float]:
    """Scores of one task recomputed from its predictions file alone."""
    task = seqio.get_mixture_or_task(task_name)
    path = os.path.join(workdir, "predictions", f"step_{step}", f"{task_name}.jsonl")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return score(task, rows)


# ----------------------------------------------------------------------------
# Runs: evaluation during training and `ift-jax eval` over saved checkpoints.


def spec_from_config(config) -> EvalSpec:
    """`EvalSpec` from a run config (`config.eval`, `config.data`)."""
    names = [t for t in config.eval.tasks.split(",") if t]
    if not names:
        from ift_jax.data.inspection import tasks_of
        names = [t.name for t in tasks_of(config.data.mixture)]
    return EvalSpec(tuple(names), config.eval.split, config.data.inputs_length,
                    config.eval.batch_size, config.eval.max_examples or None)


def greedy_predict_fn(model, params, max_decode_length: int) -> PredictFn:
    """`predict_fn` decoding greedily with `model` (build it once: jit caches on it)."""
    from ift_jax import decoding

    def predict(batch: np.ndarray) -> np.ndarray:
        tokens, _ = decoding.greedy(model, params, batch, max_decode_length=max_decode_length)
        return np.asarray(tokens)
    return predict


def evaluate_checkpoints(workdir: str, which: str = "all") -> list[int]:
    """Evaluates the run's checkpoints not evaluated yet; returns the steps done now.

    Args:
      which: `all`, `latest`, or a step number.
    """
    from ift_jax import checkpointing, export, model_setup
    config = export.read_config(workdir)
    model_setup.prepare_data(config)
    ckpt = checkpointing.Checkpointer(workdir, read_only=True)
    steps = ckpt.all_steps()
    ckpt.close()
    if which == "latest":
        steps = steps[-1:]
    elif which != "all":
        if int(which) not in steps:
            raise ValueError(f"{workdir} has no checkpoint {which}; steps: {steps}")
        steps = [int(which)]
    done = set(finished_steps(workdir))
    spec = spec_from_config(config)
    evaluated = []
    for step in steps:
        if step in done:
            logging.info("step %d already evaluated; skipped", step)
            continue
        try:
            setup, params, _ = export.load_run(workdir, step)
        except Exception as e:  # A half-written checkpoint must not stop the others.
            logging.warning("checkpoint %d of %s cannot be read (%s); skipped", step,
                            workdir, str(e).splitlines()[0])
            continue
        predict = greedy_predict_fn(setup.eval_model, params, config.eval.max_decode_length)
        evaluate(workdir, step, predict, spec)
        evaluated.append(step)
    return evaluated

