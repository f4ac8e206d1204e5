"""The user-error family: mistakes a user can fix, reported as one line.

Anything raised as a `UserError` means "the input is wrong, not the code": a
bad config value, missing data, an unreadable checkpoint, a malformed input
file, a workdir in use. The `ift-jax` command prints such an error as one
line (`ift-jax train: error: <message>`) and exits 2; every other exception is
a bug (in ift_jax, or in a user's own task or metric function) and keeps its
traceback.

So the message must carry everything: what is wrong (the config key, file and
line, checkpoint folder) and how to fix it.

Each subclass also derives from the builtin exception the same mistake used to
raise (`ValueError`, `FileNotFoundError`, `RuntimeError`), so code and tests
catching those keep working while modules move over to this family.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; its message is one line naming the thing and the fix."""


class ConfigError(UserError, ValueError):
    """A config value, config file or command-line flag that cannot be used."""


class DataError(UserError, ValueError):
    """Missing or malformed training / evaluation data (datasets, tasks, vocabularies)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint (ift_jax workdir, HF directory, t5x checkpoint) that cannot be read."""


class InputFileError(UserError, ValueError):
    """A file the user handed to a command (`--input=FILE.jsonl`, ...) that cannot be read."""


class WorkdirInUseError(UserError, RuntimeError):
    """Another live process holds the workdir's run lock (`ift_jax.run_lock`)."""


class MissingError(UserError, FileNotFoundError):
    """A path the user named (workdir, init_from, data or vocabulary file) does not exist."""


class TrainingError(UserError, FloatingPointError):
    """Training cannot go on as configured (e.g. a non-finite loss); the message says
    which step and what to change."""
