"""The training loop: losses, the pure step, sharding, resume, and the workdir contract."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ift_jax.configs import default
from ift_jax import checkpointing, errors, losses, model_setup, partitioning, runs, train


def tiny_config(**train_overrides):
    config = default.get_config()
    config.model.d_model, config.model.d_ff, config.model.d_kv = 32, 64, 8
    config.model.num_layers = config.model.num_decoder_layers = 1
    config.data.mixture = "synthetic_sentiment"
    config.data.inputs_length, config.data.targets_length = 96, 16
    config.train.batch_size = 8
    config.train.steps = 4
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.eval.every = 0  # Decoding is tested on its own; keep loop tests fast.
    config.optimizer.warmup_steps = 1
    for key, value in train_overrides.items():
        setattr(config.train, key, value)
    return config


# ----------------------------------------------------------------------------
# Losses.


def test_label_smoothing_loss_is_zero_for_the_smoothed_target_distribution():
    vocab, eps = 5, 0.1
    probs = np.full(vocab, eps / (vocab - 1))
    probs[2] = 1 - eps
    logits = jnp.log(jnp.asarray(probs))[None, None]
    loss, _ = losses.token_cross_entropy(logits, jnp.array([[2]]), label_smoothing=eps)
    assert abs(float(loss[0, 0])) < 1e-5


def test_z_loss_adds_log_z_squared():
    logits = jnp.array([[[1.0, 2.0, 3.0]]])
    plain, _ = losses.token_cross_entropy(logits, jnp.array([[1]]))
    with_z, z = losses.token_cross_entropy(logits, jnp.array([[1]]), z_loss=0.5)
    log_z = float(jax.nn.logsumexp(logits))
    np.testing.assert_allclose(z, 0.5 * log_z ** 2, rtol=1e-6)
    np.testing.assert_allclose(with_z - plain, z, rtol=1e-6)


def test_sequence_normalization_gives_the_same_loss_packed_and_padded():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(1, 8, 11)), jnp.float32)
    targets = jnp.asarray([[3, 4, 5, 1, 6, 1, 0, 0]])
    packed = {"decoder_target_tokens": targets, "decoder_loss_weights": targets > 0,
              "decoder_segment_ids": jnp.asarray([[1, 1, 1, 1, 2, 2, 0, 0]])}
    padded_logits = jnp.stack([jnp.pad(logits[0, :4], ((0, 2), (0, 0))),
                               jnp.pad(logits[0, 4:6], ((0, 4), (0, 0)))])
    padded_targets = jnp.asarray([[3, 4, 5, 1, 0, 0], [6, 1, 0, 0, 0, 0]])
    padded = {"decoder_target_tokens": padded_targets,
              "decoder_loss_weights": padded_targets > 0}
    cfg = losses.LossConfig(normalization="sequences")
    a, b = losses.loss_terms(logits, packed, cfg), losses.loss_terms(padded_logits, padded, cfg)
    np.testing.assert_allclose(a["loss_sum"] / a["denominator"],
                               b["loss_sum"] / b["denominator"], rtol=1e-6)
    assert float(a["denominator"]) == pytest.approx(2.0)
    tokens = losses.loss_terms(logits, packed, losses.LossConfig())
    assert float(tokens["denominator"]) == 6.0


def test_unknown_loss_normalization_lists_choices():
    with pytest.raises(ValueError, match="tokens, sequences"):
        losses.LossConfig(normalization="batch")


# ----------------------------------------------------------------------------
# The step.


def _steps_on(mesh, config, batches):
    setup = model_setup.build(config)
    init = model_setup.initialize(setup, mesh)
    state, frozen, shardings = init.state, init.frozen, init.shardings
    batch_sharding = partitioning.batch_sharding(mesh)
    step = train.jit_train_step(setup, shardings, batch_sharding)
    losses_seen = []
    with partitioning.mesh_context(mesh):
        for i, batch in enumerate(batches):
            global_batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
            state, metrics = step(state, frozen, global_batch, jax.random.key(i))
            losses_seen.append(float(metrics["loss"]))
    return jax.device_get(state.params), losses_seen


def test_microbatches_accumulate_to_the_same_update():
    config = tiny_config()
    batches = [next(model_setup.train_batches(config))]
    one_device = partitioning.make_mesh([1, 1, 1], jax.devices()[:1])
    plain = _steps_on(one_device, config, batches)
    config.train.num_microbatches = 4
    micro = _steps_on(one_device, config, batches)
    np.testing.assert_allclose(plain[1], micro[1], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 plain[0], micro[0])


def test_two_steps_on_a_2x4_mesh_equal_one_device():
    config = tiny_config()
    iterator = model_setup.train_batches(config)
    batches = [next(iterator), next(iterator)]
    single = _steps_on(partitioning.make_mesh([1, 1, 1], jax.devices()[:1]), config, batches)
    sharded = _steps_on(partitioning.make_mesh({"fsdp": 2, "tensor": 4}), config, batches)
    np.testing.assert_allclose(single[1], sharded[1], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 single[0], sharded[0])


# ----------------------------------------------------------------------------
# The loop and the workdir.


def test_run_writes_the_workdir_contract_and_loss_falls(tmp_path):
    config = tiny_config(steps=30, log_every=10, checkpoint_every=15)
    config.optimizer.warmup_steps = 2
    train.train_and_evaluate(config, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 30
    info = (tmp_path / "model-info.txt").read_text()
    assert "trainable" in info and "(embed, heads, kv)" in info
    rows = [json.loads(line) for line in (tmp_path / "train_metrics.jsonl").read_text()
            .splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert {"loss", "accuracy", "grad_norm", "learning_rate", "tokens_per_s"} <= set(rows[0])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["15", "30"]
    assert os.listdir(tmp_path / "tb")


def test_resume_continues_from_the_latest_checkpoint(tmp_path):
    config = tiny_config(steps=4)
    train.train_and_evaluate(config, str(tmp_path))
    config.train.steps = 6
    with pytest.raises(errors.ConfigError, match=r"was trained with another config: "
                       r"train.steps 4 -> 6; to resume with these changes pass "
                       r"--allow_config_changes=train.steps"):
        train.train_and_evaluate(config, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 4
    train.train_and_evaluate(config, str(tmp_path), allow_config_changes=["train.steps"])
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 6
    changes = [json.loads(line) for line in (tmp_path / "config_changes.jsonl").open()]
    assert changes == [{"step": 4, "key": "train.steps", "old": 4, "new": 6}]
    rows = [json.loads(line) for line in (tmp_path / "train_metrics.jsonl").read_text()
            .splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"] or "6" in os.listdir(
        tmp_path / "checkpoints")


def test_workdir_of_another_model_is_refused(tmp_path):
    train.train_and_evaluate(tiny_config(steps=2), str(tmp_path))
    other = tiny_config(steps=4)
    other.model.d_model = 48
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match="holds checkpoints of a different run.*d_model=32.*d_model=48"):
        train.train_and_evaluate(other, str(tmp_path))


def test_non_finite_loss_stops_naming_the_step_and_keeps_good_checkpoints(tmp_path):
    config = tiny_config(steps=20, checkpoint_every=1, log_every=1)
    config.optimizer.learning_rate, config.optimizer.grad_clip_norm = 1e12, 0.0
    config.optimizer.name, config.optimizer.schedule = "adamw", "constant"
    config.loss.z_loss = 0.0
    with pytest.raises(train.NonFiniteLossError, match=r"at step (\d+)") as info:
        train.train_and_evaluate(config, str(tmp_path))
    bad_step = int(__import__("re").search(r"at step (\d+)", str(info.value)).group(1))
    saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
    assert all(s < bad_step for s in saved)


def test_init_from_with_another_architecture_names_the_param_and_shapes(tmp_path):
    import flax.linen as nn
    from ift_jax import hf
    from ift_jax.models import t5
    other = t5.get_config("tiny", vocab_size=384, d_model=32, d_ff=48, d_kv=8, num_layers=1,
                          num_decoder_layers=1)
    abstract = nn.unbox(t5.abstract_variables(other)["params"])
    hf.save_t5(str(tmp_path / "hf"), other,
               jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract))
    config = tiny_config(steps=2)
    config.init_from = str(tmp_path / "hf")
    config.model.d_ff = 64  # ignored: the architecture comes from the checkpoint
    setup = runs.build_setup(config)
    assert setup.t5_config.d_ff == 48
    with pytest.raises(ValueError, match=r"init_from param .* has shape .*, the model "
                                         r"expects"):
        model_setup._overlay({"a": {"kernel": np.zeros((2, 3))}},
                             {"a": {"kernel": np.zeros((3, 2))}}, {"a": {"kernel": None}})


def test_optimizer_state_offloaded_to_host_memory_trains_and_resumes_bit_exactly(tmp_path):
    """`optimizer.offload_state`: the state lives in pinned host memory between steps and
    the run equals one without offloading, through a checkpoint and a resume."""
    import train_runs
    config = tiny_config(steps=2)
    config.optimizer.offload_state = True
    setup = model_setup.build(config)
    init = model_setup.initialize(setup, partitioning.make_mesh({"fsdp": -1}))
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(init.state.opt_state)}
    assert kinds == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(init.state.params)} == {"device"}
    train.train_and_evaluate(config, str(tmp_path / "offload"))
    config.train.steps = 4  # Resumed: the checkpoint's state is restored into host memory.
    train.train_and_evaluate(config, str(tmp_path / "offload"),
                             allow_config_changes=["train.steps"])
    plain = tiny_config(steps=4)
    train.train_and_evaluate(plain, str(tmp_path / "plain"))
    train_runs.assert_trees_equal(train_runs.checkpoint_state(tmp_path / "offload", 4),
                                  train_runs.checkpoint_state(tmp_path / "plain", 4), rtol=0)


def test_indexed_stream_resumes_from_its_saved_position_bit_exactly(tmp_path, caplog):
    """`data.pipeline=indexed`: a run stopped at step 2 and resumed restores the data
    position saved with the checkpoint (no batch recomputed) and ends where an
    uninterrupted run ends: the resumed run saw the same batches from step 2 on."""
    import train_runs
    config = tiny_config(steps=2)
    config.data.pipeline = "indexed"
    config.data.mixture = "ift_synthetic"
    train.train_and_evaluate(config, str(tmp_path / "stopped"))
    assert (tmp_path / "stopped" / "data_position" / "2" / "process_0_of_1.json").exists()
    config.train.steps = 4
    with caplog.at_level("INFO"):
        train.train_and_evaluate(config, str(tmp_path / "stopped"),
                                 allow_config_changes=["train.steps"])
    assert "data stream restored at step 2" in caplog.text
    train.train_and_evaluate(config, str(tmp_path / "whole"))
    train_runs.assert_trees_equal(train_runs.checkpoint_state(tmp_path / "stopped", 4),
                                  train_runs.checkpoint_state(tmp_path / "whole", 4), rtol=0)
    kept = sorted(os.listdir(tmp_path / "stopped" / "data_position"))
    assert kept == sorted(os.listdir(tmp_path / "stopped" / "checkpoints"))
