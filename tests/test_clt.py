"""Cross-layer transcoders (Ameisen et al. 2025) are the `CrossLayerTranscoder` shape composed
with a mechanism: layer l's latents, encoded from its MLP input, decode into the MLP outputs of
layer l and every later layer. Checked here: the decode is that sum (against a loop over
(source, target) pairs), the per-layer pieces a replacement model calls agree with the whole,
the L1 weighs the decoder norms summed over targets (free norms), the synthetic recipe is what
it says, a CLT recovers the recipe's directions and checkpoints and resumes, a step sharded
over the layer and latent axes equals the single-device step, and bad configs name the field."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import toy_config

from saejax import data, evals, optim, sae, sharding, train, validation
from saejax.data import synthetic
from saejax.sae import clt
from saejax.sae.clt import CrossLayerTranscoder
from saejax.sharding import ConfigError

LAYERS = 3
INPUTS, TARGETS = (synthetic.clt_hooks(LAYERS)[:LAYERS], synthetic.clt_hooks(LAYERS)[LAYERS:])
CLT = {"data.source": "synthetic_clt", "data.n_layers": LAYERS, "sae.shape": "clt",
       "sae.layers": f"0-{LAYERS - 1}"}
TINY = {"data.d": 16, "data.n_features": 16, "data.features_per_sample": 2,
        "sae.expansion_factor": 2, "sae.k": 2, "sae.k_aux": 8, "train.batch_size": 64,
        "optim.warmup_steps": 1, "optim.learning_rate": 1e-2, "sae.l1_coefficient": 0.1,
        "sae.l0_coefficient": 1e-3, "sae.jumprelu_bandwidth": 0.05, "evals.eval_batches": 1,
        "evals.dead_window_tokens": 64}


def _config(architecture="topk", **overrides):
    return toy_config("smoke", **{**TINY, **CLT, "sae.architecture": architecture,
                                  **overrides})


def _shape_and_params(architecture="topk", seed=0):
    architecture = sae.from_config(_config(architecture).sae)
    params = architecture.init(jax.random.PRNGKey(seed), 16, 32, _config().sae)
    # Non-zero biases, so that every term of the decode is exercised.
    params = dict(params, b_dec=jax.random.normal(jax.random.PRNGKey(7), (LAYERS * 16,)),
                  b_enc=0.1 * jax.random.normal(jax.random.PRNGKey(8), (LAYERS, 32)))
    return architecture, params


def test_each_layer_decodes_into_its_own_and_every_later_mlp_output():
    architecture, params = _shape_and_params()
    shape = architecture.shape
    assert shape == CrossLayerTranscoder((0, 1, 2)) and shape.unit_norm_params == ()
    assert shape.input_hooks == INPUTS and shape.target_hooks == TARGETS
    assert architecture.param_axes["W_enc"] == ("layer", "embed_in", "latent")
    assert architecture.param_axes["W_dec"] == ("layer", "layer_out", "latent", "embed_out")
    assert params["W_dec"].shape == (LAYERS, LAYERS, 32, 16)
    # The blocks into earlier layers start at zero and stay out of the decode.
    W_dec = np.asarray(params["W_dec"])
    assert not np.any(W_dec[1, 0]) and not np.any(W_dec[2, :2]) and np.all(W_dec[0, 2] != 0)
    latents = np.random.default_rng(1).uniform(size=(5, LAYERS, 32)).astype(np.float32)
    messy = dict(params, W_dec=params["W_dec"] + 1.0)  # what is masked may hold anything
    decode = jax.jit(shape.decode)
    x_hat = np.asarray(decode(messy, latents))
    W_messy, b_dec = np.asarray(messy["W_dec"]), np.asarray(params["b_dec"])
    for m in range(LAYERS):
        expected = sum(latents[:, l] @ W_messy[l, m] for l in range(m + 1))
        expected = expected + b_dec[m * 16:(m + 1) * 16]
        np.testing.assert_allclose(x_hat[:, m * 16:(m + 1) * 16], expected, rtol=1e-5, atol=1e-5)
        # A replacement model decodes layer m from the latents of layers 0..m alone.
        np.testing.assert_allclose(shape.decode_layer(messy, latents[:, :m + 1], m), expected,
                                   rtol=1e-5, atol=1e-5)
    # The L1's weights: each latent's norms summed over the layers it writes to.
    norms = np.linalg.norm(W_dec, axis=-1)
    decoder_norms = np.asarray(jax.jit(shape.decoder_norms)(params))
    np.testing.assert_allclose(decoder_norms, [norms[l, l:].sum(axis=0) for l in range(LAYERS)],
                               rtol=1e-5)
    np.testing.assert_allclose(decoder_norms, 1.0, rtol=1e-5)  # init: their sum is 1
    grad = jax.jit(jax.grad(lambda p: jnp.sum(shape.decoder_norms(p))))(params)
    assert np.all(np.isfinite(grad["W_dec"])) and not np.any(np.asarray(grad["W_dec"])[2, 0])


@pytest.mark.parametrize("name", ["topk", "jumprelu", "batchtopk", "relu"])
def test_encode_layer_is_the_whole_encode_one_layer_at_a_time(name):
    architecture, params = _shape_and_params(name)
    sae_config = _config(name).sae
    if name == "batchtopk":
        params = dict(params, threshold=jnp.asarray(0.05))
    x = jax.random.normal(jax.random.PRNGKey(2), (6, LAYERS, 16))
    whole = np.asarray(architecture.encode(params, x, sae_config))
    assert whole.shape == (6, LAYERS, 32)
    if name == "topk":  # k per layer per token
        assert np.all((whole != 0).sum(-1) == int(sae_config.k))
    for layer in range(LAYERS):
        np.testing.assert_allclose(clt.encode_layer(architecture, params, x[:, layer], layer,
                                                    sae_config), whole[:, layer], rtol=1e-5,
                                   atol=1e-6)


def test_the_flop_count_is_what_the_masked_layout_computes():
    architecture = sae.from_config(_config("relu").sae)
    d, n = 16, 32
    # Encoder 2 L d n forward + 2 L d n for its weight; the full L x L decoder 2 L^2 n d
    # forward + 4 L^2 n d backward.
    assert architecture.flops_per_token(d, n, _config("relu").sae) == (
        4 * LAYERS * d * n + 6 * LAYERS ** 2 * n * d)
    hlo = jax.jit(lambda p, x: architecture.decode(p, architecture.encode(
        p, x, _config("relu").sae))).lower(
        architecture.init(jax.random.PRNGKey(0), d, n, _config("relu").sae),
        jnp.ones((64, LAYERS, d))).compile().cost_analysis()
    forward = (2 * LAYERS * d * n + 2 * LAYERS ** 2 * n * d) * 64
    assert abs(hlo["flops"] - forward) / forward < 0.05, (hlo["flops"], forward)


def test_the_synthetic_recipe_is_a_code_per_layer_through_cross_layer_directions():
    config = _config()
    mesh = jax.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    source = data.make_source(config, mesh=mesh, rules=config.sharding_rules)
    assert data.batch_hooks(config) == INPUTS + TARGETS
    batch = jax.device_get(source.eval_batch(0))
    codes = np.asarray(source.eval_codes(0))                       # [batch, layer, feature]
    assert codes.shape == (64, LAYERS, 16) and 1 <= np.mean(np.sum(codes != 0, -1)) <= 4
    truth = source.ground_truth
    for l, hook in enumerate(INPUTS):
        np.testing.assert_allclose(batch[hook], codes[:, l] @ truth.inputs[l], atol=1e-5)
    for m, hook in enumerate(TARGETS):
        expected = sum(codes[:, l] @ truth.outputs[l, m] for l in range(m + 1))
        np.testing.assert_allclose(batch[hook], expected, atol=1e-5)
    assert not np.any(truth.outputs[2, :2])
    assert source.true_features.shape == (LAYERS * 16, LAYERS * 16)
    np.testing.assert_allclose(np.linalg.norm(source.true_features, axis=-1), 1.0, rtol=1e-5)
    # A decoder equal to the truth scores MMCS 1 through the shape's decoder rows.
    shape = sae.from_config(config.sae).shape
    perfect = shape.decoder_rows({"W_dec": jnp.asarray(truth.outputs)})
    assert float(evals.mmcs(perfect, jnp.asarray(source.true_features))) > 0.9999


def test_clt_config_errors_name_the_field():
    for overrides, message in (
            ({"sae.layers": ""}, r"sae.layers='': a CLT needs its layers"),
            ({"sae.layers": "2,1"}, r"sae.layers='2,1'"),
            ({"sae.layers": "0-3"}, r"sae.input_hook at sae.layers=0,1,2,3 names"),
            ({"sae.input_hook": "blocks.0.ln2.hook_normalized"}, r"sae.input_hook=.* has no "),
            ({"sae.architecture": "gated"}, r"sae.shape='clt' composes with"),
            ({"resample.every_steps": 100, "resample.until_step": 200},
             r"resample.every_steps=0"),
            ({"data.source": "synthetic"}, r"reads several hooks"),
            ({"sae.matryoshka_widths": (8,)}, r"sae.matryoshka_widths does not combine"),
            ({"mesh.layer": 2, "mesh.data": 1, "mesh.model": 4,
              "sharding_rules": (("batch", "data"), ("layer", "layer"), ("latent", "model"))},
             r"mesh.layer=2; set mesh.layer to one of \[1, 3\]"),
            ({"mesh.layer": 2, "mesh.data": 2, "mesh.model": 2},
             r"the rule \('layer', 'layer'\) and mesh.layer > 1 go together"),
            ({"mesh.data": 2, "mesh.model": 4,
              "sharding_rules": (("batch", "data"), ("layer", "model"), ("latent", "model"))},
             r"map `layer` and `latent` both to 'model'"),
            ({"mesh.data": 2, "mesh.model": 4,
              "sharding_rules": (("batch", "data"), ("layer", "model"), ("latent", None))},
             r"mesh.model=4; set mesh.model to one of \[1, 3\]")):
        with pytest.raises(ConfigError, match=message):
            validation.validate(_config(**overrides), 8)


# Sharded: 4 layers, so that a layer axis of 2 divides them.
SPLIT = {"data.n_layers": 4, "sae.layers": "0-3", "train.batch_size": 32}
LAYER_AND_LATENT = {"mesh.data": 2, "mesh.layer": 2, "mesh.model": 2, "sharding_rules": (
    ("batch", "data"), ("layer", "layer"), ("latent", "model"), ("embed", None),
    ("group", None))}
LAYER_ON_MODEL = {"mesh.data": 2, "mesh.model": 4, "sharding_rules": (
    ("batch", "data"), ("layer", "model"), ("latent", None), ("embed", None), ("group", None))}


def _run_steps(config, devices, n_steps=3):
    """Params, losses and the last metrics after `n_steps` steps of `config` on `devices`,
    with the shard shape of W_dec."""
    mesh = sharding.make_mesh(config.mesh, devices)
    with sharding.activate(mesh, config.sharding_rules):
        source = data.make_source(config, mesh=mesh, rules=config.sharding_rules)
        trainer = train.make_trainer(config, mesh, d=source.d, batch_sharding=source.sharding)
        state = trainer.init(jax.random.PRNGKey(0))
        state = trainer.init_from_data(state, tuple(source.next_batch() for _ in range(
            int(config.data.init_batches))))
        losses = []
        for _ in range(n_steps):
            state, metrics = trainer.train_step(state, source.next_batch())
            losses.append(float(metrics["loss"]))
    shard = state["params"]["W_dec"].addressable_shards[0].data.shape
    return jax.tree.map(np.asarray, state["params"]), losses, jax.device_get(metrics), shard


def test_sharded_over_layers_and_latents_matches_one_device():
    """TopK (k per layer, AuxK) on data 2 x layer 2 x model 2, and with `layer` on the model
    axis (data 2 x model 4), against one device."""
    reference, reference_losses, reference_metrics, _ = _run_steps(
        _config("topk", **SPLIT, **{"mesh.data": 1, "mesh.model": 1}), jax.devices()[:1])
    assert reference["W_dec"].shape == (4, 4, 32, 16)
    # The decoder [source layer, target layer, latent, d] is split over its source layers
    # (2 of 4 per device, or 1 with `layer` on the model axis) and its latents.
    for mesh, shard in ((LAYER_AND_LATENT, (2, 4, 16, 16)), (LAYER_ON_MODEL, (1, 4, 32, 16))):
        config = _config("topk", **SPLIT, **mesh)
        validation.validate(config, 8)
        params, losses, metrics, shard_shape = _run_steps(config, jax.devices())
        np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
        for name in reference:
            np.testing.assert_allclose(params[name], reference[name], rtol=1e-4, atol=1e-6,
                                       err_msg=name)
        for name in ("fvu", "l0", "auxk_loss", "fvu/blocks.3.hook_mlp_out"):
            np.testing.assert_allclose(metrics[name], reference_metrics[name], rtol=1e-5,
                                       atol=1e-7, err_msg=name)
        assert shard_shape == shard


def test_the_sparse_decode_steps_as_the_dense_one():
    """TopK with `sae.topk_decoder=sparse` (each layer's k latents decoded from their rows of
    the unmasked blocks, AuxK's k_aux too) against the dense masked decode: the same loss and
    gradients on one batch, and after a few steps sharded over data x layer x model the same
    params as the dense decode on one device (AuxK engaged: a window of one batch); its FLOP
    count is the sparse one."""
    def config(decoder, **mesh):
        return _config("topk", **SPLIT, **{"sae.topk_decoder": decoder, "mesh.data": 1,
                                           "mesh.model": 1, "evals.dead_window_tokens": 32,
                                           **mesh})

    sparse_config, dense_config = config("sparse"), config("dense")
    architecture = sae.from_config(sparse_config.sae)
    params = architecture.init(jax.random.PRNGKey(0), 16, 32, sparse_config.sae)
    params = dict(params, b_dec=jax.random.normal(jax.random.PRNGKey(7), (4 * 16,)))
    batch = {hook: jax.random.normal(jax.random.PRNGKey(i), (32, 16))
             for i, hook in enumerate(architecture.shape.input_hooks
                                      + architecture.shape.target_hooks)}
    dead = jnp.arange(4 * 32).reshape(4, 32) % 3 == 0
    (sparse_loss, sparse_aux), sparse_grads = jax.jit(jax.value_and_grad(
        lambda p: architecture.loss(p, batch, sparse_config.sae, 0.0, dead),
        has_aux=True))(params)
    (dense_loss, dense_aux), dense_grads = jax.jit(jax.value_and_grad(
        lambda p: architecture.loss(p, batch, dense_config.sae, 0.0, dead),
        has_aux=True))(params)
    assert float(sparse_aux["auxk_loss"]) > 0
    np.testing.assert_allclose(sparse_loss, dense_loss, rtol=1e-5)
    np.testing.assert_allclose(sparse_aux["fire_counts"], evals.fire_counts(dense_aux["latents"]))
    for name in params:
        np.testing.assert_allclose(sparse_grads[name], dense_grads[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)

    reference, reference_losses, reference_metrics, _ = _run_steps(dense_config,
                                                                   jax.devices()[:1])
    sharded = config("sparse", **LAYER_AND_LATENT)
    validation.validate(sharded, 8)
    params, losses, metrics, _ = _run_steps(sharded, jax.devices())
    assert metrics["auxk_loss"] > 0
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    for name in reference:
        np.testing.assert_allclose(params[name], reference[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    for name in ("fvu", "l0", "auxk_loss", "fvu/blocks.3.hook_mlp_out"):
        np.testing.assert_allclose(metrics[name], reference_metrics[name], rtol=1e-5,
                                   atol=1e-7, err_msg=name)

    # Per layer and selected latent (k + k_aux = 10): its encoder column and its rows of the
    # L (L + 1) / 2 = 10 unmasked blocks, 6 d each; the selection's encoders 2 L d n.
    assert architecture.flops_per_token(16, 32, sparse_config.sae) == (
        2 * 4 * 16 * 32 + 6 * 10 * (4 * 16 + 10 * 16))
    assert architecture.flops_per_token(16, 32, dense_config.sae) == (
        4 * 4 * 16 * 32 + 6 * 4 ** 2 * 32 * 16)


@pytest.mark.parametrize("decoder", ["dense", "sparse"])
def test_the_memory_model_of_a_layer_x_latent_split_matches_xla(decoder):
    """On data 2 x layer 2 x model 2, the state and batch bytes per device are XLA's argument
    bytes exactly, and the temporaries are within 1.5x of its temp bytes, with either
    decoder (the sparse one's gathered rows of every unmasked block counted)."""
    from saejax import memory  # pylint: disable=import-outside-toplevel
    config = _config("topk", **{**SPLIT, **LAYER_AND_LATENT, "data.d": 32,
                                "sae.expansion_factor": 16, "train.batch_size": 1024,
                                "sae.topk_decoder": decoder})
    mesh = sharding.make_mesh(config.mesh)
    _, compiled = memory.compile_train_step(config, mesh, d=32, compiler_options={
        "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
    report, xla = memory.memory_report(config, mesh, d=32), memory.compiled_memory(compiled)
    assert report.state_bytes + report.batch_bytes == xla["argument_bytes"], (report, xla)
    assert report.state_bytes == xla["alias_bytes"]
    # W_enc, W_dec, b_enc split over layer x model; b_dec replicated; Adam doubles each.
    n, d, layers = 512, 32, 4
    assert report.params_bytes == 4 * ((layers * d * n + layers ** 2 * n * d
                                        + layers * n) // 4 + layers * d)
    ratio = report.temporary_bytes / xla["temp_bytes"]
    assert 1 / 1.5 <= ratio <= 1.5, (report, xla, ratio)


def test_it_recovers_the_cross_layer_directions_and_resumes(tmp_path):
    overrides = {"train.steps": 200, "train.log_every": 100, "train.checkpoint_every": 100,
                 "sae.k_anneal_steps": 60, "sae.k_anneal_start": 8, "evals.eval_batches": 1}
    workdir = str(tmp_path / "run")
    summary = train.train_and_evaluate(_config(**overrides), workdir)
    assert summary["shape"] == "clt" and summary["step"] == 200
    # Every true feature (its directions into its own and later layers) has a latent whose
    # decoders into every layer are close to them: 32 latents per layer for 16 features.
    assert summary["mmcs"] > 0.95, summary
    for hook in TARGETS:
        assert summary[f"fvu/{hook}"] < 0.2, summary
    assert 0 < summary["l0"] <= LAYERS * 2 + 1e-6     # k = 2 per layer
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    assert {f"fvu/{hook}" for hook in TARGETS} <= set(first)

    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "200"))
    assert train.train_and_evaluate(_config(**overrides), resumed)["step"] == 200
    straight, again = train.load_params(workdir), train.load_params(resumed)
    for name in straight:
        np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(straight[name]),
                                      err_msg=name)
    # SAELens cannot load a CLT from disk: the export says so.
    from saejax.analysis import loading, saelens  # pylint: disable=import-outside-toplevel
    with pytest.raises((ConfigError, loading.AnalysisError),
                       match=r"SAELens has no cross-layer transcoder"):
        saelens.export_saelens(workdir, str(tmp_path / "out"))


def test_a_group_of_clts_trains_its_members_in_one_step(tmp_path):
    workdir = str(tmp_path / "group")
    summaries = list(train.train_and_evaluate(_config("relu", **{
        "train.steps": 2, "train.log_every": 2, "train.checkpoint_every": 2,
        "group.sparsity_coefficients": (0.05, 0.2)}), workdir)["members"].values())
    assert [s["l1_coefficient"] for s in summaries] == [0.05, 0.2]
    for summary in summaries:
        assert summary["shape"] == "clt" and set(f"fvu/{h}" for h in TARGETS) <= set(summary)
        assert 0 <= summary["dead_fraction"] <= 1


def test_the_experiment_config_is_a_valid_clt():
    from experiments import clt as experiment  # pylint: disable=import-outside-toplevel
    for arg in (None, "smoke"):
        config = experiment.get_config(arg)
        validation.validate(config, 8)
        shape = sae.from_config(config.sae).shape
        assert shape == CrossLayerTranscoder((0, 1, 2))
        # Twice the true features per layer.
        assert validation.n_latents(config) == 2 * config.data.n_features
    assert [p["data.seed"] for p in experiment.get_sweep()] == [0, 1, 2]
    # SmolLM2's x4 CLT: 2,304 latents a layer over layers 4-7, the rest as the x1 one.
    from experiments import clt_smollm2  # pylint: disable=import-outside-toplevel
    x1, x4 = clt_smollm2.get_config(), clt_smollm2.get_config("x4")
    assert validation.n_latents(x4) == 4 * validation.n_latents(x1) == 4 * 576
    assert sae.from_config(x4.sae).shape == sae.from_config(x1.sae).shape
    assert x4.optim.learning_rate < x1.optim.learning_rate and x4.train.steps == x1.train.steps
    with pytest.raises(ValueError, match=r"unknown argument 'x8'"):
        clt_smollm2.get_config("x8")
