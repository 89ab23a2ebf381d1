"""Matryoshka prefixes (`sae.matryoshka_widths`, saejax/sae/matryoshka.py) combine with the
mechanisms: the loss is the mechanism's plus every smaller prefix's reconstruction MSE, the
step logs each prefix's MSE and FVU, a sharded step equals one device's, and on the synthetic
hierarchy (saejax/data/hierarchy.py) Matryoshka BatchTopK absorbs parents into their children
less than BatchTopK does (`saejax.evals.absorption`), then resumes and exports to SAELens as the
JumpReLU SAE that SAELens makes of it."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import toy_config
import tiny_steps
from experiments import matryoshka as experiment
from saejax import configs, evals, memory, sae, sharding, sweep, train, validation
from saejax.analysis import loading, saelens
from saejax.data import hierarchy
from saejax.errors import ConfigError
from saejax.sae import matryoshka, ops

# LLVM's optimisation level changes the machine code, not the buffer assignment it reports.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TINY = {"data.d": 16, "data.n_features": 24, "data.features_per_sample": 3,
        "sae.expansion_factor": 4, "sae.k": 4, "sae.k_aux": 8, "train.batch_size": 64,
        "optim.warmup_steps": 1, "optim.learning_rate": 1e-2, "evals.eval_batches": 1,
        "evals.dead_window_tokens": 64, "sae.matryoshka_widths": (8, 32)}


def _config(**overrides):
    return toy_config("smoke", **{**TINY, **overrides})


def test_widths_are_counts_or_fractions_and_bad_ones_name_the_field():
    assert matryoshka.resolve_widths((8, 32), 64) == (8, 32)
    assert matryoshka.resolve_widths((0.125, 0.5, 1.0), 64) == (8, 32, 64)
    assert matryoshka.metric_names((0.125, 1)) == (
        "mse_prefix_0.125", "fvu_prefix_0.125", "mse_prefix_1", "fvu_prefix_1")
    for widths, message in (((32, 8), r"must be strictly increasing"),
                            ((0.5, 0.5), r"strictly increasing \(latent counts \(32, 32\)"),
                            ((8, 128), r"goes beyond n_latents=64"),
                            ((0.25, 16), r"mixes fractions and counts"),
                            (("a", 16), r"must be numbers"),
                            ((0.001,), r"the first prefix has no latent")):
        with pytest.raises(ConfigError, match=r"sae.matryoshka_widths=.*" + message):
            validation.validate(_config(**{"sae.matryoshka_widths": widths}), 8)
    with pytest.raises(ConfigError, match=r"'switch' supports sae.shape in"):
        validation.validate(_config(**{"sae.architecture": "switch"}), 8)
    with pytest.raises(ConfigError, match=r"topk_decoder='sparse' decodes a single-hook SAE"):
        validation.validate(_config(**{"sae.architecture": "topk",
                                       "sae.topk_decoder": "sparse"}), 8)
    for field, value, message in (("hierarchy_children", 0, "a positive integer"),
                                  ("hierarchy_child_probability", 1.5, r"in \(0, 1\]"),
                                  ("features_per_sample", 100.0, r"must be in \(0, 6\]")):
        config = experiment.get_config("matryoshka,tiny")
        config.data[field] = value
        with pytest.raises(ConfigError, match=rf"data.{field}={value}.*{message}"):
            validation.validate(config, 8)
    # Without widths the registered architecture is used as it is (legacy results unchanged).
    assert sae.from_config(_config(**{"sae.matryoshka_widths": ()}).sae) is sae.get("relu")


@pytest.mark.parametrize("mechanism", ["batchtopk", "topk", "relu"])
def test_loss_is_the_mechanisms_plus_each_smaller_prefixs_mse(mechanism):
    config = _config(**{"sae.architecture": mechanism, "sae.topk_decoder": "dense"})
    architecture = sae.from_config(config.sae)
    plain = sae.get(mechanism)
    params = plain.init(jax.random.PRNGKey(0), 16, 64, config.sae)
    params = {**params, "b_enc": params["b_enc"] + 0.1}
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 16))
    dead = jnp.arange(64) % 5 == 0
    loss, aux = jax.jit(lambda p, x: architecture.loss(p, {"activations": x}, config.sae, 0.3,
                                                       dead))(params, x)
    plain_loss, plain_aux = jax.jit(lambda p, x: plain.loss(p, {"activations": x}, config.sae,
                                                            0.3, dead))(params, x)
    latents = np.asarray(plain_aux["latents"])
    first = np.where(np.arange(64) < 8, latents, 0) @ params["W_dec"] + params["b_dec"]
    second = np.where(np.arange(64) < 32, latents, 0) @ params["W_dec"] + params["b_dec"]
    mse = [np.mean((np.asarray(x) - x_hat) ** 2) for x_hat in (first, second)]
    np.testing.assert_allclose(loss, plain_loss + sum(mse), rtol=1e-5)
    np.testing.assert_allclose([aux["mse_prefix_8"], aux["mse_prefix_32"]], mse, rtol=1e-5)
    np.testing.assert_allclose(aux["fvu_prefix_8"], ops.fvu(x, first), rtol=1e-5)
    np.testing.assert_allclose(aux["mse"], plain_aux["mse"], rtol=1e-6)  # the whole dictionary
    assert set(architecture.metrics) == set(plain.metrics) | {
        "mse_prefix_8", "fvu_prefix_8", "mse_prefix_32", "fvu_prefix_32"}
    # Counted: the whole step's, and one decoder matmul forward and backward per prefix.
    assert (architecture.flops_per_token(16, 64, config.sae)
            == plain.flops_per_token(16, 64, config.sae) + 2 * 6 * 16 * 64)
    assert (architecture.temporaries(config.sae, 64).latent_arrays
            == plain.temporaries(config.sae, 64).latent_arrays + 2)


def _auxk(pre, dead, W_dec, residual, k_aux):
    """AuxK by hand (Gao et al. 2024): the k_aux largest dead pre-activations of each token,
    rectified, decode the residual; the error over the residual's energy."""
    candidates = np.where(dead, pre, -np.inf)
    kth = -np.sort(-candidates, axis=-1)[:, k_aux - 1:k_aux]
    latents = np.where(dead & (candidates >= kth), np.maximum(pre, 0), 0)
    return np.sum((latents @ W_dec - residual) ** 2) / np.sum(residual ** 2)


def test_prefix_weights_and_prefix_auxk_add_to_the_loss():
    """`sae.matryoshka_weights` scales each smaller prefix's MSE; `sae.matryoshka_auxk` adds,
    per prefix, AuxK of the dead latents it adds on its own residual."""
    widths, weights = (8, 32), (0.5, 0.25)
    config = _config(**{"sae.architecture": "batchtopk", "sae.matryoshka_weights": weights,
                        "sae.matryoshka_auxk": True})
    architecture, plain = sae.from_config(config.sae), sae.get("batchtopk")
    params = plain.init(jax.random.PRNGKey(0), 16, 64, config.sae)
    params = {**params, "b_enc": params["b_enc"] + 0.1}
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 16))
    dead = np.arange(64) % 3 == 0
    loss, aux = jax.jit(lambda p, x: architecture.loss(p, {"activations": x}, config.sae, 0.0,
                                                       dead))(params, x)
    plain_loss, plain_aux = plain.loss(params, {"activations": x}, config.sae, 0.0, dead)
    latents, W_dec = np.asarray(plain_aux["latents"]), np.asarray(params["W_dec"])
    pre = (np.asarray(x) - np.asarray(params["b_dec"])) @ np.asarray(params["W_enc"]) + \
        np.asarray(params["b_enc"])
    expected, unit, start = float(plain_loss), float(plain_loss), 0
    for width, weight in zip(widths, weights):
        residual = np.asarray(x) - (np.where(np.arange(64) < width, latents, 0) @ W_dec
                                    + np.asarray(params["b_dec"]))
        auxk = _auxk(pre, dead & (np.arange(64) >= start) & (np.arange(64) < width), W_dec,
                     residual, 8)
        np.testing.assert_allclose(aux[f"auxk_loss_prefix_{width}"],
                                   config.sae.auxk_coefficient * auxk, rtol=1e-4)
        expected += weight * np.mean(residual ** 2) + config.sae.auxk_coefficient * auxk
        unit += np.mean(residual ** 2) + config.sae.auxk_coefficient * auxk
        start = width
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # Before sae.matryoshka_weights_from_step every prefix weighs 1.
    config = configs.apply_overrides(config, {"sae.matryoshka_weights_from_step": 5})
    for step, want in ((4, unit), (5, expected)):
        got, _ = architecture.loss(params, {"activations": x}, config.sae, 0.0, dead,
                                   step=jnp.int32(step))
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"step {step}")
    for overrides, message in (({"sae.matryoshka_weights": (1, 1, 1)}, "one per prefix"),
                               ({"sae.matryoshka_weights": (-1,)}, "non-negative"),
                               ({"sae.matryoshka_weights_from_step": -1}, "integer >= 0"),
                               ({"sae.architecture": "relu", "sae.matryoshka_auxk": True},
                                "needs a mechanism with AuxK")):
        with pytest.raises(ConfigError, match=message):
            validation.validate(_config(**overrides), 8)


def test_memory_report_counts_the_prefixes_as_xla_does():
    """The estimate is within tests/test_memory.py's factor of XLA's buffer assignment, and
    each prefix below the whole dictionary adds one [batch, n_latents] array to both."""
    counted, xla = [], []
    for widths in ((), (0.0625, 0.25)):
        config = toy_config(**{"sae.architecture": "batchtopk", "data.d": 32,
                               "sae.expansion_factor": 128, "train.batch_size": 1024,
                               "sae.k": 8, "sae.k_aux": 32, "mesh.data": 1, "mesh.model": 1,
                               "sae.matryoshka_widths": widths})
        mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
        _, compiled = memory.compile_train_step(config, mesh, d=32,
                                                compiler_options=FAST_COMPILE)
        counted.append(memory.memory_report(config, mesh, d=32).temporary_bytes)
        xla.append(memory.compiled_memory(compiled)["temp_bytes"])
        assert 1 / 1.5 <= counted[-1] / xla[-1] <= 1.5, (counted, xla)
    latent_array = 4 * 1024 * 32 * 128
    assert counted[1] - counted[0] == 2 * latent_array
    assert 1.5 * latent_array <= xla[1] - xla[0] <= 2.5 * latent_array, (xla, latent_array)


def _run_steps(config, devices, n_steps):
    run = tiny_steps.train_steps(config, devices, n_steps, metric_keys=("loss", "fvu_prefix_8"))
    return run.params, run.metrics


def test_sharded_on_2x4_matches_one_device():
    config = _config(**{"sae.architecture": "batchtopk", "data.source": "synthetic_hierarchy",
                        "data.hierarchy_parents": 4, "data.features_per_sample": 1.5})
    reference, reference_metrics = _run_steps(
        configs.apply_overrides(config, {"mesh.data": 1, "mesh.model": 1}), jax.devices()[:1], 2)
    params, metrics = _run_steps(
        configs.apply_overrides(config, {"mesh.data": 2, "mesh.model": 4}), jax.devices(), 2)
    for got, want in zip(metrics, reference_metrics):
        np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=1e-5)
    for name in reference:
        np.testing.assert_allclose(params[name], reference[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def test_hierarchy_children_fire_only_with_their_parent():
    truth = hierarchy.make_hierarchy(seed=0, d=16, n_parents=4, n_children=3)
    assert truth.features.shape == (16, 16)
    np.testing.assert_array_equal(truth.parents, [-1] * 4 + [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    x, codes = hierarchy.sample(jnp.asarray(truth.features), jax.random.PRNGKey(0), 4096,
                                n_parents=4, n_children=3, parent_probability=0.3,
                                child_probability=0.5, magnitude_spread=0.0)
    codes = np.asarray(codes)
    parents, children = codes[:, :4] != 0, (codes[:, 4:] != 0).reshape(-1, 4, 3)
    assert not np.any(children & ~parents[..., None])      # a child only with its parent
    assert np.all(children.sum(-1) <= 1)                    # and one child at a time
    np.testing.assert_allclose(parents.mean(), 0.3, atol=0.02)
    np.testing.assert_allclose(children.any(-1)[parents].mean(), 0.5, atol=0.03)
    np.testing.assert_allclose(x, codes @ truth.features, atol=1e-5)


def test_absorption_counts_a_silent_parent_latent_beside_its_childs():
    parents = jnp.array([-1, 0, 0])          # feature 0 is the parent of features 1 and 2
    matched = jnp.array([5, 6, 7])           # each feature's latent
    codes = jnp.array([[1, 1, 0], [1, 0, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], jnp.float32)
    latents = jnp.zeros((5, 8)).at[0, 6].set(1.0)        # row 0: the child's latent alone
    latents = latents.at[1, 5].set(1.0).at[1, 7].set(1.0)  # row 1: both fire
    latents = latents.at[2, 5].set(1.0)                   # row 2: the parent's alone
    # Three (row, child) pairs are active (rows 0, 1, 2); only row 0 absorbed the parent.
    np.testing.assert_allclose(evals.absorption(latents, codes, parents, matched), 1 / 3)
    decoder = jnp.eye(8)[:3] * 2.0
    np.testing.assert_array_equal(evals.match_latents(decoder, jnp.eye(8)[:3]), [0, 1, 2])


def test_matryoshka_batchtopk_absorbs_less_and_sweeps_resumes_and_exports(tmp_path):
    """Matryoshka BatchTopK absorbs less than BatchTopK on the tiny hierarchy (one sweep of the
    two); benchmarks/matryoshka_absorption.py measures it at full size over 3 seeds
    (benchmarks/RESULTS.md)."""
    from benchmarks import matryoshka_absorption  # pylint: disable=import-outside-toplevel
    config = matryoshka_absorption.config_for("matryoshka", 0, tiny=True)
    points = {"matryoshka": {"sae.matryoshka_widths": (4,)},
              "batchtopk": {"sae.matryoshka_widths": ()}}
    rows = sweep.run_sweep(config, list(points.values()), str(tmp_path / "sweep"),
                           report=False)
    assert [r["status"] for r in rows] == ["done", "done"]
    assert rows[0]["flops_per_token"] > rows[1]["flops_per_token"]  # the prefix's decode
    folders = [os.path.join(tmp_path, "sweep", row["run_dir"]) for row in rows]
    results = {variant: matryoshka_absorption.measure(
        configs.apply_overrides(config, overrides), folder)
        for (variant, overrides), folder in zip(points.items(), folders)}
    assert results["batchtopk"]["absorption"] > results["matryoshka"]["absorption"] + 0.1, (
        results)
    assert results["matryoshka"]["mmcs"] > 0.9, results
    # The run's own evaluation (summary.json, the sweep's table) reports the same absorption.
    for row, result in zip(rows, results.values()):
        assert row["absorption"] == pytest.approx(result["absorption"], abs=1e-6), (row, result)
    workdir = folders[0]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert records[-1]["fvu_prefix_4"] > records[-1]["fvu"]  # 4 latents reconstruct worse
    with open(os.path.join(workdir, "summary.json")) as f:  # and on the held-out batches
        summary = json.load(f)
    assert 0 < summary["fvu"] < summary["fvu_prefix_4"] < 1, summary

    # A sweep run again resumes the point that stopped (here, after its first checkpoint) and
    # finishes it as the run that never stopped.
    straight = train.load_params(workdir)
    steps = sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int)
    shutil.rmtree(os.path.join(workdir, "checkpoints", steps[-1]))
    os.remove(os.path.join(workdir, "summary.json"))
    rows = sweep.run_sweep(config, list(points.values()), str(tmp_path / "sweep"),
                           report=False)
    assert [r["status"] for r in rows] == ["done", "done"]
    again = train.load_params(workdir)
    for name in straight:
        np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(straight[name]),
                                      err_msg=name)

    # SAELens loads it as a JumpReLU SAE with the learned threshold on every latent.
    out = saelens.export_saelens(workdir, str(tmp_path / "saelens"))
    with open(os.path.join(out, saelens.CFG_FILENAME)) as f:
        assert json.load(f)["architecture"] == "jumprelu"
    exported, _ = saelens.import_saelens(out)
    x = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    pre = (x - exported["b_dec"]) @ exported["W_enc"] + exported["b_enc"]
    theirs = pre * (pre > np.exp(exported["log_threshold"]))
    np.testing.assert_allclose(theirs, np.asarray(loading.load_sae(workdir).encode(x)),
                               rtol=1e-4, atol=1e-5)
