"""`ift-jax plan` on the tiny preset over a (2, 4) fake mesh: numbers that move the right way."""

import dataclasses

import pytest

from ift_jax import cli, errors, plan
from ift_jax.configs import default


def _config(method="full", remat="none", data=2, fsdp=4):
    """Activations dominate (8 rows per device, unpacked, so the relative position
    one-hots outside the layers stay small): remat has something to save. Two layers
    a stack (the default config's), as compile time grows with the layers."""
    config = default.get_config()
    config.data.inputs_length, config.data.targets_length = 128, 32
    config.data.pack = False
    config.train.batch_size = 64
    config.model.remat = remat
    config.peft.method = method
    config.peft.lora_rank = 4  # Rank 32 on d_model 128 would be a quarter of the model.
    config.mesh.data, config.mesh.fsdp = data, fsdp
    return config


def test_plan_numbers_move_with_remat_fsdp_and_the_method():
    base = plan.plan(_config(), devices=8)
    assert base.mesh == {"data": 2, "fsdp": 4, "tensor": 1} and base.flops > 0
    remat = plan.plan(_config(remat="full"), devices=8)
    assert remat.activations_bytes < base.activations_bytes
    # The method's FLOPs do not count the recompute; XLA's count does.
    assert remat.model_flops == base.model_flops > 0 and remat.flops > base.flops
    sharded = plan.plan(_config(data=1, fsdp=8), devices=8)
    assert 7.0 <= sharded.params_total_bytes / sharded.params_bytes <= 8.0
    lora = plan.plan(_config(method="lora"), devices=8)
    assert lora.optimizer_bytes < 0.1 * base.optimizer_bytes
    # Does not fit: says by how much and names the levers, remat first.
    tight = dataclasses.replace(base, memory_bytes=1024, topology="tiny")
    tight.levers = plan.levers(_config(), tight)
    text = tight.summary()
    assert tight.fits is False and "does NOT fit" in text and "over" in text
    assert "model.remat=full" in tight.levers[0] and "mesh.fsdp=-1" in text


def test_a_topology_with_another_device_count_is_planned_in_a_subprocess():
    h100 = plan.plan(_config(data=1, fsdp=-1), topology="h100")
    assert h100.devices == 1 and h100.fits is True and h100.topology == "h100"
    with pytest.raises(errors.ConfigError, match="--topology='v9'"):
        plan.plan(_config(), topology="v9")


def test_cli_plan_refuses_a_bad_mesh_in_one_line(capsys):
    assert cli.main(["plan", "--mesh=2,4"]) == 2
    assert "--mesh='2,4' must be three sizes" in capsys.readouterr().err


def test_param_bytes_count_nf4_values_packed_as_xla_stores_them():
    import jax
    import jax.numpy as jnp
    f = jax.jit(lambda x: x.astype(jnp.float32).sum())
    for dtype in (jnp.uint4, jnp.int8, jnp.bfloat16, jnp.float8_e4m3fn, jnp.float32):
        arg = jax.ShapeDtypeStruct((4096 + 2,), dtype)
        xla = f.lower(arg).compile().memory_analysis().argument_size_in_bytes
        assert plan._total_bytes([arg]) == xla, dtype
