"""The errors every layer of saejax raises and every command reports as one line
(`saejax/cli.py`): below everything else, so any module may raise them without importing the
layer that defines its neighbours."""

from __future__ import annotations

import signal

# What a command exits with after SIGTERM (a preempted VM) once its checkpoint is saved.
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


class ConfigError(ValueError):
    """A config that cannot work; the message names the field and the fix."""


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint of `step` was saved before stopping."""

    def __init__(self, step: int):
        super().__init__(f"SIGTERM: saved a checkpoint at step {step} and stopped.")
        self.step = step
