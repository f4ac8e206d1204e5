"""Checkpoints with orbax: async saves, keep-N, and a guard against resuming the wrong run.

A checkpoint holds the *trainable* state only (step, trainable params,
optimizer state): for full fine-tuning that is the whole model, for PEFT runs
only the adapters or prompt, plus `meta` (JSON) recording the model
fingerprint and where the frozen base weights came from. Frozen weights are
re-read from `init_from` on restore, as t5x and PEFT do.

Resuming refuses a workdir whose checkpoints were written for another model or
method (the fingerprint differs) instead of silently loading them.

Damage and failures, where they happen:

- `set_aside_damaged()`: every checkpoint is checked cheaply
  (`checkpoint_scan.problem`: orbax's metadata, the commit marker, the item
  folders, the array index and the sizes of the files it points into); each
  damaged one is named in a warning and moved to `checkpoints_damaged/`
  (`move_aside`). `unreadable(step)` is the full read, done only after a
  restore failed.
- Saves are asynchronous; `check_saves()` (cheap, called at every step
  boundary) raises `SaveFailedError` naming the step and the cause as soon as
  a save has failed (disk full, a permission), so the run stops then, not a
  whole `checkpoint_every` interval later. A failed save deletes nothing: orbax
  removes old checkpoints only after a save committed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from ift_jax import checkpoint_scan, distributed, errors, fileio, set_aside

STATE = "state"
META = "meta"


class CheckpointMismatchError(errors.CheckpointError):
    """The workdir holds checkpoints of a different model or training method."""


class SaveFailedError(errors.CheckpointError):
    """An asynchronous save failed (disk full, permissions): the run stops."""


@dataclasses.dataclass
class _Pinned:
    """An orbax preservation policy keeping the steps in `steps` (the best checkpoint),
    which the trainer changes as evaluations come in; orbax applies it after each save."""
    steps: set = dataclasses.field(default_factory=set)

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [info.step in self.steps for info in checkpoints]


def _orbax_manager(directory: str, keep: int, save_interval_steps: int = 1,
                   read_only: bool = False, pinned: Optional[_Pinned] = None
                   ) -> ocp.CheckpointManager:
    if read_only:  # Deletes and saves nothing (orbax warns about any other setting).
        kept = dict(max_to_keep=None)
        save_interval_steps = 0
    else:  # The last `keep`, and the pinned ones.
        kept = dict(preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
            [ocp.checkpoint_managers.LatestN(n=keep), pinned or _Pinned()]))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps, create=not read_only,
        read_only=read_only, enable_async_checkpointing=True, **kept)
    # orbax wants absolute paths; a bucket path (gs://...) already is one.
    directory = directory if fileio.is_remote(directory) else os.path.abspath(directory)
    return ocp.CheckpointManager(directory, options=options,
                                 item_names=(STATE, META))


class Checkpointer:
    """Saves and restores `(state, meta)` under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
        self.workdir = workdir
        self.directory = os.path.join(workdir, "checkpoints")
        self._keep, self._read_only = keep, read_only
        self._orbax: Optional[ocp.CheckpointManager] = None
        self._excluded: set[int] = set()  # Damaged, but left in place (see set_aside_damaged).
        self._saving: Optional[int] = None  # The step of the save last started.
        self._pinned = _Pinned()  # Kept besides the last `keep` (the best checkpoint).

    @property
    def _manager(self) -> ocp.CheckpointManager:
        # Made on first use: `set_aside_damaged` runs before orbax reads (and warns about)
        # the damaged folders.
        if self._orbax is None:
            self._orbax = _orbax_manager(self.directory, self._keep, read_only=self._read_only,
                                         pinned=self._pinned)
        return self._orbax

    def latest_step(self) -> Optional[int]:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        if self._orbax is None and not fileio.isdir(self.directory):
            return []  # Nothing saved yet: the folder is made by the first save, not here.
        return sorted(set(self._manager.all_steps()) - self._excluded)

    def keep_also(self, step: Optional[int]) -> None:
        """Keeps checkpoint `step` (besides the last `keep`) from the next save on; the
        step kept before is left to the usual keep-N rule (None: none kept)."""
        self._pinned.steps = set() if step is None else {step}

    def has(self, step: int) -> bool:
        """Whether a checkpoint of `step` exists or is being written."""
        return step == self._saving or step in self.all_steps()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # ------------------------------------------------------------------
    # Damage.

    def set_aside_damaged(self, move: bool = True) -> dict[int, str]:
        """Checks every checkpoint's metadata and files (cheap, no array is read);
        each damaged one is named in a warning and moved to `checkpoints_damaged/`
        (with `move=False`, or where it cannot be moved, it is only left out of
        `all_steps`). Returns {step: problem}.

        On a multi-host job process 0 checks and moves; every process must call this.
        """
        found: dict[int, tuple[str, bool]] = {}
        if jax.process_index() == 0:
            for step in self._step_folders():
                problem = checkpoint_scan.problem(self.step_dir(step))
                if problem is not None:
                    found[step] = (problem, move and self._move_aside(step, problem))
        found = {int(k): v for k, v in distributed.agree(found).items()}
        if self._orbax is not None and any(moved for _, moved in found.values()):
            self._orbax.reload()
        self._excluded |= {step for step, (_, moved) in found.items() if not moved}
        return {step: problem for step, (problem, _) in found.items()}

    def _step_folders(self) -> list[int]:
        """Steps with a folder (orbax's temporary folders of unfinished saves excluded)."""
        if not fileio.isdir(self.directory):
            return []
        return sorted(int(n) for n in fileio.listdir(self.directory) if n.isdigit())

    def _move_aside(self, step: int, problem: str) -> bool:
        try:
            set_aside.checkpoint(self.workdir, self.step_dir(step), problem)
            return True
        except OSError as e:  # A read-only workdir: name it, skip it, leave it.
            logging.warning("checkpoint %d of %s cannot be read (%s); skipped (not moved "
                            "aside: %s)", step, self.workdir, problem, e)
            return False

    def unreadable(self, step: int) -> Optional[str]:
        """Reads all of checkpoint `step` (once, array by array on the host): what fails,
        or None. For after a failed restore: damage or another cause?"""
        problem = (checkpoint_scan.unreadable(self.step_dir(step))
                   if jax.process_index() == 0 else None)
        return distributed.agree(problem)

    def move_aside(self, step: int, problem: str) -> None:
        """Moves damaged checkpoint `step` to `checkpoints_damaged/` with a warning (where it
        cannot be moved, it is only left out of `all_steps`). Every process must call
        this (process 0 moves)."""
        moved = distributed.agree(jax.process_index() == 0 and self._move_aside(step, problem))
        if moved:
            self._manager.reload()
        else:
            self._excluded.add(step)

    # ------------------------------------------------------------------
    # Saving.

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        """Starts an async save; returns whether one was started.

        Raises:
          SaveFailedError: the previous save, or starting this one, failed.
        """
        self.wait()
        try:
            started = self._manager.save(
                step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                                 META: ocp.args.JsonSave(meta)}),
                force=force)
        except Exception as e:  # Raised while the save starts (e.g. no space for its folder).
            raise self._failed(step, e) from e
        if started:
            self._saving = step
        return started

    def check_saves(self) -> None:
        """Raises `SaveFailedError` if the save last started has failed; returns at once
        while it is still being written (a step boundary costs a flag read)."""
        if self._saving is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Waits for the save in flight to commit.

        Raises:
          SaveFailedError: it failed.
        """
        step, self._saving = self._saving, None
        if self._orbax is None:
            return
        try:
            self._orbax.wait_until_finished()
        except Exception as e:
            raise self._failed(step, e) from e

    def _failed(self, step: Optional[int], error: BaseException) -> SaveFailedError:
        return SaveFailedError(f"checkpoint {step} could not be saved to {self.directory}: "
                               f"{root_cause(error)}; the run stops here; "
                               f"{self.intact(but=step)}")

    def intact(self, but: Optional[int] = None) -> str:
        """Which checkpoints a stopped run leaves, and how to go on (for error lines)."""
        kept = [s for s in self.all_steps() if s != but]
        if not kept:
            return "no earlier checkpoint exists; fix the cause and run again"
        return (f"checkpoints {', '.join(map(str, kept))} are intact; fix the cause and run "
                f"again to resume from {kept[-1]}")

    # ------------------------------------------------------------------
    # Reading.

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
        """Waits for the save in flight and closes; a failed save is logged here (raise it
        earlier with `wait`), so closing never hides the error that ended a run."""
        try:
            self.wait()
        except SaveFailedError as e:
            logging.error("%s", e)
        if self._orbax is None:
            return
        try:
            self._orbax.close()
        except Exception as e:  # The same failure, raised again by orbax's metadata store.
            logging.warning("closing %s: %s", self.directory, root_cause(e))


def root_cause(error: BaseException) -> str:
    """What failed, in a few words: the operating system's error where one is in the
    chain (tensorstore puts it at the end of a long message), else the first line of
    the innermost exception."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in chain:
        code = e.errno if isinstance(e, OSError) and e.errno else None
        found = re.search(r"os_error_code='(\d+)'", str(e))
        code = code or (int(found.group(1)) if found else None)
        if code:
            return f"{os.strerror(code)} (errno {code})"
    text = str(chain[-1]).strip().splitlines()
    return f"{type(chain[-1]).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def check_fingerprint(saved: dict, current: dict, where: str) -> None:
    """Names every field where the checkpoint's model/method differs from the config."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointMismatchError(
            f"{where} holds checkpoints of a different run ({'; '.join(diffs)}); train this "
            f"config in another --workdir (that run's checkpoints and config.json are "
            f"untouched), or pass --start_over to move that run aside and train this one "
            f"here")
