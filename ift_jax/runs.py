"""Where a run's weights come from, and reading a run back.

One home for "config + checkpoint at a step, on a given mesh", used by
training (start-up), evaluation, `predict`, `score`, `export` and the
benchmarks. It sits above `model_setup` (which only initializes) and
`checkpointing` (which only saves and restores trees), and below everything
that uses a model.

- `load_base(source)`: the weights of `init_from` (an HF T5 directory, an HF
  PEFT adapter merged into its base, a t5x checkpoint, or another ift_jax
  workdir, whose final model is read back merged); `check_init_from(source)`
  checks it from small files alone, before a run writes anything.
- `build_setup(config)`: `model_setup.build` with that base loaded;
  `as_trained(config, setup)`: the config with `model.*` as really trained
  when `init_from`'s architecture replaced it (what `config.json` records).
- `start(setup, mesh, ckpt)`: the training start-up order, logged as it
  happens: 1. resume from the newest readable checkpoint in the workdir (one
  that fails to restore and reads as damaged is set aside and the next one
  tried); 2. else `init_from`; 3. else from scratch — refused while damaged
  checkpoints were set aside and none is left (`--start_over` asks for it).
- `Run`: a finished (or running) run read back on a mesh: its config,
  setup, checkpoint steps, and full params at a step (step 0: the starting
  model), sharded as they are for training.
- `plain_params`: a plain `t5.Transformer` param tree (LoRA merged, QLoRA
  dequantized); `host_params`: every shard gathered to host numpy arrays.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ift_jax import errors
from ift_jax import (checkpointing, distributed, fileio, hf, model_setup, partitioning, peft,
                     peft_formats, run_lock, set_aside, t5x_checkpoint)
from ift_jax.data import sentencepiece_file
from ift_jax.models import t5


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote into its workdir."""
    path = os.path.join(workdir, "config.json")
    if not fileio.exists(path):
        raise errors.MissingError(f"{workdir} is not an ift_jax workdir: no config.json")
    with fileio.open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _is_hf_dir(path: str) -> bool:
    return fileio.exists(os.path.join(path, "config.json")) and not fileio.isdir(
        os.path.join(path, "checkpoints"))


def _is_adapter_dir(path: str) -> bool:
    return fileio.exists(os.path.join(path, peft_formats.ADAPTER_CONFIG)) and not _is_hf_dir(
        path)


# HF PEFT adapter types whose adapter merges into the base's weights.
_MERGEABLE_ADAPTERS = ("LORA", "IA3")


def _adapter_base(source: str) -> str:
    """The base model of an HF PEFT adapter directory (its `base_model_name_or_path`),
    checked: a local model, and an adapter that merges into it.

    Raises:
      CheckpointError: the adapter's config is unreadable, names no local base model, or
        is of a kind that does not merge (prompt or prefix tuning).
    """
    path = os.path.join(source, peft_formats.ADAPTER_CONFIG)
    try:
        with fileio.open(path) as f:
            adapter = json.load(f)
        kind, base = adapter.get("peft_type"), adapter.get("base_model_name_or_path")
    except (ValueError, AttributeError) as e:
        raise errors.CheckpointError(f"init_from {source!r}: cannot read {path} ({e})") from None
    if kind not in _MERGEABLE_ADAPTERS:
        raise errors.CheckpointError(
            f"init_from {source!r} is an HF PEFT {kind} adapter, which does not merge into its "
            f"base's weights (a soft prompt or prefix is extra input, not a weight); train "
            f"from its base (init_from={base}) or evaluate it with ift-jax predict --adapter")
    if not base or not fileio.exists(base):
        raise errors.CheckpointError(
            f"init_from {source!r} is an HF PEFT adapter whose base_model_name_or_path "
            f"{base!r} is not a local model; set it in {path} to the base model's folder")
    return base


def check_init_from(source: str) -> None:
    """What `load_base` will read, checked from its folder and small files alone (no
    weights), so a run that cannot start from it is refused before anything is written.

    Raises:
      MissingError, CheckpointError: naming `source` and what is wrong.
    """
    if not fileio.exists(source):
        raise errors.MissingError(f"init_from {source!r}: no such file or directory")
    if _is_adapter_dir(source):
        check_init_from(_adapter_base(source))
    elif not (_is_hf_dir(source) or t5x_checkpoint.is_t5x_checkpoint(source)
              or fileio.isdir(os.path.join(source, "checkpoints"))):
        raise _unknown_init_from(source)


def _unknown_init_from(source: str) -> errors.CheckpointError:
    return errors.CheckpointError(
        f"init_from {source!r} is neither an HF T5 directory (config.json + weights), an HF "
        f"PEFT adapter (adapter_config.json), a t5x checkpoint, nor an ift_jax workdir with "
        f"checkpoints")


def _merged_adapter(source: str) -> tuple[t5.T5Config, dict]:
    """An HF PEFT adapter merged into its base: the model it computes, as plain T5."""
    config, base = load_base(_adapter_base(source))
    adapter = peft_formats.load_peft(source, config)
    merged = peft.merged_params(adapter.apply_to(base), adapter.method)
    logging.info("init_from %s: %s adapter merged into its base %s", source,
                 adapter.method.name, _adapter_base(source))
    return config, jax.tree.map(np.asarray, jax.device_get(merged))


def load_base(source: str) -> tuple[t5.T5Config, dict]:
    """`init_from`'s architecture and params as host arrays: an HF T5 directory, an HF
    PEFT adapter (merged into its base), a t5x checkpoint, or an ift_jax workdir (its
    latest checkpoint, merged).

    Raises:
      MissingError: `source` does not exist.
      CheckpointError: `source` is none of those, or cannot be read.
    """
    if not fileio.exists(source):
        raise errors.MissingError(f"init_from {source!r}: no such file or directory")
    if _is_hf_dir(source):
        return hf.load_t5(source)
    if _is_adapter_dir(source):
        return _merged_adapter(source)
    if t5x_checkpoint.is_t5x_checkpoint(source):
        return t5x_checkpoint.load_t5x(source)
    if fileio.isdir(os.path.join(source, "checkpoints")):
        run = Run.open(source, mesh=_one_device_mesh())
        try:
            params, step = run.params()
            logging.info("init_from %s step %d (%s)", source, step, run.setup.method)
            return run.setup.t5_config, host_params(plain_params(run.setup, params))
        finally:
            run.close()
    raise _unknown_init_from(source)


REPLACED = "model_replaced_by_init_from"  # config.json: what init_from's model replaced.
# T5Config fields `init_from` decides (this run's own: dtype, dropout_rate, remat, scan_layers).
ARCHITECTURE = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                "num_heads", "relative_attention_num_buckets",
                "relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj",
                "tie_word_embeddings", "scale_decoder_outputs")


def as_trained(config: ml_collections.ConfigDict,
               setup: model_setup.Setup) -> ml_collections.ConfigDict:
    """`config` as the run really trains it: where `init_from`'s architecture replaced
    what `config.model` asks for, `model.*` holds the architecture trained and
    `model_replaced_by_init_from` records `init_from` and the config's own values.
    Unchanged (the same object) when nothing was replaced."""
    asked = model_setup.t5_config(config.model)
    trained = setup.t5_config
    replaced = {f: getattr(asked, f) for f in ARCHITECTURE
                if getattr(asked, f) != getattr(trained, f)}
    if not config.init_from or not replaced:
        return config
    out = ml_collections.ConfigDict(config.to_dict())
    with out.unlocked():
        for field in replaced:
            out.model[field] = getattr(trained, field)
        out[REPLACED] = {"init_from": config.init_from, "config_values": replaced}
    return out


def build_setup(config: ml_collections.ConfigDict) -> model_setup.Setup:
    """`model_setup.build` with the `init_from` base (if any) loaded; the run's
    vocabulary must fit the model's embedding (`sentencepiece_file.check_fits`)."""
    base = load_base(config.init_from) if config.init_from else None
    setup = model_setup.build(config, base)
    try:
        spec = model_setup.vocabulary_spec(config)
    except errors.ConfigError:
        return setup  # No vocabulary: refused where one is needed, naming the key.
    sentencepiece_file.check_fits(spec, setup.t5_config.vocab_size)
    return setup


def restore(ckpt: checkpointing.Checkpointer, step: int, setup: model_setup.Setup,
            like: model_setup.TrainState) -> model_setup.TrainState:
    """The trainable state of checkpoint `step`, in the shapes and shardings of `like`."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    state, _ = ckpt.restore(step, abstract, setup.fingerprint)
    return state


def start(setup: model_setup.Setup, mesh: jax.sharding.Mesh,
          ckpt: checkpointing.Checkpointer) -> tuple[model_setup.Initialized, int]:
    """The training start-up: `(initialized state, start step)`.

    Order (docs/design.md, section 3): 1. resume from the newest readable checkpoint of the
    workdir; 2. else `init_from` (an HF T5 directory or another ift_jax
    workdir); 3. else from scratch with the seed.

    Call `ckpt.set_aside_damaged()` first. A checkpoint that still fails to
    restore is read in full; if that read fails too it is damaged: set aside,
    and the next newest is tried. Any other restore failure is raised as it is.

    Raises:
      NoReadableCheckpointError: damaged checkpoints were set aside and no readable
        one is left (starting from scratch would silently drop the run's progress).
    """
    restored = _restore_newest_readable(setup, mesh, ckpt)
    if restored is not None:
        return restored
    check_can_start_without_checkpoint(ckpt.workdir)
    init = model_setup.initialize(setup, mesh, restoring=False)
    if setup.config.init_from:
        logging.info("start-up: initialized from %s", setup.config.init_from)
    else:
        logging.info("start-up: from scratch (no checkpoint in the workdir, no init_from)")
    return init, 0


class NoReadableCheckpointError(errors.CheckpointError):
    """Every checkpoint of a run was damaged and set aside."""


def check_can_start_without_checkpoint(workdir: str) -> None:
    """Refuses to start a run from `init_from` or scratch while damaged checkpoints of
    it were set aside (`checkpoints_damaged/`) and no readable one is left."""
    damaged = distributed.agree(set_aside.damaged(workdir) if jax.process_index() == 0
                                else [])
    if damaged:
        raise NoReadableCheckpointError(
            f"{workdir} has no readable checkpoint left ({len(damaged)} damaged one(s) were "
            f"moved to {os.path.join(workdir, set_aside.DAMAGED)}: {', '.join(damaged)}); "
            f"to train again from init_from or scratch pass --start_over (the earlier run's "
            f"files are moved aside, not deleted)")


def _restore_newest_readable(setup: model_setup.Setup, mesh: jax.sharding.Mesh,
                             ckpt: checkpointing.Checkpointer
                             ) -> Optional[tuple[model_setup.Initialized, int]]:
    init = None
    while (latest := ckpt.latest_step()) is not None:
        init = init or model_setup.initialize(setup, mesh, restoring=True)
        failure: Optional[Exception] = None
        try:
            state = restore(ckpt, latest, setup, init.state)
        except checkpointing.CheckpointMismatchError:
            raise
        except Exception as e:  # Damage, or anything else: the full read tells.
            failure = e
        if not distributed.any_process(failure is not None):
            init.state = state
            logging.info("start-up: resumed from %s step %d", ckpt.directory, latest)
            return init, latest
        problem = ckpt.unreadable(latest)
        if problem is None:
            if failure is not None:
                raise failure
            raise errors.CheckpointError(f"restoring {ckpt.step_dir(latest)} failed on "
                                         f"another process; see its log")
        ckpt.move_aside(latest, f"restoring it failed: {problem}")
    return None


# ----------------------------------------------------------------------------
# Meshes for reading runs back.


def _one_device_mesh() -> jax.sharding.Mesh:
    return partitioning.make_mesh([1, 1, 1], jax.local_devices()[:1])


def parse_mesh(text: str) -> dict[str, int]:
    """`"1,4,2"` or `"data=1,fsdp=4,tensor=2"` -> mesh axis sizes.

    Raises:
      ValueError: the text is neither form.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if all("=" in p for p in parts):
            sizes = {k.strip(): int(v) for k, v in (p.split("=", 1) for p in parts)}
        else:
            sizes = dict(zip(partitioning.MESH_AXES, (int(p) for p in parts)))
            if len(parts) != len(partitioning.MESH_AXES):
                raise ValueError
    except ValueError:
        raise errors.ConfigError(f"--mesh={text!r}: give three sizes data,fsdp,tensor (e.g. 1,4,2; "
                                 f"-1 fills with the remaining devices) or data=1,fsdp=-1,tensor=2"
                                 ) from None
    return sizes


def run_mesh(mesh_config: Any, override: Optional[dict[str, int]] = None,
             devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
    """The mesh to read a run on: `override`, else the run's configured mesh, over
    `devices` (default: every device of this job, i.e. the local ones on one host).
    An override of fewer devices than there are uses the first ones.

    A configured mesh sized for another topology (say fsdp=32 from a pod) falls
    back to fsdp over all devices, keeping the tensor size where it divides.
    """
    devices = list(jax.devices() if devices is None else devices)
    if override:
        wanted = math.prod(override.get(a, 1) for a in partitioning.MESH_AXES)
        if wanted > 0 and wanted < len(devices):  # e.g. 1,1,1: evaluate on one device.
            devices = devices[:wanted]
        return partitioning.make_mesh(override, devices)
    sizes = {k: int(v) for k, v in dict(mesh_config or {}).items()}
    try:
        return partitioning.make_mesh(sizes, devices)
    except ValueError:
        tensor = sizes.get("tensor", 1)
        tensor = tensor if tensor > 0 and len(devices) % tensor == 0 else 1
        fallback = {"data": 1, "fsdp": -1, "tensor": tensor}
        logging.info("mesh %s does not fit %d devices; using %s", sizes, len(devices),
                     fallback)
        return partitioning.make_mesh(fallback, devices)


# ----------------------------------------------------------------------------
# A run read back.


class Run:
    """A run's config, setup and checkpoints, read on a mesh.

    Build with `Run.open(workdir)` (the run's own config) or
    `Run.from_config(config, workdir)` (a config not written to a workdir,
    e.g. `ift-jax eval --init_from=HF_DIR`). The setup and the frozen params
    are built once: reading several steps reloads only the checkpoint.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: Optional[str],
                 mesh: jax.sharding.Mesh, setup: Optional[model_setup.Setup] = None):
        self.config, self.workdir, self.mesh = config, workdir, mesh
        self.setup = setup or build_setup(config)
        self._ckpt = (checkpointing.Checkpointer(workdir, read_only=True)
                      if workdir and fileio.isdir(os.path.join(workdir, "checkpoints"))
                      else None)
        self._initialized: dict[bool, model_setup.Initialized] = {}

    @classmethod
    def open(cls, workdir: str, mesh: Optional[jax.sharding.Mesh] = None,
             mesh_override: Optional[dict[str, int]] = None) -> "Run":
        config = read_config(workdir)
        return cls(config, workdir, mesh or run_mesh(config.get("mesh"), mesh_override))

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, workdir: Optional[str] = None,
                    mesh: Optional[jax.sharding.Mesh] = None) -> "Run":
        return cls(config, workdir, mesh or run_mesh(config.get("mesh")))

    def steps(self) -> list[int]:
        """Checkpoint steps, oldest first (without those `check_checkpoints` found damaged)."""
        return self._ckpt.all_steps() if self._ckpt else []

    def check_checkpoints(self) -> dict[int, str]:
        """Damaged checkpoints, {step: problem} (cheap: `checkpoint_scan.problem`), each
        named in a warning and left out of `steps()`. They are moved to
        `checkpoints_damaged/` as training does, unless a live run holds the workdir
        (that run sets them aside at its next start) or the workdir is read-only."""
        if self._ckpt is None:
            return {}
        live = distributed.agree(jax.process_index() == 0
                                 and run_lock.live_holder(self.workdir) is not None)
        return self._ckpt.set_aside_damaged(move=not live)

    def _init(self, restoring: bool) -> model_setup.Initialized:
        if restoring not in self._initialized:
            self._initialized[restoring] = model_setup.initialize(self.setup, self.mesh,
                                                                  restoring=restoring)
        return self._initialized[restoring]

    def params(self, step: Optional[int] = None) -> tuple[dict, int]:
        """(full params on the mesh, step) of checkpoint `step` (default: the latest).

        Step 0 is the run's starting model (its `init_from`, or the seeded
        initialization); it needs no checkpoint.

        Raises:
          FileNotFoundError: the run has no checkpoints (and step 0 was not asked).
          ValueError: no checkpoint `step`.
        """
        steps = self.steps()
        if step is None:
            if not steps:
                raise errors.MissingError(f"{self.workdir} has no checkpoints")
            step = steps[-1]
        if step == 0:
            init = self._init(restoring=False)
            return peft.merge_params(init.state.params, init.frozen), 0
        if step not in steps:
            raise errors.CheckpointError(f"{self.workdir} has no checkpoint {step}; steps: {steps}")
        init = self._init(restoring=True)
        try:
            state = restore(self._ckpt, step, self.setup, init.state)
        except checkpointing.CheckpointMismatchError:
            raise
        except Exception:
            problem = self._ckpt.unreadable(step)
            if problem is None:
                raise  # Not the checkpoint's bytes: out of memory, a bug, ...
            raise errors.CheckpointError(f"checkpoint {step} of {self.workdir} cannot be read: "
                                         f"{problem}") from None
        return peft.merge_params(state.params, init.frozen), step

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()
            self._ckpt = None


def plain_params(setup: model_setup.Setup, params: dict) -> dict:
    """Params of a plain `t5.Transformer(setup.t5_config)` computing what the run's
    model does: LoRA (QLoRA dequantized, DoRA) and IA3 merged into the kernels.

    Raises:
      PeftError: a method with no plain form (prompt, prefix, bottleneck adapters),
        saying why; use the run itself (ift-jax predict/eval).
    """
    return peft.merged_params(params, setup.method_config)


def host_params(params: Any) -> Any:
    """Every leaf as a host numpy array, gathered from all its shards (on every host
    of a multi-host job: each must call this)."""
    def gather(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(gather, params)
