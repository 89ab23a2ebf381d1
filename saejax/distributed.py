"""Multi-process runs on JAX's multi-controller runtime: one process per host (or per GPU),
the same program on each, one mesh over every process's devices.

A launcher asks for it with `SAEJAX_DISTRIBUTED=1` (or `--distributed`), and optionally names
the cluster with `SAEJAX_COORDINATOR_ADDRESS` (host:port of process 0),
`SAEJAX_NUM_PROCESSES` and `SAEJAX_PROCESS_ID`; unset ones are left to JAX's auto-detection
(Cloud TPU, SLURM). Initialisation must come before anything touches the devices.

A process that dies (killed, its VM gone) stops sending heartbeats; after
`SAEJAX_HEARTBEAT_TIMEOUT_S` seconds (default 20; JAX's own default is 100) JAX's coordination
service stops every other process with a message ("the JAX distributed service detected fatal
errors ... another task died"), so no host waits forever on a dead one. Heartbeats come from a
thread of their own: a long compile or step does not miss them.
"""

from __future__ import annotations

import os

from absl import logging
import jax
import numpy as np

ENV_FLAG = "SAEJAX_DISTRIBUTED"
HEARTBEAT_ENV = "SAEJAX_HEARTBEAT_TIMEOUT_S"
DEFAULT_HEARTBEAT_TIMEOUT_S = 20


def requested() -> bool:
    return os.environ.get(ENV_FLAG, "") not in ("", "0", "false", "False")


def initialize(force: bool = False) -> bool:
    """Joins the cluster when a launcher asked for it; returns whether it did."""
    if not (force or requested()):
        return False
    env = os.environ.get
    number = lambda name: int(env(name)) if env(name) else None
    jax.distributed.initialize(coordinator_address=env("SAEJAX_COORDINATOR_ADDRESS") or None,
                               num_processes=number("SAEJAX_NUM_PROCESSES"),
                               process_id=number("SAEJAX_PROCESS_ID"),
                               heartbeat_timeout_seconds=number(HEARTBEAT_ENV)
                               or DEFAULT_HEARTBEAT_TIMEOUT_S)
    logging.info("Process %d of %d: %d local of %d devices.", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    if jax.process_index() != 0:  # one voice: process 0 logs progress; others only warnings
        logging.set_verbosity(logging.WARNING)
    return True


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (e.g. one host got SIGTERM): all hosts
    then stop at the same step and save the same checkpoint together."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


class ClusterError(RuntimeError):
    """Another process of the cluster stopped (or never came): this one cannot go on. `cli.run`
    reports it as one line and exits at once, as JAX's own shutdown would wait for the dead one."""


def barrier(name: str, timeout_s: float) -> None:
    """Waits until every process has reached `barrier(name)` (each name once per run); raises
    ClusterError if one has died or has not come after `timeout_s`. Nothing with one process."""
    if jax.process_count() == 1:
        return
    # The coordination service's barrier, as orbax's multihost.sync_global_processes uses it:
    # no device collective, so it works before any computation and has a timeout.
    from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
    try:
        jax_distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))
    except jax.errors.JaxRuntimeError as e:
        why = str(e).strip().splitlines()[0]
        raise ClusterError(f"process {jax.process_index()} of {jax.process_count()}: another "
                           f"process stopped or did not reach {name!r} within {timeout_s:.0f} s "
                           f"({why}). What every process committed stays; run the same command "
                           "again to go on.") from e
