"""A few train steps of a tiny config on a mesh of given devices: what the tests that compare a
sharded run with one device's (test_sharding, test_shapes, test_matryoshka) each run, built
once here (source, trainer, init, the steps, and optionally resampling latents marked dead)."""

from typing import NamedTuple

import jax
import numpy as np

from saejax import data, sharding, train


class Steps(NamedTuple):
    state: dict          # the train state after the last step
    params: dict         # its params, on the host
    metrics: list        # per step, {key: host array} of the `metric_keys`
    n_dead: object       # what the resample step reported (None when there was none)

    @property
    def losses(self) -> list:
        return [m["loss"] for m in self.metrics]


def train_steps(config, devices, n_steps: int, *, init_from_data: bool = False,
                metric_keys=("loss",), mark_dead=None) -> Steps:
    """`n_steps` steps of `config` on a mesh of `devices`, from `PRNGKey(0)`.

    init_from_data: first `trainer.init_from_data` on `data.init_batches` batches.
    mark_dead: `tokens_since_fired -> tokens_since_fired`, applied after the steps (kept in its
      sharding); then one resample step on `resample.batches` batches and one more train step.
    """
    mesh = sharding.make_mesh(config.mesh, devices)
    with sharding.activate(mesh, config.sharding_rules):
        source = data.make_source(config, mesh=mesh, rules=config.sharding_rules)
        trainer = train.make_trainer(config, mesh, d=source.d, batch_sharding=source.sharding)
        state = trainer.init(jax.random.PRNGKey(0))
        if init_from_data:
            state = trainer.init_from_data(state, tuple(source.next_batch() for _ in range(
                int(config.data.init_batches))))
        metrics = []

        def step(state):
            state, step_metrics = trainer.train_step(state, source.next_batch())
            metrics.append({k: np.asarray(step_metrics[k]) for k in metric_keys})
            return state

        for _ in range(n_steps):
            state = step(state)
        n_dead = None
        if mark_dead is not None:
            silent = state["tokens_since_fired"]
            state = dict(state, tokens_since_fired=jax.device_put(mark_dead(silent),
                                                                  silent.sharding))
            state, n_dead = trainer.resample_step(state, tuple(
                source.next_batch() for _ in range(int(config.resample.batches))))
            state = step(state)
    return Steps(state, jax.tree.map(np.asarray, state["params"]), metrics, n_dead)
