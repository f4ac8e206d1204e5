"""Exports of a run: `ift-jax export --format=hf|peft`.

Everything that can refuse an export is checked before a checkpoint is read
(`check`): the output folder (`export_folder.check_output`: an existing export
is replaced only with `overwrite`, and nothing else ever is), the run's
`config.json`, whether its method has the asked-for format, and the step.

The run is then read back by `ift_jax.runs.Run` on the run's configured mesh
over the local devices (or `mesh`): a checkpoint that does not fit one device
is still exported. The params are gathered from their shards to the host
(on every host of a multi-host job, which must all call the export) and
process 0 writes the files into a temporary folder that is marked finished and
renamed into place (`export_folder.writing`), showing progress as it goes
(tensors gathered, with an ETA, then the files being written;
`ift_jax.progress`, on stderr).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from typing import Any, Optional

import jax

from ift_jax import (distributed, errors, export_folder, fileio, hf, model_setup, peft,
                     peft_formats, progress, runs)
from ift_jax.models import t5

FORMATS = ("hf", "peft")


def check(workdir: str, output: str, export_format: str, step: Optional[int] = None,
          overwrite: bool = False) -> None:
    """Everything that can refuse an export, from the run's `config.json` and folder
    names alone (no checkpoint is read); process 0 looks at the output folder.

    Raises:
      ConfigError, MissingError, PeftError: one line naming what is wrong and the fix.
    """
    problem = None
    if jax.process_index() == 0:
        try:
            export_folder.check_output(output, overwrite)
        except errors.ConfigError as e:
            problem = str(e)
    problem = distributed.agree(problem)
    if problem:
        raise errors.ConfigError(problem)
    config = runs.read_config(workdir)
    _check_format(config, export_format)
    _check_step(workdir, step)


def _check_format(config, export_format: str) -> None:
    method = config.peft.method
    if export_format == "hf" and method not in peft.MERGEABLE:
        raise peft.PeftError(f"--format=hf writes a plain T5, and this run's method "
                             f"{method!r} cannot be merged into one: "
                             f"{peft.why_not_mergeable(method)}; use --format=peft, or the "
                             f"run itself (ift-jax predict / eval)")
    if export_format == "peft":
        if method == "full" and not config.peft.get("trainable_regex"):
            raise errors.ConfigError("--format=peft writes adapters, and this run fine-tuned "
                                     "the whole model; use --format=hf")
        why = peft_formats.why_not_exportable(method)
        if why:
            raise peft.PeftError(f"method {method!r} cannot be written in HF PEFT format: "
                                 f"{why}")


def _check_step(workdir: str, step: Optional[int]) -> None:
    folder = os.path.join(workdir, "checkpoints")
    steps = sorted(int(n) for n in fileio.listdir(folder) if n.isdigit()) if fileio.isdir(
        folder) else []
    if step is None and not steps:
        raise errors.MissingError(f"{workdir} has no checkpoints to export; pass --step=0 for "
                                  f"the run's starting model")
    if step not in (None, 0) and step not in steps:
        raise errors.CheckpointError(f"{workdir} has no checkpoint {step}; steps: {steps}")


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


def _record(export_format: str, workdir: str, step: int, setup: model_setup.Setup) -> dict:
    return {"format": export_format, "workdir": os.path.abspath(workdir), "step": step,
            "method": setup.method, "init_from": setup.config.init_from or ""}


def export_hf(workdir: str, output: str, step: Optional[int] = None,
              mesh: Optional[dict[str, int]] = None, overwrite: bool = False) -> str:
    """Writes the run as an HF directory, its method merged into the weights
    (LoRA family, IA3; others are refused with the reason); returns a summary line.

    Raises:
      ConfigError: `output` holds something (see `export_folder.check_output`).
      PeftError: a method that cannot merge, saying why.
    """
    check(workdir, output, "hf", step, overwrite)
    setup, params, step = _read(workdir, step, mesh)
    plain = _gathered(runs.plain_params(setup, params), "export: gathering")
    if jax.process_index() == 0:
        _writing(plain, output)
        with export_folder.writing(output, _record("hf", workdir, step, setup)) as folder:
            hf.save_t5(folder, setup.t5_config.replace(dtype=t5.T5Config().dtype), plain)
            _copy_vocabulary(setup, folder)
    return f"wrote HF model of {workdir} step {step} ({setup.method}) to {output}"


def export_peft(workdir: str, output: str, step: Optional[int] = None,
                mesh: Optional[dict[str, int]] = None, overwrite: bool = False) -> str:
    """Writes the run's trained params in HF PEFT's format for its method (LoRA with
    rsLoRA/DoRA and any other trained leaves as `modules_to_save`, IA3, prompt and
    prefix tuning); returns a summary line.

    Raises:
      ConfigError: full fine-tuning (export it with --format=hf), or `output` holds
        something (see `export_folder.check_output`).
      PeftError: a method or setting PEFT has no format for, saying why.
    """
    check(workdir, output, "peft", step, overwrite)
    setup, params, step = _read(workdir, step, mesh)
    base = setup.config.init_from or ""
    # PEFT files hold the trained leaves only (the base gives the rest): gather those.
    adapter = _gathered(peft.split_params(params, setup.trainable_mask(params))[0],
                        "export: gathering")
    if jax.process_index() == 0:
        _writing(adapter, output)
        with export_folder.writing(output, _record("peft", workdir, step, setup)) as folder:
            peft_formats.save_peft(folder, setup.t5_config, adapter, setup.method_config,
                                   base)
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
