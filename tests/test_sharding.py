"""Sharded train steps and the sharded top-k against single-device references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import toy_config
import tiny_steps
from saejax import data, sae, sharding

MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]


def _run_steps(config, devices, n_steps=3):
    """The state and per-step losses after `n_steps` steps on a mesh of `devices` (and, with
    resampling, every third latent marked dead, resampled and one more step)."""
    def dead(silent):  # silent for far longer than the window
        return jnp.where(jnp.arange(silent.shape[-1]) % 3 == 0, 10**6, silent)

    run = tiny_steps.train_steps(config, devices, n_steps,
                                 mark_dead=dead if config.resample.every_steps else None)
    if config.resample.every_steps:
        assert np.all(np.asarray(run.n_dead) >= run.state["tokens_since_fired"].shape[-1] // 3)
    return run.state, run.losses


def _config(architecture, mesh_shape, **overrides):
    # A small dictionary (d=32, 128 latents) keeps 8-device compiles fast on 2 cores.
    return toy_config(**overrides, **{"sae.architecture": architecture, "data.d": 32, "data.n_features": 64,
                         "sae.expansion_factor": 4, "sae.k": 6, "train.batch_size": 64,
                         "sae.l1_coefficient": 3.0, "optim.warmup_steps": 1,
                         "sae.l0_coefficient": 1e-3, "sae.jumprelu_bandwidth": 0.05,
                         # Latents silent for one batch count as dead, so the sharded AuxK
                         # top-k (k_aux <= the 16 latents per shard) runs from step 2.
                         "evals.dead_window_tokens": 64, "sae.k_aux": 8,
                         "mesh.data": mesh_shape[0], "mesh.model": mesh_shape[1]})


GROUP = {"group.sparsity_coefficients": (0.5, 3.0)}
# Dead-latent resampling after the steps (then one more step), on the sharded dictionary.
RESAMPLE = {"resample.every_steps": 1, "resample.until_step": 1}
ANNEAL = {"sae.k_anneal_steps": 2, "sae.k_anneal_start": 12}
# Each mesh costs a compile of ~5 s on 2 CPU cores, so not every case runs on every mesh. Every
# case runs on a mesh that splits the batch and the dictionary; topk, whose sharded top-k and
# AuxK depend most on how the latents are split, runs on all four shapes; switch also with its
# 4 experts split over 8 shards.
SPLIT_MESHES = {"topk": MESHES, "batchtopk": [(4, 2)], "jumprelu": [(4, 2)],
                "switch": [(2, 4), (1, 8)]}
# TopK's sharded case takes the sparse decoder ("auto" picks dense at this small dictionary).
CASES = {**{name: (name, {"sae.topk_decoder": "sparse"} if name == "topk" else {},
                   SPLIT_MESHES.get(name, [(2, 4)]))
            for name in sorted(sae.ARCHITECTURES) if name != "relu"},
         "relu-resample": ("relu", RESAMPLE, [(2, 4)]),
         "relu-group-resample": ("relu", {**GROUP, **RESAMPLE}, [(4, 2)]),
         "jumprelu-group-vmap": ("jumprelu", {**GROUP, "group.vectorize": "vmap"}, [(2, 4)]),
         # k annealed from 12 to 6 over steps 0-1, then plain: both branches of the step.
         "topk-anneal": ("topk", {**ANNEAL, "sae.topk_decoder": "sparse"}, [(4, 2)]),
         "batchtopk-anneal": ("batchtopk", ANNEAL, [(2, 4)]),
         # The dense decoder, the reference the sparse one must match (test below).
         "topk-dense-decode": ("topk", {"sae.topk_decoder": "dense"}, [(2, 4)])}


def test_cases_cover_every_architecture_split_and_every_mesh():
    assert {name for name, _, _ in CASES.values()} == set(sae.ARCHITECTURES)
    assert all(any(data > 1 and model > 1 for data, model in meshes)
               for _, _, meshes in CASES.values())
    assert {mesh for _, _, meshes in CASES.values() for mesh in meshes} == set(MESHES)


def _assert_same_run(state, losses, reference, reference_losses, what):
    """Same losses, params and dead-latent clocks as the reference, within float32 rounding."""
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    for name, value in reference["params"].items():
        # Relative error of the whole tensor: Adam divides each gradient by its own scale, so
        # an element whose gradient is ~0 may differ by reduction-order noise alone.
        value, other = np.asarray(value), np.asarray(state["params"][name])
        error = np.linalg.norm(other - value) / max(np.linalg.norm(value), 1e-12)
        assert error < 1e-5, f"{name} {what}: relative error {error:.2e}"
    np.testing.assert_array_equal(np.asarray(state["tokens_since_fired"]),
                                  np.asarray(reference["tokens_since_fired"]))


@pytest.mark.parametrize("architecture,overrides,meshes", list(CASES.values()),
                         ids=list(CASES))
def test_sharded_step_matches_single_device(architecture, overrides, meshes):
    reference, reference_losses = _run_steps(_config(architecture, (1, 1), **overrides),
                                             jax.devices()[:1])
    grouped = "group.sparsity_coefficients" in overrides
    for mesh_shape in meshes:
        state, losses = _run_steps(_config(architecture, mesh_shape, **overrides),
                                   jax.devices())
        _assert_same_run(state, losses, reference, reference_losses, f"on {mesh_shape}")
        # The dictionary really is split: each device holds [d, n_latents / model] of W_enc.
        *group, d, n_latents = reference["params"]["W_enc"].shape
        group = tuple(group)
        assert group == ((2,) if grouped else ())
        for shard in state["params"]["W_enc"].addressable_shards:
            assert shard.data.shape == (*group, d, n_latents // mesh_shape[1])
        for shard in state["params"]["W_dec"].addressable_shards:
            assert shard.data.shape == (*group, n_latents // mesh_shape[1], d)
        for shard in state["opt_state"][1][0].mu["W_enc"].addressable_shards:
            assert shard.data.shape == (*group, d, n_latents // mesh_shape[1])


@pytest.mark.parametrize("overrides", [{}, {"sae.k_anneal_steps": 4, "sae.k_anneal_start": 24}],
                         ids=["fixed-k", "annealed-k"])
def test_topk_sparse_decode_trains_like_the_dense_decoder(overrides):
    """Decoding the k selected rows gives the dense decoder's losses and params (float32
    rounding), AuxK included: latents silent for one batch are dead from the second step."""
    runs = [_run_steps(_config("topk", (1, 1), **overrides, **{"sae.topk_decoder": decoder}),
                       jax.devices()[:1], n_steps=6) for decoder in ("sparse", "dense")]
    (sparse_state, sparse_losses), (dense_state, dense_losses) = runs
    _assert_same_run(sparse_state, sparse_losses, dense_state, dense_losses, "sparse vs dense")
    assert np.any(np.asarray(dense_state["tokens_since_fired"]) >= 64)  # AuxK had dead latents


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("k", [1, 5, 16])
def test_sharded_top_k_is_exact(mesh_shape, k):
    rules = sharding.DEFAULT_RULES
    mesh = jax.make_mesh(mesh_shape, sharding.MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    key = jax.random.PRNGKey(k)
    # Rounded values give many ties: they must break towards the lower index, as lax.top_k does.
    x = jnp.round(jax.random.normal(key, (16, 128)) * 4)
    expected_values, expected_indices = jax.lax.top_k(x, k)
    with sharding.activate(mesh, rules):
        xs = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
        values, indices = jax.jit(lambda v: sharding.top_k(v, k))(xs)
        mask = jax.jit(lambda v: sharding.top_k_mask(v, k))(xs)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(expected_values))
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(expected_indices))
    expected_mask = np.zeros(x.shape, np.float32)
    np.put_along_axis(expected_mask, np.asarray(expected_indices), 1.0, axis=-1)
    np.testing.assert_array_equal(np.asarray(mask), expected_mask)
    if mesh_shape[1] > 1:
        assert mask.sharding.spec == P("data", "model")


def test_sharded_top_k_gathers_only_candidates():
    """The compiled sharded top-k all-gathers k values per shard, never the whole row."""
    mesh = jax.make_mesh((1, 8), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
        x = jax.device_put(jnp.zeros((4, 1024)), NamedSharding(mesh, P("data", "model")))
        hlo = jax.jit(lambda v: sharding.top_k(v, 3)).lower(x).compile().as_text()
    gathers = [line for line in hlo.splitlines() if "all-gather" in line and "=" in line]
    assert gathers, "expected the candidates to be all-gathered"
    assert all("1024]" not in line for line in gathers), gathers


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_batch_top_k_is_exact(mesh_shape):
    mesh = jax.make_mesh(mesh_shape, sharding.MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(3), (16, 64)))
    k = 5 * 16  # k per token x batch, shared across the batch
    expected = np.zeros(x.size, np.float32)
    expected[np.asarray(jax.lax.top_k(x.reshape(-1), k)[1])] = 1.0
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
        xs = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
        mask = jax.jit(lambda v: sharding.batch_top_k_mask(v, k))(xs)
    np.testing.assert_array_equal(np.asarray(mask).reshape(-1), expected)
    assert mask.sharding.spec == P("data", "model")
