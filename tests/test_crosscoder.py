"""Crosscoders (Lindsey et al. 2024) are the `Crosscoder` shape composed with a mechanism: on
the synthetic recipe of one sparse code read through per-layer directions, a ReLU crosscoder
recovers each feature's directions at every layer (one decoder row), its L1 weighs each latent
by the sum of its per-hook decoder norms (which stay free), it reports FVU per hook, it gives
the same run on a 2x4 mesh as on one device, and it checkpoints and resumes. Each hook has its
own input scale: on batches whose hooks differ 10x in size (`growing`, as residual streams grow
with depth) each is normalised on its own, and the runs above are made on such batches."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import toy_config
from test_shapes import TINY, _run_steps

from saejax import data, optim, sae, sharding, train, validation
from saejax.data import synthetic
from saejax.sae.crosscoder import Crosscoder
from saejax.sharding import ConfigError

HOOKS = synthetic.crosscoder_hooks(3)
CROSSCODER = {"data.source": "synthetic_crosscoder", "data.n_layers": 3,
              "sae.shape": "crosscoder", "sae.hooks": ",".join(HOOKS)}


def _config(architecture="relu", **overrides):
    return toy_config("smoke", **{**TINY, **CROSSCODER, "sae.architecture": architecture,
                                  "sae.l1_coefficient": 0.3, "data.normalize_inputs": True,
                                  **overrides})


GROWTH = np.float32(10.0)  # hook l of the synthetic batches, 10**l times its recipe's size


@pytest.fixture
def growing(monkeypatch):
    """The synthetic crosscoder's hooks 1x, 10x, 100x their recipe's size, as residual streams
    grow with depth: one input scale for the hooks side by side would leave the last dominating
    the loss; each hook's own makes every hook's normalised batches what they were."""
    entries = synthetic.SyntheticCrosscoderSource._entries

    def grown(self, x, codes):
        return {hook: value * GROWTH ** i
                for i, (hook, value) in enumerate(entries(self, x, codes).items())}
    monkeypatch.setattr(synthetic.SyntheticCrosscoderSource, "_entries", grown)


def test_the_batches_are_one_code_through_per_layer_directions():
    config = _config()
    mesh = jax.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    source = data.make_source(config, mesh=mesh, rules=config.sharding_rules)
    assert data.batch_hooks(config) == HOOKS and source.widths == {h: 16 for h in HOOKS}
    batch = source.next_batch()
    assert list(batch) == list(HOOKS)
    _, codes = synthetic.sample(source.ground_truth, jax.random.fold_in(source._train_key, 0),
                                64, float(config.data.features_per_sample))
    directions = np.split(source.true_features * np.sqrt(3), 3, axis=-1)
    for hook, features in zip(HOOKS, directions):
        np.testing.assert_allclose(batch[hook], codes @ features, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(source.true_features, axis=-1), 1.0, rtol=1e-5)


def test_the_l1_weighs_the_sum_of_per_hook_decoder_norms_which_stay_free():
    shape = sae.from_config(_config().sae).shape
    assert shape == Crosscoder(HOOKS) and shape.unit_norm_params == ()
    params = shape.init_layout(jax.random.PRNGKey(0), 16, 8)
    # Each latent's three per-hook decoders start at norm 1/3: their sum is 1.
    np.testing.assert_allclose(shape.decoder_norms(params), 1.0, rtol=1e-5)
    scaled = dict(params, W_dec=params["W_dec"] * jnp.repeat(jnp.array([1.0, 2.0, 4.0]), 16))
    np.testing.assert_allclose(shape.decoder_norms(scaled), 7 / 3, rtol=1e-5)
    # The optimiser leaves the decoder's norms to the loss.
    tx = optim.make_optimizer(_config().optim, 10, unit_norm_params=shape.unit_norm_params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    moved = jax.tree.map(lambda p, u: p + u, params, updates)
    assert not np.allclose(shape.decoder_norms(moved), 1.0, atol=1e-3)


def test_each_hook_has_its_own_input_scale(growing):
    config = _config(**{"data.init_batches": 2})
    mesh = jax.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    with sharding.activate(mesh, config.sharding_rules):
        source = data.make_source(config, mesh=mesh, rules=config.sharding_rules)
        trainer = train.make_trainer(config, mesh, d=source.d, batch_sharding=source.sharding)
        batches = tuple(source.next_batch() for _ in range(2))
        state = trainer.init_from_data(trainer.init(jax.random.PRNGKey(0)), batches)
    scale = np.asarray(state["input_scale"])
    expected = [1 / np.sqrt(np.mean(np.sum(np.concatenate(
        [np.asarray(b[hook]) for b in batches]) ** 2, axis=-1))) for hook in HOOKS]
    np.testing.assert_allclose(scale, expected, rtol=1e-5)
    np.testing.assert_allclose(scale[:-1] / scale[1:], GROWTH, rtol=0.2)  # each its own size
    # What the crosscoder reads: every hook at unit mean squared norm.
    scaled = sae.base.scale_batch(trainer.architecture.shape, batches[0], scale)
    for hook in HOOKS:
        assert np.mean(np.sum(np.asarray(scaled[hook]) ** 2, -1)) == pytest.approx(1, rel=0.2)


def test_it_recovers_the_cross_layer_features_and_resumes(tmp_path, growing):
    overrides = {"train.steps": 300, "train.log_every": 100, "train.checkpoint_every": 100,
                 "optim.learning_rate": 3e-3, "evals.eval_batches": 2}
    workdir = str(tmp_path / "run")
    summary = train.train_and_evaluate(_config(**overrides), workdir)
    assert summary["shape"] == "crosscoder" and summary["step"] == 300
    # Every true feature has a decoder row close to its directions at all three layers.
    assert summary["mmcs"] > 0.9, summary
    assert summary["mcc"] > 0.9, summary  # one-to-one (SAELens' synthetic benchmark)
    for hook in HOOKS:
        assert summary[f"fvu/{hook}"] < 0.2, summary
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    assert {f"fvu/{hook}" for hook in HOOKS} <= set(first)

    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "300"))
    assert train.train_and_evaluate(_config(**overrides), resumed)["step"] == 300
    straight, again = train.load_params(workdir), train.load_params(resumed)
    assert straight["input_scale"].shape == (3,)
    for name in straight:
        np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(straight[name]),
                                      err_msg=name)


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_sharded_on_2x4_matches_one_device(architecture, growing):
    overrides = {"resample.batches": 2}
    reference, reference_losses = _run_steps(
        _config(architecture, **overrides, **{"mesh.data": 1, "mesh.model": 1}),
        jax.devices()[:1], 3)
    params, losses = _run_steps(
        _config(architecture, **overrides, **{"mesh.data": 2, "mesh.model": 4}),
        jax.devices(), 3)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    for name in reference:
        np.testing.assert_allclose(params[name], reference[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    assert reference["W_dec"].shape == (64, 3 * 16)


def test_crosscoder_config_errors_name_the_field():
    for overrides, message in (
            ({"sae.hooks": "layer_0"}, r"sae.shape='crosscoder' needs sae.hooks: two or more"),
            ({"sae.hooks": "layer_0,layer_7"}, r"sae.hooks names \['layer_7'\]"),
            ({"data.source": "synthetic"}, r"reads several hooks; data.source='synthetic'")):
        with pytest.raises(ConfigError, match=message):
            validation.validate(_config(**overrides), 8)


def test_a_trained_crosscoder_loads_and_its_saelens_export_is_refused(tmp_path, growing):
    from saejax.analysis import loading, saelens  # pylint: disable=import-outside-toplevel
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(_config(**{"train.steps": 4, "train.log_every": 2,
                                        "train.checkpoint_every": 4}), workdir)
    loaded = loading.load_sae(workdir)
    assert loaded.architecture.shape == Crosscoder(HOOKS)
    # Each hook's raw activations are read times its own scale (the dashboards' `scale_of`).
    scales = train.load_params(workdir)["input_scale"]
    assert [loaded.scale_of(hook) for hook in HOOKS] == pytest.approx(list(scales), rel=1e-6)
    np.testing.assert_allclose(scales[:-1] / scales[1:], GROWTH, rtol=0.2)
    with pytest.raises(loading.AnalysisError, match=r"none of them"):
        loaded.scale_of("layer_7")
    x = np.random.default_rng(0).standard_normal((2, 3 * 16)).astype(np.float32)
    columns = np.repeat(scales, 16)
    architecture = loaded.architecture
    x_hat = architecture.decode(loaded.params, architecture.encode(
        loaded.params, x * columns, loaded.sae_config), x * columns) / columns
    np.testing.assert_allclose(loaded.reconstruct(x), x_hat, rtol=1e-5, atol=1e-6)
    with pytest.raises((ConfigError, loading.AnalysisError), match=r"SAELens has no crosscoder"):
        saelens.export_saelens(workdir, str(tmp_path / "out"))


def test_the_experiment_config_is_a_valid_crosscoder():
    from experiments import crosscoder  # pylint: disable=import-outside-toplevel
    for arg in (None, "smoke"):
        config = crosscoder.get_config(arg)
        validation.validate(config, 8)
        assert sae.from_config(config.sae).shape == Crosscoder(crosscoder.HOOKS)
    assert [p["data.seed"] for p in crosscoder.get_sweep()] == [0, 1, 2]



def test_the_smollm2_crosscoder_reports_both_loss_recovered_figures(tmp_path):
    """experiments/crosscoder_smollm2.py:tiny on the real model, from the `lm` source over a
    few Shakespeare lines: three residual streams, each with its own input scale (smaller
    deeper: the residual norm grows with depth), FVU per hook, and loss recovered with all
    hooks replaced and with each alone, every one between the zero ablation and the clean
    model's CE."""
    from conftest import asset  # pylint: disable=import-outside-toplevel
    from experiments import crosscoder_smollm2  # pylint: disable=import-outside-toplevel
    checkpoint = os.path.dirname(asset("smollm2", "config.json", what="SmolLM2-135M"))
    with open(asset("shakespeare", "hamlet.txt", what="Shakespeare"), encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()][200:300]
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = crosscoder_smollm2.get_config("tiny")
    config.lm.checkpoint, config.lm.tokens = checkpoint, str(text)
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))

    assert summary["shape"] == "crosscoder" and summary["step"] == config.train.steps
    scales = train.load_params(str(tmp_path / "run"))["input_scale"]
    assert scales.shape == (3,) and np.all(np.diff(scales) < 0), scales
    for suffix in ("", *(f"/{hook}" for hook in crosscoder_smollm2.HOOKS)):
        assert np.isfinite(summary[f"loss_recovered{suffix}"]), (suffix, summary)
        assert summary["ce_clean"] < summary[f"ce_zero_ablation{suffix}"], suffix
        assert summary[f"kl_sae{suffix}"] >= 0, suffix
        if suffix:
            assert np.isfinite(summary[f"fvu{suffix}"]), suffix
