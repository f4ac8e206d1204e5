"""Reading a finished run back: its params, merged or as adapters, and exports.

- `load_run(workdir)`: the run's config, `Setup`, and full param tree (trainable
  from the latest checkpoint, frozen from the run's `init_from`), on one device.
- `plain_params(...)`: a plain `t5.Transformer` param tree: LoRA merged into the
  kernels, QLoRA dequantized first. Prompt-tuned runs have no plain form.
- `export_hf` / `export_peft`: `ift-jax export --format=hf|peft`.

`model_setup` uses `plain_params` for `init_from=<another ift_jax workdir>`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import jax
import ml_collections

from ift_jax import checkpointing, fileio, hf, model_setup, partitioning, peft
from ift_jax.models import t5


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not fileio.exists(path):
        raise FileNotFoundError(f"{workdir} is not an ift_jax workdir: no config.json")
    with fileio.open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, step: Optional[int] = None,
             setup: Optional[model_setup.Setup] = None
             ) -> tuple[model_setup.Setup, dict, int]:
    """(setup, full params, step) of a run's checkpoint (latest by default).

    Step 0 is the run's starting model (its `init_from`, or the seeded
    initialization), with no checkpoint needed. Pass the `setup` of an earlier
    call to read several checkpoints without rebuilding it (and reloading the
    `init_from` base) each time; its model then stays the same object, so
    jitted decoding compiles once.
    """
    setup = setup or model_setup.build(read_config(workdir))
    ckpt = checkpointing.Checkpointer(workdir, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps and step != 0:
            raise FileNotFoundError(f"{workdir} has no checkpoints")
        step = steps[-1] if step is None else step
        if step not in steps and step != 0:
            raise ValueError(f"{workdir} has no checkpoint {step}; steps: {steps}")
        mesh = partitioning.make_mesh([1, 1, 1], jax.local_devices()[:1])
        state, frozen, _, _ = model_setup.initial_state(setup, setup.optimizer, mesh,
                                                        _AtStep(ckpt, step))
    finally:
        ckpt.close()
    return setup, peft.merge_params(state.params, frozen), step


class _AtStep:
    """A Checkpointer view whose latest step is `step`."""

    def __init__(self, ckpt: checkpointing.Checkpointer, step: int):
        self._ckpt, self._step = ckpt, step
        self.directory = ckpt.directory

    def latest_step(self) -> Optional[int]:
        return self._step or None  # Step 0: nothing to restore, the start-up model.

    def restore(self, step, abstract_state, fingerprint):
        return self._ckpt.restore(step, abstract_state, fingerprint)


def plain_params(setup: model_setup.Setup, params: dict) -> dict:
    """Params of a plain `t5.Transformer(setup.t5_config)`."""
    if setup.method == "prompt":
        raise ValueError("a prompt-tuned run has no plain model form: its prompt is an "
                         "input, not a weight; use the run itself (ift-jax predict/eval)")
    if setup.method in ("lora", "qlora"):
        cfg = model_setup.lora_config(setup.config.peft, quantize=setup.method == "qlora")
        return peft.merge_lora(params, cfg)
    return params


def export_hf(workdir: str, output: str, step: Optional[int] = None) -> str:
    """Writes the run as an HF directory (merged); returns a summary line."""
    setup, params, step = load_run(workdir, step)
    config = setup.t5_config.replace(dtype=t5.T5Config().dtype)
    hf.save_t5(output, config, jax.device_get(plain_params(setup, params)))
    _copy_vocabulary(setup, output)
    return f"wrote HF model of {workdir} step {step} ({setup.method}) to {output}"


def export_peft(workdir: str, output: str, step: Optional[int] = None) -> str:
    """Writes the run's LoRA adapter in HF PEFT format; returns a summary line."""
    setup, params, step = load_run(workdir, step)
    if setup.method not in ("lora", "qlora"):
        raise ValueError(f"--format=peft exports LoRA adapters; this run's method is "
                         f"{setup.method!r} (use --format=hf)")
    cfg = model_setup.lora_config(setup.config.peft, quantize=setup.method == "qlora")
    base = setup.config.init_from or ""
    hf.save_peft_adapter(output, setup.t5_config, jax.device_get(params), cfg, base)
    return f"wrote LoRA adapter of {workdir} step {step} to {output} (base: {base or '?'})"


def _copy_vocabulary(setup: model_setup.Setup, output: str) -> None:
    try:
        spec = model_setup.vocabulary_spec(setup.config)
    except ValueError:
        return
    if spec != "byte" and os.path.exists(spec):
        import shutil
        shutil.copy(spec, os.path.join(output, "spiece.model"))
    else:
        logging.info("vocabulary %r is not a SentencePiece file; none copied", spec)


def params_from_workdir(workdir: str) -> tuple[t5.T5Config, Any]:
    """`init_from=<workdir>`: that run's final model as plain params."""
    setup, params, step = load_run(workdir)
    logging.info("init_from %s step %d (%s)", workdir, step, setup.method)
    return setup.t5_config, jax.device_get(plain_params(setup, params))
