"""`ift-jax plan`: will a run fit a topology? The training step compiled ahead of time.

What this module owns: compiling a run's training step for a target topology
without any weights (abstract params, optimizer state and batch, each with the
sharding the run would give it) and reading, per device, what the compiled
executable needs:

- params / optimizer state bytes: the per-device shards of the trainable and
  frozen params and of the optimizer state (exact, from their shardings);
- activations and temporaries: the executable's `temp_size_in_bytes`
  (`compiled.memory_analysis()`); peak = arguments + outputs - donated + temps;
- FLOPs per step per device, two ways: `model_flops`, the method's training
  FLOPs (`model_setup.training_flops_per_token`, what MFU counts: no remat
  recompute) over the step's padded tokens; and `flops`, XLA's own count
  (`compiled.cost_analysis()`), which includes remat's recompute but counts a
  loop's body once, so under `model.scan_layers` it is one layer's, not the
  stack's;
- the compile time. The subprocess compiles with LLVM's cheapest optimization
  (`FAST_COMPILE_FLAGS`): the program is never run, and buffer assignment, which
  the bytes come from, happens before LLVM (same bytes, ~40% less compile time:
  FLAN-T5-small LoRA on 4 devices, 99 s -> 62 s).

Topologies (`TOPOLOGIES`) are device counts with a device memory. On a machine
with another device count the plan runs in a subprocess on that many fake CPU
devices (`--xla_force_host_platform_device_count`). CPU compilation is not the
TPU/GPU compiler: its temporaries are an estimate of the same program, and
numbers are for comparing levers (remat, scan, fsdp, methods), not a guarantee.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from ift_jax import config_checks, double_quant, errors, model_setup, partitioning, peft
from ift_jax import train_step
from ift_jax import param_trees as trees

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    devices: int
    memory_bytes: int  # Per device.


TOPOLOGIES = {
    "v4-8": Topology("v4-8", 4, 32 * GiB),
    "v4-32": Topology("v4-32", 16, 32 * GiB),
    "v5e-16": Topology("v5e-16", 16, 16 * GiB),
    "h100": Topology("h100", 1, 80 * 10 ** 9),
    "h200": Topology("h200", 1, 141 * 10 ** 9),
}


@dataclasses.dataclass
class Plan:
    """Per-device bytes and FLOPs of one compiled training step."""

    devices: int
    mesh: dict
    params_bytes: int  # Trainable + frozen shards.
    params_total_bytes: int  # All params, unsharded.
    trainable_bytes: int
    frozen_bytes: int
    optimizer_bytes: int
    activations_bytes: int  # Temporaries of the step (activations, gradients, ...).
    peak_bytes: int
    flops: float  # XLA's count: a scanned layer stack's body once.
    compile_s: float
    model_flops: float = 0.0  # The method's training FLOPs (as MFU counts them).
    scanned: bool = False  # model.scan_layers: `flops` is one layer's.
    memory_bytes: Optional[int] = None
    topology: str = ""
    levers: list = dataclasses.field(default_factory=list)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.memory_bytes is None else self.peak_bytes <= self.memory_bytes

    def summary(self) -> str:
        gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        lines = [f"devices {self.devices} ({self.topology or 'given'}), mesh "
                 + " ".join(f"{k}={v}" for k, v in self.mesh.items()),
                 f"per device: params {gib(self.params_bytes)} (trainable "
                 f"{gib(self.trainable_bytes)}, frozen {gib(self.frozen_bytes)}), optimizer "
                 f"state {gib(self.optimizer_bytes)}, activations+temporaries "
                 f"{gib(self.activations_bytes)}, peak {gib(self.peak_bytes)}",
                 f"FLOPs per step per device {self.model_flops:.4g} (model), "
                 f"{self.flops:.4g} (XLA's count{', one scanned layer' if self.scanned else ''}"
                 f"); compile {self.compile_s:.1f} s"]
        if self.memory_bytes is not None:
            if self.fits:
                lines.append(f"fits: {gib(self.peak_bytes)} of {gib(self.memory_bytes)}")
            else:
                lines.append(f"does NOT fit: {gib(self.peak_bytes - self.memory_bytes)} over "
                             f"{gib(self.memory_bytes)}; levers: {'; '.join(self.levers)}")
        return "\n".join(lines)


def _bytes(shape: tuple[int, ...], dtype: Any) -> int:
    """Bytes of an array as XLA stores it: sub-byte types (QLoRA's NF4 values, `uint4`)
    packed, two a byte, not numpy's one-byte itemsize."""
    dtype = jnp.dtype(dtype)
    bits = jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else 8 * dtype.itemsize
    return -(-math.prod(shape) * bits // 8)


def _shard_bytes(tree: Any) -> int:
    """Bytes of one device's shards of abstract arrays with shardings."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += _bytes(shape, x.dtype)
    return total


def _total_bytes(tree: Any) -> int:
    return sum(_bytes(x.shape, x.dtype) for x in jax.tree.leaves(tree))


def _abstract(x: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _batch(config: ml_collections.ConfigDict, sharding: Any) -> dict:
    b, e, t = (config.train.batch_size, config.data.inputs_length,
               config.data.targets_length)
    shapes = {"encoder_input_tokens": e, "decoder_input_tokens": t, "decoder_target_tokens": t}
    if config.data.pack:
        shapes.update(encoder_segment_ids=e, decoder_segment_ids=t, encoder_positions=e,
                      decoder_positions=t)
    return {k: jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=sharding)
            for k, n in shapes.items()}


def _frozen_abstract(setup, frozen: Any, shardings: Any) -> Any:
    dtype = model_setup.frozen_dtype(setup)

    def cast(x, sharding):
        if not trees.is_quantized(x) and jnp.issubdtype(x.dtype, jnp.floating):
            return _abstract(jax.ShapeDtypeStruct(x.shape, dtype), sharding)
        return _quantized_abstract(x, sharding, dtype)
    return jax.tree.map(cast, frozen, shardings, is_leaf=trees.is_quantized)


def _quantized_abstract(x: Any, sharding: Any, dtype: Any) -> Any:
    """QLoRA's NF4 values and their scales. A run quantizes its base in the frozen dtype
    (`peft.init_adapters`), so plain scales are in that dtype, although the model's init
    (which made `x`) quantized kernels cast to the compute dtype; double-quantized scales
    (FP8 codes, fp32 steps) keep theirs but for the mean, in the scales' dtype."""
    x = jax.tree.map(_abstract, x, sharding)
    scale = x.array.scale
    if double_quant.is_double_quantized(x):
        return x.replace(array=x.array.replace(scale=scale.replace(mean=_in(scale.mean, dtype))))
    return x.replace(array=x.array.replace(scale=_in(scale, dtype)))


def _in(x: jax.ShapeDtypeStruct, dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)


def compile_step(config: ml_collections.ConfigDict, mesh_sizes: Optional[dict] = None
                 ) -> Plan:
    """Compiles `config`'s training step on this process's devices; allocates no weights.

    `mesh_sizes` (`{"data": d, "fsdp": f, "tensor": t}`) replaces `config.mesh`."""
    if mesh_sizes:
        config = config.copy_and_resolve_references()
        for axis, size in mesh_sizes.items():
            config.mesh[axis] = size
    config_checks.validate_for_devices(config, jax.device_count())
    sizes = config_checks.resolve_mesh(config_checks.mesh_sizes(config), jax.device_count())
    setup = model_setup.build(config)
    mesh = partitioning.make_mesh(sizes)
    enc = jnp.ones((1, config.data.inputs_length), jnp.int32)
    dec = jnp.ones((1, config.data.targets_length), jnp.int32)
    params, shardings = partitioning.abstract_init(
        lambda rng: setup.model.init(rng, enc, dec), jax.random.key(0), mesh)
    params, shardings = params["params"], shardings["params"]
    mask = setup.trainable_mask(params)
    trainable, frozen = peft.split_params(params, mask)
    trainable_sh, frozen_sh = peft.split_params(shardings, mask)
    trainable = jax.tree.map(lambda x, sh: _abstract(model_setup.fp32_master(x), sh),
                             trainable, trainable_sh)
    frozen = _frozen_abstract(setup, frozen, frozen_sh)
    with partitioning.mesh_context(mesh):
        opt_sh = jax.jit(setup.optimizer.init).lower(trainable).compile().output_shardings
    opt_sh = model_setup.optimizer_shardings(setup, opt_sh, mesh)  # The run's own placement.
    opt_state = jax.tree.map(_abstract, jax.eval_shape(setup.optimizer.init, trainable), opt_sh)
    state_sh = model_setup.TrainState(partitioning.replicated(mesh), trainable_sh, opt_sh)
    state = model_setup.TrainState(
        jax.ShapeDtypeStruct((), jnp.int32, sharding=partitioning.replicated(mesh)),
        trainable, opt_state)
    batch_sharding = partitioning.batch_sharding(mesh)
    step = train_step.jit_train_step(setup, model_setup.Shardings(state_sh, frozen_sh),
                                     batch_sharding)
    start = time.perf_counter()
    with partitioning.mesh_context(mesh):
        compiled = step.lower(state, frozen, _batch(config, batch_sharding),
                              jax.random.key(0)).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    trainable_b, frozen_b = _shard_bytes(trainable), _shard_bytes(frozen)
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    return Plan(devices=jax.device_count(), mesh=sizes, params_bytes=trainable_b + frozen_b,
                params_total_bytes=_total_bytes(trainable) + _total_bytes(frozen),
                trainable_bytes=trainable_b, frozen_bytes=frozen_b,
                optimizer_bytes=_shard_bytes(opt_state),
                activations_bytes=int(memory.temp_size_in_bytes), peak_bytes=int(peak),
                flops=float(cost.get("flops", 0.0)), compile_s=compile_s,
                model_flops=setup.flops_per_token * config.train.batch_size
                * (config.data.inputs_length + config.data.targets_length) / jax.device_count(),
                scanned=bool(config.model.get("scan_layers", False)))


def levers(config: ml_collections.ConfigDict, p: Plan) -> list[str]:
    """What would lower the peak, largest share first."""
    found = []
    if config.model.get("remat", "none") == "none":
        found.append((p.activations_bytes, f"--config.model.remat=full (activations+temporaries "
                                           f"{p.activations_bytes / GiB:.2f} GiB)"))
    if p.mesh.get("fsdp", 1) < p.devices:
        found.append((p.params_bytes + p.optimizer_bytes,
                      "--config.mesh.fsdp=-1 --config.mesh.data=1 (shard params and "
                      "optimizer state over every device)"))
    method = config.peft.method
    if method == "full":
        found.append((p.optimizer_bytes + p.trainable_bytes,
                      "--config.peft.method=lora or qlora (no optimizer state for the base)"))
    elif method != "qlora" and p.frozen_bytes:
        if config.peft.get("frozen_dtype", "float32") == "float32":
            found.append((p.frozen_bytes / 2, "--config.peft.frozen_dtype=bfloat16"))
        if method == "lora":
            found.append((p.frozen_bytes / 2, "--config.peft.method=qlora (NF4 base kernels)"))
    found.append((0, "a smaller --config.train.batch_size or more "
                     "--config.train.num_microbatches"))
    return [text for _, text in sorted(found, key=lambda f: -f[0])]


def plan(config: ml_collections.ConfigDict, *, devices: Optional[int] = None,
         topology: Optional[str] = None, mesh_sizes: Optional[dict] = None,
         memory_bytes: Optional[int] = None) -> Plan:
    """The plan of `config` on `topology` (or `devices` fake devices with `memory_bytes`
    each): compiled here when this process has that many devices, else in a subprocess
    with that many fake CPU ones."""
    top = None if memory_bytes is None else Topology("", devices or 0, memory_bytes)
    if topology is not None:
        if topology not in TOPOLOGIES:
            raise errors.ConfigError(f"--topology={topology!r} is not one of "
                                     f"{', '.join(TOPOLOGIES)}; or give --devices=N")
        top = TOPOLOGIES[topology]
        devices = top.devices
    devices = devices or jax.device_count()
    if top is not None and not top.devices:
        top = dataclasses.replace(top, devices=devices)
    if devices == jax.device_count():
        result = compile_step(config, mesh_sizes)
    else:
        result = _in_subprocess(config, devices, mesh_sizes)
    if top is not None:
        result.topology, result.memory_bytes = top.name, top.memory_bytes
        if not result.fits:
            result.levers = levers(config, result)
    return result


FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_llvm_disable_expensive_passes=true")


def subprocess_env(devices: int) -> dict:
    """The environment of a planning process: `devices` fake CPU devices, fast compiles."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if "host_platform_device_count" not in f and f not in FAST_COMPILE_FLAGS]
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
        [*flags, *FAST_COMPILE_FLAGS, f"--xla_force_host_platform_device_count={devices}"]))


def _in_subprocess(config: ml_collections.ConfigDict, devices: int,
                   mesh_sizes: Optional[dict]) -> Plan:
    env = subprocess_env(devices)
    request = json.dumps({"config": config.to_dict(), "mesh": mesh_sizes})
    done = subprocess.run([sys.executable, "-m", "ift_jax.plan"], input=request, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise errors.ConfigError(f"planning on {devices} fake devices failed: {tail}")
    return Plan(**json.loads(done.stdout.strip().splitlines()[-1]))


def _main() -> None:
    """Subprocess side of `_in_subprocess`: `{"config": ..., "mesh": ...}` as JSON in, a
    Plan as one JSON line out; `{"configs": [...], ...}` gives one line per config, each
    as soon as it is compiled (`{"error": ...}` for one that fails)."""
    request = json.loads(sys.stdin.read())
    for config in request.get("configs", [request.get("config")]):
        try:
            result = dataclasses.asdict(compile_step(ml_collections.ConfigDict(config),
                                                     request["mesh"]))
        except errors.UserError as e:
            if "configs" not in request:
                raise
            result = {"error": str(e)}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _main()
