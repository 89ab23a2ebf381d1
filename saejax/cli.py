"""The one pattern of every saejax command: absl flags defined only when the module runs as
the program, `app.run`, a `main` that calls a library function, and `run` around it, which
turns saejax's known errors into one line on stderr and exit code 2 (SIGTERM: a checkpoint,
then exit code 143; a dead process of the cluster: exit code 2 at once). Also what every command does before its work (`setup`): readable logs,
simulated CPU devices when asked, and joining a multi-process cluster when a launcher asks
(`saejax/distributed.py`).

    def _define_flags(): flags.DEFINE_...
    def main(argv): ...  # argv[1:] are the positional arguments
    if __name__ == "__main__":
        cli.run(main, _define_flags)
"""

from __future__ import annotations

import functools
import logging as std_logging
import os
import sys
from typing import Callable, Sequence

from absl import app, flags, logging
import jax

from saejax import distributed
from saejax.errors import SIGTERM_EXIT_CODE, ConfigError, Preempted

# What a command reports as one line rather than a traceback: a setting that cannot work (the
# message names the field and the fix), a missing file, a run whose loss turned NaN.
KNOWN_ERRORS = (ConfigError, FileNotFoundError, FloatingPointError)
ERROR_EXIT_CODE = 2


class UsageError(Exception):
    """The command line has the wrong positional arguments; the message is the usage line."""


def run(main: Callable[[list[str]], None], define_flags: Callable[[], None] | None = None, *,
        errors: tuple[type[BaseException], ...] = KNOWN_ERRORS) -> None:
    """The program: defines the command's flags, parses them, and runs `main(argv)`."""
    if define_flags is not None:
        define_flags()
    app.run(functools.partial(_reporting_errors, main, errors))


def _reporting_errors(main, errors, argv):
    try:
        return main(argv)
    except Preempted as e:
        logging.warning("%s", e)
        sys.exit(SIGTERM_EXIT_CODE)
    except UsageError as e:
        print(e, file=sys.stderr)
        sys.exit(ERROR_EXIT_CODE)
    except distributed.ClusterError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(ERROR_EXIT_CODE)  # at once: JAX's exit handler would wait on the dead process
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(ERROR_EXIT_CODE)


def positional(argv: Sequence[str], count: int, usage: str) -> list[str]:
    """The `count` positional arguments after the program's name, or a UsageError."""
    if len(argv) - 1 != count:
        raise UsageError(f"usage: {usage}")
    return list(argv[1:])


def define_device_flags(*, join_cluster: bool = False) -> None:
    """--num_cpu_devices, and --distributed for commands that train."""
    flags.DEFINE_integer("num_cpu_devices", None,
                         "On CPU, simulate this many devices (to try mesh.model > 1).")
    if join_cluster:
        flags.DEFINE_bool("distributed", False, "Join a multi-process JAX cluster "
                          "(jax.distributed.initialize); launchers set SAEJAX_DISTRIBUTED=1 "
                          "instead. See saejax/distributed.py.")


class _QuietLibraries:
    """Keeps the progress lines readable: drops INFO records from orbax's internals."""

    def filter(self, record) -> bool:
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def format_duration(seconds: float) -> str:
    """An ETA or elapsed time for progress lines: "4m07s", or "2h15m" past an hour."""
    seconds = int(seconds)
    return (f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600
            else f"{seconds // 60}m{seconds % 60:02d}s")


def setup_from_flags() -> None:
    """`setup` from the flags of `define_device_flags`, first in a command's main."""
    values = flags.FLAGS
    setup(num_cpu_devices=values["num_cpu_devices"].value if "num_cpu_devices" in values
          else None,
          join_cluster="distributed" in values and values["distributed"].value)


def setup(*, num_cpu_devices: int | None = None, join_cluster: bool = False) -> None:
    """Call first in a command's main, before anything touches the devices."""
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", num_cpu_devices)
    distributed.initialize(force=join_cluster)
