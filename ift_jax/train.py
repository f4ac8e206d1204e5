"""Training: `train_and_evaluate(config, workdir)`, the loop around the pure step.

One loop for every method (the step, `ift_jax.train_step`, takes gradients
only w.r.t. the method's trainable partition). Start-up goes through
`ift_jax.runs.start` (resume → init_from → scratch); evaluation runs on the
training mesh (`ift_jax.evaluator`), on every host.

The host never waits on the device per step: metrics of step N are fetched
after step N+1 has been dispatched.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np

from ift_jax import (checkpointing, config_checks, config_diff, errors, evaluator, fileio,
                     model_setup, partitioning, run_lock, runs, suites)
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


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop finishes the step, saves and exits 0."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        logging.warning("signal %d: stopping after the current step", signum)
        self.requested = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteLossError(errors.TrainingError):
    pass


# ----------------------------------------------------------------------------
# The orchestrator.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_changes: Sequence[str] = ()) -> dict:
    """Trains (resuming if the workdir has a checkpoint) and returns the last metrics.

    Nothing is written before every check has passed: the config's values
    (`config_checks`), no benchmark task in the training mixture
    (`suites.check_training_mixture`), the eval suites' data, no other live
    run on the workdir (a lock held for the whole run), and, on a resume, no
    changed config field unless `allow_config_changes` names it (the accepted
    changes are appended to `config_changes.jsonl`). `config.json` is written
    once the run has started from its checkpoint, `init_from` or scratch.
    """
    config_checks.validate_for_devices(config, jax.device_count(), jax.process_count())
    config_diff.check_allowed_keys(allow_config_changes, config)
    model_setup.prepare_data(config)
    suites.check_training_mixture(config.data.mixture)
    evaluator.check_suites(config)
    fileio.makedirs(workdir)
    with run_lock.hold(workdir):
        return _train(config, workdir, allow_config_changes)


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
        changes = config_diff.diff(json.load(f), config)
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
    setup = runs.build_setup(config)
    mesh = partitioning.make_mesh(dict(config.mesh))
    ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    changes = _config_changes(config, workdir, setup, ckpt, allow_config_changes)
    init, start = runs.start(setup, mesh, ckpt)
    state, frozen, shardings = init.state, init.frozen, init.shardings
    _write_config(config, workdir, changes, start)
    model_setup.release_init_params(setup)  # On the devices now.
    if jax.process_index() == 0:
        model_setup.write_model_info(workdir, setup, state.params, frozen)

    batch_sharding = partitioning.batch_sharding(mesh)
    step_fn = jit_train_step(setup, shardings, batch_sharding)

    batches = global_batches(model_setup.train_batches(config, start_step=start),
                             batch_sharding)
    log = MetricsLog(workdir, config.train.steps,
                     setup.flops_per_token if config.device_peak_flops else 0.0,
                     config.device_peak_flops)
    evaluate = _evaluator(config, setup, workdir, log, mesh)
    stop = StopRequested()
    rng = jax.random.key(config.train.seed)
    started = time.perf_counter()
    pending: Optional[tuple[int, dict]] = None
    last: dict = {}
    step = start
    try:
        with partitioning.mesh_context(mesh):
            if evaluate and start == 0:  # The starting model: step 0 and in-context.
                evaluate(0, model_setup.merge(state.params, frozen))
            while step < config.train.steps and not stop.requested:
                batch = next(batches)
                state, metrics = step_fn(state, frozen, batch, jax.random.fold_in(rng, step))
                step += 1
                if pending is not None:  # Fetch step N-1 now that step N is queued.
                    last = _report(log, setup, *pending, config)
                pending = (step, metrics)
                if step % config.train.checkpoint_every == 0 or step == config.train.steps:
                    # Check this step's loss first: never checkpoint a non-finite state.
                    last, pending = _report(log, setup, *pending, config), None
                    ckpt.save(step, state, setup.checkpoint_meta())
                if evaluate and (step % config.eval.every == 0 or step == config.train.steps):
                    evaluate(step, model_setup.merge(state.params, frozen))
            if pending is not None:
                last = _report(log, setup, *pending, config)
            if stop.requested:
                if ckpt.latest_step() != step:
                    ckpt.save(step, state, setup.checkpoint_meta(), force=True)
                logging.warning("stopped at step %d; checkpoint saved", step)
        if jax.process_index() == 0:
            _write_summary(workdir, config, step, last, state.params, frozen, started)
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


def _write_summary(workdir: str, config, step: int, last: dict, trainable: Any, frozen: Any,
                   started: float) -> None:
    """`summary.json`: where the run stopped, its last metrics, sizes and peak memory
    (sweeps read it; `finished` marks a run that reached `train.steps`)."""
    counts = {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
              for name, tree in (("trainable", trainable), ("frozen", frozen))}
    summary = {"step": step, "steps": config.train.steps,
               "finished": step >= config.train.steps,
               "train": {k: float(v) for k, v in last.items()},
               "params": {**counts, "total": counts["trainable"] + counts["frozen"]},
               "peak_memory": peak_memory(), "wall_s": time.perf_counter() - started,
               "device": jax.devices()[0].device_kind, "num_devices": jax.device_count()}
    with fileio.open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)


def _evaluator(config, setup, workdir: str, log: MetricsLog, mesh
               ) -> Optional[Callable]:
    """`(step, params) -> None` decoding and scoring the eval tasks on the training
    mesh (every host takes part; process 0 writes), or None if evaluation is off."""
    if not config.eval.every:
        return None
    run_evaluator = evaluator.RunEvaluator(config, setup.eval_model, workdir, mesh)

    def run(step: int, params: Any) -> None:
        results = run_evaluator.at_step(step, params)
        if results:
            log.writer.write_scalars(step, {f"eval/{task}/{k}": v
                                            for task, m in results.items()
                                            for k, v in m.items()})
    return run


def _report(log: MetricsLog, setup, step: int, metrics: dict, config) -> dict:
    values = jax.device_get(metrics)
    if not np.isfinite(values["loss"]):
        raise NonFiniteLossError(
            f"loss is {values['loss']} at step {step}; stopping, the last good checkpoint "
            f"is kept (lower the learning rate or enable gradient clipping)")
    is_log = step % config.train.log_every == 0 or step == config.train.steps
    return log.add(step, values, setup.learning_rate(step), is_log)
