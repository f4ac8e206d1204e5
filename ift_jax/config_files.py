"""Loading `--config=FILE[:arg]`, with errors that point at the user's own line.

`load(spec)` imports the file and calls its `get_config(arg)` the way
ml_collections' config flags do (`FILE` -> `get_config()`, `FILE:arg` ->
`get_config("arg")`). Whatever goes wrong becomes one `ConfigError` line naming
the flag, the file and line where it happened (the last frame of the traceback
that is not library code: the user's config, or the ift_jax config it builds
on), the exception type and its message:

    --config=configs/flan_t5.py:base: configs/flan_t5.py:37: get_config('base')
    raised ValueError: unknown preset key 'base'; keys: size, method, task, runlocal

The CLI loads the config this way before anything else, so a missing or broken
config file is reported before a workdir is created.
"""

from __future__ import annotations

import importlib.util
import os
import sysconfig
import traceback
from typing import Any, Optional

from ml_collections import config_dict

import ift_jax.configs
from ift_jax.errors import ConfigError

# Code in these folders is library code, never "the user's line".
_LIBRARY_DIRS = tuple(os.path.realpath(p) + os.sep for p in {
    sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def split_spec(spec: str) -> tuple[str, Optional[str]]:
    """`"FILE:arg"` -> `("FILE", "arg")`; `"FILE"` -> `("FILE", None)`."""
    path, colon, arg = spec.partition(":")
    return path, (arg if colon else None)


def load(spec: str) -> config_dict.ConfigDict:
    """`get_config(arg)` of the config file in `spec` (`FILE[:arg]`).

    Raises:
      ConfigError: the file is missing, fails to import, has no `get_config`,
        or `get_config` raises or returns something that is not a ConfigDict.
    """
    path, arg = split_spec(spec)
    module = import_file(spec)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"--config={spec}: {path} defines no get_config(); a config file "
                          f"defines get_config(arg=None) returning a ConfigDict")
    call = f"get_config({arg!r})" if arg is not None else "get_config()"
    try:
        config = module.get_config(arg) if arg is not None else module.get_config()
    except Exception as e:  # Whatever the user's code raises: reported, not a traceback.
        raise ConfigError(f"--config={spec}: {_where(e, path)}: {call} raised "
                          f"{_describe(e)}") from e
    if not isinstance(config, config_dict.ConfigDict):
        raise ConfigError(f"--config={spec}: {call} returned {type(config).__name__}, not an "
                          f"ml_collections.ConfigDict (a missing return statement?)")
    return config


def import_file(spec: str) -> Any:
    """The config file of `spec` (`FILE[:arg]`) as a module.

    Raises:
      ConfigError: the file is missing or raises while importing.
    """
    path = split_spec(spec)[0]
    if not path or not os.path.isfile(path):
        raise ConfigError(f"--config={spec}: no such file {path!r}; give a config file, "
                          f"e.g. --config=configs/default.py")
    module_spec = importlib.util.spec_from_file_location("_ift_jax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # SyntaxError, ImportError, NameError, ... in the file.
        raise ConfigError(f"--config={spec}: {_where(e, path)}: importing {path} raised "
                          f"{_describe(e)}") from e
    return module


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _where(error: BaseException, path: str) -> str:
    """`file:line` of the user's own code where `error` happened."""
    if isinstance(error, SyntaxError) and error.filename:
        return f"{_relative(error.filename)}:{error.lineno}"
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not _is_library(f.filename)]
    if not frames:
        return _relative(path)
    return f"{_relative(frames[-1].filename)}:{frames[-1].lineno}"


def _is_library(filename: str) -> bool:
    real = os.path.realpath(filename)
    return (real == os.path.realpath(__file__) or real.startswith(_LIBRARY_DIRS)
            or filename.startswith("<frozen "))


def _relative(filename: str) -> str:
    relative = os.path.relpath(filename)
    return filename if relative.startswith(os.pardir + os.sep) else relative


def display_spec(spec: str) -> str:
    """`spec` with its file relative to the working directory where it is below it."""
    path, arg = split_spec(spec)
    return _relative(os.path.abspath(path)) + (f":{arg}" if arg is not None else "")


def module_file(spec: str) -> str:
    """The absolute path of the config file in `spec` (for reading its comments)."""
    return os.path.abspath(split_spec(spec)[0])


def default_path() -> str:
    """configs/default.py as installed (`ift_jax.configs`)."""
    return os.path.join(os.path.dirname(ift_jax.configs.__file__), "default.py")
