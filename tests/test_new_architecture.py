"""An architecture is one file: one defined here, and nowhere else, registers and then trains,
resamples, sweeps, memory-reports, checkpoints, resumes and exports to SAELens without any
other file knowing its name.

It is a ReLU SAE with a learned per-latent gain (latents = relu(pre) * exp(log_gain)), an extra
param with its own resampling rule, and a tanh penalty in place of L1, weighted by a config
field of its own (`sae.tanh_coefficient`), with an extra metric (`mean_gain`). A variant with a
transcoder-like shape (entry "in" encoded, entry "out" reconstructed) checks that the step's
metrics compare the reconstruction with the target, not the input.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

from conftest import toy_config
from saejax import configs, memory, sae, sharding, sweep, train
from saejax.analysis import loading, saelens
from saejax.sae import base, ops
from saejax.sharding import ConfigError

NAME = "gained_relu"
PARAM_AXES = {**base.PARAM_AXES, "log_gain": ("latent",)}


def init(key, d, n_latents, sae_config):
    del sae_config
    return {**base.init_params(key, d, n_latents), "log_gain": jnp.zeros((n_latents,))}


def encode(params, x, sae_config=None):
    del sae_config
    return jax.nn.relu(base.pre_activations(params, x)) * jnp.exp(params["log_gain"])


def loss(params, batch, sae_config, sparsity_coefficient, dead, step=None):
    del dead, step
    shape = base.SINGLE_HOOK  # what it reads and reconstructs from the batch dict
    latents = encode(params, shape.input(batch), sae_config)
    x_hat = base.decode(params, latents)
    mse = ops.mse(shape.target(batch), x_hat)
    penalty = jnp.mean(jnp.tanh(latents * jnp.linalg.norm(params["W_dec"], axis=-1)))
    return mse + sparsity_coefficient * penalty, {
        "mse": mse, "sparsity_loss": penalty, "latents": latents, "x_hat": x_hat,
        "mean_gain": jnp.mean(jnp.exp(params["log_gain"]))}


def validate(config, n_latents):
    del n_latents
    base.require(config.sae.tanh_coefficient >= 0,
                 f"sae.tanh_coefficient={config.sae.tanh_coefficient!r} must be >= 0.")


def to_saelens(params, sae_config):
    """relu(pre) * g == relu(pre * g) for g > 0: the gain folds into the encoder."""
    del sae_config
    gain = np.exp(params["log_gain"])
    return "standard", {**base.dense_tensors(params), "W_enc": params["W_enc"] * gain,
                        "b_enc": params["b_enc"] * gain}, {}


ARCHITECTURE = base.Architecture(
    name=NAME, init=init, encode=encode, decode=base.decode, loss=loss,
    flops_per_token=base.dense_flops_per_token, param_axes=PARAM_AXES,
    sparsity_coefficient="tanh_coefficient",
    config_fields={"tanh_coefficient": base.ConfigField(0.3, "weight of the tanh penalty")},
    validate=validate, metrics=("sparsity_loss", "mean_gain"),
    temporaries=lambda sae_config, n_latents: base.Temporaries(4),
    resample={**base.RESAMPLE, "log_gain": "init"},
    saelens=base.SaeLens(to_saelens=to_saelens))

_TINY = {"sae.architecture": NAME, "data.d": 16, "data.n_features": 24,
         "sae.expansion_factor": 4, "train.batch_size": 64, "train.log_every": 3,
         "train.checkpoint_every": 3, "evals.eval_batches": 1, "mesh.model": 2,
         "evals.dead_window_tokens": 128}


@pytest.fixture(autouse=True)
def registered():
    sae.register(ARCHITECTURE)
    yield
    sae.unregister(NAME)


def _config(**overrides):
    return toy_config("smoke", **{**_TINY, **overrides})


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_its_config_field_and_checks_come_from_its_file():
    assert configs.base_config().sae.tanh_coefficient == 0.3
    with pytest.raises(ConfigError, match=r"sae.tanh_coefficient=-1.0 must be >= 0"):
        train.train_and_evaluate(_config(**{"sae.tanh_coefficient": -1.0}), "/nonexistent")
    sae.unregister(NAME)
    assert "tanh_coefficient" not in configs.base_config().sae


def test_trains_resamples_checkpoints_resumes_and_exports(tmp_path):
    workdir = str(tmp_path / "run")
    overrides = {"train.steps": 6, "resample.every_steps": 3, "resample.until_step": 3,
                 "resample.batches": 2, "evals.dead_window_tokens": 64}
    summary = train.train_and_evaluate(_config(**overrides), workdir)
    assert summary["architecture"] == NAME and summary["tanh_coefficient"] == 0.3
    assert summary["step"] == 6 and np.isfinite(summary["fvu"])
    records = _metrics(workdir)
    assert [r["step"] for r in records] == [3, 6]
    for record in records:  # its own metrics are logged, none dropped
        assert record["mean_gain"] > 0 and record["sparsity_loss"] > 0
        assert record["tanh_coefficient"] == pytest.approx(0.3)
    params = train.load_params(workdir)
    assert params["log_gain"].shape == (64,)

    # Resuming with more steps carries on from the checkpoint of step 6.
    summary = train.train_and_evaluate(_config(**{**overrides, "train.steps": 9}), workdir)
    assert summary["step"] == 9
    assert [r["step"] for r in _metrics(workdir)] == [3, 6, 9]

    # Exported, SAELens' standard encoding of raw activations gives saejax's latents.
    out = saelens.export_saelens(workdir, str(tmp_path / "saelens"))
    with open(os.path.join(out, saelens.CFG_FILENAME)) as f:
        assert json.load(f)["architecture"] == "standard"
    loaded = loading.load_sae(workdir)
    exported, _ = saelens.import_saelens(out)
    x = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    theirs = np.maximum((x - exported["b_dec"]) @ exported["W_enc"] + exported["b_enc"], 0)
    np.testing.assert_allclose(theirs, np.asarray(loaded.encode(x)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(theirs @ exported["W_dec"] + exported["b_dec"],
                               np.asarray(loaded.reconstruct(x)), rtol=1e-4, atol=1e-5)


def test_resampling_resets_its_param_by_its_rule():
    from saejax import optim  # pylint: disable=import-outside-toplevel
    config = _config()
    initial = init(jax.random.PRNGKey(0), 8, 16, config.sae)
    params = {**initial, "log_gain": initial["log_gain"] + 1.0}
    tx = optim.make_optimizer(config.optim, total_steps=10)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 8))
    dead = jnp.arange(16) < 4
    new, _ = optim.resample_dead_latents(
        jax.random.PRNGKey(2), params, tx.init(params), x, x * 0.5, dead, tx=tx,
        encoder_scale=0.2, param_axes=PARAM_AXES, rules=ARCHITECTURE.resample, initial=initial)
    np.testing.assert_array_equal(new["log_gain"], np.where(np.arange(16) < 4, 0.0, 1.0))


def test_sweeps_over_its_coefficient_as_one_group(tmp_path):
    points = [{"sae.tanh_coefficient": c} for c in (0.1, 0.3)]
    rows = sweep.run_sweep(_config(**{"train.steps": 3, "mesh.model": 1}), points,
                           str(tmp_path / "sweep"), report=False)
    assert [r["status"] for r in rows] == ["done", "done"]
    assert [r["tanh_coefficient"] for r in rows] == [0.1, 0.3]
    assert {r["run_dir"] for r in rows} == {rows[0]["run_dir"]}  # one group of two
    # Its penalty is not a mean over latents: the level is the coefficient itself.
    assert [(r["sparsity_level_name"], r["sparsity_level"]) for r in rows] == [
        ("tanh_coefficient", 0.1), ("tanh_coefficient", 0.3)]


def test_memory_report_counts_its_temporaries():
    config = _config(**{"train.batch_size": 256, "mesh.data": 2, "mesh.model": 4})
    mesh = AbstractMesh((2, 4), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 2)
    report = memory.memory_report(config, mesh, d=16)
    # Four [batch, n_latents] arrays (its `temporaries`), split over both axes, plus the
    # [batch, d] arrays every step holds.
    rows, latents = 256 // 2, 64 // 4
    assert report.activation_bytes == 4 * (4 * rows * latents + memory.EMBED_ARRAYS * rows * 16)
    # Its extra param is in the state: W_enc, W_dec split over `model`, biases and gain too.
    assert report.params_bytes == 4 * (2 * 16 * 64 // 4 + 2 * 64 // 4 + 16)


class _InToOut(base.SingleHook):
    """A transcoder-like shape, for this test: encodes entry "in", reconstructs entry "out"."""

    def entries(self, widths):
        return ((base.Entry("in", widths["in"]),), (base.Entry("out", widths["out"]),))

    def input(self, batch):
        return batch["in"]

    def target(self, batch):
        return batch["out"]


def test_the_step_reads_its_input_and_compares_the_reconstruction_with_its_target():
    shape = _InToOut("in_to_out")

    def transcoder_loss(params, batch, sae_config, sparsity_coefficient, dead, step=None):
        del dead, step
        latents = encode(params, shape.input(batch), sae_config)
        x_hat = base.decode(params, latents)
        mse = ops.mse(shape.target(batch), x_hat)
        return mse + sparsity_coefficient * 0.0, {
            "mse": mse, "sparsity_loss": jnp.zeros(()), "latents": latents, "x_hat": x_hat,
            "mean_gain": jnp.mean(jnp.exp(params["log_gain"]))}

    sae.register(ARCHITECTURE._replace(name="gained_transcoder", loss=transcoder_loss,
                                       shape=shape))
    try:
        config = _config(**{"sae.architecture": "gained_transcoder", "mesh.model": 1})
        mesh = sharding.make_mesh(config.mesh)
        rules = config.sharding_rules
        with sharding.activate(mesh, rules):
            batch_sharding = jax.sharding.NamedSharding(
                mesh, sharding.logical_to_spec(("batch", "embed"), rules))
            trainer = train.make_trainer(config, mesh, d=16, batch_sharding=batch_sharding)
            state = trainer.init(jax.random.PRNGKey(0))
            x = jax.random.normal(jax.random.PRNGKey(1), (64, 16))
            # The target is the input negated: what an SAE of "in" would get right, this one
            # (it reconstructs "out") gets wrong, and its metrics say so.
            batch = jax.device_put({"in": x, "out": -x}, batch_sharding)
            params = jax.tree.map(np.asarray, state["params"])
            x_hat = np.asarray(base.decode(params, encode(params, x)))
            _, metrics = trainer.train_step(state, batch)
    finally:
        sae.unregister("gained_transcoder")
    expected_mse = np.mean((x_hat + np.asarray(x)) ** 2)
    np.testing.assert_allclose(metrics["mse"], expected_mse, rtol=1e-5)
    target = -np.asarray(x)
    fvu = np.sum((target - x_hat) ** 2) / np.sum((target - target.mean(0)) ** 2)
    np.testing.assert_allclose(metrics["fvu"], fvu, rtol=1e-5)
