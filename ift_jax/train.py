"""Training: `train_and_evaluate(config, workdir)`, the loop around the pure step.

One loop for every method (the step, `ift_jax.train_step`, takes gradients
only w.r.t. the method's trainable partition). Start-up goes through
`ift_jax.runs.start` (resume → init_from → scratch); evaluation runs on the
training mesh (`ift_jax.evaluator`), on every host.

Restarts continue the run as if it had not stopped: damaged checkpoints are
set aside and the newest readable one is used (`checkpointing`, `runs.start`);
metrics rows logged after the restored step (by the run that was cut off) are
dropped; an evaluation point due at the restored step whose results are
missing (cut off by a kill or a SIGTERM, which stops an evaluation within a
batch) is evaluated first. A failed asynchronous save stops the run at the
next step boundary with one line naming the step and the cause. A SIGTERM or
SIGINT on any host stops every host at the same step boundary, where each
saves that step and exits 0 (`ift_jax.preemption`).

The host never waits on the device per step: metrics of step N are fetched
after step N+1 has been dispatched.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from ift_jax import (best, checkpointing, config_checks, config_diff, distributed, errors,
                     evaluator, fileio, inference, model_setup, partitioning, preemption,
                     run_lock, runs, set_aside, suites)
from ift_jax.configs import default as default_config
from ift_jax.data import indexed, pipeline, positions
from ift_jax.train_step import (  # noqa: F401  (the step's public names, also here)
    TrainState, global_batches, jit_train_step, train_step)


# ----------------------------------------------------------------------------
# Metrics on the host.


class MetricsLog:
    """`train_metrics.jsonl`, clu writers (TensorBoard + log) and a progress line.

    `mfu` = tokens/s × `flops_per_token` (the FLOPs the method executes per
    input+target token, `model_setup.training_flops_per_token`) / the peak of
    all devices; logged when both are set.
    """

    def __init__(self, workdir: str, total_steps: int, flops_per_token: float,
                 peak_flops: float):
        from clu import metric_writers
        self.is_main = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(
            os.path.join(workdir, "tb"), just_logging=not self.is_main)
        self.path = os.path.join(workdir, "train_metrics.jsonl")
        self.total_steps = total_steps
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops * jax.device_count()
        self._window_start = time.perf_counter()
        self._window_tokens = 0.0
        self._start = time.perf_counter()

    def add(self, step: int, metrics: dict, lr: float, log: bool) -> dict:
        values = {k: float(v) for k, v in metrics.items()}
        self._window_tokens += values.pop("input_tokens", 0.0)
        if not log:
            return values
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        values.update(learning_rate=lr, tokens_per_s=self._window_tokens / elapsed)
        if self.peak_flops and self.flops_per_token:
            values["mfu"] = values["tokens_per_s"] * self.flops_per_token / self.peak_flops
        self._window_start, self._window_tokens = time.perf_counter(), 0.0
        self.writer.write_scalars(step, values)
        if self.is_main:
            fileio.append_text(self.path, json.dumps({"step": step, **values}) + "\n")
            done = time.perf_counter() - self._start
            eta = done / max(step, 1) * (self.total_steps - step)
            print(f"step {step}/{self.total_steps}  loss {values['loss']:.4f}  "
                  f"acc {values['accuracy']:.3f}  {values['tokens_per_s']:.0f} tok/s  "
                  f"ETA {eta:.0f}s", flush=True)
        return values

    def close(self):
        self.writer.flush()
        self.writer.close()


class NonFiniteLossError(errors.TrainingError):
    pass


# ----------------------------------------------------------------------------
# The orchestrator.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_changes: Sequence[str] = (),
                       start_over: bool = False) -> dict:
    """Trains (resuming if the workdir has a checkpoint) and returns the last metrics.

    With `start_over`, an earlier run's files in `workdir` (checkpoints, damaged
    ones, metrics, evaluation, config) are moved to `workdir/start_over-<time>/`
    first and training starts from `init_from` or scratch. Without it, a workdir
    whose checkpoints were all damaged (set aside) is refused.

    Nothing is written before every check has passed: the config's values
    (`config_checks`), no benchmark task in the training mixture
    (`suites.check_training_mixture`), some task with a positive rate in it, each
    sampled task rendered with examples (`pipeline.check_training_data`), the eval
    suites' data, an `init_from` that can be read (`runs.check_init_from`), no other
    live run on the workdir (a lock held for the whole run), and, on a resume, no changed config field unless `allow_config_changes`
    names it (the accepted changes are appended to `config_changes.jsonl`).
    `config.json` is written once the run has started from its checkpoint,
    `init_from` or scratch.
    """
    config_checks.validate_for_devices(config, jax.device_count(), jax.process_count())
    config_diff.check_allowed_keys(allow_config_changes, config)
    model_setup.prepare_data(config)
    suites.check_training_mixture(config.data.mixture)
    pipeline.check_training_data(config.data.mixture)
    evaluator.check_suites(config)
    if config.init_from:
        runs.check_init_from(config.init_from)
    _check_writable(workdir)
    with run_lock.hold(workdir):
        if start_over:
            _start_over(workdir)
        return _train(config, workdir, allow_config_changes)


def _check_writable(workdir: str) -> None:
    """Refuses a workdir this process cannot write, before anything is written."""
    error = fileio.unwritable(workdir)
    if error is not None:
        raise errors.ConfigError(f"--workdir={workdir} is not writable ({error.strerror or error}"
                                 f"); give a folder this user can write to")


def _start_over(workdir: str) -> None:
    moved = set_aside.earlier_run(workdir) if jax.process_index() == 0 else None
    moved = distributed.agree(moved)  # Every host waits for the move.
    logging.info("start-up: starting over%s", f" (earlier run moved to {moved})" if moved
                 else " (nothing to move aside)")


def _config_changes(config: ml_collections.ConfigDict, workdir: str, setup, ckpt,
                    allowed: Sequence[str]) -> list[config_diff.Change]:
    """Changes against the workdir's `config.json` of a run that resumes; refused
    unless allowed. Checkpoints of another model or method are refused first (their
    fingerprint, read from the checkpoint's metadata alone)."""
    latest = ckpt.latest_step()
    if latest is None:
        return []
    checkpointing.check_fingerprint(ckpt.read_meta(latest).get("fingerprint", {}),
                                    setup.fingerprint, ckpt.directory)
    path = os.path.join(workdir, "config.json")
    if not fileio.exists(path):
        return []
    with fileio.open(path) as f:
        saved = json.load(f)
    # Compared as written: what was trained (a config.json written before runs recorded
    # that holds the config's own model.* values).
    new = runs.as_trained(config, setup) if runs.REPLACED in saved else config
    changes = config_diff.diff(saved, new, defaults=default_config.get_config())
    config_diff.check(changes, allowed, workdir)
    return changes


def _write_config(config: ml_collections.ConfigDict, workdir: str,
                  changes: Sequence[config_diff.Change], step: int) -> None:
    if jax.process_index() != 0:
        return
    with fileio.open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    if changes:
        rows = "".join(json.dumps(r) + "\n" for r in config_diff.records(changes, step))
        fileio.append_text(os.path.join(workdir, "config_changes.jsonl"), rows)
        logging.warning("resumed at step %d with config changes: %s", step,
                        "; ".join(map(str, changes)))


def _train(config: ml_collections.ConfigDict, workdir: str,
           allow_config_changes: Sequence[str]) -> dict:
    ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    ckpt.set_aside_damaged()  # Before anything reads a checkpoint.
    if ckpt.latest_step() is None:  # Refused here, before the model is even built.
        runs.check_can_start_without_checkpoint(workdir)
    setup = runs.build_setup(config)
    mesh = partitioning.make_mesh(dict(config.mesh))
    changes = _config_changes(config, workdir, setup, ckpt, allow_config_changes)
    init, start = runs.start(setup, mesh, ckpt)
    state, frozen, shardings = init.state, init.frozen, init.shardings
    trained = runs.as_trained(config, setup)
    if runs.REPLACED in trained:
        logging.info("init_from %s has another architecture than config.model; trained "
                     "(and recorded in config.json): %s", config.init_from, ", ".join(
                         f"model.{k}={trained.model[k]!r} (config: {v!r})"
                         for k, v in trained[runs.REPLACED]["config_values"].items()))
    _write_config(trained, workdir, changes, start)
    _drop_metrics_after(workdir, start)
    _mark_unfinished(workdir, start, config.train.steps)
    model_setup.release_init_params(setup)  # On the devices now.
    if jax.process_index() == 0:
        model_setup.write_model_info(workdir, setup, state.params, frozen)

    batch_sharding = partitioning.batch_sharding(mesh)
    step_fn = jit_train_step(setup, shardings, batch_sharding)

    data = model_setup.train_batches(config, start_step=start, workdir=workdir)
    stream = data if isinstance(data, indexed.IndexedStream) else None
    batches = global_batches(data, batch_sharding)
    log = MetricsLog(workdir, config.train.steps,
                     setup.flops_per_token if config.device_peak_flops else 0.0,
                     config.device_peak_flops)
    stop = preemption.StopRequest(mesh)
    evaluate = _evaluator(config, setup, workdir, log, mesh, stop)
    rng = jax.random.key(config.train.seed)
    follow = best.Follower.from_config(config, workdir, start) if evaluate else None
    stopped_early = _follow_start(follow, ckpt)
    started = time.perf_counter()
    pending: Optional[tuple[int, dict]] = None
    last: dict = {}
    step = start

    def save(step: int, force: bool = False) -> None:
        """Checkpoints `state` at `step`, with the indexed stream's position first."""
        host = (jax.process_index(), jax.process_count())
        if stream is not None:
            positions.save(stream, workdir, step, *host)
        ckpt.save(step, state, setup.checkpoint_meta(), force=force)
        if stream is not None:
            positions.drop_except(workdir, set(ckpt.all_steps()) | {step}, *host)

    def evaluated(step: int, point: Optional[dict]) -> str:
        """Keeps the best checkpoint (saving the step if it has none); the early stop's
        reason, or "". Every host decides the same (process 0's record)."""
        nonlocal last, pending
        if follow is None or point is None:
            return ""
        decision = evaluator.agree(follow.update(step, point))
        if decision["new_best"] and follow.keep and not ckpt.has(step):
            if pending is not None:  # Never checkpoint a non-finite state.
                last, pending = _report(log, setup, *pending, config), None
            save(step, force=True)
        ckpt.keep_also(decision["best_step"])
        if follow.keep and jax.process_index() == 0:
            best.write_record(workdir, follow.keep)
        return decision["stop"]

    try:
        with partitioning.mesh_context(mesh):
            if evaluate and start == 0:  # The starting model: step 0 and in-context.
                stopped_early = evaluated(0, evaluate(0, model_setup.merge(state.params,
                                                                           frozen)))
            elif evaluate and _eval_due(start, config) and evaluate.pending(start):
                logging.info("start-up: evaluation point %d has no eval/step_%d.json (it was "
                             "cut off); evaluating it first", start, start)
                stopped_early = evaluated(start, evaluate(
                    start, model_setup.merge(state.params, frozen)))
            # `stopped_early` is agreed by all hosts, so all of them skip or join the
            # stop vote's collective alike.
            while (step < config.train.steps and not stopped_early
                   and not stop.agreed_at_boundary()):
                ckpt.check_saves()  # A failed save stops the run here, not a save later.
                batch = next(batches)
                state, metrics = step_fn(state, frozen, batch, jax.random.fold_in(rng, step))
                step += 1
                if pending is not None:  # Fetch step N-1 now that step N is queued.
                    last = _report(log, setup, *pending, config)
                pending = (step, metrics)
                if step % config.train.checkpoint_every == 0 or step == config.train.steps:
                    # Check this step's loss first: never checkpoint a non-finite state.
                    last, pending = _report(log, setup, *pending, config), None
                    save(step)
                if evaluate and _eval_due(step, config):
                    stopped_early = evaluated(step, evaluate(
                        step, model_setup.merge(state.params, frozen)))
            if pending is not None:
                last = _report(log, setup, *pending, config)
            if stop.agreed or stopped_early:  # Every host: agreed at this step boundary.
                if not ckpt.has(step):
                    save(step, force=True)
                ckpt.wait()
                logging.warning("%s at step %d; checkpoint saved", stopped_early or "stopped",
                                step)
        ckpt.wait()  # `finished` only once the last checkpoint is committed.
        if jax.process_index() == 0:
            # An early stop is a finished run (sweeps skip it); a stop request is not.
            _write_summary(workdir, config, step, last, state.params, frozen, started,
                           finished=(step >= config.train.steps or bool(stopped_early))
                           and not stop.agreed, stop_reason=stopped_early)
    except OSError as e:  # Disk full, a read-only remount: one line, as for a failed save.
        ckpt.wait()  # A save that failed as well says more (SaveFailedError names its step).
        raise errors.TrainingError(
            f"writing into {workdir} failed at step {step}: {checkpointing.root_cause(e)}; "
            f"the run stops here; {ckpt.intact()}") from e
    finally:
        ckpt.close()
        log.close()
        stop.restore()
    return last


def peak_memory() -> dict[str, Optional[int]]:
    """Peak bytes of this process: device (largest over local devices, where the
    backend reports it; not on CPU) and host resident set."""
    import resource
    device = [d.memory_stats() or {} for d in jax.local_devices()]
    peaks = [int(m["peak_bytes_in_use"]) for m in device if "peak_bytes_in_use" in m]
    return {"device_bytes": max(peaks) if peaks else None,
            "host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _follow_start(follow: Optional[best.Follower], ckpt: checkpointing.Checkpointer) -> str:
    """A resumed run's best checkpoint kept again; the early stop's reason if the
    evaluations so far already end the run (a resume of an early-stopped run)."""
    if follow is None:
        return ""
    state = evaluator.agree(follow.state())
    ckpt.keep_also(state["best_step"])
    return state["stop"]


def _write_summary(workdir: str, config, step: int, last: dict, trainable: Any, frozen: Any,
                   started: float, finished: bool, stop_reason: str = "") -> None:
    """`summary.json`: where the run stopped, its last metrics, sizes and peak memory
    (sweeps and the launchers read it; `finished` marks a run that reached
    `train.steps`, or stopped early by `train.early_stopping` (`stop_reason`
    says so), and was not stopped by a signal, e.g. during its last evaluation)."""
    counts = {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
              for name, tree in (("trainable", trainable), ("frozen", frozen))}
    summary = {"step": step, "steps": config.train.steps,
               "finished": finished,
               **({"stop_reason": stop_reason} if stop_reason else {}),
               "train": {k: float(v) for k, v in last.items()},
               "params": {**counts, "total": counts["trainable"] + counts["frozen"]},
               "peak_memory": peak_memory(), "wall_s": time.perf_counter() - started,
               "device": jax.devices()[0].device_kind, "num_devices": jax.device_count()}
    with fileio.open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)


def _eval_due(step: int, config) -> bool:
    return step > 0 and (step % config.eval.every == 0 or step == config.train.steps)


class _Evaluate:
    """`(step, params) -> None`: decodes and scores the eval tasks on the training mesh
    (every host takes part; process 0 writes). A stop request cancels the point
    within a batch (nothing of it is written; it is evaluated again at the restart)."""

    def __init__(self, run_evaluator: evaluator.RunEvaluator, log: MetricsLog,
                 stop: preemption.StopRequest):
        self.run_evaluator, self.log, self.stop = run_evaluator, log, stop

    def pending(self, step: int) -> bool:
        return self.run_evaluator.pending(step)

    def __call__(self, step: int, params: Any) -> Optional[dict]:
        """The point's `{"tasks": ..., "suites": ...}`, or None (nothing evaluated)."""
        try:
            result = self.run_evaluator.at_step(step, params)
        except inference.Cancelled:
            self.stop.requested = self.stop.agreed = True  # The cancel was agreed by all.
            logging.warning("evaluation at step %d stopped by the stop request; it is done "
                            "again when the run resumes", step)
            return None
        if result is None:
            return None
        self.log.writer.write_scalars(step, {f"eval/{task}/{k}": v
                                             for task, m in result.tasks.items()
                                             for k, v in m.items()})
        return {"tasks": result.tasks, "suites": result.suites}


def _evaluator(config, setup, workdir: str, log: MetricsLog, mesh, stop: preemption.StopRequest
               ) -> Optional[_Evaluate]:
    """The run's evaluation, or None if evaluation is off."""
    if not config.eval.every:
        return None
    run_evaluator = evaluator.RunEvaluator(config, setup.eval_model, workdir, mesh,
                                           should_stop=lambda: stop.requested)
    return _Evaluate(run_evaluator, log, stop)


def _drop_metrics_after(workdir: str, step: int) -> None:
    """Rewrites `train_metrics.jsonl` without the rows of steps after `step` (logged by a
    run cut off before its next checkpoint; they are logged again) and any partial
    last line. Atomic: written aside, then moved over the old file."""
    path = os.path.join(workdir, "train_metrics.jsonl")
    if jax.process_index() != 0 or not fileio.exists(path):
        return
    with fileio.open(path) as f:
        lines = f.read().splitlines(keepends=True)
    kept = [line for line in lines if _row_step(line) is not None and _row_step(line) <= step]
    if len(kept) == len(lines):
        return
    kept = [line if line.endswith("\n") else line + "\n" for line in kept]
    fileio.write_text(path + ".tmp", "".join(kept))
    fileio.replace(path + ".tmp", path)
    logging.info("start-up: dropped %d metrics row(s) after step %d from %s (they are logged "
                 "again)", len(lines) - len(kept), step, path)


def _mark_unfinished(workdir: str, start: int, steps: int) -> None:
    """An earlier `summary.json` saying `finished` no longer holds once this run has steps
    to train (a resume with more `train.steps`): a run that then fails must not read
    as done to a launcher."""
    path = os.path.join(workdir, "summary.json")
    if jax.process_index() != 0 or start >= steps or not fileio.exists(path):
        return
    with fileio.open(path) as f:
        summary = json.load(f)
    if summary.get("finished") is not False:
        summary.update(finished=False, steps=steps)
        fileio.write_text(path + ".tmp", json.dumps(summary, indent=2, sort_keys=True))
        fileio.replace(path + ".tmp", path)


def _row_step(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _report(log: MetricsLog, setup, step: int, metrics: dict, config) -> dict:
    values = jax.device_get(metrics)
    if not np.isfinite(values["loss"]):
        raise NonFiniteLossError(
            f"loss is {values['loss']} at step {step}; stopping, the last good checkpoint "
            f"is kept (lower the learning rate or enable gradient clipping)")
    is_log = step % config.train.log_every == 0 or step == config.train.steps
    return log.add(step, values, setup.learning_rate(step), is_log)
