"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

On Cloud TPU pod slices (and SLURM/Open MPI clusters JAX recognizes)
`jax.distributed.initialize()` needs no arguments: `ift-jax train` calls it so
when `IFT_JAX_DISTRIBUTED=auto` is set (launch/tpu.py sets it on every
worker). Elsewhere set:

    IFT_JAX_COORDINATOR=host:port  IFT_JAX_NUM_PROCESSES=N  IFT_JAX_PROCESS_ID=i

(or pass the same to `initialize(coordinator=, num_processes=, process_id=)`).
On CPU, collectives go through gloo.

Decisions every process must take alike (which checkpoints are readable,
whether to stop an evaluation) go through `agree` (process 0's value) and
`any_process` (true if true on any process).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from ift_jax import errors

_initialized = False


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, auto: bool = False) -> bool:
    """Joins the multi-process runtime if asked to; returns whether it did.

    Args:
      coordinator, num_processes, process_id: explicit settings; default to
        `IFT_JAX_COORDINATOR`, `IFT_JAX_NUM_PROCESSES`, `IFT_JAX_PROCESS_ID`.
      auto: call `jax.distributed.initialize()` with no arguments when nothing
        is set (Cloud TPU pods, SLURM).
    """
    global _initialized
    if _initialized:
        return True
    coordinator = coordinator or os.environ.get("IFT_JAX_COORDINATOR")
    num_processes = num_processes or _env_int("IFT_JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("IFT_JAX_PROCESS_ID")
    if coordinator:
        if num_processes is None or process_id is None:
            raise errors.ConfigError("multi-process run needs IFT_JAX_NUM_PROCESSES and "
                                     "IFT_JAX_PROCESS_ID with "
                                     f"the coordinator {coordinator}")
        # Only the CPU client reads this; asking `jax.default_backend()` here
        # would start the backends before `initialize`, which JAX refuses.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)
    elif auto:
        jax.distributed.initialize()
    else:
        return False
    _initialized = True
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def agree(value: Any) -> Any:
    """Process 0's `value` on every process (JSON-serializable values); a collective:
    every process must call it."""
    if jax.process_count() == 1:
        return value
    main = jax.process_index() == 0
    text = json.dumps(value).encode() if main else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(text))))
    buffer = np.zeros((size,), np.uint8)
    if main:
        buffer[:] = np.frombuffer(text, np.uint8)
    return json.loads(bytes(multihost_utils.broadcast_one_to_all(buffer)).decode())


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process; a collective: every process must call it."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray([bool(flag)]))))
