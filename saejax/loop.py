"""The training loop of `train_and_evaluate`: steps, dead-latent resampling, the NaN check on
the host, a metrics line per SAE, checkpoints, and stopping at the same step on every host
when one of them gets SIGTERM (saving first, so the run resumes from there).
"""

from __future__ import annotations

import signal
import time
from typing import Callable

from absl import logging
import jax
import numpy as np

from saejax import checkpoint, cli, data, distributed, groups
from saejax.errors import Preempted
from saejax.trainer import Trainer
from saejax.workdir import jsonable


def train(config, trainer: Trainer, state: dict, source: data.KeyedSource, mesh,
          ckpt: checkpoint.Checkpointer, outputs: list[groups.Output], *,
          mmcs: Callable | None, seconds_before: float) -> tuple[dict, float]:
    """Trains from the state's step to `train.steps`; returns the final state and the
    training seconds summed over sessions (compilation excluded). Raises `Preempted` after
    saving when SIGTERM arrives, FloatingPointError when the loss or params go non-finite."""
    total_steps = int(config.train.steps)
    log_every = int(config.train.log_every)
    checkpoint_every = int(config.train.checkpoint_every)
    preemption_check_every = int(config.train.preemption_check_every)
    grouped = bool(groups.group_coefficients(config))
    serialize_steps = _serialize_steps(mesh)
    single_process = jax.process_count() == 1
    start_step = last_checked = int(state["step"])
    # Throughput is timed from the end of this session's first step (compilation excluded).
    t_first, first_done = None, start_step
    resampled = np.zeros(len(outputs), np.int64)  # since the last log line, per SAE
    train_seconds = seconds_before  # summed over sessions, compilation excluded
    with _SigtermFlag() as sigterm:
        for step in range(start_step, total_steps):
            state, metrics = trainer.train_step(state, source.next_batch())
            if serialize_steps or t_first is None:
                jax.block_until_ready(metrics)
            done = step + 1
            if t_first is None:
                t_first, first_done = time.perf_counter(), done
            if _resample_due(config.resample, done, total_steps):
                state, n_dead = trainer.resample_step(
                    state, tuple(source.next_batch()
                                 for _ in range(int(config.resample.batches))))
                resampled += np.asarray(n_dead).reshape(-1)
                logging.info("step %d: resampled %s dead latents.", done, n_dead)
            log_now = done % log_every == 0 or done == total_steps
            # Every host stops at the same step when any of them got SIGTERM. Agreeing is a
            # host sync, so several processes check every `preemption_check_every` steps.
            preempted = ((single_process or done % preemption_check_every == 0)
                         and distributed.any_process(sigterm.raised))
            save_now = done % checkpoint_every == 0 or done == total_steps or preempted
            if not (log_now or save_now):
                continue
            metrics = jax.device_get(metrics)
            _check_finite(metrics, ckpt, first=last_checked + 1, last=done)
            last_checked = done
            session_seconds = time.perf_counter() - t_first
            train_seconds = seconds_before + session_seconds
            if log_now:
                tokens_per_s = ((done - first_done) * int(config.train.batch_size)
                                / session_seconds if done > first_done else 0.0)
                if mmcs is not None:
                    metrics["mmcs"] = mmcs(state["params"])
                _log(config, outputs, metrics, done=done, tokens_per_s=tokens_per_s,
                     train_seconds=train_seconds, resampled=resampled, grouped=grouped)
                resampled[:] = 0
            if save_now:
                data_state = {**source.state(), "train_seconds": train_seconds}
                ckpt.save(done, state, data_state, force=True)
                groups.save_members(outputs, done, state, data_state)
            if preempted:
                groups.close(ckpt, outputs)
                raise Preempted(done)
    ckpt.wait()
    return state, train_seconds


def _serialize_steps(mesh) -> bool:
    """XLA's CPU backend runs independent programs concurrently, and with several (fake)
    devices sharing a few cores, two programs' collectives can wait on each other forever
    (the next batch's generation vs the current step). On CPU, finish each step before
    dispatching the next program; accelerators keep the asynchronous pipeline."""
    return jax.default_backend() == "cpu" and mesh.size > 1


def _resample_due(resample_config, done: int, total_steps: int) -> bool:
    every = int(resample_config.every_steps)
    return (every > 0 and done % every == 0 and done <= int(resample_config.until_step)
            and done < total_steps)


def _check_finite(metrics: dict, ckpt: checkpoint.Checkpointer, *, first: int,
                  last: int) -> None:
    """Stops the run when the loss or params of any step from `first` to `last` went
    non-finite (the step's `finite` flag, popped from `metrics`), naming the last good
    checkpoint."""
    if np.all(metrics.pop("finite")):
        return
    ckpt.wait()
    kept = (f"The last good checkpoint (step {ckpt.latest_step()}) is kept in "
            f"{ckpt.directory}." if ckpt.latest_step() is not None
            else "No checkpoint had been saved yet.")
    raise FloatingPointError(
        f"Non-finite loss or params between step {first} and step {last}; stopping. {kept}")


def _log(config, outputs: list[groups.Output], metrics: dict, *, done: int,
         tokens_per_s: float, train_seconds: float, resampled: np.ndarray,
         grouped: bool) -> None:
    """A progress line, and per SAE a line of `metrics.jsonl` and of the log."""
    total_steps, batch_size = int(config.train.steps), int(config.train.batch_size)
    eta = (total_steps - done) * batch_size / tokens_per_s if tokens_per_s else 0.0
    logging.info("step %d/%d | %.0f tok/s | ETA %s", done, total_steps, tokens_per_s,
                 cli.format_duration(eta))
    for i, output in enumerate(outputs):
        record = {"step": done, "tokens": done * batch_size,
                  **{k: jsonable(groups.pick(v, i, grouped)) for k, v in metrics.items()},
                  "tokens_per_s": tokens_per_s,
                  "train_seconds": train_seconds,
                  "resampled_latents": int(resampled[i])}
        output.metrics_log.write(record)
        logging.info("  %sloss %.4g | L0 %.2f | FVU %.4f | dead %.3f%s",
                     f"{output.name}: " if grouped else "", record["loss"], record["l0"],
                     record["fvu"], record["dead_fraction"],
                     f" | MMCS {record['mmcs']:.4f}" if "mmcs" in record else "")


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between steps, so it can save and exit."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
