"""Mirrors of a run's metrics for the tools people watch runs in: TensorBoard event files in
`<workdir>/tensorboard/` (written with tensorboardX, so TensorFlow is not needed) and, when
`logging.wandb_project` is set, a Weights & Biases run. `metrics.jsonl` and `summary.json` stay
the source of truth: the mirrors get the same records, under the same names, from
`workdir.MetricsLog` (process 0 only), which is the one place records are written.

What each mirror gets: every number of a metrics line as a scalar at its step, the feature
density histogram (`log_density_histogram`, counts over `evals.LOG_DENSITY_EDGES`) as a
histogram of log10 density, and the final evaluations (summary.json's numbers) as
`summary/<name>` at the last step.
"""

from __future__ import annotations

import importlib
import math
import os
import uuid
from typing import Protocol

import numpy as np

from saejax import paths
from saejax.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"   # the W&B run a resumed run goes on logging to
WANDB_MODES = ("", "online", "offline", "disabled")
HISTOGRAM = "log_density_histogram"


def density_bucket_edges() -> np.ndarray:
    """The 19 edges (log10 density) of the histogram's 18 bins: bin 0, the latents that never
    fired in the window, is drawn as [-8.5, -8); the last, those that fired on every token, as
    [0, 0.5)."""
    from saejax import evals  # pylint: disable=import-outside-toplevel  (jax, on first use)
    return np.asarray([-8.5, *evals.LOG_DENSITY_EDGES, 0.5])


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics line or a summary (not its step, lists, strings or NaN/None)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class Mirror(Protocol):
    def write(self, record: dict) -> None: ...
    def write_summary(self, summary: dict, step: int) -> None: ...
    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------
# TensorBoard.
# ------------------------------------------------------------------------------------------
class TensorBoard:
    """Event files in `<workdir>/tensorboard/`. A resumed run purges the events after its
    checkpoint's step (TensorBoard drops them on reading), as metrics.jsonl drops its lines."""

    def __init__(self, workdir: str, resume_step: int):
        try:
            from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            raise ConfigError("logging.tensorboard=True needs tensorboardX (a dependency of "
                              "saejax: pip install -e . or pip install tensorboardX), or set "
                              "--config.logging.tensorboard=False.") from e
        self.logdir = paths.join(workdir, TENSORBOARD_DIR)
        self._writer = SummaryWriter(self.logdir,
                                     purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        step = int(record["step"])
        for name, value in scalars(record).items():
            self._writer.add_scalar(name, value, step)
        counts = np.asarray(record.get(HISTOGRAM) or [], np.float64)
        if counts.sum() > 0:
            edges = density_bucket_edges()
            centres = (edges[:-1] + edges[1:]) / 2
            used = np.flatnonzero(counts)
            self._writer.add_histogram_raw(
                HISTOGRAM, min=float(edges[used[0]]), max=float(edges[used[-1] + 1]),
                num=float(counts.sum()), sum=float(counts @ centres),
                sum_squares=float(counts @ centres**2), bucket_limits=edges[1:].tolist(),
                bucket_counts=counts.tolist(), global_step=step)
        self._writer.flush()  # a killed run keeps what it logged

    def write_summary(self, summary: dict, step: int) -> None:
        for name, value in scalars(summary).items():
            self._writer.add_scalar(f"summary/{name}", value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# ------------------------------------------------------------------------------------------
# Weights & Biases.
# ------------------------------------------------------------------------------------------
def import_wandb(logging_config):
    """The wandb module, or a ConfigError naming the field that asked for it and the fix."""
    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise ConfigError(
            f"logging.wandb_project={logging_config.wandb_project!r} asks for Weights & "
            "Biases, but wandb is not installed: pip install 'saejax[wandb]' (or pip install "
            "wandb), or leave logging.wandb_project empty.") from None


class WandB:
    """One W&B run per workdir: its id is kept in `<workdir>/wandb_run_id`, so a resumed run
    logs on in the same W&B run. `logging.wandb_mode` ("offline", ...) is passed on; left
    empty, wandb's own setting (WANDB_MODE, `wandb offline`) decides."""

    def __init__(self, config, workdir: str, name: str):
        wandb = import_wandb(config.logging)
        id_file = paths.join(workdir, WANDB_ID_FILE)
        if paths.exists(id_file):
            run_id = paths.read_text(id_file).strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            paths.write_text(id_file, run_id + "\n")
        self._wandb = wandb
        self._run = wandb.init(
            project=str(config.logging.wandb_project),
            entity=str(config.logging.wandb_entity) or None, name=name, id=run_id,
            resume="allow", dir=workdir if not paths.is_remote(workdir) else None,
            mode=str(config.logging.wandb_mode) or None, config=config.to_dict())

    def write(self, record: dict) -> None:
        values: dict = dict(scalars(record))
        counts = np.asarray(record.get(HISTOGRAM) or [], np.float64)
        if counts.sum() > 0:
            values[HISTOGRAM] = self._wandb.Histogram(
                np_histogram=(counts, density_bucket_edges()))
        self._run.log(values, step=int(record["step"]))

    def write_summary(self, summary: dict, step: int) -> None:
        del step
        self._run.summary.update({f"summary/{k}": v for k, v in scalars(summary).items()})

    def close(self) -> None:
        self._run.finish()


# ------------------------------------------------------------------------------------------
# Which mirrors a run's config asks for.
# ------------------------------------------------------------------------------------------
def validate(config) -> None:
    """The `logging` section: a known W&B mode, and wandb installed when it is asked for."""
    section = config.logging
    if str(section.wandb_mode) not in WANDB_MODES:
        raise ConfigError(f"logging.wandb_mode={section.wandb_mode!r} is not known; choose one "
                          f"of {WANDB_MODES[1:]} or leave it empty (wandb's own setting).")
    if section.wandb_project:
        import_wandb(section)


def open_mirrors(config, workdir: str, resume_step: int) -> list[Mirror]:
    """The mirrors of one SAE's metrics (a run's, or a group member's in its folder). Call on
    process 0 only."""
    mirrors: list[Mirror] = []
    if config.logging.tensorboard:
        mirrors.append(TensorBoard(workdir, resume_step))
    if config.logging.wandb_project:
        mirrors.append(WandB(config, workdir, os.path.basename(os.path.normpath(workdir))))
    return mirrors
