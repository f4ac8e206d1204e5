"""Exports of a run: `ift-jax export --format=hf|peft`.

The run is read back by `ift_jax.runs.Run` on the run's configured mesh
over the local devices (or `mesh`): a checkpoint that does not fit one device
is still exported. The params are gathered from their shards to the host
(on every host of a multi-host job, which must all call the export) and
process 0 writes the files, showing progress as it goes (tensors gathered,
with an ETA, then the file being written; `ift_jax.progress`, on stderr).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from typing import Any, Optional

import jax

from ift_jax import errors
from ift_jax import hf, model_setup, peft, progress, runs
from ift_jax.models import t5


def _read(workdir: str, step: Optional[int], mesh: Optional[dict[str, int]]
          ) -> tuple[model_setup.Setup, dict, int]:
    run = runs.Run.open(workdir, mesh_override=mesh)
    try:
        params, step = run.params(step)
    finally:
        run.close()
    return run.setup, params, step


def _gathered(params: Any, desc: str) -> Any:
    """`runs.host_params`, tensor by tensor, with progress on process 0."""
    leaves, treedef = jax.tree.flatten(params)
    gathered = []
    with (progress.Progress(len(leaves), desc, "tensor") if jax.process_index() == 0
          else contextlib.nullcontext()) as tracker:
        for leaf in leaves:
            gathered.append(runs.host_params(leaf))
            if tracker:
                tracker.update()
    return jax.tree.unflatten(treedef, gathered)


def _writing(params: Any, output: str) -> None:
    size = sum(x.size for x in jax.tree.leaves(params)) * 4  # Written as float32.
    print(f"export: writing {output} ({size / 2**30:.2f} GiB)", file=sys.stderr, flush=True)


def export_hf(workdir: str, output: str, step: Optional[int] = None,
              mesh: Optional[dict[str, int]] = None) -> str:
    """Writes the run as an HF directory (merged); returns a summary line."""
    setup, params, step = _read(workdir, step, mesh)
    if setup.method == "prompt":
        raise errors.ConfigError("--format=hf writes a plain T5, and a prompt-tuned run has none: "
                                 "its prompt is an input, not a weight; use ift-jax predict/eval "
                                 "with the run itself")
    plain = _gathered(runs.plain_params(setup, params), "export: gathering")
    if jax.process_index() == 0:
        _writing(plain, output)
        hf.save_t5(output, setup.t5_config.replace(dtype=t5.T5Config().dtype), plain)
        _copy_vocabulary(setup, output)
    return f"wrote HF model of {workdir} step {step} ({setup.method}) to {output}"


def export_peft(workdir: str, output: str, step: Optional[int] = None,
                mesh: Optional[dict[str, int]] = None) -> str:
    """Writes the run's LoRA adapter in HF PEFT format; returns a summary line."""
    setup, params, step = _read(workdir, step, mesh)
    if setup.method not in ("lora", "qlora"):
        advice = ("use --format=hf for the whole model" if setup.method == "full"
                  else "this method has no PEFT-format export yet")
        raise errors.ConfigError(f"--format=peft exports LoRA adapters; this run's method is "
                                 f"{setup.method!r} ({advice})")
    cfg = model_setup.lora_config(setup.config.peft, quantize=setup.method == "qlora")
    base = setup.config.init_from or ""
    adapter = _gathered(peft.split_params(params, peft.trainable_mask(params, setup.method))[0],
                        "export: gathering")
    if jax.process_index() == 0:
        _writing(adapter, output)
        hf.save_peft_adapter(output, setup.t5_config, adapter, cfg, base)
    return f"wrote LoRA adapter of {workdir} step {step} to {output} (base: {base or '?'})"


def _copy_vocabulary(setup: model_setup.Setup, output: str) -> None:
    try:
        spec = model_setup.vocabulary_spec(setup.config)
    except ValueError:
        return
    if spec != "byte" and os.path.exists(spec):
        shutil.copy(spec, os.path.join(output, "spiece.model"))
    else:
        logging.info("vocabulary %r is not a SentencePiece file; none copied", spec)
