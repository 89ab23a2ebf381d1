"""Multi-process runs on JAX's multi-controller runtime: one process per host (or per GPU),
the same program on each, one mesh over every process's devices.

A launcher asks for it with `SAEJAX_DISTRIBUTED=1` (or `--distributed`), and optionally names
the cluster with `SAEJAX_COORDINATOR_ADDRESS` (host:port of process 0),
`SAEJAX_NUM_PROCESSES` and `SAEJAX_PROCESS_ID`; unset ones are left to JAX's auto-detection
(Cloud TPU, SLURM). Initialisation must come before anything touches the devices.
"""

from __future__ import annotations

import os

from absl import logging
import jax
import numpy as np

ENV_FLAG = "SAEJAX_DISTRIBUTED"


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
                               process_id=number("SAEJAX_PROCESS_ID"))
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
