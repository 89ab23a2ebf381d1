"""Orbax checkpoints of a run: the train state (params, optimizer state, counters, RNG) and the
data source's position, saved together so that a resumed run continues exactly; `load_params`
reads a trained SAE back.

Restoring tries the newest step first; when a step fails to restore (a corrupt or truncated
checkpoint) and an older one succeeds, the failed one is moved aside to
`<workdir>/corrupt_checkpoints/` with a warning, never deleted. If no step restores, nothing is
moved and the error is raised.
"""

from __future__ import annotations

from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from saejax import paths


ITEMS = ("state", "data")


def directory_of(workdir: str) -> str:
    return paths.join(paths.absolute(workdir), "checkpoints")


def read_state(workdir: str, step: int | None = None):
    """The saved train state of a run (default: the newest step), restored onto one local
    device whatever mesh saved it; for reading an SAE, not for resuming."""
    directory = directory_of(workdir)
    # Handlers named, so the saved shapes are known without a target: the checkpoint may come
    # from a mesh (or a number of processes) this process does not have.
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {directory}")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              manager.item_metadata(step).state)
        return manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))).state


def load_params(workdir: str, step: int | None = None) -> dict[str, np.ndarray]:
    """The SAE params of a run's checkpoint (default: the newest) as NumPy arrays, with
    `input_scale`: the SAE expects raw activations multiplied by it (one scale, shape (), or
    one per hook where the shape keeps them, a crosscoder's [n_hooks];
    `sae.base.scale_batch`)."""
    state = read_state(workdir, step)
    return {**jax.tree.map(np.asarray, state["params"]),
            "input_scale": np.asarray(state["input_scale"])}


class Checkpointer:
    """Owns `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, *, max_to_keep: int, save_interval_steps: int):
        self.workdir = paths.absolute(workdir)
        self.directory = directory_of(workdir)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
            cleanup_tmp_directories=True)
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore_latest(self, abstract_state) -> tuple[Any, dict] | None:
        """(state, data_state) of the newest readable step, or None if there are no steps.

        Newer steps that fail are moved aside only once an older one restores: if none does,
        the failure is more likely this program than the files (a changed state layout, no
        memory), so nothing is moved and the error is raised.
        """
        failures = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore()))
            except Exception as e:  # pylint: disable=broad-except
                logging.warning("Checkpoint at step %d could not be restored (%s: %s).", step,
                                type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                failures.append((step, e))
                continue
            for failed_step, error in failures:
                self._set_aside(failed_step, error)
            logging.info("Restored checkpoint at step %d from %s", step, self.directory)
            return restored.state, restored.data
        if failures:
            step, error = failures[-1]
            raise RuntimeError(
                f"No checkpoint in {self.directory} could be restored (steps "
                f"{[s for s, _ in failures]}); nothing was moved or deleted. The oldest failed "
                f"with {type(error).__name__}: {error}") from error
        return None

    def delete_after(self, step: int) -> None:
        """Deletes steps newer than `step` (for derived copies that will be written again)."""
        for newer in [s for s in self._manager.all_steps() if s > step]:
            self._manager.delete(newer)

    def _set_aside(self, step: int, error: Exception) -> None:
        self._manager.wait_until_finished()
        src = epath.Path(self.directory) / str(step)
        dst = epath.Path(self.workdir) / "corrupt_checkpoints" / str(step)
        if jax.process_index() == 0:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists():
                dst.rmtree()
            src.rename(dst)
        logging.warning("Checkpoint at step %d could not be restored (%s); an older one could, "
                        "so it was moved to %s.", step, type(error).__name__, dst)
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
