"""T5Gemma under the house rules table on 8 fake CPU devices (fsdp 2 x tensor 4): KV
heads shard over `tensor` where they divide it and are replicated where they do not
(one KV head), and the sharded forward and gradients equal the single-device ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ift_jax import partitioning
from ift_jax.models import t5gemma, t5gemma_config

MESH = {"data": 1, "fsdp": 2, "tensor": 4}


def _config(variant, kv_heads):
    config = t5gemma_config.get_config(f"{variant}-tiny")
    stack = config.encoder.replace(num_kv_heads=kv_heads)
    return config.replace(encoder=stack, decoder=stack)


def _batch(config):
    rng = np.random.default_rng(0)
    enc = rng.integers(3, config.vocab_size, (8, 12)).astype(np.int32)
    targets = rng.integers(3, config.vocab_size, (8, 6)).astype(np.int32)
    enc[1, 7:], targets[2, 4:] = 0, 0
    return enc, np.pad(targets[:, :-1], ((0, 0), (1, 0))), targets


@pytest.fixture(scope="module", params=[("t5gemma", 1), ("t5gemma", 4), ("t5gemma2", 1)],
                ids=["t5gemma-1kv", "t5gemma-4kv", "t5gemma2-1kv"])
def sharded(request):
    config = _config(*request.param)
    mesh = partitioning.make_mesh(MESH)
    model = t5gemma.Transformer(config)
    enc, dec = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), jnp.int32)
    variables, shardings = partitioning.sharded_init(
        lambda rng: model.init(rng, enc, dec), jax.random.key(0), mesh)
    return config, mesh, variables["params"], shardings["params"]


def test_kv_heads_shard_where_they_divide_the_tensor_axis(sharded):
    config, _, params, _ = sharded
    attention = params["encoder"]["layers_0"]["attention"]
    assert attention["query"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    kv_spec = P("fsdp", "tensor" if config.encoder.num_kv_heads % 4 == 0 else None, None)
    assert attention["key"]["kernel"].sharding.spec == kv_spec
    assert attention["value"]["kernel"].sharding.spec == kv_spec
    assert params["token_embedder"]["embedding"].sharding.spec == P("tensor", "fsdp")


def _loss(model, params, enc, dec, targets):
    logits = model.apply({"params": params}, enc, dec, targets)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    return (nll * (targets > 0)).sum() / (targets > 0).sum()


def test_sharded_forward_and_gradients_equal_single_device(sharded):
    config, mesh, params, param_shardings = sharded
    model = t5gemma.Transformer(config)
    enc, dec, targets = _batch(config)
    single_loss, single_grads = jax.value_and_grad(_loss, argnums=1)(
        model, jax.device_get(params), enc, dec, targets)
    batch = partitioning.batch_sharding(mesh)
    step = jax.jit(lambda p, e, d, t: jax.value_and_grad(_loss, argnums=1)(model, p, e, d, t),
                   in_shardings=(param_shardings, batch, batch, batch))
    with partitioning.mesh_context(mesh):
        loss, grads = step(params, enc, dec, targets)
    np.testing.assert_allclose(float(loss), float(single_loss), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(grads), single_grads)
