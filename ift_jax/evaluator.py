"""Evaluating a run's model where it lives: during training, from saved checkpoints,
and `predict` on input files.

- `RunEvaluator(config, model, workdir, mesh)`: one run's evaluation points
  (`at_step`: step N, and at step 0 the in-context baselines), decoding and
  scoring on `mesh` with the params sharded as they are (`inference.Inference`).
  On a multi-host job every host calls it (each decodes its shard of every
  batch); process 0 writes the files and prints. Decisions that read the
  workdir (which points are still to do) are taken by process 0 and
  broadcast, so all hosts run the same collectives.
- `evaluate_checkpoints(workdir)`: `ift-jax eval` over a run's checkpoints
  not evaluated yet, on the run's configured mesh over this job's devices.
- `evaluate_model(config, workdir)`: `ift-jax eval --init_from=DIR`, the
  starting model of a config with no training run, written as step 0.
- `predict_rows(workdir, rows)`: `ift-jax predict`; `score_rows(run, rows)`:
  `ift-jax score`, the log-likelihood of given targets (t5x's score mode).

Long operations show progress with an ETA on process 0 (`ift_jax.progress`, on
stderr): an evaluation point task by task, predict and score batch by batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections

from ift_jax import errors
from ift_jax import (distributed, evaluation, fileio, inference, model_setup, progress, report,
                     runs, suites)
from ift_jax import metrics as metrics_lib
from ift_jax.data import inspection, vocabularies
from ift_jax.data.vocabularies import TASK_VOCABULARY

_SHOWN = ("rouge1", "rougeL", "accuracy", "rank_accuracy", "exact_match", "bleu", "span_f1",
          "loss")


def _is_main() -> bool:
    return jax.process_index() == 0


def agree(value: Any) -> Any:
    """Process 0's `value` on every process (JSON-serializable values)."""
    return distributed.agree(value)


def _task_names(names: Sequence[str]) -> list[str]:
    """Task names with mixtures expanded into their tasks (order kept, no repeats)."""
    out: list[str] = []
    for name in names:
        out.extend(t.name for t in inspection.tasks_of(name) if t.name not in out)
    return out


def spec_from_config(config: ml_collections.ConfigDict) -> list[evaluation.EvalSpec]:
    """The run's `EvalSpec`s (`config.eval`, `config.data`): its eval tasks (default:
    those of `data.mixture`) followed by the guard tasks, then one spec per
    benchmark suite of `eval.suites`, with the suite's split, lengths and protocol
    (k-shot prompts drop exemplars from the end until they fit, as MMLU's code does)."""
    e = config.eval
    names = evaluation._names
    specs = []
    tasks = _task_names(names(e.tasks) or names(config.data.mixture))
    guards = [t for t in _task_names(names(e.get("guard_tasks", ""))) if t not in tasks]
    if tasks or guards:
        specs.append(evaluation.EvalSpec(
            tuple(tasks + guards), e.split, config.data.inputs_length, e.batch_size,
            e.max_examples or None, config.data.targets_length,
            tuple(names(e.get("metrics", ""))), tuple(guards), e.max_decode_length))
    for suite in suites.parse(e.get("suites", "")):
        specs.append(evaluation.EvalSpec(
            suite.tasks, suite.split, e.get("suite_inputs_length", 0) or suite.inputs_length,
            e.batch_size, e.get("suite_max_examples", 0) or None, config.data.targets_length,
            max_decode_length=suite.max_decode_length, suite=suite.name, fit_exemplars=True))
    return specs


def check_suites(config: ml_collections.ConfigDict) -> None:
    """Refuses unknown suites of `eval.suites` (listing the suites) and suites whose data
    folder is missing (naming it and its SOURCE.md), before any work."""
    for suite in suites.parse(config.eval.get("suites", "")):
        suites.check_data(suite)


def aggregate(suite: str, per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """A suite's aggregates from its tasks' scores (`suites.Suite.aggregate`)."""
    return suites.get(suite).aggregate(per_task)


def pending_incontext(config: ml_collections.ConfigDict, workdir: str) -> list[int]:
    """The shot counts of `eval.incontext_shots` not evaluated yet in `workdir`."""
    return [int(k) for k in evaluation._names(config.eval.get("incontext_shots", ""))
            if not fileio.exists(os.path.join(workdir, "eval", f"incontext_{int(k)}shot.json"))]


def run_inference(config: ml_collections.ConfigDict, model: Any, mesh: jax.sharding.Mesh,
                  params: Any, on_batch: Optional[Callable[[int], None]] = None,
                  should_stop: Optional[Callable[[], bool]] = None) -> inference.Inference:
    """`model` with `params` on `mesh`, batched as the run's `eval` settings say."""
    e, d = config.eval, config.data
    return inference.Inference(
        model, params, mesh, batch_size=e.batch_size, inputs_length=d.inputs_length,
        targets_length=d.targets_length, num_beams=e.get("num_beams", 1),
        length_penalty=e.get("length_penalty", 1.0), num_buckets=e.get("length_buckets", 4),
        should_stop=should_stop, on_batch=on_batch)


class TaskProgress:
    """`evaluation.evaluate`'s per-task callback (called before each task) shown as
    progress over the tasks of `specs`, on process 0 and when there are several:
    `eval step 100: 3/12 task (25%), <task done>, elapsed 41s, ETA 2m03s`."""

    def __init__(self, specs: Sequence[evaluation.EvalSpec], desc: str, **kwargs):
        total = sum(len(spec.tasks) for spec in specs)
        self._progress = (progress.Progress(total, desc, "task", **kwargs)
                          if _is_main() and total > 1 else None)
        self._current: Optional[str] = None

    def __call__(self, name: str) -> None:
        self._finish()
        self._current = name

    def _finish(self) -> None:
        if self._current is not None and self._progress is not None:
            self._progress.update(1, note=self._current)
        self._current = None

    def __enter__(self) -> "TaskProgress":
        return self

    def __exit__(self, error_type, *rest) -> None:
        if error_type is None:  # A task that raised is not done.
            self._finish()
        if self._progress is not None:
            self._progress.close()


def _rows_progress(total: int, desc: str):
    """Progress over rows on process 0 (a context manager giving it, or None)."""
    return progress.Progress(total, desc, "row") if _is_main() else contextlib.nullcontext()


class RunEvaluator:
    """Evaluates one run's model at evaluation points on `mesh`.

    `should_stop` (training passes its SIGTERM flag) is asked before every batch;
    once it is true on any host, the point stops with `inference.Cancelled` and
    writes nothing (its `eval/step_N.json` is missing, so it is done again).
    """

    def __init__(self, config: ml_collections.ConfigDict, model: Any, workdir: str,
                 mesh: jax.sharding.Mesh, should_stop: Optional[Callable[[], bool]] = None):
        self.config, self.model, self.workdir, self.mesh = config, model, workdir, mesh
        self.should_stop = should_stop
        check_suites(config)
        self.specs = spec_from_config(config)
        metrics_lib.set_rouge_sentence_split(config.eval.get("rouge_sentence_split", "pysbd"))

    def inference(self, params: Any) -> inference.Inference:
        return run_inference(self.config, self.model, self.mesh, params,
                             should_stop=self._stop_requested if self.should_stop else None)

    def _stop_requested(self) -> bool:
        return distributed.any_process(self.should_stop())

    def pending(self, step: int) -> bool:
        """Whether evaluation point `step` has no `eval/step_<N>.json` (process 0 reads)."""
        return not agree(step in evaluation.finished_steps(self.workdir))

    def at_step(self, step: int, params: Any) -> Optional[evaluation.PointResult]:
        """Evaluation point `step`; at step 0 also the pending in-context baselines,
        and step 0 itself only with `eval.at_start` and not evaluated yet."""
        if step == 0:
            todo = agree({"shots": pending_incontext(self.config, self.workdir),
                          "start": bool(self.config.eval.at_start) and 0 not in
                          evaluation.finished_steps(self.workdir)})
            for shots in todo["shots"]:
                self.incontext(shots, params)
            if not todo["start"]:
                return None
        return self.point(step, params)

    def step(self, step: int, params: Any) -> dict[str, dict[str, float]]:
        """Evaluation point `step`'s per-task metrics."""
        return self.point(step, params).tasks

    def point(self, step: int, params: Any) -> evaluation.PointResult:
        with TaskProgress(self.specs, f"eval step {step}") as tracker:
            result = evaluation.evaluate(self.workdir, step, self.inference(params), self.specs,
                                         aggregate=aggregate, write_files=_is_main(),
                                         progress=tracker)
        if _is_main():
            self._log(f"eval step {step}", result)
            report.write_tables(self.workdir)
            if step and any(s.guard_tasks for s in self.specs):
                print(report.forgetting_summary(self.workdir), flush=True)
        return result

    def incontext(self, shots: int, params: Any) -> dict[str, dict[str, float]]:
        with TaskProgress([s for s in self.specs if not s.suite],
                          f"eval {shots}-shot (untuned)") as tracker:
            result = evaluation.evaluate_incontext(self.workdir, shots, self.inference(params),
                                                   self.specs, write_files=_is_main(),
                                                   progress=tracker)
        if _is_main():
            self._log(f"eval {shots}-shot (untuned)", result)
        return result.tasks

    @staticmethod
    def _log(title: str, result: evaluation.PointResult) -> None:
        parts = [f"{task} {k}={v:.2f}" for task, m in result.tasks.items()
                 for k, v in m.items() if k in _SHOWN]
        parts += [f"{suite} {k}={v:.2f}" for suite, m in result.suites.items()
                  for k, v in m.items()]
        invalid = sum(int(m.get("invalid_utf8_predictions", 0)) for m in result.tasks.values())
        note = (f"  ({invalid} predictions were not valid UTF-8 and were replaced; usual "
                f"for an untrained byte model)" if invalid else "")
        print(f"{title}: " + "  ".join(parts) + note, flush=True)


@dataclasses.dataclass
class CheckpointsEvaluated:
    """What `evaluate_checkpoints` did: steps evaluated now, evaluated before, and
    those it could not read (named in a warning each)."""

    evaluated: list[int]
    already: list[int]
    unreadable: list[int]

    def summary(self) -> str:
        parts = [f"evaluated steps {self.evaluated}" if self.evaluated
                 else "evaluated no step"]
        if self.already:
            parts.append(f"already evaluated {self.already}")
        if self.unreadable:
            parts.append(f"could not read checkpoints {self.unreadable}")
        return "; ".join(parts)


def _which_steps(steps: list[int], which: str, workdir: str) -> list[int]:
    if which == "latest":
        return steps[-1:]
    if which == "all":
        return steps
    if int(which) not in steps:
        raise errors.CheckpointError(f"{workdir} has no checkpoint {which}; steps: {steps}")
    return [int(which)]


def evaluate_checkpoints(workdir: str, which: str = "all",
                         incontext: Optional[Sequence[int]] = None,
                         mesh: Optional[dict[str, int]] = None) -> CheckpointsEvaluated:
    """Evaluates the run's checkpoints not evaluated yet, on the run's configured mesh
    over this job's devices (or `mesh`).

    Step 0 (the starting model) counts as a checkpoint when `eval.at_start` is
    set. Damaged checkpoints are found and set aside as training does
    (`runs.Run.check_checkpoints`; `latest` is then the newest readable one), a
    checkpoint that fails to read in full is skipped; each is named in a
    warning and reported in `unreadable`, never as evaluated.

    Args:
      which: `all`, `latest`, or a step number.
      incontext: shot counts for the untuned model (default: `eval.incontext_shots`);
        each is evaluated once.
    """
    error = fileio.unwritable(workdir) if _is_main() and fileio.isdir(workdir) else None
    if error is not None:
        raise errors.ConfigError(f"--workdir={workdir} is not writable ({error.strerror or error}"
                                 f"): evaluation writes eval/ and predictions/ there; give a "
                                 f"copy of the run that this user can write to")
    run = runs.Run.open(workdir, mesh_override=mesh)
    config = run.config
    if incontext is not None:
        config.eval.incontext_shots = ",".join(str(k) for k in incontext)
    model_setup.prepare_data(config)
    damaged = run.check_checkpoints()
    steps = ([0] if config.eval.get("at_start", False) else []) + run.steps()
    asked_damaged = which not in ("all", "latest") and int(which) in damaged
    steps = [] if asked_damaged else _which_steps(steps, which, workdir)
    done = set(agree(evaluation.finished_steps(workdir)))
    skipped = sorted(damaged) if which == "all" or asked_damaged else [
        s for s in damaged if not steps or s > steps[-1]]  # `latest`: the newer ones.
    outcome = CheckpointsEvaluated([], sorted(done & set(steps)), skipped)
    evaluator = RunEvaluator(config, run.setup.eval_model, workdir, run.mesh)
    try:
        for step in steps:
            if step in done:
                continue
            try:
                params, _ = run.params(step)
            except errors.CheckpointError as e:  # Damaged: the other steps still count.
                logging.warning("%s; skipped", e)
                outcome.unreadable.append(step)
                continue
            evaluator.step(step, params)
            outcome.evaluated.append(step)
        shots = agree(pending_incontext(config, workdir))
        if shots:
            params, _ = run.params(0)
            for k in shots:
                evaluator.incontext(k, params)
    finally:
        run.close()
    if _is_main():
        report.write_tables(workdir)
    return outcome


def evaluate_model(config: ml_collections.ConfigDict, workdir: str,
                   mesh: Optional[dict[str, int]] = None) -> dict[str, dict[str, float]]:
    """The starting model of `config` (its `init_from`, e.g. an HF directory) evaluated
    as step 0 of `workdir`, which gets the run's `config.json` as a training run does:
    `ift-jax report` and later `ift-jax eval` read it the same way."""
    check_suites(config)
    model_setup.prepare_data(config)
    if _is_main():
        fileio.makedirs(workdir)
        with fileio.open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    run = runs.Run.from_config(config, workdir,
                               runs.run_mesh(config.get("mesh"), mesh) if mesh else None)
    try:
        params, _ = run.params(0)
        evaluator = RunEvaluator(config, run.setup.eval_model, workdir, run.mesh)
        return evaluator.step(0, params)
    finally:
        run.close()


def read_inputs(path: str, fields: Sequence[str] = ("inputs",),
                check: Optional[Callable[[dict], Optional[str]]] = None) -> list[dict]:
    """Rows of a JSONL file, each an object with a string value for each of `fields`
    (other keys are kept as they are) that `check` (if given) finds no fault in.

    Raises:
      InputFileError: naming the file and line of a row that is not such an object,
        or `check`'s message for it.
    """
    rows = []
    with fileio.open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise errors.InputFileError(f"{path}:{number}: not JSON ({e.msg})") from None
            missing = [k for k in fields if not isinstance(row, dict)
                       or not isinstance(row.get(k), str)]
            if missing:
                raise errors.InputFileError(f"{path}:{number}: {_row_format(fields, missing)}")
            fault = check(row) if check else None
            if fault:
                raise errors.InputFileError(f"{path}:{number}: {fault}")
            rows.append(row)
    if not rows:
        raise errors.InputFileError(f"{path}: no rows; give one JSON object per line")
    return rows


def _row_format(fields: Sequence[str], missing: Sequence[str]) -> str:
    example = json.dumps({k: ("Summarize: ..." if k == "inputs" else "...") for k in fields})
    if len(fields) == 1:
        return f"each line must be an object with a string '{fields[0]}' field, e.g. {example}"
    names = ", ".join(f"'{k}'" for k in fields)
    lacking = ", ".join(f"'{k}'" for k in missing)
    return (f"each line must be an object with string fields {names} (this one lacks "
            f"{lacking}), e.g. {example}")


def _input_tokens(vocab: Any, text: str, length: int) -> tuple[list[int], bool]:
    """(ids cut to `length` with EOS last, whether the input was cut), as evaluation
    feeds inputs."""
    ids = vocab.encode(text)
    return ids[:length - 1] + [vocab.eos_id], len(ids) > length - 1


def predict_rows(workdir: str, rows: Sequence[dict], step: Optional[int] = None, *,
                 num_beams: Optional[int] = None, max_decode_length: Optional[int] = None,
                 mesh: Optional[dict[str, int]] = None) -> list[dict]:
    """`rows` with a `prediction` from the run's checkpoint (latest by default).

    Inputs are tokenized with the run's vocabulary and cut to its
    `data.inputs_length`; decoding settings default to the run's `eval` ones.
    The model runs on the run's configured mesh over this job's devices.
    """
    run = runs.Run.open(workdir, mesh_override=mesh)
    try:
        config = run.config
        model_setup.prepare_data(config)
        params, step = run.params(step)
        if num_beams:
            config.eval.num_beams = num_beams
        tokens = [_input_tokens(TASK_VOCABULARY, r["inputs"], config.data.inputs_length)[0]
                  for r in rows]
        with _rows_progress(len(rows), f"predict step {step}") as tracker:
            model = run_inference(config, run.setup.eval_model, run.mesh, params,
                                  tracker.update if tracker else None)
            outputs = model.generate(tokens, max_decode_length or config.eval.max_decode_length)
    finally:
        run.close()
    out = []
    for row, output in zip(rows, outputs):
        text, bad = evaluation.decode_tokens(TASK_VOCABULARY, output)
        out.append({**row, "prediction": text.strip(), **({"invalid_utf8": True} if bad else {})})
    logging.info("predicted %d rows with %s step %d", len(out), workdir, step)
    return out


def score_rows(run: runs.Run, rows: Sequence[dict], step: Optional[int] = None
               ) -> list[dict]:
    """`rows` with the log-likelihood of each one's `targets` given its `inputs` under
    `run`'s model at checkpoint `step` (default: the latest; 0: the starting model,
    e.g. the `init_from` of `runs.Run.from_config`), teacher-forced as t5x's score mode.

    Each row gains `log_likelihood` (natural log, summed over the target's tokens with
    EOS), `tokens`, `log_likelihood_per_token`, `perplexity` (exp of minus that),
    `argmax_hits` (target tokens that are the model's argmax) and, when its input was
    cut to `data.inputs_length` as evaluation cuts it, `inputs_truncated`. Targets are
    scored whole. Rows run in length-bucketed batches of `eval.batch_size` on the
    run's mesh; on a multi-host job every host must call this with the same rows.
    """
    config = run.config
    params, step = run.params(step)
    vocab = vocabularies.make_vocabulary(model_setup.vocabulary_spec(config))
    inputs = [_input_tokens(vocab, r["inputs"], config.data.inputs_length) for r in rows]
    targets = [vocab.encode(r["targets"]) + [vocab.eos_id] for r in rows]
    with _rows_progress(len(rows), f"score step {step}") as tracker:
        model = run_inference(config, run.setup.eval_model, run.mesh, params,
                              tracker.update if tracker else None)
        scores = model.score([ids for ids, _ in inputs], targets)
    out = []
    for row, (ll, hits, count), (_, cut) in zip(rows, scores, inputs):
        out.append({**row, "log_likelihood": float(ll), "tokens": int(count),
                    "log_likelihood_per_token": float(ll / count),
                    "perplexity": math.exp(-ll / count), "argmax_hits": int(hits),
                    **({"inputs_truncated": True} if cut else {})})
    return out
