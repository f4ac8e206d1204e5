"""Evaluation: predictions and metrics per task, written as DESIGN.md says.

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

How predictions are made (greedy, beam, a LoRA or prompt-tuned model) is the
caller's `predict_fn` / `score_fn`, so the core of this module needs no model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import seqio

from ift_jax import fileio
from ift_jax import metrics as metrics_lib

PredictFn = Callable[[np.ndarray], np.ndarray]  # [batch, inputs_length] -> [batch, length]
# ([batch, inputs_length], [batch, targets_length]) -> per row
# (log-likelihood, correct tokens, target tokens).
ScoreFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]

# Row keys of teacher-forced scoring.
_SCORED = ("target_log_likelihood", "target_correct", "target_tokens")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Which split of which tasks, at what lengths, how many examples, which metrics.

    `metrics` names metrics of `ift_jax.metrics.METRICS` to use instead of each
    task's own; `guard_tasks` are the tasks among `tasks` held out of training
    (forgetting is measured on them).
    """

    tasks: tuple[str, ...]
    split: str = "validation"
    inputs_length: int = 512
    batch_size: int = 32
    max_examples: Optional[int] = None
    targets_length: int = 128
    metrics: tuple[str, ...] = ()
    guard_tasks: tuple[str, ...] = ()

    def __post_init__(self):
        for name in self.metrics:
            metrics_lib.get(name)  # Unknown names fail here, listing the available ones.


def _examples(task: seqio.Task, spec: EvalSpec) -> list[dict]:
    dataset = task.get_dataset({"inputs": spec.inputs_length, "targets": 1 << 16},
                               split=spec.split, shuffle=False)
    limit = -1 if spec.max_examples is None else spec.max_examples
    examples = list(dataset.take(limit).as_numpy_iterator())
    if not examples:
        raise ValueError(f"task {task.name!r}: split {spec.split!r} has no examples to "
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


def _score_rows(inputs: list, targets: list, score_fn: ScoreFn, spec: EvalSpec
                ) -> list[tuple[float, float, float]]:
    """score_fn over (inputs, targets) pairs, batched; one (ll, correct, tokens) per pair."""
    out = []
    batches = zip(_padded(inputs, spec.batch_size, spec.inputs_length),
                  _padded(targets, spec.batch_size, spec.targets_length))
    for enc, dec in batches:
        ll, correct, tokens = (np.asarray(x, np.float64) for x in score_fn(enc, dec))
        out.extend(zip(ll.tolist(), correct.tolist(), tokens.tolist()))
    return out[:len(inputs)]


def _rank_choices(rows: list[dict], examples: list[dict], score_fn: ScoreFn,
                  vocabulary: seqio.Vocabulary, spec: EvalSpec) -> None:
    """Adds `choices` and `choice_prediction` (highest log-likelihood) to rows with choices."""
    pairs = []
    for index, example in enumerate(examples):
        for choice in json.loads(_text(example.get("choices", b"[]"))):
            pairs.append((index, choice))
    if not pairs:
        return
    scores = _score_rows(
        [examples[i]["inputs"] for i, _ in pairs],
        [_with_eos(vocabulary.encode(c), spec.targets_length, vocabulary.eos_id)
         for _, c in pairs], score_fn, spec)
    best: dict[int, tuple[float, str]] = {}
    for (index, choice), (ll, _, _) in zip(pairs, scores):
        rows[index].setdefault("choices", []).append(choice)
        if index not in best or ll > best[index][0]:  # Ties keep the first choice.
            best[index] = (ll, choice)
    for index, (_, choice) in best.items():
        rows[index]["choice_prediction"] = choice


def evaluate_task(task: seqio.Task, predict_fn: PredictFn, spec: EvalSpec,
                  score_fn: Optional[ScoreFn] = None) -> tuple[dict[str, float], list[dict]]:
    """(metrics, prediction rows) of one task; see the module docstring."""
    vocabulary = task.output_features["targets"].vocabulary
    examples = _examples(task, spec)
    outputs: list[np.ndarray] = []
    for batch in _padded([e["inputs"] for e in examples], spec.batch_size,
                         spec.inputs_length):
        outputs.extend(np.asarray(predict_fn(batch)))
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
        rows.append(row)
    if score_fn is not None:
        targets = [_with_eos(e["targets"], spec.targets_length, vocabulary.eos_id)
                   for e in examples]
        scored = _score_rows([e["inputs"] for e in examples], targets, score_fn, spec)
        for row, values in zip(rows, scored):
            row.update(zip(_SCORED, values))
        _rank_choices(rows, examples, score_fn, vocabulary, spec)
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
               rows: dict[str, list[dict]], guard_tasks: Sequence[str] = ()) -> str:
    """Writes `eval/step_<N>.json` and the predictions files; returns the JSON path."""
    payload = {"step": step, "tasks": results}
    if guard_tasks:
        payload["guard_tasks"] = list(guard_tasks)
    return _write_point(workdir, f"step_{step}", payload, rows)


def _evaluate_tasks(tasks: dict[str, seqio.Task], predict_fn: PredictFn, spec: EvalSpec,
                    score_fn: Optional[ScoreFn]) -> tuple[dict, dict]:
    results, rows = {}, {}
    for name, task in tasks.items():
        results[name], rows[name] = evaluate_task(task, predict_fn, spec, score_fn)
        invalid = results[name].get("invalid_utf8_predictions")
        if invalid:
            logging.warning("%s: %d predictions were not valid UTF-8 (replaced)", name,
                            int(invalid))
    return results, rows


def evaluate(workdir: str, step: int, predict_fn: PredictFn, spec: EvalSpec,
             score_fn: Optional[ScoreFn] = None) -> dict[str, dict[str, float]]:
    """Evaluates every task of `spec` at `step` and writes the results."""
    tasks = {name: seqio.get_mixture_or_task(name) for name in spec.tasks}
    results, rows = _evaluate_tasks(tasks, predict_fn, spec, score_fn)
    write_step(workdir, step, results, rows, spec.guard_tasks)
    return results


def evaluate_incontext(workdir: str, shots: int, predict_fn: PredictFn, spec: EvalSpec,
                       score_fn: Optional[ScoreFn] = None) -> dict[str, dict[str, float]]:
    """The tasks of `spec` with `shots` train exemplars in each input (dropped from
    the end until the input fits `spec.inputs_length`), written as
    `eval/incontext_<k>shot.json` with the mean number of exemplars used."""
    from ift_jax.data import instructions
    tasks = {name: instructions.with_shots(name, shots, spec.inputs_length)
             for name in spec.tasks}
    results, rows = _evaluate_tasks(tasks, predict_fn, spec, score_fn)
    used = {name: sum(r.get("shots", 0) for r in task_rows) / len(task_rows)
            for name, task_rows in rows.items()}
    payload = {"step": 0, "shots": shots, "tasks": results, "shots_used": used}
    if spec.guard_tasks:
        payload["guard_tasks"] = list(spec.guard_tasks)
    _write_point(workdir, f"incontext_{shots}shot", payload, rows)
    return results


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


# ----------------------------------------------------------------------------
# Runs: evaluation during training and `ift-jax eval` over saved checkpoints.


def _names(text: str) -> list[str]:
    return [t.strip() for t in str(text or "").split(",") if t.strip()]


def _task_names(names: Sequence[str]) -> list[str]:
    """Task names with mixtures expanded into their tasks (order kept, no repeats)."""
    from ift_jax.data.inspection import tasks_of
    out: list[str] = []
    for name in names:
        out.extend(t.name for t in tasks_of(name) if t.name not in out)
    return out


def spec_from_config(config) -> EvalSpec:
    """`EvalSpec` from a run config (`config.eval`, `config.data`): the eval tasks
    (default: those of `data.mixture`) followed by the guard tasks."""
    e = config.eval
    tasks = _task_names(_names(e.tasks) or [config.data.mixture])
    guards = [t for t in _task_names(_names(e.get("guard_tasks", ""))) if t not in tasks]
    return EvalSpec(tuple(tasks + guards), e.split, config.data.inputs_length,
                    e.batch_size, e.max_examples or None, config.data.targets_length,
                    tuple(_names(e.get("metrics", ""))), tuple(guards))


def greedy_predict_fn(model, params, max_decode_length: int, num_beams: int = 1,
                      length_penalty: float = 1.0) -> PredictFn:
    """`predict_fn` decoding with `model` (greedy, or beam search when `num_beams` > 1;
    build the model once: jit caches on it)."""
    from ift_jax import decoding

    def predict(batch: np.ndarray) -> np.ndarray:
        if num_beams > 1:
            tokens, _ = decoding.beam_search(model, params, batch, num_beams=num_beams,
                                             max_decode_length=max_decode_length,
                                             length_penalty=length_penalty)
        else:
            tokens, _ = decoding.greedy(model, params, batch,
                                        max_decode_length=max_decode_length)
        return np.asarray(tokens)
    return predict


def model_score_fn(model, params) -> ScoreFn:
    """`score_fn`: teacher-forced log-likelihoods under `model` (`decoding.score_targets`)."""
    from ift_jax import decoding

    def score_targets(inputs: np.ndarray, targets: np.ndarray):
        return decoding.score_targets(model, params, inputs, targets)
    return score_targets


class RunEvaluator:
    """Evaluates one run's model at evaluation points: `step(N, params)` and
    `incontext(k, params)`, with the run's spec, decoding settings and workdir."""

    def __init__(self, config, model, workdir: str):
        self.config, self.model, self.workdir = config, model, workdir
        self.spec = spec_from_config(config)
        metrics_lib.set_rouge_sentence_split(config.eval.get("rouge_sentence_split", "pysbd"))

    def _fns(self, params) -> tuple[PredictFn, ScoreFn]:
        e = self.config.eval
        return (greedy_predict_fn(self.model, params, e.max_decode_length,
                                  e.get("num_beams", 1), e.get("length_penalty", 1.0)),
                model_score_fn(self.model, params))

    def step(self, step: int, params) -> dict[str, dict[str, float]]:
        predict, score_targets = self._fns(params)
        results = evaluate(self.workdir, step, predict, self.spec, score_targets)
        self._log(f"eval step {step}", results)
        if self.spec.guard_tasks and step:
            from ift_jax import report
            print(report.forgetting_summary(self.workdir), flush=True)
        return results

    def incontext(self, shots: int, params) -> dict[str, dict[str, float]]:
        predict, score_targets = self._fns(params)
        results = evaluate_incontext(self.workdir, shots, predict, self.spec, score_targets)
        self._log(f"eval {shots}-shot (untuned)", results)
        return results

    @staticmethod
    def _log(title: str, results: dict) -> None:
        shown = ("rouge1", "rougeL", "accuracy", "rank_accuracy", "exact_match", "bleu",
                 "span_f1", "loss")
        print(f"{title}: " + "  ".join(f"{task} {k}={v:.2f}" for task, m in results.items()
                                       for k, v in m.items() if k in shown), flush=True)


def pending_incontext(config, workdir: str) -> list[int]:
    """The shot counts of `eval.incontext_shots` not evaluated yet in `workdir`."""
    return [int(k) for k in _names(config.eval.get("incontext_shots", ""))
            if not fileio.exists(os.path.join(workdir, "eval", f"incontext_{int(k)}shot.json"))]


def evaluate_checkpoints(workdir: str, which: str = "all",
                         incontext: Optional[Sequence[int]] = None) -> list[int]:
    """Evaluates the run's checkpoints not evaluated yet; returns the steps done now.

    Step 0 (the starting model) counts as a checkpoint when `eval.at_start` is
    set. A checkpoint that cannot be read is skipped with a warning naming it.

    Args:
      which: `all`, `latest`, or a step number.
      incontext: shot counts for the untuned model (default: `eval.incontext_shots`);
        each is evaluated once.
    """
    from ift_jax import checkpointing, export, model_setup
    config = export.read_config(workdir)
    if incontext is not None:
        config.eval.incontext_shots = ",".join(str(k) for k in incontext)
    model_setup.prepare_data(config)
    ckpt = checkpointing.Checkpointer(workdir, read_only=True)
    steps = ckpt.all_steps()
    ckpt.close()
    if config.eval.get("at_start", False):
        steps = [0] + steps
    if which == "latest":
        steps = steps[-1:]
    elif which != "all":
        if int(which) not in steps:
            raise ValueError(f"{workdir} has no checkpoint {which}; steps: {steps}")
        steps = [int(which)]
    done = set(finished_steps(workdir))
    evaluated, setup, evaluator = [], None, None
    for step in steps:
        if step in done:
            logging.info("step %d already evaluated; skipped", step)
            continue
        try:
            setup, params, _ = export.load_run(workdir, step, setup)
        except Exception as e:  # A half-written checkpoint must not stop the others.
            logging.warning("checkpoint %d of %s cannot be read (%s); skipped", step,
                            workdir, str(e).splitlines()[0])
            continue
        evaluator = evaluator or RunEvaluator(config, setup.eval_model, workdir)
        evaluator.step(step, params)
        evaluated.append(step)
    shots = pending_incontext(config, workdir)
    if shots:
        setup, params, _ = export.load_run(workdir, 0, setup)
        evaluator = evaluator or RunEvaluator(config, setup.eval_model, workdir)
        for k in shots:
            evaluator.incontext(k, params)
    from ift_jax import report
    report.write_tables(workdir)
    return evaluated


def read_inputs(path: str) -> list[dict]:
    """Rows of a JSONL file, each an object with a string `inputs` field.

    Raises:
      ValueError: naming the file and line of a row that is not such an object.
    """
    rows = []
    with fileio.open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("inputs"), str):
                raise ValueError(f"{path}:{number}: each line must be an object with a string "
                                 f"'inputs' field, e.g. {{\"inputs\": \"Summarize: ...\"}}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows to predict")
    return rows


def predict_rows(workdir: str, rows: Sequence[dict], step: Optional[int] = None, *,
                 num_beams: Optional[int] = None, max_decode_length: Optional[int] = None
                 ) -> list[dict]:
    """`rows` with a `prediction` from the run's checkpoint (latest by default).

    Inputs are tokenized with the run's vocabulary and cut to its
    `data.inputs_length`; decoding settings default to the run's `eval` ones.
    """
    from ift_jax import export, model_setup
    from ift_jax.data.vocabularies import TASK_VOCABULARY
    config = export.read_config(workdir)
    model_setup.prepare_data(config)
    setup, params, step = export.load_run(workdir, step)
    predict = greedy_predict_fn(
        setup.eval_model, params, max_decode_length or config.eval.max_decode_length,
        num_beams or config.eval.get("num_beams", 1), config.eval.get("length_penalty", 1.0))
    eos = TASK_VOCABULARY.eos_id
    tokens = [TASK_VOCABULARY.encode(r["inputs"])[:config.data.inputs_length - 1] + [eos]
              for r in rows]
    outputs = []
    for batch in _padded(tokens, config.eval.batch_size, config.data.inputs_length):
        outputs.extend(np.asarray(predict(batch)))
    out = []
    for row, output in zip(rows, outputs):
        text, bad = decode_tokens(TASK_VOCABULARY, output)
        out.append({**row, "prediction": text.strip(), **({"invalid_utf8": True} if bad else {})})
    logging.info("predicted %d rows with %s step %d", len(out), workdir, step)
    return out
