"""Orbax checkpoints of a run: the train state (params, optimizer state, counters, RNG) and the
data source's position, saved together so that a resumed run continues exactly.

Restoring tries the newest step first; a step that fails to restore (a corrupt or truncated
checkpoint) is moved aside to `<workdir>/corrupt_checkpoints/` with a warning, never deleted, and
the next older step is tried.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from absl import logging
import orbax.checkpoint as ocp


class Checkpointer:
    """Owns `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, *, max_to_keep: int, save_interval_steps: int):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
            cleanup_tmp_directories=True)
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options,
                                     item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore_latest(self, abstract_state) -> tuple[Any, dict] | None:
        """(state, data_state) of the newest readable step, or None if there is none."""
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore()))
            except Exception as e:  # pylint: disable=broad-except
                self._set_aside(step, e)
                continue
            logging.info("Restored checkpoint at step %d from %s", step, self.directory)
            return restored.state, restored.data
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        self._manager.wait_until_finished()
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.workdir, "corrupt_checkpoints", str(step))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        shutil.move(src, dst)
        logging.warning("Checkpoint at step %d could not be restored (%s: %s); moved it to %s "
                        "and trying the previous one.", step, type(error).__name__,
                        str(error).splitlines()[0] if str(error) else "", dst)
        self._manager.close()
        self._manager = self._open()

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
