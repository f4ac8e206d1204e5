"""Tests for ift_jax.optim: schedule values, config errors, Adafactor factoring, decay masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ift_jax.optim import (OptimizerConfig, ScheduleConfig, learning_rate_at, make_optimizer,
                           make_schedule)


def _lrs(cfg, steps):
    schedule = make_schedule(cfg)
    return [float(schedule(s)) for s in steps]


def test_constant_schedule_is_base_everywhere():
    assert _lrs(ScheduleConfig("constant", 0.3), [0, 1, 10_000]) == pytest.approx([0.3] * 3)


def test_linear_warmup_ramps_then_holds():
    cfg = ScheduleConfig("linear_warmup", 1.0, warmup_steps=10)
    assert _lrs(cfg, [0, 5, 10, 1000]) == pytest.approx([0.0, 0.5, 1.0, 1.0])


def test_linear_warmup_without_warmup_starts_at_base():
    assert _lrs(ScheduleConfig("linear_warmup", 0.1), [0, 7]) == pytest.approx([0.1, 0.1])


def test_rsqrt_is_flat_during_warmup_then_inverse_sqrt():
    cfg = ScheduleConfig("rsqrt", 0.01, warmup_steps=10_000)
    # T5: 0.01 up to step 10k; at 4x warmup 0.01 * sqrt(10k / 40k) = 0.005.
    assert _lrs(cfg, [0, 5_000, 10_000, 40_000, 1_000_000]) == pytest.approx(
        [0.01, 0.01, 0.01, 0.005, 0.001])
    assert float(jax.jit(make_schedule(cfg))(jnp.asarray(40_000))) == pytest.approx(0.005)


def test_rsqrt_without_warmup_is_base_over_sqrt_step():
    cfg = ScheduleConfig("rsqrt", 1.0)
    assert _lrs(cfg, [0, 1, 4, 100]) == pytest.approx([1.0, 1.0, 0.5, 0.1])


def test_cosine_warms_up_then_decays_to_end_value():
    cfg = ScheduleConfig("cosine", 1.0, warmup_steps=10, total_steps=110, end_value=0.1)
    # Halfway through the decay cos(pi/2) = 0: end + (base - end) / 2 = 0.55.
    assert _lrs(cfg, [0, 5, 10, 60, 110, 500]) == pytest.approx(
        [0.0, 0.5, 1.0, 0.55, 0.1, 0.1])


def test_cosine_without_warmup_starts_at_base():
    cfg = ScheduleConfig("cosine", 2.0, total_steps=100)
    assert _lrs(cfg, [0, 50, 100]) == pytest.approx([2.0, 1.0, 0.0], abs=1e-6)


def test_linear_decay_warms_up_then_reaches_end_value_at_total_steps():
    cfg = ScheduleConfig("linear_decay", 1.0, warmup_steps=10, total_steps=110, end_value=0.2)
    assert _lrs(cfg, [0, 5, 10, 60, 110, 500]) == pytest.approx(
        [0.0, 0.5, 1.0, 0.6, 0.2, 0.2])


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match="cosin") as err:
        make_schedule(ScheduleConfig("cosin", 1.0))
    for name in ("constant", "linear_warmup", "rsqrt", "cosine", "linear_decay"):
        assert name in str(err.value)


@pytest.mark.parametrize("name", ["cosine", "linear_decay"])
def test_decaying_schedules_require_total_steps(name):
    with pytest.raises(ValueError, match=f"'{name}' needs total_steps"):
        ScheduleConfig(name, 1.0, warmup_steps=10)
    with pytest.raises(ValueError, match="total_steps=10"):
        ScheduleConfig(name, 1.0, warmup_steps=10, total_steps=10)


def test_constant_schedule_rejects_warmup():
    with pytest.raises(ValueError, match="linear_warmup"):
        ScheduleConfig("constant", 1.0, warmup_steps=100)


def test_unknown_optimizer_lists_valid_names():
    with pytest.raises(ValueError, match="'adam'.*adafactor, adamw"):
        OptimizerConfig("adam", ScheduleConfig("constant", 1e-3))


def test_learning_rate_at_accepts_either_config():
    sched = ScheduleConfig("linear_warmup", 1.0, warmup_steps=4)
    assert learning_rate_at(sched, 1) == 0.25
    assert isinstance(learning_rate_at(OptimizerConfig("adamw", sched), 2), float)
    assert learning_rate_at(OptimizerConfig("adamw", sched), 2) == 0.5


def _factored_state(cfg, params):
    state = make_optimizer(cfg).init(params)
    return {k: optax.tree_utils.tree_get(state, k) for k in ("v_row", "v_col", "v")}


def test_adafactor_factors_second_moments_of_large_matrices_only():
    params = {"kernel": jnp.ones((256, 512)), "scale": jnp.ones((512,)),
              "narrow": jnp.ones((256, 64))}
    s = _factored_state(OptimizerConfig("adafactor", ScheduleConfig("constant", 1e-2)), params)
    assert s["v_row"]["kernel"].shape == (256,)
    assert s["v_col"]["kernel"].shape == (512,)
    assert s["v"]["kernel"].size == 1  # placeholder, not a full 256x512 matrix
    # 1-D params and matrices with a dim under min_dim_size_to_factor keep a full moment.
    assert s["v"]["scale"].shape == (512,)
    assert s["v_row"]["scale"].size == 1
    assert s["v"]["narrow"].shape == (256, 64)


def test_adafactor_factored_false_keeps_full_second_moment():
    cfg = OptimizerConfig("adafactor", ScheduleConfig("constant", 1e-2), factored=False)
    assert _factored_state(cfg, {"kernel": jnp.ones((256, 512))})["v"]["kernel"].shape == (
        256, 512)


@pytest.mark.parametrize("name,expected_w_update", [
    ("adamw", -0.1 * 0.5 * 2.0),   # decoupled, multiplied by lr
    ("adafactor", -0.5 * 2.0),     # t5x weight_decay_rate: not multiplied by lr
])
def test_weight_decay_skips_1d_params(name, expected_w_update):
    cfg = OptimizerConfig(name, ScheduleConfig("constant", 0.1), weight_decay=0.5,
                          grad_clip_norm=None)
    params = {"w": jnp.full((4, 3), 2.0), "b": jnp.full((3,), 2.0)}
    tx = make_optimizer(cfg)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], expected_w_update, rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], 0.0)


def _first_adamw_update(grad_clip_norm, grads):
    # eps=1 makes Adam's first step lr * g / (|g| + 1), so it depends on the clipped size.
    cfg = OptimizerConfig("adamw", ScheduleConfig("constant", 0.1), eps=1.0,
                          grad_clip_norm=grad_clip_norm)
    tx = make_optimizer(cfg)
    params = jax.tree.map(jnp.zeros_like, grads)
    return tx.update(grads, tx.init(params), params)[0]


def test_grad_clipping_caps_update_for_huge_gradient():
    grads = {"w": jnp.full((4,), 1e6)}  # global norm 2e6
    # Clipped to norm 1: each entry 0.5, update -0.1 * 0.5 / 1.5.
    np.testing.assert_allclose(_first_adamw_update(1.0, grads)["w"], -0.1 / 3, rtol=1e-5)
    np.testing.assert_allclose(_first_adamw_update(None, grads)["w"], -0.1, rtol=1e-5)


def test_schedule_drives_the_optimizer_step():
    cfg = OptimizerConfig("adamw", ScheduleConfig("linear_warmup", 0.1, warmup_steps=10))
    tx = make_optimizer(cfg)
    params = {"w": jnp.ones((3, 3))}
    grads = {"w": jnp.ones((3, 3))}
    state = tx.init(params)
    first, state = tx.update(grads, state, params)
    second, _ = tx.update(grads, state, params)
    np.testing.assert_array_equal(first["w"], 0.0)  # lr(0) = 0
    assert float(jnp.abs(second["w"]).max()) == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_a_few_steps_reduce_a_quadratic(name):
    cfg = OptimizerConfig(name, ScheduleConfig("constant", 0.05), weight_decay=1e-4)
    tx = make_optimizer(cfg)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    target = {"w": jax.random.normal(k1, (256, 128)), "b": jax.random.normal(k2, (128,))}
    params = jax.tree.map(lambda t: t + jax.random.normal(k3, t.shape), target)

    def loss_fn(p):
        return sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)

    @jax.jit
    def step(p, s):
        grads = jax.grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    state, start = tx.init(params), float(loss_fn(params))
    for _ in range(20):
        params, state = step(params, state)
    end = float(loss_fn(params))
    assert math.isfinite(end) and end < 0.5 * start
