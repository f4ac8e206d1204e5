"""From a run config to a ready model: architecture, method, params, optimizer, data.

Reads the ConfigDict in one place (with `runs` and `train.train_and_evaluate`)
and hands plain objects to the rest: a `Setup` (model, trainable partition,
apply functions, optimizer) and the *initialized* `(state, frozen)` on a mesh.

This module only initializes; it never reads a checkpoint. Where a run's
weights come from (resume, `init_from`, scratch) is decided by `ift_jax.runs`,
which loads an `init_from` base and hands it to `build`, and restores
checkpoints into the shapes `initialize` gives.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import os
from typing import Any, Callable, Iterator, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from ift_jax import (errors, fileio, lora, model_info, optim, param_trees, partitioning, peft,
                     scan_layout)
from ift_jax.models import additions, t5

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # The trainable subtree only.
    opt_state: Any


def merge(trainable: Any, frozen: Any) -> dict:
    """Full params from the trainable and frozen partitions (`peft.merge_params`)."""
    return peft.merge_params(trainable, frozen)


# ----------------------------------------------------------------------------
# The setup.


def t5_config(model_cfg: ml_collections.ConfigDict) -> t5.T5Config:
    """`T5Config` from `config.model`: a preset plus field overrides."""
    values = dict(model_cfg)
    preset = values.pop("preset", "tiny")
    if "dtype" in values:
        values["dtype"] = _DTYPES[values["dtype"]]
    return t5.get_config(preset, **values)


@dataclasses.dataclass
class Setup:
    """Everything the loop needs, built from the config."""

    config: ml_collections.ConfigDict
    t5_config: t5.T5Config
    model: nn.Module
    method: str
    optimizer_config: optim.OptimizerConfig
    optimizer: Any
    init_params: Optional[dict] = None  # Host arrays of the `init_from` base model.
    eval_model: Optional[nn.Module] = None  # Same params; LoRA dropout off.
    method_config: Optional[peft.MethodConfig] = None  # The method's settings.

    @property
    def prompt_config(self) -> Optional[peft.PromptConfig]:
        return self.method_config.prompt if self.method_config else None

    @property
    def fingerprint(self) -> dict:
        c = self.t5_config
        layout = {"model.scan_layers": True} if c.scan_layers else {}  # Params stacked.
        return {"architecture": _architecture(c),
                "method": self.method,
                "trainable_regex": self.config.peft.trainable_regex or "", **layout}

    def checkpoint_meta(self) -> dict:
        return {"fingerprint": self.fingerprint, "init_from": self.config.init_from or ""}

    @functools.cached_property
    def flops_per_token(self) -> float:
        """`training_flops_per_token` of this method at the configured lengths (for MFU)."""
        params = peft.abstract_params(self.model)
        return training_flops_per_token(self.t5_config, self.config.data.inputs_length,
                                        self.config.data.targets_length, params,
                                        self.trainable_mask(params))

    def learning_rate(self, step: int) -> float:
        return optim.learning_rate_at(self.optimizer_config, step)

    def trainable_mask(self, params: Any) -> Any:
        return peft.trainable_mask(params, self.method,
                                   self.config.peft.trainable_regex or None)

    def train_apply(self, params: Any, batch: dict, rng: Optional[jax.Array]) -> jax.Array:
        """Logits of the training model; dropout on when `rng` is given."""
        rngs = {"dropout": rng} if rng is not None else {}
        return self.model.apply(
            {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            batch["decoder_target_tokens"], batch.get("encoder_segment_ids"),
            batch.get("decoder_segment_ids"), batch.get("encoder_positions"),
            batch.get("decoder_positions"), enable_dropout=rng is not None, rngs=rngs)


# Fields that change neither the function nor the checkpoints' params (the layout of
# `scan_layers` is a fingerprint entry of its own).
_NOT_ARCHITECTURE = ("dtype", "dropout_rate", "remat", "scan_layers")


def _architecture(c: t5.T5Config) -> str:
    """`repr` of `c` as it was before `remat` / `scan_layers` existed (fp32, no dropout),
    so checkpoints written before them still match."""
    c = c.replace(dtype=jnp.float32, dropout_rate=0.0)
    fields = ", ".join(f"{f.name}={getattr(c, f.name)!r}" for f in dataclasses.fields(c)
                       if f.name not in _NOT_ARCHITECTURE[2:])
    return f"{type(c).__qualname__}({fields})"


def optimizer_config(config: ml_collections.ConfigDict) -> optim.OptimizerConfig:
    o = config.optimizer
    schedule = optim.ScheduleConfig(
        name=o.schedule, base=o.learning_rate,
        warmup_steps=0 if o.schedule == "constant" else o.warmup_steps,
        total_steps=config.train.steps if o.schedule in ("cosine", "linear_decay") else None,
        end_value=o.end_learning_rate)
    return optim.OptimizerConfig(
        name=o.name, schedule=schedule, weight_decay=o.weight_decay,
        grad_clip_norm=o.grad_clip_norm or None,
        multiply_by_parameter_scale=o.multiply_by_parameter_scale)


def training_flops_per_token(c: t5.T5Config, inputs_length: int, targets_length: int,
                             params: Any = None, trainable: Any = None) -> float:
    """Training FLOPs executed per input+target token (forward + backward).

    A matmul weight W running over P_W positions of an example costs 2·P_W·|W|
    FLOPs forward, 2·P_W·|W| for its input's gradient and, only if W trains,
    2·P_W·|W| for its own gradient. Per example, with E = inputs_length +
    prompt_length encoder positions and T = targets_length decoder positions:

        F = Σ_W P_W·|W|·(4 + 2·[W trains])
            + 12·d_inner·(n_enc·E² + n_dec·T·(T + E))
        training_flops_per_token = F / (inputs_length + targets_length)

    The weights W are every `kernel` (P_W = E in the encoder and for the
    cross-attention key/value, which project the encoder output; T for the rest
    of the decoder and the logits), LoRA's `kernel_lora_a [in, r]` and
    `kernel_lora_b [r, out]` beside its kernel, and the token embedding when it
    is also the logits projection (tied, T5 v1.0). The last term is attention's
    score and value products (activations on both sides: 6 FLOPs per
    multiply-add, whatever trains). So, with N = Σ P_W·|W| / (inputs + targets)
    the matmul weights a token passes through:

    - full fine-tuning: 6·N (+ attention);
    - LoRA / QLoRA: the base kernels are frozen, 4·N, plus 6·r·(in + out) per
      position of each adapted kernel (QLoRA's matmuls run on the dequantized
      kernels);
    - prompt tuning: 4·N, the encoder over prompt_length more positions;
    - bottleneck adapters: 4·N plus 6·(2·d_model·width) per adapted sublayer
      position (their down and up kernels are matmuls that train);
    - IA3: 4·N (its scales are elementwise); DoRA as LoRA (its norm is per
      step, not per token);
    - prefix tuning: 4·N, and each attention block with prefixes attends to
      prefix_length more keys (attention term); its reparameterization MLP
      runs once per step, not per token, and is not counted.

    Not counted: elementwise work, softmax, norms, the relative-position bias,
    QLoRA dequantization; counted although XLA may skip it: the input gradient
    of the lowest layers when nothing below them trains. Positions are the
    padded lengths while the trainer's tokens/s counts non-padding tokens, so
    with padding `mfu` is the share of the peak spent on real tokens.

    Args:
      params: the model's param tree (abstract, boxed or not; a prompt's
        length is read from `prompt/embedding`); default the plain T5 of `c`.
      trainable: `peft.trainable_mask` of `params`; default every param.
    """
    if params is None:
        params = t5.abstract_variables(c)["params"]
    flat = traverse_util.flatten_dict(params)
    train = traverse_util.flatten_dict(trainable) if trainable is not None else {}
    prompt = flat.get(peft.PROMPT_PATH)
    enc_len = inputs_length + (peft.count_params(prompt) // c.d_model if prompt is not None
                               else 0)
    total = 0.0
    for key, leaf in flat.items():
        positions = _matmul_positions(c, key, enc_len, targets_length)
        if positions:
            trains = train.get(key, trainable is None)
            total += positions * peft.count_params(leaf) * (6 if trains else 4)
    inner = c.num_heads * c.d_kv
    pre = _prefix_keys(c, flat)  # Prefix tuning's extra keys per attention block.
    total += 12 * inner * (c.num_layers * enc_len * (enc_len + pre["encoder"])
                           + c.num_decoder_layers * targets_length
                           * (targets_length + pre["decoder"] + enc_len + pre["cross"]))
    return total / (inputs_length + targets_length)


def _prefix_keys(c: t5.T5Config, flat: dict) -> dict[str, int]:
    """Prefix keys each encoder self-, decoder self- and cross-attention block attends to
    (the placement follows from the table's slot count, see `additions.prefix_slots`)."""
    keys = dict.fromkeys(("encoder", "decoder", "cross"), 0)
    table = flat.get(("prefix", "key_values"))
    if table is None and ("prefix", "embedding") in flat:
        length = peft.count_params(flat[("prefix", "embedding")]) // c.d_model
        slots = peft.count_params(flat[("prefix", "mlp_out_bias")]) // (c.num_heads * c.d_kv)
    elif table is not None:
        length, slots = param_trees.unbox(table).shape[:2]
    else:
        return keys
    all_slots, _ = additions.prefix_slots(c.num_layers, c.num_decoder_layers, "all")
    blocks = ("encoder", "decoder", "cross") if slots == all_slots else ("decoder",)
    return {**keys, **dict.fromkeys(blocks, length)}


def _matmul_positions(c: t5.T5Config, key: tuple, encoder: int, decoder: int) -> int:
    """Positions per example the matmul weight at `key` runs over; 0: not a matmul."""
    if key == ("token_embedder", "embedding"):
        return decoder if c.tie_word_embeddings else 0  # Else a gather.
    if key[-1] not in ("kernel", *peft.LORA_LEAVES):
        return 0
    if key[0] == "encoder" or (key[-3] == "encoder_decoder_attention"
                               and key[-2] in ("key", "value")):
        return encoder
    return decoder


def build(config: ml_collections.ConfigDict,
          base: Optional[tuple[t5.T5Config, dict]] = None) -> Setup:
    """Model, method and optimizer from the config (no params yet).

    Args:
      base: `(architecture, host params)` of `config.init_from`, loaded by
        `runs.load_base` (this module reads no checkpoint). Its architecture
        replaces `config.model`'s, keeping this run's dtype and dropout.
    """
    arch = t5_config(config.model)
    init_params = None
    if config.init_from and base is None:
        raise ValueError(f"init_from {config.init_from!r} is set but its weights were not "
                         f"loaded: build the setup with ift_jax.runs.build_setup(config)")
    if base is not None:
        loaded, init_params = base
        arch = loaded.replace(dtype=arch.dtype, dropout_rate=arch.dropout_rate,
                              remat=arch.remat, scan_layers=arch.scan_layers)
        # Bases come unrolled (HF, t5x) or from a run of either layout: convert.
        init_params = scan_layout.to_layout(init_params, arch.scan_layers)
    method = config.peft.method
    method_cfg = method_config(config.peft, method, functools.partial(vocabulary_spec, config))
    model, eval_model = peft.build_models(arch, method_cfg)
    opt_cfg = optimizer_config(config)
    return Setup(config, arch, model, method, opt_cfg, optim.make_optimizer(opt_cfg),
                 init_params, eval_model, method_cfg)


def lora_config(peft_cfg: ml_collections.ConfigDict, quantize: bool) -> peft.LoraConfig:
    return peft.LoraConfig(
        rank=peft_cfg.lora_rank, alpha=peft_cfg.lora_alpha, dropout=peft_cfg.lora_dropout,
        target_regex=lora.target_regex(peft_cfg.lora_targets), quantize=quantize,
        tile_size=peft_cfg.qlora_tile_size,
        double_quant=quantize and bool(peft_cfg.get("qlora_double_quant", False)),
        use_rslora=bool(peft_cfg.get("lora_use_rslora", False)),
        use_dora=bool(peft_cfg.get("lora_use_dora", False)))


def prompt_config(peft_cfg: ml_collections.ConfigDict,
                  vocabulary: Optional[Callable[[], str]] = None) -> peft.PromptConfig:
    """`peft.prompt_*` as a PromptConfig; `prompt_init=text` tokenizes `prompt_init_text`
    with the run's vocabulary (`vocabulary()` gives its spec), unless `prompt_init_ids`
    gives the ids themselves."""
    ids: tuple[int, ...] = ()
    if peft_cfg.prompt_init == "text":
        given = str(peft_cfg.get("prompt_init_ids", "") or "").split()
        ids = tuple(int(i) for i in given) or _tokenized(peft_cfg.prompt_init_text, vocabulary)
    return peft.PromptConfig(length=peft_cfg.prompt_length, init=peft_cfg.prompt_init,
                             init_token_ids=ids)


def _tokenized(text: str, vocabulary: Optional[Callable[[], str]]) -> tuple[int, ...]:
    from ift_jax.data import vocabularies  # seqio (TensorFlow): only when a text needs it.
    if not text:
        return ()
    if vocabulary is None:
        raise peft.PeftError("peft.prompt_init=text needs the run's vocabulary to tokenize "
                             "peft.prompt_init_text; or give peft.prompt_init_ids")
    return tuple(int(i) for i in vocabularies.make_vocabulary(vocabulary()).encode(text))


def method_config(peft_cfg: ml_collections.ConfigDict, method: str,
                  vocabulary: Optional[Callable[[], str]] = None) -> peft.MethodConfig:
    """The `peft.MethodConfig` of `method` from the `peft.*` keys."""
    get = peft_cfg.get
    settings = {
        "lora": lambda: dict(lora=lora_config(peft_cfg, quantize=False)),
        "qlora": lambda: dict(lora=lora_config(peft_cfg, quantize=True)),
        "prompt": lambda: dict(prompt=prompt_config(peft_cfg, vocabulary)),
        "houlsby": lambda: dict(adapter=_adapter_config(peft_cfg)),
        "pfeiffer": lambda: dict(adapter=_adapter_config(peft_cfg)),
        "ia3": lambda: dict(ia3=peft.IA3Config(tuple(
            t.strip() for t in str(get("ia3_targets", "key,value,wo")).split(",") if t.strip()))),
        "prefix": lambda: dict(prefix=peft.PrefixConfig(
            get("prefix_length", 20), get("prefix_placement", "all"), get("prefix_hidden", 0))),
    }
    if method not in peft.METHODS:
        raise peft.PeftError(f"peft.method {method!r}; methods: {', '.join(peft.METHODS)}")
    return peft.MethodConfig(method, trainable_regex=peft_cfg.trainable_regex or None,
                             **settings.get(method, dict)())


def _adapter_config(peft_cfg: ml_collections.ConfigDict) -> peft.AdapterConfig:
    return peft.AdapterConfig(width=peft_cfg.get("adapter_width", 64),
                              activation=peft_cfg.get("adapter_activation", "relu"))


# ----------------------------------------------------------------------------
# Params and state on the mesh.


@dataclasses.dataclass
class Shardings:
    state: Any
    frozen: Any


def _dummy(config) -> tuple[jax.Array, jax.Array]:
    return (jnp.ones((1, config.data.inputs_length), jnp.int32),
            jnp.ones((1, config.data.targets_length), jnp.int32))


def release_init_params(setup: Setup) -> None:
    """Drops the host copy of the `init_from` weights (on the devices by now) and
    hands the freed memory back to the OS. glibc keeps the freed blocks of a
    multi-GB load in its arenas otherwise: T5 base LoRA held 2.85 GiB of RSS
    after the drop, 1.28 GiB after the trim (0.96 GiB of it weights)."""
    setup.init_params = None
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # Not glibc (macOS, musl): nothing to trim.
        pass


@dataclasses.dataclass
class Initialized:
    """The starting `(state, frozen)` of a setup on a mesh, and their shardings.

    With `restoring=True` the trainable `state` holds `jax.ShapeDtypeStruct`s
    (with shardings) for a checkpoint to fill, and no values were computed
    for it.
    """

    state: TrainState
    frozen: Any
    shardings: Shardings


def initialize(setup: Setup, mesh: jax.sharding.Mesh, *, restoring: bool = False
               ) -> Initialized:
    """The run's starting model on `mesh`: `init_from` weights, else seeded random ones.

    Frozen params always get values (PEFT checkpoints do not hold them); the
    trainable state gets values unless `restoring`. Random values are compiled
    only when something needs them: not for `init_from` PEFT runs (the base
    covers every frozen param), nor for full fine-tuning that restores.
    """
    enc, dec = _dummy(setup.config)
    init_fn = lambda rng: setup.model.init(rng, enc, dec)  # noqa: E731
    rng = jax.random.key(setup.config.train.seed)
    params, var_shardings = partitioning.abstract_init(init_fn, rng, mesh)
    params, param_shardings = params["params"], var_shardings["params"]
    mask = setup.trainable_mask(params)
    if not _base_covers(setup, params) and not (restoring and _all_trainable(mask)):
        params = partitioning.sharded_init(init_fn, rng, mesh)[0]["params"]
    if setup.config.init_from:
        params = _with_base(setup, params, param_shardings, mask)
    trainable, frozen = peft.split_params(params, mask)
    trainable = jax.tree.map(fp32_master, trainable)
    trainable_sh, frozen_sh = peft.split_params(param_shardings, mask)
    frozen = _cast_frozen_on_devices(frozen, frozen_dtype(setup), frozen_sh)
    trainable_abstract = jax.tree.map(_abstract, trainable, trainable_sh)
    with partitioning.mesh_context(mesh):
        init_optimizer = jax.jit(setup.optimizer.init).lower(trainable_abstract).compile()
    state_sh = TrainState(partitioning.replicated(mesh), trainable_sh,
                          optimizer_shardings(setup, init_optimizer.output_shardings, mesh))
    if restoring:
        state = TrainState(jnp.zeros((), jnp.int32), trainable_abstract,
                           jax.eval_shape(setup.optimizer.init, trainable_abstract))
        state = jax.tree.map(_abstract, state, state_sh)
    else:
        state = TrainState(jnp.zeros((), jnp.int32), trainable, init_optimizer(trainable))
        state = jax.device_put(state, state_sh)
    return Initialized(state, frozen, Shardings(state_sh, frozen_sh))


def fp32_master(x: Any) -> Any:
    """A trainable float leaf in float32 at least: the master weights the optimizer
    updates. qwix gives QLoRA's A and B the dtype of the kernel's scales, which is
    the compute dtype (bf16) when the model runs in it; every other method's
    trainable params are float32 already. `plan` applies it too, so it plans the
    state a run holds."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    if dtype == x.dtype:
        return x
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)


def _abstract(x: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _all_trainable(mask: Any) -> bool:
    return all(jax.tree.leaves(mask))


HOST_MEMORY = "pinned_host"


def optimizer_shardings(setup: Setup, compiled: Any, mesh: jax.sharding.Mesh) -> Any:
    """Where the optimizer state lives: the layout XLA gave `optimizer.init`'s outputs on
    this mesh (`_on_mesh`), in host memory when `optimizer.offload_state` (the step then
    moves it to the devices for the update and back: `train_step`)."""
    shardings = _on_mesh(compiled, mesh)
    if not setup.config.optimizer.get("offload_state", False):
        return shardings
    return jax.tree.map(lambda s: s.with_memory_kind(HOST_MEMORY), shardings)


def _on_mesh(shardings: Any, mesh: jax.sharding.Mesh) -> Any:
    """Optimizer-state leaves keep the layout XLA gave them on this mesh (param-shaped
    moments follow their params); anything else is replicated."""
    replicated = partitioning.replicated(mesh)

    def on_mesh(sharding):
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh:
            return sharding
        return replicated

    return jax.tree.map(on_mesh, shardings)


def _base_covers(setup: Setup, abstract_params: Any) -> bool:
    """Whether `init_from` gives every param a value, so no random init is needed.

    PEFT runs take the base weights from `init_from` and initialize only the
    adapters (`peft.init_adapters`); full fine-tuning overlays `init_from` on
    the model's params. Either way, random base weights would be thrown away,
    and compiling the random init costs more than a training step's compile
    (T5 small on CPU: ~14 s, one threefry stream per param).
    """
    if not setup.config.init_from:
        return False
    if setup.method != "full":
        return True
    loaded = traverse_util.flatten_dict(setup.init_params)
    return all(k in loaded for k in traverse_util.flatten_dict(abstract_params))


def _with_base(setup: Setup, params: Any, shardings: Any, mask: Any) -> Any:
    """The run's params with the `init_from` base weights (frozen params of PEFT runs
    come from here on every start, as checkpoints hold only the trainable part)."""
    if setup.method == "full":
        return _overlay(params, setup.init_params, shardings)
    return jax.device_put(init_adapters(setup, mask), shardings)


def init_adapters(setup: Setup, mask: Any = None) -> dict:
    """`peft.init_adapters` of the run's base: the adapters a scanned run starts
    with are those of the unrolled model, stacked (the same values either way).
    With `mask` (`trainable_mask`), frozen base leaves are cast to `peft.frozen_dtype`
    on the host first, so no float32 copy of them reaches a device."""
    rng = jax.random.key(setup.config.train.seed)
    base = setup.init_params
    if mask is not None:
        base = _cast_frozen_on_host(base, scan_layout.to_layout(
            param_trees.unbox(mask), scan_layout.is_scanned(base)), frozen_dtype(setup))
    if not setup.t5_config.scan_layers:
        return peft.init_adapters(setup.model, base, rng, setup.prompt_config)
    unrolled, _ = peft.build_models(setup.t5_config.replace(scan_layers=False),
                                    setup.method_config)
    base = scan_layout.to_layout(base, False)
    return scan_layout.stack(peft.init_adapters(unrolled, base, rng, setup.prompt_config))


def frozen_dtype(setup: Setup) -> Any:
    """`peft.frozen_dtype`: the dtype frozen float params are kept in on the devices."""
    return _DTYPES[setup.config.peft.get("frozen_dtype", "float32")]


def _castable(leaf: Any, dtype: Any) -> bool:
    """Float leaves not yet in `dtype`; QLoRA's quantized kernels keep their own form."""
    return (not param_trees.is_quantized(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating)
            and leaf.dtype != dtype)


def _cast_frozen_on_host(base: dict, mask: dict, dtype: Any) -> dict:
    flat, flat_mask = param_trees.flatten(base), param_trees.flatten(mask)
    return param_trees.unflatten({
        k: np.asarray(v).astype(dtype) if not flat_mask.get(k, True) and _castable(v, dtype)
        else v for k, v in flat.items()})


def _cast_frozen_on_devices(frozen: dict, dtype: Any, shardings: dict) -> dict:
    """Frozen params in `dtype` (the float32 arrays are donated, so freed)."""
    flat = param_trees.flatten(frozen)
    cast = {k: v for k, v in flat.items() if _castable(v, dtype)}
    if not cast:
        return frozen
    flat_sh = param_trees.flatten(shardings)
    done = jax.jit(lambda t: jax.tree.map(lambda x: x.astype(dtype), t),
                   out_shardings={k: flat_sh[k] for k in cast}, donate_argnums=0)(cast)
    return param_trees.unflatten({**flat, **done})


def _overlay(params: Any, loaded: dict, shardings: Any) -> Any:
    """Replaces params (arrays, or shapes when `loaded` covers them all) by `loaded`
    where paths match; shapes must agree."""
    flat = traverse_util.flatten_dict(params)
    flat_sh = traverse_util.flatten_dict(shardings)
    for path, value in traverse_util.flatten_dict(loaded).items():
        if path not in flat:
            raise errors.CheckpointError(f"init_from param {'/'.join(path)} does not exist in "
                                         f"this model")
        if tuple(flat[path].shape) != tuple(value.shape):
            raise errors.CheckpointError(f"init_from param {'/'.join(path)} has shape "
                                         f"{tuple(value.shape)}, the model expects "
                                         f"{tuple(flat[path].shape)}")
        flat[path] = jax.device_put(np.asarray(value, flat[path].dtype), flat_sh[path])
    return traverse_util.unflatten_dict(flat)


def write_model_info(workdir: str, setup: Setup, trainable: Any, frozen: Any) -> None:
    """`model-info.txt`: param table with logical axes, and counts per partition."""
    enc, dec = _dummy(setup.config)
    boxed = jax.eval_shape(lambda: setup.model.init(jax.random.key(0), enc, dec))["params"]
    counts = {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
              for name, tree in (("trainable", trainable), ("frozen", frozen))}
    total = counts["trainable"] + counts["frozen"]
    header = (f"# method: {setup.method}; T5Config: {setup.t5_config}\n"
              f"# params: total {total:,}; trainable {counts['trainable']:,} "
              f"({100 * counts['trainable'] / max(total, 1):.4f}%); "
              f"frozen {counts['frozen']:,}")
    with fileio.open(os.path.join(workdir, "model-info.txt"), "w") as f:
        f.write(model_info.format_model_info(boxed, header))


# ----------------------------------------------------------------------------
# Data.


def vocabulary_spec(config: ml_collections.ConfigDict) -> str:
    """`data.vocab`, or the `spiece.model` shipped in an HF `init_from` directory."""
    if config.data.vocab:
        return config.data.vocab
    spiece = os.path.join(config.init_from or "", "spiece.model")
    if config.init_from and os.path.exists(spiece):
        return spiece
    raise errors.ConfigError("data.vocab is empty and init_from has no spiece.model; set "
                             "--config.data.vocab to 'byte' or a SentencePiece .model path")


def prepare_data(config: ml_collections.ConfigDict) -> None:
    """Data directory, task cache and vocabulary of this run; registers the tasks."""
    from ift_jax.data import cache, sources, vocabularies
    if config.data.data_dir:
        sources.set_data_dir(config.data.data_dir)
    cache.set_cache_dir(config.data.get("cache_dir") or None)
    vocabularies.set_vocabulary(vocabulary_spec(config))
    import ift_jax.tasks  # noqa: F401  (registers tasks)


def train_batches(config: ml_collections.ConfigDict, start_step: int = 0,
                  workdir: Optional[str] = None) -> Iterator[dict[str, np.ndarray]]:
    """This host's share of each global training batch, continuing at `start_step`.

    `data.pipeline="seqio"`: SeqIO's tf.data pipeline, deterministic for a seed,
    so a resume computes and drops the `start_step` batches already consumed.
    `"indexed"`: an `indexed.IndexedStream`, whose position after `start_step`
    batches is read from the workdir (`positions`) when it was saved there.
    """
    from ift_jax.data import indexed, pipeline, positions
    prepare_data(config)

    hosts, index = jax.process_count(), jax.process_index()
    if config.train.batch_size % hosts:
        raise errors.ConfigError(f"train.batch_size {config.train.batch_size} is not divisible by "
                                 f"the {hosts} processes")
    local = config.train.batch_size // hosts
    whole = config.data.host_sharding == "global_batch"
    if config.data.host_sharding not in ("examples", "global_batch"):
        raise errors.ConfigError(f"data.host_sharding {config.data.host_sharding!r}; choose "
                                 f"'examples' or 'global_batch'")
    spec = pipeline.BatchSpec(
        config.data.mixture, "train", config.data.inputs_length, config.data.targets_length,
        batch_size=config.train.batch_size if whole else local, pack=config.data.pack,
        seed=config.data.seed, num_epochs=None)
    shard = None if whole else pipeline.host_shard_info()
    rows = slice(index * local, (index + 1) * local) if whole else None
    if config.data.get("pipeline", "seqio") == "indexed":
        stream = indexed.IndexedStream(indexed.load_tasks(spec, shard), spec, rows)
        positions.resume(stream, workdir or "", start_step, index, hosts)
        return stream
    dataset = pipeline.get_dataset(spec, shard)
    if start_step:
        dataset = dataset.skip(start_step)
    batches = dataset.as_numpy_iterator()
    if not whole:
        return batches
    return ({k: v[rows] for k, v in b.items()} for b in batches)
