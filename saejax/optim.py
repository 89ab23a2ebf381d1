"""Optimiser pieces: schedules and the unit-norm decoder constraint, as optax transformations.

The decoder constraint follows Towards Monosemanticity: before the optimiser sees the gradient,
the component of each decoder row's gradient parallel to the row is removed; after the update,
every row is put back on the unit sphere. Both are `GradientTransformation`s so they compose with
any optax optimiser in one `optax.chain`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

# The params whose rows the constraint keeps unit-norm unless a shape names others
# (`shape.unit_norm_params`; a crosscoder's decoder norms are free, so it names none).
DECODERS = ("W_dec",)
RESAMPLE_RULES = ("decoder", "encoder", "zero", "init")


def _unit_rows(w: jax.Array) -> jax.Array:
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


def _rewrite_decoder_update(rewrite, name: str,
                            param_names: tuple[str, ...]) -> optax.GradientTransformation:
    """A stateless transformation replacing `updates[p]` by `rewrite(update, param)` for each
    `p` of `param_names`."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(f"{name} needs params in update().")
        updates = dict(updates)
        for p in param_names:
            updates[p] = rewrite(updates[p], params[p])
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def remove_parallel_decoder_grad(*, param_names: tuple[str, ...] = DECODERS
                                 ) -> optax.GradientTransformation:
    """Removes from each row of `updates[p]` (p in `param_names`) its component along the
    current row.

    Args:
      param_names: keys of the decoder matrices `[..., n_latents, d]` in the params dict.
    """

    def rewrite(g, w):
        w = _unit_rows(w)
        return g - jnp.sum(g * w, axis=-1, keepdims=True) * w

    return _rewrite_decoder_update(rewrite, "remove_parallel_decoder_grad", tuple(param_names))


def project_decoder_rows(*, param_names: tuple[str, ...] = DECODERS
                         ) -> optax.GradientTransformation:
    """Rewrites the update so that each row of `params + updates` has unit norm.

    Place it last in the chain: it sees the final update and returns
    `unit_rows(params + updates) - params`.

    Args:
      param_names: keys of the decoder matrices `[..., n_latents, d]` in the params dict.
    """
    return _rewrite_decoder_update(lambda u, w: _unit_rows(w + u) - w, "project_decoder_rows",
                                   tuple(param_names))


class RewarmState(NamedTuple):
    steps_since_resample: jax.Array  # int32
    rewarm_steps: jax.Array          # int32, constant


def rewarm_after_resample(rewarm_steps: int) -> optax.GradientTransformation:
    """Scales updates by min(1, (n + 1) / rewarm_steps), n = steps since the last resampling.

    `resample_dead_latents` sets n to 0, so the learning rate re-warms linearly after every
    resampling (Towards Monosemanticity); before the first one n starts at `rewarm_steps`.
    """

    def init_fn(params):
        del params
        steps = jnp.asarray(max(int(rewarm_steps), 1), jnp.int32)
        return RewarmState(steps, steps)

    def update_fn(updates, state, params=None):
        del params
        scale = _rewarm_scale(state)
        updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
        steps = jnp.minimum(state.steps_since_resample + 1, state.rewarm_steps)
        return updates, state._replace(steps_since_resample=steps)

    return optax.GradientTransformation(init_fn, update_fn)


def _rewarm_scale(state: RewarmState) -> jax.Array:
    return jnp.minimum(1.0, (state.steps_since_resample + 1) / state.rewarm_steps)


def rewarm_factor(opt_state) -> jax.Array:
    """The factor `rewarm_after_resample` applies to this step's learning rate (1 if absent)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, RewarmState))
             if isinstance(s, RewarmState)]
    return _rewarm_scale(found[0]) if found else jnp.ones(())


def resample_dead_latents(key: jax.Array, params: dict, opt_state, x: jax.Array,
                          x_hat: jax.Array, dead: jax.Array, *,
                          tx: optax.GradientTransformation, encoder_scale: float,
                          param_axes: dict[str, tuple], rules: dict[str, str],
                          initial: dict | None = None, inputs: jax.Array | None = None):
    """Dead-latent resampling (Anthropic, "Towards Monosemanticity").

    Each dead latent gets an input drawn with probability proportional to its squared
    reconstruction loss. What happens to its entries of each param is the architecture's
    `rules` (`saejax.sae.shapes.RESAMPLE`): "decoder", the row becomes that token's target,
    normalised; "encoder", the column that token's input direction (the same one for a
    single-hook SAE, whose input is its target) scaled to `encoder_scale` times the mean norm
    of the alive encoder columns; "zero", the entries are zeroed (the encoder bias); "init",
    they return to `initial`'s (a JumpReLU threshold). Its Adam moments are zeroed, and the
    learning-rate re-warm restarts.

    Args:
      key: randomness for the draw.
      params, opt_state: the SAE and its optimizer state (from `make_optimizer`).
      x, x_hat: targets `[tokens, d]` and their reconstructions.
      dead: `[n_latents]` bool.
      tx: the optimizer whose state this is.
      encoder_scale: encoder columns' norm relative to the mean alive norm.
      param_axes: logical axes of each param; moments along `latent` are reset.
      rules: {param name: one of RESAMPLE_RULES}; params not named keep their values.
      initial: params as initialised, for the "init" rule.
      inputs: the encoder's inputs `[tokens, d_in]` when they are not `x` (a transcoder).
    Returns:
      (params, opt_state).
    """
    squared_loss = jnp.sum(jnp.square(x - x_hat), axis=-1)
    weights = jnp.square(squared_loss)
    probabilities = weights / jnp.maximum(jnp.sum(weights), 1e-30)
    n_latents = dead.shape[0]
    # One draw per latent keeps shapes static; only the dead latents use theirs.
    chosen = jax.random.choice(key, x.shape[0], (n_latents,), p=probabilities)
    directions = _unit_rows(x[chosen])                                  # [n_latents, d]
    # A single-hook SAE's inputs are its targets (the same array): one set of directions.
    input_directions = (directions if inputs is None or inputs is x
                        else _unit_rows(inputs[chosen]))
    params = dict(params)
    for name, rule in rules.items():
        if rule == "decoder":    # [n_latents, d]
            params[name] = jnp.where(dead[:, None], directions, params[name])
        elif rule == "encoder":  # [d, n_latents]
            encoder_norms = jnp.linalg.norm(params[name], axis=0)       # [n_latents]
            alive = ~dead
            mean_alive_norm = jnp.sum(encoder_norms * alive) / jnp.maximum(jnp.sum(alive), 1)
            mean_alive_norm = jnp.where(jnp.any(alive), mean_alive_norm, 1.0)
            params[name] = jnp.where(dead[None, :],
                                     input_directions.T * encoder_scale * mean_alive_norm,
                                     params[name])
        elif rule in ("zero", "init"):
            axes = param_axes[name]
            mask = jnp.expand_dims(dead, [i for i, a in enumerate(axes) if a != "latent"])
            params[name] = jnp.where(mask, 0.0 if rule == "zero" else initial[name],
                                     params[name])
        else:
            raise ValueError(f"resampling rule {rule!r} for {name} is not one of "
                             f"{RESAMPLE_RULES}.")

    # Adam moments of every per-latent parameter of a dead latent are zeroed.
    keep = {name: None for name in params}
    for name, axes in param_axes.items():
        if "latent" in axes:
            keep[name] = jnp.expand_dims(~dead, [i for i, a in enumerate(axes) if a != "latent"])
    opt_state = optax.tree_map_params(
        tx, lambda moment, k: moment if k is None else jnp.where(k, moment, 0.0), opt_state,
        keep, is_leaf=lambda v: v is None, transform_non_params=lambda v: v)
    # The learning rate re-warms only when something was resampled.
    steps_since = optax.tree_utils.tree_get(opt_state, "steps_since_resample")
    opt_state = optax.tree_utils.tree_set(
        opt_state, steps_since_resample=jnp.where(jnp.any(dead), 0, steps_since))
    return params, opt_state


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warmup, constant, then a decay over the last `decay_fraction` of training.

    `decay` is `linear` (to zero, as in Anthropic's recipe), `cosine`, or `none`.
    """
    peak = float(optim_config.learning_rate)
    warmup = int(optim_config.warmup_steps)
    decay_steps = int(round(float(optim_config.decay_fraction) * total_steps))
    decay_steps = min(max(decay_steps, 1), max(total_steps - warmup, 1))
    constant = max(total_steps - warmup - decay_steps, 0)
    if optim_config.decay == "none":
        tail = optax.constant_schedule(peak)
    elif optim_config.decay == "linear":
        tail = optax.linear_schedule(peak, 0.0, decay_steps)
    else:  # cosine
        tail = optax.cosine_decay_schedule(peak, decay_steps)
    return optax.join_schedules(
        [optax.linear_schedule(peak / max(warmup, 1), peak, warmup),
         optax.constant_schedule(peak), tail],
        boundaries=[warmup, warmup + constant])


def l1_coefficient_schedule(l1_coefficient: float, warmup_steps: int) -> optax.Schedule:
    """Linear ramp of the sparsity coefficient from 0 (Anthropic's April 2024 update)."""
    if warmup_steps <= 0:
        return optax.constant_schedule(float(l1_coefficient))
    return optax.linear_schedule(0.0, float(l1_coefficient), int(warmup_steps))


def make_optimizer(optim_config, total_steps: int, *, rewarm_steps: int = 1,
                   unit_norm_params: tuple[str, ...] = DECODERS) -> optax.GradientTransformation:
    """Adam (re-warmed after resampling) between the halves of the unit-norm decoder
    constraint on `unit_norm_params` (the architecture's `shape.unit_norm_params`)."""
    parts = [remove_parallel_decoder_grad(param_names=unit_norm_params)]
    if float(optim_config.grad_clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(optim_config.grad_clip_norm)))
    parts += [
        optax.adam(learning_rate_schedule(optim_config, total_steps),
                   b1=float(optim_config.b1), b2=float(optim_config.b2),
                   eps=float(optim_config.eps)),
        rewarm_after_resample(rewarm_steps),
        project_decoder_rows(param_names=unit_norm_params),
    ]
    return optax.chain(*parts)
