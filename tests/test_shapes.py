"""A mechanism and a shape are separate pieces: a transcoder with JumpReLU or TopK is
`sae.from_config` composing the registered mechanism with `shapes.Transcoder`, with no file of
its own. On the synthetic two-hook recipe (one sparse code through known directions into
`activations_in` and through other known directions into `activations_out`) it trains, gives
the same run on a 2x4 mesh as on one device, and checkpoints and resumes."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import toy_config
import tiny_steps
from jax.sharding import AbstractMesh, AxisType

from saejax import configs, data, evals, memory, sae, sharding, train, validation
from saejax.analysis import loading, saelens
from saejax.data import synthetic
from saejax.sae import shapes
from saejax.sharding import ConfigError

IN, OUT = synthetic.TRANSCODER_HOOKS
TRANSCODER = {"data.source": "synthetic_transcoder", "sae.shape": "transcoder",
              "sae.input_hook": IN, "sae.target_hook": OUT}
# A small dictionary (d=16, 64 latents) keeps the 8-device compiles fast on 2 cores.
TINY = {"data.d": 16, "data.n_features": 24, "data.features_per_sample": 3,
        "sae.expansion_factor": 4, "sae.k": 4, "sae.k_aux": 8, "train.batch_size": 64,
        "optim.warmup_steps": 1, "optim.learning_rate": 1e-2, "sae.l0_coefficient": 1e-3,
        "sae.jumprelu_bandwidth": 0.05, "evals.eval_batches": 1,
        "evals.dead_window_tokens": 64}
CASES = {"jumprelu": {"sae.architecture": "jumprelu"},
         "topk_skip": {"sae.architecture": "topk", "sae.skip_connection": True}}


def _config(case, **overrides):
    return toy_config("smoke", **{**TINY, **TRANSCODER, **CASES[case], **overrides})


def test_a_pair_is_a_composition_not_a_file():
    sae_dir = os.path.dirname(sae.__file__)
    modules = {name[:-3] for name in os.listdir(sae_dir) if name.endswith(".py")}
    mechanisms = {a.mechanism.name for a in sae.ARCHITECTURES.values() if a.mechanism}
    assert mechanisms == {a.name for a in sae.ARCHITECTURES.values()}
    for mechanism in mechanisms:
        for shape in shapes.SHAPES:
            assert not modules & {f"{mechanism}_{shape}", f"{shape}_{mechanism}"}
    # The transcoder is written once, in shapes.py, and named by no mechanism's file.
    # (clt.py is a shape of its own, the cross-layer transcoder, not a mechanism.)
    for module in modules - {"shapes", "__init__", "base", "clt"}:
        with open(os.path.join(sae_dir, module + ".py")) as f:
            assert "Transcoder" not in f.read(), module

    config = _config("jumprelu")
    architecture = sae.from_config(config.sae)
    assert architecture.mechanism is sae.get("jumprelu").mechanism
    assert architecture.shape == shapes.Transcoder(IN, OUT)
    assert architecture.param_axes["W_enc"] == ("embed_in", "latent")
    assert architecture.param_axes["log_threshold"] == ("latent",)
    assert architecture.saelens is sae.get("jumprelu").saelens  # the shape adds its part
    # The default shape is the registered architecture itself.
    assert sae.from_config(configs.base_config().sae) is sae.get("relu")


def test_shape_config_errors_name_the_field():
    for overrides, message in (
            ({"data.source": "synthetic"},
             r"gives one: name the stores of one harvest in data.path.*synthetic_transcoder"),
            ({"sae.target_hook": ""}, r"needs sae.target_hook"),
            ({"sae.target_hook": IN}, r"both 'activations_in'"),
            ({"sae.input_hook": "blocks.0.hook_mlp_in"},
             r"sae.input_hook='blocks.0.hook_mlp_in' is not an entry"),
            ({"sae.shape": "hypercoder"}, r"sae.shape='hypercoder' is not known"),
            ({"sae.architecture": "switch"}, r"'switch' supports sae.shape in"),
            ({"sae.architecture": "topk", "sae.topk_decoder": "sparse"},
             r"topk_decoder='sparse' decodes a single-hook SAE only"),
            ({"sae.shape": "single_hook"}, r"gives the hooks.*sae.shape='transcoder'")):
        with pytest.raises(ConfigError, match=message):
            validation.validate(_config("jumprelu", **overrides), 8)


def test_synthetic_two_hook_batches_are_one_code_through_two_directions():
    config = _config("jumprelu")
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    source = data.make_source(config, mesh=mesh, rules=config.sharding_rules)
    assert source.widths == {IN: 16, OUT: 16}
    batch = source.next_batch()
    truth = synthetic.make_ground_truth(seed=int(config.data.seed), d=16, n_features=24,
                                        correlated=bool(config.data.correlated),
                                        frequency_decay=float(config.data.frequency_decay))
    _, codes = synthetic.sample(truth, jax.random.fold_in(source._train_key, 0), 64,
                                float(config.data.features_per_sample))
    np.testing.assert_allclose(batch[IN], codes @ source.input_features, atol=1e-5)
    np.testing.assert_allclose(batch[OUT], codes @ source.true_features, atol=1e-5)
    assert not np.allclose(batch[IN], batch[OUT])


def _run_steps(config, devices, n_steps):
    # Resampling points dead latents at badly reconstructed tokens (input and target).
    dead = lambda _: np.where(np.arange(64) % 3 == 0, 10**6, 0).astype(np.int32)
    run = tiny_steps.train_steps(config, devices, n_steps, init_from_data=True, mark_dead=dead)
    assert int(run.n_dead) == 22
    return run.params, run.losses


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_on_2x4_matches_one_device(case):
    overrides = {"resample.batches": 2}
    reference, reference_losses = _run_steps(
        _config(case, **overrides, **{"mesh.data": 1, "mesh.model": 1}), jax.devices()[:1], 3)
    params, losses = _run_steps(
        _config(case, **overrides, **{"mesh.data": 2, "mesh.model": 4}), jax.devices(), 3)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    assert set(params) == set(reference)
    for name in reference:
        np.testing.assert_allclose(params[name], reference[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    if case == "topk_skip":
        assert params["W_skip"].shape == (16, 16) and np.any(params["W_skip"] != 0)


@pytest.mark.parametrize("case", list(CASES))
def test_transcoder_trains_checkpoints_and_resumes(case, tmp_path):
    overrides = {"train.steps": 40, "train.log_every": 10, "train.checkpoint_every": 20,
                 "mesh.data": 2, "mesh.model": 4}
    workdir = str(tmp_path / "run")
    summary = train.train_and_evaluate(_config(case, **overrides), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    # It learns the map from one hook to the other: the reconstruction error of the target
    # falls well below where it started, and the decoder turns toward the output directions.
    assert records[-1]["fvu"] < 0.5 * records[0]["fvu"], [r["fvu"] for r in records]
    assert summary["step"] == 40 and summary["fvu"] < 0.5
    assert summary["shape"] == "transcoder"
    assert records[-1]["mmcs"] > records[0]["mmcs"]
    assert set(evals.RECOVERY_METRICS) <= set(summary)  # SAELens' synthetic benchmark

    # Resuming from the checkpoint of step 20 (the run stopped there) gives the run that
    # never stopped.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "40"))
    assert train.train_and_evaluate(_config(case, **overrides), resumed)["step"] == 40
    loaded = loading.load_sae(workdir)  # read back as the transcoder it is
    assert loaded.architecture.shape == shapes.Transcoder(IN, OUT, case == "topk_skip")
    # Exported where SAELens has the transcoder (tests/test_saelens_interop.py runs sae_lens on
    # it), it reads back to the same map from one hook to the other; else a clear refusal.
    out = str(tmp_path / "saelens")
    if loaded.architecture.name in saelens.exportable(loaded.architecture.shape):
        imported = loading.load_sae(saelens.export_saelens(workdir, out))
        assert imported.architecture.shape == loaded.architecture.shape
        x = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
        np.testing.assert_allclose(imported.reconstruct(x), loaded.reconstruct(x), rtol=1e-5,
                                   atol=1e-5)
    else:
        with pytest.raises(loading.AnalysisError, match="has no SAELens counterpart"):
            saelens.export_saelens(workdir, out)
    straight, again = train.load_params(workdir), train.load_params(resumed)
    for name in straight:
        np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(straight[name]),
                                      err_msg=name)


def test_memory_report_counts_both_entries_and_the_skip():
    config = _config("topk_skip", **{"train.batch_size": 256, "mesh.data": 2, "mesh.model": 4})
    mesh = AbstractMesh((2, 4), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 2)
    report = memory.memory_report(config, mesh, d=16)
    rows = 256 // 2
    assert report.batch_bytes == 4 * rows * 2 * 16  # activations_in and activations_out
    # W_enc, W_dec split over `model`; b_enc too; b_dec and the [d_in, d_out] skip whole.
    assert report.params_bytes == 4 * (2 * 16 * 64 // 4 + 64 // 4 + 16 + 16 * 16)
