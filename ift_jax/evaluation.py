"""Evaluation: predictions and metrics per task, written as docs/design.md says.

For each task: run `predict_fn` on the task's inputs, decode, postprocess both
sides with the task's own `postprocess_fn`, apply its `metric_fns` (or the
metrics named in `EvalSpec.metrics`), and, given a `score_fn` (teacher-forced
log-likelihood):

- `loss` / `token_accuracy`: validation loss (mean negative log-likelihood per
  target token, no z-loss) and argmax accuracy over the targets;
- `rank_accuracy` for examples with answer choices: each choice is scored by
  its summed log-likelihood and the best one is the prediction (t5x's rank
  classification, FLAN's way of scoring options).

Files written per evaluation point (`step_<N>`, or `incontext_<k>shot` for
the untuned model with k exemplars):

- `predictions/<point>/<task>.jsonl`: one row per example,
  `{"inputs": str, "references": [str, ...], "prediction": str}` — exactly the
  strings the metrics were computed on — plus, when measured, `choices` and
  `choice_prediction`, and the row's `target_log_likelihood`, `target_correct`
  and `target_tokens`; `generation` (the decoded text, when the task's
  postprocessing extracted the prediction from it, e.g. BBH's chain of
  thought) and `group` (rows a metric scores together, e.g. MultiRC's
  questions); every score is recomputable from these rows alone;
- `eval/<point>.json`: `{"step": N, "tasks": {task: {metric: value, ...}}}`
  (+ `guard_tasks`, and `shots` for in-context points). It is written last:
  its presence means the point is done.

How predictions are made (greedy, beam, a LoRA or prompt-tuned model, on one
device or a pod) is the caller's `Predictor` (`ift_jax.inference.Inference`
runs a model on a mesh), so this module needs no model. A plain per-batch
`predict_fn` (and `score_fn`) also works: `FunctionPredictor` batches for it.

Beyond the tasks' metrics, every evaluation point records two of HELM's
columns where the rows allow: `calibration_ece` (expected calibration error
of the rank-classification probabilities, softmax over the choices'
log-likelihoods) per task, and `robustness` (a multi-template task's primary
metric per template, with the spread across templates, as FLAN and T0
report). Files are written by process 0 only (`write_files`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from typing import Callable, Iterator, Optional, Protocol, Sequence

import numpy as np
import seqio

from ift_jax import errors
from ift_jax import fileio
from ift_jax import metrics as metrics_lib
from ift_jax.data import cache
from ift_jax.data import instructions

PredictFn = Callable[[np.ndarray], np.ndarray]  # [batch, inputs_length] -> [batch, length]
# ([batch, inputs_length], [batch, targets_length]) -> per row
# (log-likelihood, correct tokens, target tokens).
ScoreFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]

# Row keys of teacher-forced scoring.
_SCORED = ("target_log_likelihood", "target_correct", "target_tokens")

# The metric robustness is reported on: the first of these a task has.
_ROBUSTNESS_METRICS = ("rank_accuracy", "accuracy", "exact_match", "span_f1", "rougeL", "bleu")


class Predictor(Protocol):
    """What evaluation needs of a model: generate, score targets, score choices.

    Rows are token id lists (inputs as the task tokenized them, targets
    EOS-terminated), unpadded; results come back one per row, in order.
    """

    def generate(self, inputs: Sequence[Sequence[int]], max_decode_length: int
                 ) -> list[np.ndarray]: ...

    def score(self, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
              ) -> Optional[np.ndarray]:
        """`[rows, 3]` (log-likelihood, argmax hits, tokens), or None: not scored."""

    def score_choices(self, inputs: Sequence[Sequence[int]],
                      choices: Sequence[Sequence[Sequence[int]]]
                      ) -> Optional[list[np.ndarray]]:
        """Per input, the log-likelihood of each choice, or None: not scored."""


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Which split of which tasks, at what lengths, how many examples, which metrics.

    `metrics` names metrics of `ift_jax.metrics.METRICS` to use instead of each
    task's own; `guard_tasks` are the tasks among `tasks` held out of training
    (forgetting is measured on them); `suite` names the benchmark suite the
    tasks belong to (its aggregates go into the eval JSON's `suites`).
    """

    tasks: tuple[str, ...]
    split: str = "validation"
    inputs_length: int = 512
    batch_size: int = 32  # Rows per batch of a `FunctionPredictor`.
    max_examples: Optional[int] = None
    targets_length: int = 128
    metrics: tuple[str, ...] = ()
    guard_tasks: tuple[str, ...] = ()
    max_decode_length: int = 128
    suite: str = ""  # The benchmark suite these tasks make up, if any.
    # k-shot tasks drop exemplars from the end until the input fits inputs_length
    # (MMLU's protocol), instead of cutting the prompt's end (its question).
    fit_exemplars: bool = False

    def __post_init__(self):
        for name in self.metrics:
            metrics_lib.get(name)  # Unknown names fail here, listing the available ones.


def _examples(task: seqio.Task, spec: EvalSpec) -> list[dict]:
    dataset = task.get_dataset({"inputs": spec.inputs_length, "targets": 1 << 16},
                               split=spec.split, shuffle=False,
                               use_cached=cache.use_cached(task))
    limit = -1 if spec.max_examples is None else spec.max_examples
    examples = list(dataset.take(limit).as_numpy_iterator())
    if not examples:
        raise errors.DataError(f"task {task.name!r}: split {spec.split!r} has no examples to "
                                     f"evaluate")
    return examples


def _padded(rows: Sequence[Sequence[int]], batch_size: int, length: int
            ) -> Iterator[np.ndarray]:
    """`[batch_size, length]` int32 batches of `rows` (cut to `length`), padded with 0."""
    for start in range(0, len(rows), batch_size):
        batch = np.zeros((batch_size, length), np.int32)
        for row, tokens in enumerate(rows[start:start + batch_size]):
            tokens = list(tokens)[:length]
            batch[row, :len(tokens)] = tokens
        yield batch


def _with_eos(tokens: Sequence[int], length: int, eos_id: int) -> list[int]:
    """Targets cut to `length` still end in EOS (seqio's `append_eos_after_trim`)."""
    tokens = [int(t) for t in tokens if t != eos_id]
    return tokens[:length - 1] + [eos_id]


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


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class FunctionPredictor:
    """A `Predictor` over per-batch functions: `predict_fn([batch, inputs_length])
    -> tokens` and, optionally, `score_fn(inputs, targets) -> (ll, correct, tokens)`
    per row (choices are scored as one (input, choice) pair each)."""

    def __init__(self, predict_fn: PredictFn, score_fn: Optional[ScoreFn], spec: EvalSpec):
        self.predict_fn, self.score_fn, self.spec = predict_fn, score_fn, spec

    def generate(self, inputs, max_decode_length):
        outputs: list[np.ndarray] = []
        for batch in _padded(inputs, self.spec.batch_size, self.spec.inputs_length):
            outputs.extend(np.asarray(self.predict_fn(batch)))
        return outputs[:len(inputs)]

    def score(self, inputs, targets):
        if self.score_fn is None:
            return None
        out = []
        batches = zip(_padded(inputs, self.spec.batch_size, self.spec.inputs_length),
                      _padded(targets, self.spec.batch_size, self.spec.targets_length))
        for enc, dec in batches:
            out.append(np.stack([np.asarray(x, np.float64) for x in self.score_fn(enc, dec)],
                                axis=1))
        return np.concatenate(out)[:len(inputs)]

    def score_choices(self, inputs, choices):
        if self.score_fn is None:
            return None
        pairs = [(i, c) for i, cs in enumerate(choices) for c in cs]
        scored = self.score([inputs[i] for i, _ in pairs], [c for _, c in pairs])
        out = [np.zeros((len(cs),)) for cs in choices]
        position = [0] * len(choices)
        for (i, _), (ll, _, _) in zip(pairs, scored):
            out[i][position[i]] = ll
            position[i] += 1
        return out


def _as_predictor(predictor, spec: EvalSpec, score_fn: Optional[ScoreFn]) -> Predictor:
    if hasattr(predictor, "generate"):
        return predictor
    return FunctionPredictor(predictor, score_fn, spec)


def _rank_choices(rows: list[dict], examples: list[dict], predictor: Predictor,
                  vocabulary: seqio.Vocabulary, spec: EvalSpec) -> None:
    """Adds `choices`, `choice_log_likelihoods` and `choice_prediction` (the
    likeliest; ties keep the first) to rows whose examples have answer choices."""
    indices, inputs, choices = [], [], []
    for index, example in enumerate(examples):
        texts = json.loads(_text(example.get("choices", b"[]")))
        if texts:
            indices.append(index)
            inputs.append(example["inputs"])
            choices.append([_with_eos(vocabulary.encode(c), spec.targets_length,
                                      vocabulary.eos_id) for c in texts])
            rows[index]["choices"] = texts
    if not indices:
        return
    scores = predictor.score_choices(inputs, choices)
    if scores is None:
        for index in indices:
            del rows[index]["choices"]
        return
    for index, lls in zip(indices, scores):
        lls = [float(x) for x in lls]
        rows[index]["choice_log_likelihoods"] = lls
        rows[index]["choice_prediction"] = rows[index]["choices"][int(np.argmax(lls))]


def evaluate_task(task: seqio.Task, predictor, spec: EvalSpec,
                  score_fn: Optional[ScoreFn] = None) -> tuple[dict[str, float], list[dict]]:
    """(metrics, prediction rows) of one task; see the module docstring.

    Args:
      predictor: a `Predictor`, or a per-batch `predict_fn` (with `score_fn`).
    """
    predictor = _as_predictor(predictor, spec, score_fn)
    vocabulary = task.output_features["targets"].vocabulary
    examples = _examples(task, spec)
    outputs = predictor.generate([e["inputs"] for e in examples], spec.max_decode_length)
    rows = []
    for example, output in zip(examples, outputs):
        text, bad = decode_tokens(vocabulary, output)
        prediction = task.postprocess_fn(text, example=example, is_target=False)
        references = task.postprocess_fn(_text(example["targets_pretokenized"]),
                                          example=example, is_target=True)
        references = [references] if isinstance(references, str) else list(references)
        row = {"inputs": _text(example["inputs_pretokenized"]), "references": references,
               "prediction": prediction}
        if prediction != text.strip():  # An extracted answer (BBH CoT): keep what was said.
            row["generation"] = text
        if _text(example.get("group", b"")):  # Scored together (MultiRC's questions).
            row["group"] = _text(example["group"])
        if bad:
            row["invalid_utf8"] = True
        if int(_text(example.get("shots", b"0"))):
            row["shots"] = int(_text(example["shots"]))
        if _text(example.get("template", b"")):
            row["template"] = _text(example["template"])
        rows.append(row)
    targets = [_with_eos(e["targets"], spec.targets_length, vocabulary.eos_id)
               for e in examples]
    scored = predictor.score([e["inputs"] for e in examples], targets)
    if scored is not None:
        for row, values in zip(rows, scored.tolist()):
            row.update(zip(_SCORED, values))
    _rank_choices(rows, examples, predictor, vocabulary, spec)
    return score(task, rows, spec.metrics), rows


def score(task: seqio.Task, rows: Sequence[dict], metric_names: Sequence[str] = ()
          ) -> dict[str, float]:
    """Every metric of the rows: the task's (or the named) text metrics, and
    `rank_accuracy`, `loss`, `token_accuracy`, `invalid_utf8_predictions`
    when the rows carry what they need."""
    targets = [r["references"] if len(r["references"]) > 1 else r["references"][0]
               for r in rows]
    predictions = [r["prediction"] for r in rows]
    metric_fns = [metrics_lib.get(n) for n in metric_names] or task.metric_fns
    results: dict[str, float] = {}
    for metric_fn in metric_fns:
        extra = ({"groups": [r.get("group", "") for r in rows]}
                 if metrics_lib.takes_groups(metric_fn) else {})
        results.update({k: float(v)
                        for k, v in metric_fn(targets, predictions, **extra).items()})
    ranked = [r for r in rows if "choice_prediction" in r]
    if ranked:
        results["rank_accuracy"] = metrics_lib.accuracy(
            [r["references"] for r in ranked],
            [r["choice_prediction"] for r in ranked])["accuracy"]
        calibrated = [r for r in ranked if "choice_log_likelihoods" in r]
        if calibrated:
            results["calibration_ece"] = calibration_error(calibrated)
    if rows and all(_SCORED[0] in r for r in rows):
        tokens = max(sum(r["target_tokens"] for r in rows), 1.0)
        results["loss"] = -sum(r["target_log_likelihood"] for r in rows) / tokens
        results["token_accuracy"] = 100.0 * sum(r["target_correct"] for r in rows) / tokens
    invalid = sum(bool(r.get("invalid_utf8")) for r in rows)
    if invalid:
        results["invalid_utf8_predictions"] = float(invalid)
    return results


def _write_point(workdir: str, point: str, payload: dict, rows: dict[str, list[dict]]
                 ) -> str:
    """Writes `predictions/<point>/` and then `eval/<point>.json`; returns the JSON path."""
    pred_dir = os.path.join(workdir, "predictions", point)
    fileio.makedirs(pred_dir)
    for task, task_rows in rows.items():
        with fileio.open(os.path.join(pred_dir, f"{task}.jsonl"), "w") as f:
            for row in task_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    fileio.makedirs(os.path.join(workdir, "eval"))
    path = os.path.join(workdir, "eval", f"{point}.json")
    tmp = path + ".tmp"
    with fileio.open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    fileio.replace(tmp, path)  # The JSON appears last: its presence means "point done".
    return path


def write_step(workdir: str, step: int, results: dict[str, dict[str, float]],
               rows: dict[str, list[dict]], guard_tasks: Sequence[str] = (),
               extra: Optional[dict] = None) -> str:
    """Writes `eval/step_<N>.json` and the predictions files; returns the JSON path.

    `extra` adds sections beside `tasks` (`suites`, `robustness`)."""
    payload = {"step": step, "tasks": results, **(extra or {})}
    if guard_tasks:
        payload["guard_tasks"] = list(guard_tasks)
    return _write_point(workdir, f"step_{step}", payload, rows)


def calibration_error(rows: Sequence[dict]) -> float:
    """Expected calibration error (x 100, HELM's 10 equal-mass bins) of rank
    classification: a row's confidence is the softmax over its choices'
    log-likelihoods at the chosen choice, and it is correct when that choice is a
    reference."""
    confidences = [max(metrics_lib.choice_probabilities(r["choice_log_likelihoods"]))
                   for r in rows]
    correct = [r["choice_prediction"] in r["references"] for r in rows]
    return metrics_lib.expected_calibration_error(confidences, correct)


def robustness(task: seqio.Task, rows: Sequence[dict], metric_names: Sequence[str] = ()
               ) -> Optional[dict]:
    """A multi-template task's primary metric per instruction template, and the
    spread (max - min) and standard deviation across templates; None when the
    rows used fewer than two templates."""
    by_template: dict[str, list[dict]] = {}
    for row in rows:
        if "template" in row:
            by_template.setdefault(row["template"], []).append(row)
    if len(by_template) < 2:
        return None
    per_template = {name: score(task, group, metric_names)
                    for name, group in sorted(by_template.items())}
    available = set.intersection(*(set(m) for m in per_template.values()))
    metric = next((m for m in _ROBUSTNESS_METRICS if m in available), None)
    if metric is None:
        return None
    values = {name: m[metric] for name, m in per_template.items()}
    return {"metric": metric, "per_template": values,
            "examples": {name: len(group) for name, group in sorted(by_template.items())},
            "spread": max(values.values()) - min(values.values()),
            "std": statistics.pstdev(values.values())}


@dataclasses.dataclass
class PointResult:
    """One evaluation point: per-task metrics and rows, robustness, suite aggregates."""

    tasks: dict[str, dict[str, float]]
    rows: dict[str, list[dict]]
    robustness: dict[str, dict]
    suites: dict[str, dict[str, float]]

    def extra(self) -> dict:
        out = {}
        if self.robustness:
            out["robustness"] = self.robustness
        if self.suites:
            out["suites"] = self.suites
        return out


Aggregate = Callable[[str, dict[str, dict[str, float]]], dict[str, float]]


def _evaluate_specs(specs: Sequence[EvalSpec], predictor, score_fn: Optional[ScoreFn],
                    task_of: Callable[[str], seqio.Task], aggregate: Optional[Aggregate],
                    progress: Optional[Callable[[str], None]] = None) -> PointResult:
    result = PointResult({}, {}, {}, {})
    for spec in specs:
        model = _as_predictor(predictor, spec, score_fn)
        for name in spec.tasks:
            if progress:
                progress(name)
            task = _fitted(name, spec.inputs_length) if spec.fit_exemplars else task_of(name)
            result.tasks[name], result.rows[name] = evaluate_task(task, model, spec)
            spread = robustness(task, result.rows[name], spec.metrics)
            if spread:
                result.robustness[name] = spread
        if spec.suite and aggregate:
            result.suites[spec.suite] = aggregate(
                spec.suite, {t: result.tasks[t] for t in spec.tasks})
    return result


def _fitted(name: str, inputs_length: int) -> seqio.Task:
    """Task `name`, its k exemplars (if any) dropped from the end until the input fits."""
    task = seqio.get_mixture_or_task(name)
    shots = getattr(getattr(task.source, "rendering", None), "num_shots", 0)
    return instructions.with_shots(name, shots, inputs_length) if shots else task


def _specs(spec: EvalSpec | Sequence[EvalSpec]) -> list[EvalSpec]:
    return [spec] if isinstance(spec, EvalSpec) else list(spec)


def _guards(specs: Sequence[EvalSpec]) -> list[str]:
    return [t for spec in specs for t in spec.guard_tasks]


def evaluate(workdir: str, step: int, predictor, spec: EvalSpec | Sequence[EvalSpec],
             score_fn: Optional[ScoreFn] = None, *, aggregate: Optional[Aggregate] = None,
             write_files: bool = True, progress: Optional[Callable[[str], None]] = None
             ) -> PointResult:
    """Evaluates every task of `spec` (one spec or several, e.g. the run's tasks and
    each benchmark suite) at `step` and writes the results.

    Args:
      predictor: a `Predictor`, or a per-batch `predict_fn` (with `score_fn`).
      aggregate: `(suite, per-task metrics) -> aggregates` for specs with a suite.
      write_files: False on every process but the one that writes (multi-host).
      progress: called with each task's name before it is evaluated.
    """
    specs = _specs(spec)
    result = _evaluate_specs(specs, predictor, score_fn, seqio.get_mixture_or_task,
                             aggregate, progress)
    if write_files:
        write_step(workdir, step, result.tasks, result.rows, _guards(specs), result.extra())
    return result


def evaluate_incontext(workdir: str, shots: int, predictor,
                       spec: EvalSpec | Sequence[EvalSpec],
                       score_fn: Optional[ScoreFn] = None, *, write_files: bool = True,
                       progress: Optional[Callable[[str], None]] = None) -> PointResult:
    """The tasks of `spec` with `shots` train exemplars in each input (dropped from
    the end until the input fits `spec.inputs_length`), written as
    `eval/incontext_<k>shot.json` with the mean number of exemplars used.
    Benchmark suites (specs with a `suite`) bring their own shots and are left out."""
    specs = [s for s in _specs(spec) if not s.suite]
    lengths = {name: s.inputs_length for s in specs for name in s.tasks}
    result = _evaluate_specs(
        specs, predictor, score_fn,
        lambda name: instructions.with_shots(name, shots, lengths[name]), None, progress)
    used = {name: sum(r.get("shots", 0) for r in task_rows) / len(task_rows)
            for name, task_rows in result.rows.items()}
    payload = {"step": 0, "shots": shots, "tasks": result.tasks, "shots_used": used,
               **result.extra()}
    if _guards(specs):
        payload["guard_tasks"] = _guards(specs)
    if write_files:
        _write_point(workdir, f"incontext_{shots}shot", payload, result.rows)
    return result


def finished_steps(workdir: str) -> list[int]:
    """Steps whose `eval/step_<N>.json` exists (evaluation finished)."""
    directory = os.path.join(workdir, "eval")
    if not fileio.isdir(directory):
        return []
    steps = []
    for name in fileio.listdir(directory):
        if name.startswith("step_") and name.endswith(".json"):
            steps.append(int(name[len("step_"):-len(".json")]))
    return sorted(steps)


def recompute(workdir: str, step: int, task_name: str, metric_names: Sequence[str] = ()
              ) -> dict[str, float]:
    """Scores of one task recomputed from its predictions file alone."""
    task = seqio.get_mixture_or_task(task_name)
    path = os.path.join(workdir, "predictions", f"step_{step}", f"{task_name}.jsonl")
    with fileio.open(path) as f:
        rows = [json.loads(line) for line in f]
    return score(task, rows, metric_names)


def _names(text: str) -> list[str]:
    return [t.strip() for t in str(text or "").split(",") if t.strip()]
