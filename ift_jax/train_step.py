"""The pure training step and its compilation over the mesh (no TensorFlow).

`train_step` is one optimizer step for every method: full fine-tuning, LoRA,
QLoRA and prompt tuning are different *trainable partitions* of the same T5
(`ift_jax.peft`). It takes gradients only w.r.t. the trainable subtree;
frozen params are an input that is never donated, never updated and has no
optimizer state. `jit_train_step` compiles it once for the mesh with the
state donated. Benchmarks and GPU hosts without TensorFlow import this
module, not `ift_jax.train`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import optax

from ift_jax import losses, model_setup

Array = jax.Array
TrainState = model_setup.TrainState


def _microbatches(batch: dict, num: int) -> dict:
    """`[B, L]` -> `[num, B/num, L]` for a scan over microbatches."""
    return jax.tree.map(lambda x: x.reshape((num, x.shape[0] // num) + x.shape[1:]), batch)


def _sum_terms(terms: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: sum(xs), *terms)


def train_step(state: TrainState, frozen: Any, batch: dict, rng: Array, *,
               apply_fn: Callable, tx: optax.GradientTransformation,
               loss_cfg: losses.LossConfig, num_microbatches: int = 1,
               offload: Any = None) -> tuple[TrainState, dict]:
    """One optimizer step; gradients are accumulated in fp32 over microbatches.

    Args:
      apply_fn: `(params, batch, rng) -> logits` with dropout enabled, where
        params = trainable merged with frozen (see `model_setup`).
      offload: `(device_shardings, host_shardings)` of the optimizer state when it
        lives in host memory (`optimizer.offload_state`): it is moved to the devices
        for the update and back to the host after it.
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
    opt_state = state.opt_state
    if offload is not None:
        opt_state = jax.device_put(opt_state, offload[0])
    updates, opt_state = tx.update(grads, opt_state, state.params)
    if offload is not None:
        opt_state = jax.device_put(opt_state, offload[1])
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": terms["loss_sum"] / denominator,
               "z_loss": terms["z_loss_sum"] / denominator,
               "accuracy": terms["correct"] / jnp.maximum(terms["tokens"], 1.0),
               "target_tokens": terms["tokens"], "grad_norm": optax.tree.norm(grads),
               "input_tokens": jnp.sum(batch["encoder_input_tokens"] > 0) + terms["tokens"]}
    return TrainState(state.step + 1, params, opt_state), metrics


def jit_train_step(setup, shardings, batch_sharding) -> Callable:
    """`train_step` compiled once for the mesh, state donated. An optimizer state
    placed in host memory (`model_setup.optimizer_shardings`) is moved to the devices
    for each update."""
    host = shardings.state.opt_state
    offload = None
    if any(s.memory_kind == model_setup.HOST_MEMORY for s in jax.tree.leaves(host)):
        offload = (jax.tree.map(lambda s: s.with_memory_kind("device"), host), host)
    return jax.jit(
        functools.partial(train_step, apply_fn=setup.train_apply, tx=setup.optimizer,
                          loss_cfg=losses.LossConfig(**setup.config.loss),
                          num_microbatches=setup.config.train.num_microbatches,
                          offload=offload),
        in_shardings=(shardings.state, shardings.frozen, batch_sharding, None),
        out_shardings=(shardings.state, None), donate_argnums=(0,))


def global_batches(local: Iterator[dict], sharding: jax.sharding.NamedSharding
                   ) -> Iterator[dict]:
    """This host's numpy batches -> global arrays over the mesh."""
    for batch in local:
        yield {k: jax.make_array_from_process_local_data(sharding, v)
               for k, v in batch.items()}
