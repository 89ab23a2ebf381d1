"""What every saejax command does before its work: readable logs, simulated CPU devices when
asked, and joining a multi-process cluster when a launcher asks (`saejax/distributed.py`)."""

from __future__ import annotations

import logging as std_logging

from absl import logging
import jax

from saejax import distributed


class _QuietLibraries:
    """Keeps the progress lines readable: drops INFO records from orbax's internals."""

    def filter(self, record) -> bool:
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def format_duration(seconds: float) -> str:
    """An ETA or elapsed time for progress lines: "4m07s", or "2h15m" past an hour."""
    seconds = int(seconds)
    return (f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600
            else f"{seconds // 60}m{seconds % 60:02d}s")


def setup(*, num_cpu_devices: int | None = None, join_cluster: bool = False) -> None:
    """Call first in a command's main, before anything touches the devices."""
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", num_cpu_devices)
    distributed.initialize(force=join_cluster)
