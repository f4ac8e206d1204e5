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

from ift_jax import errors, hf, model_setup, peft, peft_formats, progress, runs
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
    """Writes the run as an HF directory, its method merged into the weights
    (LoRA family, IA3; others are refused with the reason); returns a summary line."""
    setup, params, step = _read(workdir, step, mesh)
    plain = _gathered(runs.plain_params(setup, params), "export: gathering")
    if jax.process_index() == 0:
        _writing(plain, output)
        hf.save_t5(output, setup.t5_config.replace(dtype=t5.T5Config().dtype), plain)
        _copy_vocabulary(setup, output)
    return f"wrote HF model of {workdir} step {step} ({setup.method}) to {output}"


def export_peft(workdir: str, output: str, step: Optional[int] = None,
                mesh: Optional[dict[str, int]] = None) -> str:
    """Writes the run's trained params in HF PEFT's format for its method (LoRA with
    rsLoRA/DoRA and any other trained leaves as `modules_to_save`, IA3, prompt and
    prefix tuning); returns a summary line.

    Raises:
      ConfigError: full fine-tuning (export it with --format=hf).
      PeftError: a method or setting PEFT has no format for, saying why.
    """
    setup, params, step = _read(workdir, step, mesh)
    if setup.method == "full" and not setup.config.peft.trainable_regex:
        raise errors.ConfigError("--format=peft writes adapters, and this run fine-tuned the "
                                 "whole model; use --format=hf")
    base = setup.config.init_from or ""
    # PEFT files hold the trained leaves only (the base gives the rest): gather those.
    adapter = _gathered(peft.split_params(params, setup.trainable_mask(params))[0],
                        "export: gathering")
    if jax.process_index() == 0:
        _writing(adapter, output)
        peft_formats.save_peft(output, setup.t5_config, adapter, setup.method_config, base)
    return (f"wrote {setup.method} adapter of {workdir} step {step} to {output} "
            f"(base: {base or '?'})")


def _copy_vocabulary(setup: model_setup.Setup, output: str) -> None:
    try:
        spec = model_setup.vocabulary_spec(setup.config)
    except ValueError:
        return
    if spec != "byte" and os.path.exists(spec):
        shutil.copy(spec, os.path.join(output, "spiece.model"))
    else:
        logging.info("vocabulary %r is not a SentencePiece file; none copied", spec)
