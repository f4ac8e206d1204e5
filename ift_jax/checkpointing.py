"""Checkpoints with orbax: async saves, keep-N, and a guard against resuming the wrong run.

A checkpoint holds the *trainable* state only (step, trainable params,
optimizer state): for full fine-tuning that is the whole model, for PEFT runs
only the adapters or prompt, plus `meta` (JSON) recording the model
fingerprint and where the frozen base weights came from. Frozen weights are
re-read from `init_from` on restore, as t5x and PEFT do.

Resuming refuses a workdir whose checkpoints were written for another model or
method (the fingerprint differs) instead of silently loading them.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import orbax.checkpoint as ocp

from ift_jax import errors, fileio

STATE = "state"
META = "meta"


class CheckpointMismatchError(errors.CheckpointError):
    """The workdir holds checkpoints of a different model or training method."""


def _manager(directory: str, keep: int, save_interval_steps: int = 1,
             read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_interval_steps, create=not read_only,
        read_only=read_only, enable_async_checkpointing=True)
    # orbax wants absolute paths; a bucket path (gs://...) already is one.
    directory = directory if fileio.is_remote(directory) else os.path.abspath(directory)
    return ocp.CheckpointManager(directory, options=options,
                                 item_names=(STATE, META))


class Checkpointer:
    """Saves and restores `(state, meta)` under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
        self.directory = os.path.join(workdir, "checkpoints")
        self._manager = _manager(self.directory, keep, read_only=read_only)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        """Starts an async save; returns whether one was started."""
        return self._manager.save(
            step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                             META: ocp.args.JsonSave(meta)}), force=force)

    def read_meta(self, step: int) -> dict:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{META: ocp.args.JsonRestore()}))
        return dict(restored[META])

    def restore(self, step: int, abstract_state: Any, fingerprint: dict) -> tuple[Any, dict]:
        """Restores `step` into the shapes and shardings of `abstract_state`.

        Raises:
          CheckpointMismatchError: the checkpoint's fingerprint differs.
        """
        meta = self.read_meta(step)
        check_fingerprint(meta.get("fingerprint", {}), fingerprint, self.directory)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract_state)}))
        return restored[STATE], meta

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def check_fingerprint(saved: dict, current: dict, where: str) -> None:
    """Names every field where the checkpoint's model/method differs from the config."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointMismatchError(
            f"{where} holds checkpoints of a different run ({'; '.join(diffs)}); train this "
            f"config in another --workdir (that run's checkpoints and config.json are "
            f"untouched)")
