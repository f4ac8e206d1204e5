"""QLoRA's double quantization: 8-bit scales, their error, the bytes saved, a run on it."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ift_jax import (config_checks, double_quant, errors, hf, lora, partitioning, peft, plan,
                     runs, train)
from ift_jax import param_trees as trees
from ift_jax.models import t5
from test_train import tiny_config

# The size of test_train_peft's base (and tiny_config's model): d_kv 8, so tiles of 8.
SMALL = t5.get_config("tiny", vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_layers=1,
                      num_decoder_layers=1, dropout_rate=0.0)
ALL = lora.TARGET_PRESETS["all"]
# e4m3: 3 mantissa bits, so rounding to nearest errs by at most 2^-4 of the value; below
# the smallest normal (2^-6) the spacing is the subnormal one, 2^-9 (half: 2^-10).
RELATIVE, SUBNORMAL = 2.0 ** -4, 2.0 ** -10


def _qlora(double_quant_scales, tile_size=8, config=SMALL):
    cfg = peft.LoraConfig(rank=4, alpha=8.0, quantize=True, tile_size=tile_size,
                          target_regex=ALL, double_quant=double_quant_scales)
    return cfg, peft.apply_lora(t5.Transformer(config), cfg)


@pytest.fixture(scope="module")
def base_params():
    rng = np.random.default_rng(0)
    abstract = nn.unbox(t5.abstract_variables(SMALL)["params"])
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32),
                        abstract)


def test_block_tiles_hold_256_scales_of_t5_base_kernels_and_fewer_only_when_they_must():
    assert double_quant.block_tile((12, 12, 64)) == (1, 4, 64)  # query [768/64, heads, kv]
    assert double_quant.block_tile((32, 768)) == (1, 256)  # mlp wo [2048/64, 768]
    assert double_quant.block_tile((1, 1, 768)) == (1, 1, 256)  # attention out
    assert double_quant.block_tile((2, 3, 5)) == (2, 1, 1)  # no divisor: smaller blocks


def test_double_quantized_scales_are_within_fp8_rounding_of_the_fp32_scales():
    rng = np.random.default_rng(0)
    # NF4 scales are tile absmaxes: positive, spread around their mean.
    scale = jnp.asarray(np.abs(rng.normal(0.05, 0.02, (12, 12, 64))), jnp.float32)
    dq = double_quant.quantize_scale(scale)
    assert dq.codes.dtype == jnp.float8_e4m3fn and dq.codes.shape == scale.shape
    assert dq.step.shape == (12, 3, 1) and dq.mean.shape == (1, 1, 1)
    np.testing.assert_allclose(dq.mean, np.mean(scale, keepdims=True), rtol=1e-6)
    got, centred = dq.expand(), scale - dq.mean
    step = np.repeat(np.repeat(dq.step, 4, axis=1), 64, axis=2)
    bound = np.maximum(RELATIVE * np.abs(centred), SUBNORMAL * step) + 1e-6 * np.abs(scale)
    error = np.abs(np.asarray(got) - np.asarray(scale))
    assert np.all(error <= bound)
    assert error.max() > 0.2 * RELATIVE * np.abs(centred).max()  # really 8-bit, not fp32
    assert dq.astype(jnp.bfloat16).expand().dtype == jnp.bfloat16  # qwix casts scales
    assert double_quant.quantize_scale(scale.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_a_constant_block_keeps_its_exact_value():
    scale = jnp.full((4, 256), 0.125, jnp.float32)
    np.testing.assert_array_equal(double_quant.quantize_scale(scale).expand(), scale)


def _double_quantized(params):
    """`params` with every QLoRA scale double-quantized (what the quantizer itself does)."""
    def convert(leaf):
        if not trees.is_quantized(leaf):
            return leaf
        scale = double_quant.quantize_scale(leaf.array.scale)
        return leaf.replace(array=leaf.array.replace(scale=scale))
    return jax.tree.map(convert, params, is_leaf=trees.is_quantized)


def test_logits_with_double_quantized_scales_stay_close_to_plain_qlora(base_params):
    enc = jnp.asarray(np.random.default_rng(1).integers(2, SMALL.vocab_size, (2, 12)))
    dec = jnp.asarray(np.random.default_rng(2).integers(2, SMALL.vocab_size, (2, 7)))
    _, model = _qlora(False)
    params = peft.init_adapters(model, base_params, jax.random.key(1))
    cfg, dq_model = _qlora(True)
    dq_params = _double_quantized(params)
    assert jax.tree.structure(dq_params) == jax.tree.structure(
        nn.unbox(peft.abstract_params(dq_model)))  # what the model quantizes to
    plain = t5.Transformer(SMALL).apply
    logits = jax.jit(model.apply)({"params": params}, enc, dec)
    dq_logits = jax.jit(dq_model.apply)({"params": dq_params}, enc, dec)
    merged = jax.jit(plain)({"params": peft.merge_lora(dq_params, cfg)}, enc, dec)
    np.testing.assert_allclose(merged, dq_logits, rtol=1e-5, atol=1e-5)
    full = jax.jit(plain)({"params": base_params}, enc, dec)

    def rms(x, ref):
        return float(jnp.sqrt(jnp.mean((x - ref) ** 2) / jnp.mean(ref ** 2)))
    nf4, extra = rms(logits, full), rms(dq_logits, logits)
    # A scale errs by <= 2^-4 of its distance from the kernel's mean scale, a few % of a
    # weight; NF4 itself errs by ~10% of a weight. Measured (tiles of 8): NF4 0.26, double
    # quantization 0.019 more.
    assert 0 < extra < 0.15 * nf4


BYTES_CONFIG = t5.get_config("tiny", vocab_size=384, d_model=256, d_ff=256, d_kv=64,
                             num_heads=4, num_layers=1, num_decoder_layers=1)


def _scale_bytes(params):
    flat = [v.array.scale for v in trees.flatten(params).values() if trees.is_quantized(v)]
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
               for s in flat for x in jax.tree.leaves(s))


def test_frozen_base_bytes_drop_by_three_bytes_per_scale_less_the_second_level():
    abstract = {dq: nn.unbox(peft.abstract_params(_qlora(dq, 64, BYTES_CONFIG)[1]))
                for dq in (False, True)}
    kernels = {k: v for k, v in trees.flatten(abstract[False]).items() if trees.is_quantized(v)}
    assert len(kernels) == 18  # every linear layer of both stacks
    scales = [math.prod(v.array.scale.shape) for v in kernels.values()]
    assert all(s % 256 == 0 for s in scales)  # full blocks: the paper's 256 scales each
    # fp32 (4 bytes) -> fp8 (1) per scale, plus fp32 per 256 scales and a mean per kernel.
    expected = sum(4 * s - (s + 4 * s // 256 + 4) for s in scales)
    total = {dq: sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                     for x in jax.tree.leaves(tree)) for dq, tree in abstract.items()}
    assert total[False] - total[True] == expected
    # Bits of scale per weight at tile 64: 32/64 -> 8/64 + 32/(64 * 256) (+ the means).
    mlp = [k for k in kernels if k[-2] in ("wi_0", "wi_1", "wo")]
    weights = sum(kernels[k].array.qvalue.size for k in mlp)
    mlp_bits = {dq: 8 * _scale_bytes({k: trees.flatten(abstract[dq])[k] for k in mlp})
                / weights for dq in abstract}
    assert mlp_bits[False] == 0.5
    assert mlp_bits[True] == pytest.approx(8 / 64 + 32 / (64 * 256) + 32 * len(mlp) / weights)


def test_double_quant_is_refused_off_qlora():
    with pytest.raises(peft.PeftError, match="double quantization"):
        peft.LoraConfig(double_quant=True)
    config = tiny_config()
    config.peft.method, config.peft.qlora_double_quant = "lora", True
    with pytest.raises(errors.ConfigError, match="peft.qlora_double_quant=True"):
        config_checks.validate(config)


def test_a_qlora_run_with_double_quant_trains_checkpoints_and_resumes(base_params, tmp_path):
    hf.save_t5(str(tmp_path / "base"), SMALL, jax.tree.map(np.asarray, base_params))
    config = tiny_config(steps=2)
    config.init_from, config.peft.method = str(tmp_path / "base"), "qlora"
    config.peft.lora_targets, config.peft.qlora_double_quant = "all", True
    config.peft.lora_rank, config.peft.qlora_tile_size = 4, 8
    config.optimizer.learning_rate = 1e-2
    config.model.dtype = "bfloat16"  # init quantizes bf16 kernels, the run its fp32 base
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    config.train.steps = 4
    train.train_and_evaluate(config, workdir, allow_config_changes=["train.steps"])
    rows = [json.loads(r) for r in (tmp_path / "run" / "train_metrics.jsonl").read_text()
            .splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and rows[1]["loss"] < rows[0]["loss"]
    run = runs.Run.open(workdir, mesh=partitioning.make_mesh([1, 1, 1], jax.devices()[:1]))
    try:
        params, step = run.params()
    finally:
        run.close()
    assert step == 4 and run.setup.method_config.lora.double_quant
    kernels = [v for v in trees.flatten(params).values() if trees.is_quantized(v)]
    assert len(kernels) == 18 and all(double_quant.is_double_quantized(v) for v in kernels)
    assert all(v.array.scale.codes.dtype == jnp.float8_e4m3fn for v in kernels)
    # Trained in bf16 compute, A and B are fp32 master weights (qwix would make them bf16).
    adapters = {k: v for k, v in trees.flatten(params).items() if k[-1] in peft.LORA_LEAVES}
    assert len(adapters) == 36 and {v.dtype for v in adapters.values()} == {np.dtype("float32")}


def test_plan_counts_the_scales_as_a_run_stores_them():
    """fp32 scales (a run quantizes its fp32 base, even with bf16 compute) against FP8
    codes plus an fp32 step per block and a mean per kernel."""
    totals = {}
    for dq in (False, True):
        config = tiny_config()
        config.model.dtype, config.peft.method = "bfloat16", "qlora"
        config.peft.lora_targets, config.peft.qlora_double_quant = "all", dq
        config.peft.lora_rank, config.peft.qlora_tile_size = 4, 8
        totals[dq] = plan.compile_step(config).params_total_bytes
    _, model = _qlora(True)
    scales = [v.array.scale for v in trees.flatten(nn.unbox(peft.abstract_params(model)))
              .values() if trees.is_quantized(v)]
    expected = sum(3 * math.prod(s.shape) - 4 * math.prod(s.step.shape) - 4 for s in scales)
    assert totals[False] - totals[True] == expected
