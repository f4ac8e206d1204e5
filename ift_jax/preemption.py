"""Stop requests (SIGTERM, SIGINT) that every host of a run acts on at the same step.

On a pod the scheduler may signal one host only. A host that stopped alone
would leave the others blocked in the next collective, and a checkpoint saved
by some hosts only is no checkpoint. So a signal only sets this host's *vote*;
the loop asks `StopRequest.agreed_at_boundary()` at every step boundary, which
all-reduces the votes (logical OR) over the mesh, and every host stops, saves
and exits 0 at the step where the OR first reads true.

Why an all-reduced flag and not JAX's preemption sync manager
(`multihost_utils.reached_preemption_sync_point`): that manager catches
SIGTERM in C++ (our Python handler would replace it, and it ignores SIGINT),
exists only after `jax.distributed.initialize`, and cannot cancel an
evaluation in progress; the flag works the same for one process or many.

Cost: the vote is a one-element-per-device OR dispatched at every boundary
and read one boundary later, after the loop has already waited for the step
before (it fetches that step's metrics), so the host never waits on the device
for it; the price is one tiny collective per step and a stop one step later
than the signal. Checking every step (not every N) keeps the time between a
preemption notice (30 s on Cloud TPU) and the save to one step.
"""

from __future__ import annotations

import logging
import signal
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class StopRequest:
    """This host's stop vote (set by SIGTERM/SIGINT) and the run's agreed stop.

    `requested`: a signal reached this host. `agreed`: every host has seen a
    vote for stopping at the same boundary (or an agreed cancel, e.g. of an
    evaluation, set it on every host); the loop stops on `agreed` only.
    """

    def __init__(self, mesh: Optional[Mesh] = None):
        self.requested = False
        self.agreed = False
        self._vote = _Vote(mesh) if mesh is not None and jax.process_count() > 1 else None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        logging.warning("signal %d: stopping after the current step%s", signum,
                        " (on every host)" if self._vote is not None else "")
        self.requested = True

    def agreed_at_boundary(self) -> bool:
        """Whether the run stops at this step boundary; the same answer on every host.

        A collective on multi-host runs: every host must call it at every boundary.
        """
        if self._vote is None:
            self.agreed = self.agreed or self.requested
        else:
            self.agreed = self._vote.exchange(self.requested) or self.agreed
        return self.agreed

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Vote:
    """An OR over all hosts, dispatched now and read at the next call."""

    def __init__(self, mesh: Mesh):
        # One element per device, sharded over every mesh axis.
        self._sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
        self._size = mesh.devices.size
        self._any = jax.jit(jnp.any, out_shardings=NamedSharding(mesh, PartitionSpec()))
        self._pending: Optional[jax.Array] = None

    def exchange(self, vote: bool) -> bool:
        """Dispatches this boundary's vote; returns the OR of the previous boundary's."""
        previous = self._pending
        votes = jax.make_array_from_callback((self._size,), self._sharding,
                                             lambda _: np.asarray([vote]))
        self._pending = self._any(votes)
        return previous is not None and bool(np.asarray(previous.addressable_data(0)))
