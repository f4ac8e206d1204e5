"""Training: `train_and_evaluate(config, workdir)` and the pure `train_step`.

One loop for every method: full fine-tuning, LoRA, QLoRA and prompt tuning are
different *trainable partitions* of the same T5 (`ift_jax.peft`). The step
takes gradients only w.r.t. the trainable subtree; frozen params are an input
that is never donated, never updated and has no optimizer state.

`train_step` is jitted once with in/out shardings over the (data, fsdp,
tensor) mesh and donates the state. The host never waits on the device per
step: metrics of step N are fetched after step N+1 has been dispatched.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ift_jax import checkpointing, fileio, losses, partitioning
from ift_jax import model_setup

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    step: Array
    params: Any  # The trainable subtree only.
    opt_state: Any


# ----------------------------------------------------------------------------
# The pure step.


def _microbatches(batch: dict, num: int) -> dict:
    """`[B, L]` -> `[num, B/num, L]` for a scan over microbatches."""
    return jax.tree.map(lambda x: x.reshape((num, x.shape[0] // num) + x.shape[1:]), batch)


def _sum_terms(terms: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: sum(xs), *terms)


def train_step(state: TrainState, frozen: Any, batch: dict, rng: Array, *,
               apply_fn: Callable, tx: optax.GradientTransformation,
               loss_cfg: losses.LossConfig, num_microbatches: int = 1
               ) -> tuple[TrainState, dict]:
    """One optimizer step; gradients are accumulated in fp32 over microbatches.

    Args:
      apply_fn: `(params, batch, rng) -> logits` with dropout enabled, where
        params = trainable merged with frozen (see `model_setup`).
    """

    # The whole batch's denominator, known before the forward pass: dividing the
    # loss by it (a constant) scales backprop's seed, so the gradients come out
    # normalized instead of taking one more pass over all of them afterwards.
    denominator = jnp.maximum(losses.loss_denominator(batch, loss_cfg), 1e-8)

    def loss_of(trainable, micro, micro_rng):
        logits = apply_fn(model_setup.merge(trainable, frozen), micro, micro_rng)
        terms = losses.loss_terms(logits, micro, loss_cfg)
        return terms["loss_sum"] / denominator, terms

    grad_fn = jax.grad(loss_of, has_aux=True)
    if num_microbatches == 1:
        grads, terms = grad_fn(state.params, batch, rng)
    else:
        def body(carry, xs):
            micro, index = xs
            g, t = grad_fn(state.params, micro, jax.random.fold_in(rng, index))
            acc_g, acc_t = carry
            return (jax.tree.map(jnp.add, acc_g, g), _sum_terms([acc_t, t])), None

        zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        zeros_t = {k: jnp.zeros((), jnp.float32) for k in
                   ("loss_sum", "z_loss_sum", "denominator", "correct", "tokens")}
        (grads, terms), _ = jax.lax.scan(
            body, (zeros_g, zeros_t),
            (_microbatches(batch, num_microbatches), jnp.arange(num_microbatches)))
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": terms["loss_sum"] / denominator,
               "z_loss": terms["z_loss_sum"] / denominator,
               "accuracy": terms["correct"] / jnp.maximum(terms["tokens"], 1.0),
               "target_tokens": terms["tokens"], "grad_norm": optax.tree.norm(grads),
               "input_tokens": jnp.sum(batch["encoder_input_tokens"] > 0) + terms["tokens"]}
    return TrainState(state.step + 1, params, opt_state), metrics


# ----------------------------------------------------------------------------
# Batches and metrics on the host.


def global_batches(local: Iterator[dict], sharding: jax.sharding.NamedSharding
                   ) -> Iterator[dict]:
    """This host's numpy batches -> global arrays over the mesh."""
    for batch in local:
        yield {k: jax.make_array_from_process_local_data(sharding, v)
               for k, v in batch.items()}


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


class NonFiniteLossError(FloatingPointError):
    pass


# ----------------------------------------------------------------------------
# The orchestrator.


def jit_train_step(setup, shardings, batch_sharding) -> Callable:
    """`train_step` compiled once for the mesh, state donated."""
    return jax.jit(
        functools.partial(train_step, apply_fn=setup.train_apply, tx=setup.optimizer,
                          loss_cfg=losses.LossConfig(**setup.config.loss),
                          num_microbatches=setup.config.train.num_microbatches),
        in_shardings=(shardings.state, shardings.frozen, batch_sharding, None),
        out_shardings=(shardings.state, None), donate_argnums=(0,))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming if the workdir has a checkpoint) and returns the last metrics."""
    fileio.makedirs(workdir)
    setup = model_setup.build(config)
    mesh = partitioning.make_mesh(dict(config.mesh))
    if jax.process_index() == 0:
        with fileio.open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    tx = setup.optimizer
    ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    state, frozen, shardings, start = model_setup.initial_state(setup, tx, mesh, ckpt)
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
    evaluator = _evaluator(config, setup, workdir, log)
    stop = StopRequested()
    rng = jax.random.key(config.train.seed)
    started = time.perf_counter()
    pending: Optional[tuple[int, dict]] = None
    last: dict = {}
    step = start
    try:
        with partitioning.mesh_context(mesh):
            if evaluator and start == 0:  # The starting model: step 0 and in-context.
                evaluator(0, model_setup.merge(state.params, frozen))
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
                if evaluator and (step % config.eval.every == 0 or step == config.train.steps):
                    evaluator(step, model_setup.merge(state.params, frozen))
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


def _evaluator(config, setup, workdir: str, log: MetricsLog) -> Optional[Callable]:
    """`(step, params) -> None` decoding and scoring the eval tasks, or None if off."""
    if not config.eval.every:
        return None
    if jax.process_count() > 1:
        logging.warning("evaluation during multi-host training is not supported yet; run "
                        "`ift-jax eval --workdir=%s` afterwards", workdir)
        return None
    from ift_jax import evaluation, report
    evaluator = evaluation.RunEvaluator(config, setup.eval_model, workdir)

    def run(step: int, params: Any) -> None:
        if step == 0:
            for shots in evaluation.pending_incontext(config, workdir):
                evaluator.incontext(shots, params)
            if not config.eval.at_start or 0 in evaluation.finished_steps(workdir):
                return
        results = evaluator.step(step, params)
        log.writer.write_scalars(step, {f"eval/{task}/{k}": v for task, m in results.items()
                                        for k, v in m.items()})
        report.write_tables(workdir)
    return run


def _report(log: MetricsLog, setup, step: int, metrics: dict, config) -> dict:
    values = jax.device_get(metrics)
    if not np.isfinite(values["loss"]):
        raise NonFiniteLossError(
            f"loss is {values['loss']} at step {step}; stopping, the last good checkpoint "
            f"is kept (lower the learning rate or enable gradient clipping)")
    is_log = step % config.train.log_every == 0 or step == config.train.steps
    return log.add(step, values, setup.learning_rate(step), is_log)
