"""Mesh construction, sharded init and sharded forward on 8 fake CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ift_jax import partitioning
from ift_jax.models import t5

CONFIG = t5.get_config("tiny", dropout_rate=0.0)


def test_make_mesh_fills_one_axis_with_remaining_devices():
    mesh = partitioning.make_mesh({"fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert partitioning.make_mesh([-1, 1, 1]).shape["data"] == 8


@pytest.mark.parametrize("sizes,message", [
    ({"fsdp": -1, "tensor": -1}, "at most one"),
    ({"fsdp": 3, "tensor": -1}, "cannot fill"),
    ({"fsdp": 2, "tensor": 2}, "needs 4 devices, 8 are available"),
    ({"model": 8}, "unknown mesh axes"),
])
def test_make_mesh_rejects_impossible_shapes(sizes, message):
    with pytest.raises(ValueError, match=message):
        partitioning.make_mesh(sizes)


def test_logical_rules_do_not_reuse_a_mesh_axis_within_one_array():
    # Embedding [vocab, embed] -> tensor, fsdp; attention kernel [embed, heads, kv].
    assert nn.logical_to_mesh_axes(("vocab", "embed"), partitioning.DEFAULT_RULES) == P(
        "tensor", "fsdp")
    assert nn.logical_to_mesh_axes(("embed", "heads", "kv"), partitioning.DEFAULT_RULES
                                   ) == P("fsdp", "tensor", None)
    assert nn.logical_to_mesh_axes(partitioning.BATCH_AXES, partitioning.DEFAULT_RULES
                                   ) == P(("data", "fsdp"), None)


def _init_fn(config):
    model = t5.Transformer(config)
    enc, dec = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), jnp.int32)
    return lambda rng: model.init(rng, enc, dec)


@pytest.fixture(scope="module")
def sharded():
    mesh = partitioning.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    variables, shardings = partitioning.sharded_init(_init_fn(CONFIG), jax.random.key(0), mesh)
    return mesh, variables["params"], shardings["params"]


def test_sharded_init_places_every_param_by_its_logical_axes(sharded):
    mesh, params, _ = sharded
    boxed = t5.abstract_variables(CONFIG, batch=2)["params"]
    expected = jax.tree.map(
        lambda b: nn.logical_to_mesh_axes(b.names, partitioning.DEFAULT_RULES), boxed,
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    flat_params = jax.tree_util.tree_leaves_with_path(params)
    flat_expected = jax.tree.leaves(expected, is_leaf=lambda x: isinstance(x, P))
    assert len(flat_params) == len(flat_expected)
    for (path, array), spec in zip(flat_params, flat_expected):
        name = jax.tree_util.keystr(path)
        assert array.sharding.mesh.shape == mesh.shape, name
        assert array.sharding.spec == spec, (name, array.sharding.spec, spec)
        shard = array.addressable_shards[0].data.shape
        for dim, axis in zip(range(array.ndim), tuple(spec) + (None,) * array.ndim):
            split = 1 if axis is None else mesh.shape[axis]
            assert shard[dim] == array.shape[dim] // split, (name, shard)
    # The attention query kernel really is split over fsdp (embed) and tensor (heads).
    query = params["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert query.addressable_shards[0].data.shape == (32, 1, 16)


def test_sharded_init_equals_unsharded_init(sharded):
    _, params, _ = sharded
    plain = nn.unbox(_init_fn(CONFIG)(jax.random.key(0))["params"])
    # Same random draws; jit may round the scaling differently in the last bit.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 params, plain)


def test_sharded_forward_equals_single_device(sharded):
    mesh, params, param_shardings = sharded
    rng = np.random.default_rng(0)
    enc = rng.integers(2, CONFIG.vocab_size, (8, 24))
    targets = rng.integers(2, CONFIG.vocab_size, (8, 12))
    dec = np.concatenate([np.zeros((8, 1), int), targets[:, :-1]], axis=1)
    model = t5.Transformer(CONFIG)
    single = model.apply({"params": jax.device_get(params)}, enc, dec, targets)

    batch_sharding = partitioning.batch_sharding(mesh)
    forward = jax.jit(lambda p, e, d, t: model.apply({"params": p}, e, d, t),
                      in_shardings=(param_shardings, batch_sharding, batch_sharding,
                                    batch_sharding))
    with partitioning.mesh_context(mesh):
        logits = forward(params, enc, dec, targets)
    # Activation constraints took effect: batch over data*fsdp, vocab over tensor.
    assert logits.addressable_shards[0].data.shape == (4, 12, CONFIG.vocab_size // 4)
    np.testing.assert_allclose(logits, single, rtol=1e-5, atol=1e-5)


def test_a_dimension_the_mesh_does_not_divide_is_replicated():
    mesh = partitioning.make_mesh({"fsdp": 8})
    boxed = {"scale": nn.Partitioned(jax.ShapeDtypeStruct((4, 16), jnp.float32),
                                     names=("embed", "mlp")),
             "kernel": nn.Partitioned(jax.ShapeDtypeStruct((16, 16), jnp.float32),
                                      names=("embed", "mlp"))}
    shardings = partitioning.logical_shardings(boxed, mesh)
    assert shardings["kernel"].spec == P("fsdp", "tensor")  # 16 rows over 8 devices
    assert shardings["scale"].spec == P(None, "tensor")  # 4 rows cannot be split 8 ways
