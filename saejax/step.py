"""The train state and the pure functions of a step: `init_train_state`, its logical axes,
`train_step`, `resample_step`, `init_from_data` and `eval_step`. Each takes the state (or
params) and a batch `{hook: [batch, d_hook]}` and returns new values; `saejax.trainer` jits
them with their shardings, and vmaps them over a group's members.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from saejax import data, evals, optim, sae, sharding


def init_train_state(key: jax.Array, sparsity_coefficient: jax.Array, *,
                     architecture: sae.Architecture, tx: optax.GradientTransformation, d: int,
                     n_latents: int, sae_config) -> dict:
    params_key, rng = jax.random.split(key)
    params = architecture.init(params_key, d, n_latents, sae_config)
    latent_shape = sae.base.latent_shape(architecture.shape, n_latents)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "tokens_since_fired": jnp.zeros(latent_shape, jnp.int32),
        "density": evals.init_density(latent_shape),
        # Inputs are multiplied by this before the SAE sees them (data.normalize_inputs): one
        # scale, or the shape's per hook (a crosscoder's [n_hooks]); `sae.base.scale_batch`.
        "input_scale": jnp.ones(sae.base.input_scale_shape(architecture.shape), jnp.float32),
        # The weight of the sparsity term after warmup; differs between members of a group.
        "sparsity_coefficient": jnp.asarray(sparsity_coefficient, jnp.float32),
        "rng": rng,
    }


# How the state of a group of SAEs is stacked: these entries carry a leading member axis, the
# others (the step, the RNG, the input scale, whatever its shape) are shared by every member.
MEMBER_AXES = {"step": None, "params": 0, "opt_state": 0, "tokens_since_fired": 0,
               "density": 0, "input_scale": None, "sparsity_coefficient": 0, "rng": None}
# A hook group's state (groups.py) is stacked once more, on a leading hook axis: each hook's
# SAE (or coefficient group) has its own input scale; the step and the RNG stay shared (every
# hook's SAE starts from the seed, as it would alone).
HOOK_AXES = {key: None if key in ("step", "rng") else 0 for key in MEMBER_AXES}


def state_logical_axes(architecture: sae.Architecture, tx: optax.GradientTransformation,
                       abstract_state: dict, *, levels: tuple[tuple[str, dict], ...] = ()
                       ) -> dict:
    """Logical axes of every array of the state; optimizer moments follow their params.
    `levels` are a group's stacked member levels, outermost first, as (logical axis, which
    entries it stacks) (`groups.Members.levels`: ("hook", HOOK_AXES), ("group", MEMBER_AXES))."""
    axes = architecture.param_axes
    latent = sae.base.latent_axes(architecture.shape)
    opt_state = abstract_state["opt_state"]
    if levels:  # tree_map_params needs the per-member structure, not the stacked one
        opt_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[len(levels):], a.dtype),
                                 opt_state)
    logical = {
        "step": (),
        "params": axes,
        "opt_state": optax.tree_map_params(tx, lambda _, a: a, opt_state, axes,
                                           transform_non_params=lambda _: (),
                                           is_leaf=sharding.is_axes),
        "tokens_since_fired": latent,
        "density": evals.Density(counts=latent, window_tokens=(), density=latent),
        "input_scale": (None,) * len(sae.base.input_scale_shape(architecture.shape)),
        "sparsity_coefficient": (),
        "rng": (None,),
    }
    for name, level in reversed(levels):
        logical = {key: value if level[key] is None else
                   jax.tree.map(lambda a, name=name: (name, *a), value, is_leaf=sharding.is_axes)
                   for key, value in logical.items()}
    return logical


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _scaled(shape, batch: dict, scale: jax.Array) -> dict:
    """Every entry of a batch `{hook: [batch, d_hook]}` times its input scale (a bare array
    is a batch of one entry, `data.DEFAULT_HOOK`)."""
    return sae.base.scale_batch(shape, data.as_batch(batch), scale)


def _concatenated(batches: tuple[dict, ...]) -> dict:
    batches = [data.as_batch(b) for b in batches]
    return {hook: jnp.concatenate([b[hook] for b in batches], axis=0) for hook in batches[0]}


def train_step(state: dict, batch: dict, *, architecture: sae.Architecture,
               tx: optax.GradientTransformation, sae_config, sparsity_warmup: optax.Schedule,
               lr_schedule: optax.Schedule, dead_window_tokens: int, density_window_tokens: int,
               dense_threshold: float, compute_dtype=jnp.float32) -> tuple[dict, dict]:
    """One optimisation step: `state, metrics = train_step(state, batch)`, `batch` a dict
    `{hook: [batch, d_hook]}` (saejax.data) that the architecture's shape reads.

    The loss runs in `compute_dtype` (mixed precision: a bfloat16 copy of the float32 params
    and batch, so the matmuls and the [batch, n_latents] activations are bfloat16); its
    gradients come back through the cast as float32, for the float32 optimizer state.
    """
    step = state["step"]
    batch = _scaled(architecture.shape, batch, state["input_scale"])
    target = architecture.shape.target(batch)
    sparsity_coefficient = state["sparsity_coefficient"] * sparsity_warmup(step)

    dead = state["tokens_since_fired"] >= dead_window_tokens

    def loss_fn(params):
        params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        return architecture.loss(params, jax.tree.map(lambda x: x.astype(compute_dtype), batch),
                                 sae_config,
                                 sparsity_coefficient, dead, step=step)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # Non-gradient buffers an architecture keeps in its params (BatchTopK's threshold).
    params = {**params, **{name: value.astype(params[name].dtype)
                           for name, value in aux.get("buffers", {}).items()}}
    # Architectures that never form the dense latents (sparse TopK) count firings themselves.
    counts = aux["fire_counts"] if "fire_counts" in aux else evals.fire_counts(aux["latents"])
    n_tokens = target.shape[0]
    tokens_since_fired = evals.update_tokens_since_fired(state["tokens_since_fired"], counts,
                                                         n_tokens)
    density = evals.update_density(state["density"], counts, n_tokens, density_window_tokens)
    metrics = {
        "loss": loss,
        "mse": aux["mse"],
        "fvu": evals.fvu(target, aux["x_hat"]),
        "l0": evals.l0_of_counts(counts, n_tokens),
        "dead_fraction": evals.dead_fraction(tokens_since_fired, dead_window_tokens,
                                             tokens_since_fired.ndim),
        "dense_fraction": evals.dense_fraction(density.density, dense_threshold),
        "log_density_histogram": evals.log_density_histogram(density.density),
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": lr_schedule(step) * optim.rewarm_factor(state["opt_state"]),
        "finite": jnp.isfinite(loss) & _all_finite(params),
    }
    metrics.update(per_hook_fvu(architecture.shape, target, aux["x_hat"]))
    for name in architecture.metrics:  # the architecture's own scalars (AuxK, ...)
        metrics[name] = aux[name]
    if architecture.sparsity_coefficient:
        metrics[architecture.sparsity_coefficient] = sparsity_coefficient
    new_state = dict(state, step=step + 1, params=params, opt_state=opt_state,
                     tokens_since_fired=tokens_since_fired, density=density)
    return new_state, metrics


def resample_step(state: dict, batches: tuple[dict, ...], *,
                  architecture: sae.Architecture, tx: optax.GradientTransformation, sae_config,
                  dead_window_tokens: int, encoder_scale: float, d: int,
                  n_latents: int) -> tuple[dict, jax.Array]:
    """Resamples the dead latents from `batches` by the architecture's rules (entries reset to
    their initial values come from a fresh `init`); returns the state and how many were
    dead."""
    batch = _scaled(architecture.shape, _concatenated(batches), state["input_scale"])
    params = state["params"]
    inputs = architecture.shape.input(batch)
    x_hat = architecture.decode(params, architecture.encode(params, inputs, sae_config), inputs)
    # Dead latents point at the targets the SAE reconstructs worst.
    x = architecture.shape.target(batch)
    dead = state["tokens_since_fired"] >= dead_window_tokens
    key = jax.random.fold_in(state["rng"], state["step"])
    initial = (architecture.init(jax.random.fold_in(key, 1), d, n_latents, sae_config)
               if "init" in architecture.resample.values() else None)
    params, opt_state = optim.resample_dead_latents(
        key, params, state["opt_state"], x, x_hat, dead, tx=tx, encoder_scale=encoder_scale,
        param_axes=architecture.param_axes, rules=architecture.resample, initial=initial,
        inputs=inputs)
    tokens_since_fired = jnp.where(dead, 0, state["tokens_since_fired"])
    return (dict(state, params=params, opt_state=opt_state,
                 tokens_since_fired=tokens_since_fired), jnp.sum(dead))


def init_from_data(state: dict, batches: tuple[dict, ...], *, architecture: sae.Architecture,
                   normalize_inputs: bool, b_dec_init: str) -> dict:
    """Data-dependent initialisation on a fresh run: the input scale that gives unit mean squared
    norm (kept in the state, so a saved SAE applies it to raw activations; per hook where the
    shape keeps one per hook, `sae.base.input_scale_of`) and `b_dec` at the geometric median
    (Towards Monosemanticity) or mean of the scaled targets (what the decoder writes)."""
    shape = architecture.shape
    batch = _concatenated(batches)
    scale = (sae.base.input_scale_of(shape, batch) if normalize_inputs
             else state["input_scale"])
    x = shape.target(sae.base.scale_batch(shape, batch, scale))
    params = dict(state["params"])
    if b_dec_init == "geometric_median":
        params["b_dec"] = sae.base.geometric_median(x)
    elif b_dec_init == "mean":
        params["b_dec"] = jnp.mean(x, axis=0)
    return dict(state, params=params, input_scale=scale.astype(jnp.float32))


def eval_step(params: dict, input_scale: jax.Array, batch: dict, *,
              architecture: sae.Architecture, sae_config) -> dict:
    batch = _scaled(architecture.shape, batch, input_scale)
    x = architecture.shape.input(batch)
    latents = architecture.encode(params, x, sae_config)
    x_hat = architecture.decode(params, latents, x)
    target = architecture.shape.target(batch)
    return {"mse": evals.mse(target, x_hat), "fvu": evals.fvu(target, x_hat),
            "l0": evals.l0(latents, latents.ndim - 1),
            **per_hook_fvu(architecture.shape, target, x_hat),
            **architecture.shape.eval_metrics(params, latents, x, target, x_hat)}


def per_hook_fvu(shape, target: jax.Array, x_hat: jax.Array) -> dict:
    """`fvu/<hook>` for each hook of a target that holds several (a crosscoder's)."""
    reconstructed = shape.split_target(x_hat)
    return {f"fvu/{hook}": evals.fvu(part, reconstructed[hook])
            for hook, part in shape.split_target(target).items()}
