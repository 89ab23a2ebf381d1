"""Unit checks of the pieces the trainer relies on: the decoder constraint, schedules, the
synthetic recipe and the metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import toy_config
from saejax import evals, optim, sae
from saejax.data import synthetic
from saejax.sae import base, topk_family


def test_decoder_constraint_keeps_rows_unit_norm_and_drops_parallel_gradient():
    key_w, key_g = jax.random.split(jax.random.PRNGKey(0))
    w = jax.random.normal(key_w, (3, 16, 8))  # a stacked leading axis works too
    w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    params = {"W_dec": w, "b_dec": jnp.zeros(8)}
    grads = {"W_dec": jax.random.normal(key_g, w.shape), "b_dec": jnp.ones(8)}

    projected, _ = optim.remove_parallel_decoder_grad().update(grads, optax.EmptyState(), params)
    np.testing.assert_allclose(jnp.sum(projected["W_dec"] * w, axis=-1), 0.0, atol=1e-6)
    np.testing.assert_array_equal(projected["b_dec"], grads["b_dec"])

    tx = optim.make_optimizer(toy_config().optim, total_steps=10)
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(jnp.linalg.norm(params["W_dec"], axis=-1), 1.0, rtol=1e-6)
    assert not np.allclose(params["W_dec"], w)


def test_decoder_constraint_applies_to_the_params_a_shape_names_and_only_those():
    """A shape whose decoder norms are free (a crosscoder's) names no unit-norm params; one
    with two decoders names both."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(3))
    params = {"W_dec": jax.random.normal(key_a, (16, 8)) * 3.0,
              "W_skip": jax.random.normal(key_b, (16, 8)) * 3.0}
    grads = jax.tree.map(jnp.ones_like, params)
    for names in ((), ("W_dec", "W_skip")):
        tx = optim.make_optimizer(toy_config().optim, total_steps=10, unit_norm_params=names)
        p, state = params, tx.init(params)
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
        for name in params:
            norms = np.asarray(jnp.linalg.norm(p[name], axis=-1))
            if name in names:
                np.testing.assert_allclose(norms, 1.0, rtol=1e-6)
            else:
                assert norms.min() > 2.0, name
    assert sae.from_config(toy_config().sae).shape.unit_norm_params == ("W_dec",)


def test_learning_rate_warms_up_holds_then_decays_to_zero():
    config = toy_config(**{"optim.warmup_steps": 10, "optim.decay_fraction": 0.2,
                           "optim.learning_rate": 1e-3})
    schedule = optim.learning_rate_schedule(config.optim, total_steps=100)
    assert float(schedule(0)) < 2e-4
    np.testing.assert_allclose([float(schedule(s)) for s in (10, 50, 80)], 1e-3, rtol=1e-6)
    assert float(schedule(90)) < 6e-4 and float(schedule(100)) < 1e-9
    l1 = optim.l1_coefficient_schedule(2.0, warmup_steps=4)
    np.testing.assert_allclose([float(l1(s)) for s in (0, 2, 4, 9)], [0, 1, 2, 2])


def test_synthetic_recipe_matches_the_published_statistics():
    gt = synthetic.make_ground_truth(seed=0, d=256, n_features=512, correlated=True,
                                     frequency_decay=0.99)
    np.testing.assert_allclose(np.linalg.norm(gt.features, axis=-1), 1.0, rtol=1e-5)
    correlation = gt.correlation_cholesky @ gt.correlation_cholesky.T
    np.testing.assert_allclose(np.diag(correlation), 1.0, rtol=1e-4)
    assert np.all(np.linalg.eigvalsh(correlation.astype(np.float64)) > 0)

    x, codes = synthetic.sample(gt, jax.random.PRNGKey(1), 4096, features_per_sample=5.0)
    active = np.asarray(codes > 0)
    assert 4.0 < active.sum(-1).mean() < 6.0          # about 5 features per sample
    assert active.any(-1).all()                        # no sample is empty
    assert np.asarray(codes).max() <= 1.0
    frequency = active.mean(0)
    assert frequency[:32].mean() > 10 * frequency[-32:].mean()   # 0.99**i decay
    np.testing.assert_allclose(x, np.asarray(codes) @ gt.features, rtol=1e-5, atol=1e-5)


def test_metrics():
    x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    assert float(evals.fvu(x, x)) == 0.0
    np.testing.assert_allclose(float(evals.fvu(x, jnp.broadcast_to(x.mean(0), x.shape))), 1.0)
    latents = jnp.array([[0.0, 2.0, 0.0], [1.0, 1.0, 0.0]])
    assert float(evals.l0(latents)) == 1.5
    np.testing.assert_array_equal(evals.fire_counts(latents), [1, 2, 0])
    assert float(evals.l0_of_counts(evals.fire_counts(latents), 2)) == 1.5
    counts = evals.update_tokens_since_fired(jnp.array([0, 5, 9]), evals.fire_counts(latents), 2)
    np.testing.assert_array_equal(counts, [0, 0, 11])
    np.testing.assert_allclose(float(evals.dead_fraction(counts, 10)), 1 / 3, rtol=1e-6)
    features = jnp.eye(3)
    decoder = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    np.testing.assert_allclose(float(evals.mmcs(decoder, features)),
                               (1.0 + 2 * np.sqrt(0.5)) / 3, rtol=1e-6)


def test_jumprelu_threshold_gradient_is_the_kernel_density_estimate():
    from saejax.sae import jumprelu  # pylint: disable=import-outside-toplevel
    z = jnp.array([[0.50, 0.10, 0.31], [0.29, 0.70, 0.05]])
    threshold = jnp.array([0.3, 0.3, 0.3])
    bandwidth = 0.04  # the rectangle kernel covers |z - 0.3| < 0.02
    # H(z - theta): d/d theta = -(1/eps) * #{|z - theta| < eps/2}; no gradient to z.
    d_z, d_theta = jax.grad(lambda z, t: jnp.sum(jumprelu.heaviside(z, t, bandwidth)),
                            argnums=(0, 1))(z, threshold)
    np.testing.assert_array_equal(d_z, 0.0)
    np.testing.assert_allclose(d_theta, [-1 / bandwidth, 0.0, -1 / bandwidth])
    # JumpReLU: d/dz = H(z - theta); d/d theta = -(theta/eps) * #{...}.
    d_z, d_theta = jax.grad(lambda z, t: jnp.sum(jumprelu.jumprelu(z, t, bandwidth)),
                            argnums=(0, 1))(z, threshold)
    np.testing.assert_array_equal(d_z, (z > threshold).astype(jnp.float32))
    np.testing.assert_allclose(d_theta, [-0.3 / bandwidth, 0.0, -0.3 / bandwidth], rtol=1e-6)


def test_batchtopk_learns_an_inference_threshold(tmp_path):
    from saejax import train  # pylint: disable=import-outside-toplevel
    summary = train.train_and_evaluate(
        toy_config(**{"sae.architecture": "batchtopk", "sae.k": 8, "train.steps": 30}),
        str(tmp_path / "run"))
    params = train.load_params(str(tmp_path / "run"))
    assert params["threshold"] > 0
    # Encoding one token at a time with the threshold keeps about k latents per token.
    assert 2 < summary["l0"] < 32, summary


def test_batch_sum_is_the_sum_over_the_batch_and_its_gradient_flows():
    a = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), (96, 40)))
    np.testing.assert_allclose(evals.batch_sum(a), jnp.sum(a, axis=0), rtol=1e-6)
    assert evals.batch_sum(a.astype(jnp.bfloat16)).dtype == jnp.float32
    np.testing.assert_array_equal(evals.fire_counts(a.astype(jnp.bfloat16)),
                                  np.sum(np.asarray(a) != 0, axis=0))
    # The bias added through base.add_bias gets the summed gradient, as a broadcast add would.
    y, bias = a, jax.random.normal(jax.random.PRNGKey(1), (40,))
    loss = lambda add: lambda y, b: jnp.sum(jnp.sin(add(y, b)))
    ours = jax.grad(loss(base.add_bias), argnums=(0, 1))(y, bias)
    plain = jax.grad(loss(jnp.add), argnums=(0, 1))(y, bias)
    for g, h in zip(ours, plain):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,decoder", [("topk", "dense"), ("topk", "sparse"),
                                          ("batchtopk", "dense"), ("switch", "dense")])
def test_k_annealing_keeps_k_anneal_start_latents_at_first_and_k_from_its_end(name, decoder):
    # Switch: two experts of 32 latents, with room for every token (none dropped).
    config = toy_config(**{"sae.architecture": name, "data.d": 16, "sae.k": 4,
                           "sae.k_anneal_steps": 10, "sae.k_anneal_start": 24,
                           "sae.topk_decoder": decoder, "sae.switch_experts": 2,
                           "sae.switch_capacity_factor": 2.0})
    architecture = sae.get(name)
    params = architecture.init(jax.random.PRNGKey(0), 16, 64, config.sae)
    params["b_enc"] = params["b_enc"] + 10.0  # every pre-activation positive: none cut by ReLU
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 16))
    dead = jnp.zeros(64, bool)

    def l0_at(step):
        _, aux = jax.jit(lambda step: architecture.loss(params, x, config.sae, 0.0, dead,
                                                        step=step))(step)
        counts = aux["fire_counts"] if "fire_counts" in aux else evals.fire_counts(aux["latents"])
        return float(evals.l0_of_counts(counts, 32))

    # 24 at step 0, linearly down to 4 at step 10 (14 at step 5), 4 after, and 4 in evaluation.
    assert [l0_at(step) for step in (0, 5, 10, 50)] == [24.0, 14.0, 4.0, 4.0]
    assert float(topk_family.annealed_k(config.sae, 5)) == 14
    _, aux = architecture.loss(params, x, config.sae, 0.0, dead)
    counts = aux["fire_counts"] if "fire_counts" in aux else evals.fire_counts(aux["latents"])
    assert float(evals.l0_of_counts(counts, 32)) == 4.0


def test_auxk_gives_dead_latents_a_gradient():
    from saejax.sae import topk  # pylint: disable=import-outside-toplevel
    config = toy_config(**{"data.d": 16, "sae.k": 2, "sae.k_aux": 4})
    params = sae.get("topk").init(jax.random.PRNGKey(0), 16, 64, config.sae)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 16))
    pre = np.asarray(x @ params["W_enc"])
    never_selected = np.ones(64, bool)
    never_selected[np.argsort(-pre, axis=-1)[:, :2].reshape(-1)] = False
    assert never_selected.sum() > 8

    def grad_of(dead):
        grad_fn = jax.grad(lambda p: sae.get("topk").loss(p, x, config.sae, 0.0, dead)[0])
        return np.asarray(grad_fn(params)["W_enc"])

    alive = grad_of(jnp.zeros(64, bool))
    np.testing.assert_array_equal(alive[:, never_selected], 0.0)
    revived = grad_of(jnp.asarray(never_selected))
    assert np.abs(revived[:, never_selected]).sum(0).astype(bool).sum() >= 4
    _, aux = sae.get("topk").loss(params, x, config.sae, 0.0, jnp.asarray(never_selected))
    assert 0.0 < float(aux["auxk_loss"]) <= 2.0


def test_geometric_median_resists_outliers():
    points = jnp.concatenate([jax.random.normal(jax.random.PRNGKey(0), (99, 4)) * 0.1 + 1.0,
                              jnp.full((1, 4), 1000.0)])
    median = base.geometric_median(points)
    np.testing.assert_allclose(median, 1.0, atol=0.1)
    assert float(jnp.mean(points, axis=0)[0]) > 10


def test_density_windows_and_histogram():
    density = evals.init_density(3)
    latents = jnp.array([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    density = evals.update_density(density, evals.fire_counts(latents), 2, window_tokens=4)
    assert np.isnan(np.asarray(density.density)).all()     # window not full yet
    assert np.isnan(float(evals.dense_fraction(density.density, 0.1)))
    assert int(evals.log_density_histogram(density.density).sum()) == 0
    density = evals.update_density(density, evals.fire_counts(latents), 2, window_tokens=4)
    np.testing.assert_allclose(density.density, [1.0, 0.5, 0.0])
    assert int(density.window_tokens) == 0 and int(density.counts.sum()) == 0
    np.testing.assert_allclose(float(evals.dense_fraction(density.density, 0.6)), 1 / 3,
                               rtol=1e-6)
    histogram = np.asarray(evals.log_density_histogram(density.density))
    # never fired -> first bin; density 0.5 -> [-0.5, 0); density 1 -> the last bin.
    assert histogram.sum() == 3 and histogram[0] == 1 and histogram[-2] == 1
    assert histogram[-1] == 1 and len(histogram) == len(evals.LOG_DENSITY_EDGES) + 1
    saturated = evals.update_tokens_since_fired(jnp.array([2**30 - 1]),
                                                evals.fire_counts(jnp.zeros((8, 1))), 8)
    assert int(saturated[0]) == 2**30


def test_normalized_inputs_and_geometric_median_init(tmp_path):
    from saejax import train  # pylint: disable=import-outside-toplevel
    workdir = str(tmp_path / "run")
    summary = train.train_and_evaluate(
        toy_config(**{"data.normalize_inputs": True, "sae.b_dec_init": "geometric_median",
                      "train.steps": 10, "optim.learning_rate": 1e-9}), workdir)
    params = train.load_params(workdir)
    gt = synthetic.make_ground_truth(seed=0, d=256, n_features=512, correlated=True,
                                     frequency_decay=0.99)
    x, _ = synthetic.sample(gt, jax.random.PRNGKey(5), 4096, features_per_sample=5.0)
    scale = float(params["input_scale"])
    np.testing.assert_allclose(float(jnp.mean(jnp.sum(jnp.square(x * scale), -1))), 1.0,
                               rtol=0.05)
    # b_dec barely moved (tiny learning rate) from the geometric median of the scaled inputs.
    median = np.asarray(jax.jit(base.geometric_median)(x * scale))
    assert np.abs(median).max() > 0.01
    np.testing.assert_allclose(params["b_dec"], median, atol=0.02)
    assert summary["step"] == 10


def test_resampling_resets_dead_latents_moments_and_rewarms():
    from saejax.sae import gated  # pylint: disable=import-outside-toplevel
    config = toy_config()
    params = sae.get("gated").init(jax.random.PRNGKey(0), 8, 16)
    initial = dict(params)
    params["r_mag"] = params["r_mag"] + 0.5
    tx = optim.make_optimizer(config.optim, total_steps=100, rewarm_steps=10)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(12):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert float(optim.rewarm_factor(state)) == 1.0
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 8))
    dead = jnp.arange(16) < 4

    new_params, new_state = optim.resample_dead_latents(
        jax.random.PRNGKey(2), params, state, x, x * 0.5, dead, tx=tx, encoder_scale=0.2,
        param_axes=sae.get("gated").param_axes, rules=sae.get("gated").resample, initial=initial)
    adam = new_state[1][0]
    for name, axis in (("W_enc", 1), ("W_dec", 0), ("b_enc", 0), ("r_mag", 0)):
        dead_part = np.take(np.asarray(adam.mu[name]), np.arange(4), axis=axis)
        alive_part = np.take(np.asarray(adam.mu[name]), np.arange(4, 16), axis=axis)
        assert np.all(dead_part == 0) and np.all(alive_part != 0), name
    np.testing.assert_array_equal(adam.mu["b_dec"], state[1][0].mu["b_dec"])
    np.testing.assert_allclose(np.linalg.norm(new_params["W_dec"][:4], axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(new_params["r_mag"][:4], 0.0)
    np.testing.assert_array_equal(new_params["W_dec"][4:], params["W_dec"][4:])
    np.testing.assert_allclose(float(optim.rewarm_factor(new_state)), 0.1)  # 1 / rewarm_steps

    _, unchanged = optim.resample_dead_latents(
        jax.random.PRNGKey(2), params, state, x, x * 0.5, jnp.zeros(16, bool), tx=tx,
        encoder_scale=0.2, param_axes=sae.get("gated").param_axes, rules=sae.get("gated").resample,
        initial=initial)
    assert float(optim.rewarm_factor(unchanged)) == 1.0   # nothing dead: no re-warm


def test_resampling_resets_a_dead_jumprelu_threshold_to_its_initial_value():
    from saejax.sae import jumprelu  # pylint: disable=import-outside-toplevel
    config = toy_config(**{"sae.architecture": "jumprelu"})
    initial = sae.get("jumprelu").init(jax.random.PRNGKey(0), 8, 16, config.sae)
    params = {**initial, "log_threshold": initial["log_threshold"] + 2.0}
    tx = optim.make_optimizer(config.optim, total_steps=100)
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 8))
    dead = jnp.arange(16) < 4
    new_params, _ = optim.resample_dead_latents(
        jax.random.PRNGKey(2), params, tx.init(params), x, x * 0.5, dead, tx=tx,
        encoder_scale=0.2, param_axes=sae.get("jumprelu").param_axes,
        rules=sae.get("jumprelu").resample, initial=initial)
    np.testing.assert_allclose(np.exp(new_params["log_threshold"][:4]),
                               config.sae.jumprelu_init_threshold, rtol=1e-6)
    np.testing.assert_array_equal(new_params["log_threshold"][4:], params["log_threshold"][4:])


def test_switch_routes_each_token_to_one_expert():
    from saejax.sae import switch  # pylint: disable=import-outside-toplevel
    # Capacity for every token in every expert: nothing is dropped.
    config = toy_config(**{"sae.switch_experts": 4, "sae.k": 3, "sae.switch_capacity_factor": 4.0})
    params = sae.get("switch").init(jax.random.PRNGKey(0), 16, 64, config.sae)
    x = jax.random.normal(jax.random.PRNGKey(1), (40, 16))
    latents = np.asarray(sae.get("switch").encode(params, x, config.sae))
    active_experts = (latents.reshape(40, 4, 16) != 0).any(-1).sum(-1)
    np.testing.assert_array_equal(active_experts, 1)          # one expert per token
    assert ((latents != 0).sum(-1) <= 3).all()                 # TopK inside the expert
    # Encoding is per token: the same latents alone as in a batch.
    np.testing.assert_allclose(np.asarray(sae.get("switch").encode(params, x[7:8], config.sae))[0],
                               latents[7], rtol=1e-5, atol=1e-6)
    # The training loss reconstructs through the router weight exactly as decode(encode(x)).
    _, aux = sae.get("switch").loss(params, x, config.sae, 0.0, jnp.zeros(64, bool))
    assert float(aux["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(aux["x_hat"], latents @ params["W_dec"] + params["b_dec"],
                               rtol=1e-5, atol=1e-5)
    assert 0.99 <= float(aux["balance_loss"]) <= 4.0
    dense = base.dense_flops_per_token(16, 64)
    default = toy_config(**{"sae.switch_experts": 4}).sae  # capacity factor 1.25
    assert sae.get("switch").flops_per_token(16, 64, default) < dense / 2


def test_topk_decoder_auto_is_sparse_only_for_large_dictionaries():
    from conftest import toy_config  # pylint: disable=import-outside-toplevel
    from saejax.sae import topk  # pylint: disable=import-outside-toplevel
    config = toy_config(None, **{"sae.k": 6})            # 1024 latents, k_aux 128: dense
    assert not topk.sparse_decode(config.sae, 1024)
    config.sae.k = 32
    assert topk.sparse_decode(config.sae, 512 * 128)     # x128 at d = 512: sparse
    config.sae.topk_decoder = "sparse"
    assert topk.sparse_decode(config.sae, 1024)
    config.sae.topk_decoder = "dense"
    assert not topk.sparse_decode(config.sae, 512 * 128)
    assert sae.get("topk").flops_per_token(512, 512 * 128, config.sae) == 10 * 512 * 512 * 128
