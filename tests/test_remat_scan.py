"""`model.remat` and `model.scan_layers`: same logits and gradients, layouts that convert."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ift_jax.configs import default
from ift_jax import (checkpointing, config_checks, decoding, errors, hf, lora, model_setup,
                     partitioning, peft, scan_layout, train_step)
from ift_jax import param_trees as trees
from ift_jax.models import t5

TINY = t5.get_config("tiny", dropout_rate=0.0)
ENC = jnp.asarray(np.random.RandomState(0).randint(1, 500, (2, 12)), jnp.int32)
DEC = jnp.asarray(np.random.RandomState(1).randint(1, 500, (2, 6)), jnp.int32)
VARIANTS = [("full", False), ("save_dots", False), ("none", True), ("full", True)]


def _params(config=TINY):
    model = t5.Transformer(config)
    return nn.unbox(jax.jit(model.init)(jax.random.key(0), ENC, DEC)["params"])


def _loss_and_grads(model, params, trainable_mask=None):
    """Logits and gradients of a training call (dropout on, rate 0: remat active)."""
    mask = trainable_mask if trainable_mask is not None else jax.tree.map(lambda _: True, params)
    trainable, frozen = peft.split_params(params, mask)

    def loss(t):
        logits = model.apply({"params": peft.merge_params(t, frozen)}, ENC, DEC, DEC,
                             enable_dropout=True, rngs={"dropout": jax.random.key(1)})
        return jnp.sum(jax.nn.log_softmax(logits)[..., 3] * 1e-2), logits
    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(trainable)
    return logits, grads


def _close(actual, expected, what, tol=1e-6):
    """Relative error ||actual - expected|| / ||expected|| at most `tol`: a scanned
    loop sums in another order than the unrolled one (a few float32 ulps)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    error = np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)
    assert error <= tol, f"{what}: relative error {error:.3g} > {tol:g}"


def _assert_close(a, b, tol=1e-6):
    """The whole trees within `tol` (relative error over all leaves), each leaf within
    10 x `tol` (a small leaf's few ulps of reassociation are a larger share of it)."""
    flat_a, flat_b = trees.flatten(a), trees.flatten(b)
    assert flat_a.keys() == flat_b.keys()
    keys = sorted(flat_a)
    _close(np.concatenate([np.ravel(flat_a[k]) for k in keys]),
           np.concatenate([np.ravel(flat_b[k]) for k in keys]), "all leaves", tol)
    for k in keys:
        _close(flat_a[k], flat_b[k], trees.path(k), 10 * tol)


@pytest.mark.parametrize("remat,scan", VARIANTS)
def test_remat_and_scan_keep_logits_and_gradients(remat, scan):
    params = _params()
    logits, grads = _loss_and_grads(t5.Transformer(TINY), params)
    config = TINY.replace(remat=remat, scan_layers=scan)
    logits_v, grads_v = _loss_and_grads(t5.Transformer(config),
                                        scan_layout.to_layout(params, scan))
    _close(logits_v, logits, "logits")
    _assert_close(scan_layout.to_layout(grads_v, False), grads)


# ----------------------------------------------------------------------------
# PEFT methods on a scanned stack: the same adapters, stacked, compute the same.

METHODS = {
    "lora": peft.MethodConfig("lora", lora=peft.LoraConfig(
        rank=4, target_regex=lora.TARGET_PRESETS["all"], use_dora=True)),
    "qlora": peft.MethodConfig("qlora", lora=peft.LoraConfig(rank=4, quantize=True, tile_size=16)),
    "houlsby": peft.MethodConfig("houlsby", adapter=peft.AdapterConfig(width=8)),
    "prefix": peft.MethodConfig("prefix", prefix=peft.PrefixConfig(length=3)),
    "ia3": peft.MethodConfig("ia3", ia3=peft.IA3Config()),
}


def _perturbed(params, method):
    """Trainable leaves moved off their init (LoRA B = 0 would give A no gradient)."""
    mask = trees.flatten(peft.trainable_mask(params, method))
    flat = trees.flatten(params)
    rng = np.random.RandomState(2)
    for k, trains in mask.items():
        if trains:
            flat[k] = flat[k] + 0.05 * rng.standard_normal(flat[k].shape).astype(np.float32)
    return trees.unflatten(flat)


@pytest.mark.parametrize("name", list(METHODS))
def test_peft_methods_compute_the_same_on_a_scanned_stack(name):
    method = METHODS[name]
    model, _ = peft.build_models(TINY, method)
    params = _perturbed(peft.init_adapters(model, _params(), jax.random.key(3)), name)
    mask = peft.trainable_mask(params, name)
    logits, grads = _loss_and_grads(model, params, mask)
    scanned, _ = peft.build_models(TINY.replace(scan_layers=True, remat="full"), method)
    stacked = scan_layout.stack(params)
    logits_s, grads_s = _loss_and_grads(scanned, stacked, peft.trainable_mask(stacked, name))
    # QLoRA dequantizes its NF4 kernels inside the scan body, in another order than
    # the unrolled model (measured: gradients 1.6e-6 apart); every other method 1e-6.
    tol = 5e-6 if name == "qlora" else 1e-6
    _close(logits_s, logits, "logits", tol)
    _assert_close(scan_layout.unstack(grads_s), grads, tol)


# ----------------------------------------------------------------------------
# Decoding, layouts, HF round trips and checkpoints across layouts.


def test_greedy_decoding_of_a_scanned_model_matches_the_unrolled_one():
    params = _params()
    tokens, scores = decoding.greedy(t5.Transformer(TINY), params, ENC, max_decode_length=5)
    scanned = t5.Transformer(TINY.replace(scan_layers=True))
    tokens_s, scores_s = decoding.greedy(scanned, scan_layout.stack(params), ENC,
                                         max_decode_length=5)
    np.testing.assert_array_equal(tokens_s, tokens)
    _close(scores_s, scores, "scores")


def test_layouts_round_trip_and_hf_export_of_a_scanned_run(tmp_path):
    config = TINY.replace(scan_layers=True)
    stacked = scan_layout.stack(jax.tree.map(np.asarray, _params()))
    assert scan_layout.is_scanned(stacked) and not scan_layout.is_unrolled(stacked)
    assert stacked["encoder"]["layers"]["attention"]["query"]["kernel"].shape == (2, 64, 4, 16)
    _assert_close(scan_layout.stack(scan_layout.unstack(stacked)), stacked, 0.0)
    hf.save_t5(str(tmp_path), config, stacked)  # Written one HF block per layer.
    unrolled_config, unrolled = hf.load_t5(str(tmp_path))
    assert not unrolled_config.scan_layers and scan_layout.is_unrolled(unrolled)
    _, loaded = hf.load_t5(str(tmp_path), scan_layers=True)
    _assert_close(loaded, stacked, 0.0)


def test_a_checkpoint_of_the_other_layout_is_refused_naming_scan_layers():
    config = default.get_config()
    scanned_config = default.get_config()
    scanned_config.model.scan_layers = True
    unrolled, scanned = model_setup.build(config), model_setup.build(scanned_config)
    with pytest.raises(checkpointing.CheckpointMismatchError, match="model.scan_layers"):
        checkpointing.check_fingerprint(scanned.fingerprint, unrolled.fingerprint, "w")
    remat_config = default.get_config()
    remat_config.model.remat = "save_dots"  # Remat keeps the layout: same checkpoints.
    assert model_setup.build(remat_config).fingerprint == unrolled.fingerprint
    # The architecture entry is spelled as before these keys existed: old checkpoints match.
    assert "remat" not in unrolled.fingerprint["architecture"]
    assert "scan_layers" not in unrolled.fingerprint["architecture"]
    with pytest.raises(errors.CheckpointError, match="model.scan_layers=True"):
        scan_layout.check_layout(_params(), True, "init_from")


def test_an_init_from_base_of_either_layout_converts_to_the_runs_layout():
    config = default.get_config()
    config.model.scan_layers = True
    arch = model_setup.t5_config(config.model).replace(scan_layers=False)
    base = jax.tree.map(np.asarray, nn.unbox(jax.eval_shape(
        t5.Transformer(arch).init, jax.random.key(0), ENC, DEC)["params"]))
    base = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), base)
    setup = model_setup.build(config, base=(arch, base))
    assert setup.t5_config.scan_layers and scan_layout.is_scanned(setup.init_params)
    config.model.scan_layers = False
    back = model_setup.build(config, base=(arch, setup.init_params))
    assert scan_layout.is_unrolled(back.init_params)


def test_config_checks_name_the_new_keys():
    config = default.get_config()
    config.model.remat = "sometimes"
    with pytest.raises(errors.ConfigError, match="model.remat='sometimes'"):
        config_checks.validate(config)
    with pytest.raises(errors.ConfigError, match="model.scan_layers='yes'"):
        config_checks.validate({"model": {"remat": "nothing_saveable", "scan_layers": "yes"}})
    with pytest.raises(errors.ConfigError, match="peft.frozen_dtype='float16'"):
        config_checks.validate({"peft": {"frozen_dtype": "float16"}})


# ----------------------------------------------------------------------------
# peft.frozen_dtype: frozen params in bf16 on the devices, trained ones in fp32.


def _lora_step(frozen_dtype):
    config = default.get_config()
    config.model.dtype = "bfloat16"
    config.peft.method, config.peft.lora_rank = "lora", 4
    config.peft.frozen_dtype = frozen_dtype
    config.data.inputs_length, config.data.targets_length = 12, 6
    setup = model_setup.build(config)
    mesh = partitioning.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    init = model_setup.initialize(setup, mesh)
    batch_sharding = partitioning.batch_sharding(mesh)
    rows = np.random.RandomState(4).randint(1, 300, (8, 18)).astype(np.int32)
    batch = {"encoder_input_tokens": rows[:, :12], "decoder_input_tokens": rows[:, 12:],
             "decoder_target_tokens": rows[:, 12:]}
    step = train_step.jit_train_step(setup, init.shardings, batch_sharding)
    with partitioning.mesh_context(mesh):
        batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
        state, metrics = step(init.state, init.frozen, batch, jax.random.key(0))
    return init, state, float(metrics["loss"])


def test_bf16_frozen_weights_keep_fp32_trainables_and_the_loss():
    init, state, loss = _lora_step("bfloat16")
    frozen = jax.tree.leaves(init.frozen)
    assert frozen and all(isinstance(x, jax.Array) and x.dtype == jnp.bfloat16 for x in frozen)
    trained = jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state)
    assert {x.dtype for x in trained if jnp.issubdtype(x.dtype, jnp.floating)} == {
        jnp.dtype(jnp.float32)}
    _, state32, loss32 = _lora_step("float32")
    # bf16 compute casts each fp32 kernel to bf16 anyway: the same numbers either way.
    assert abs(loss - loss32) <= 1e-2 * abs(loss32)
    # Checkpoints hold the trainable state: same tree, shapes and dtypes.
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state.params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), state32.params)
