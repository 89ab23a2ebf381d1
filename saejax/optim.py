"""Optimiser pieces: schedules and the unit-norm decoder constraint, as optax transformations.

The decoder constraint follows Towards Monosemanticity: before the optimiser sees the gradient,
the component of each decoder row's gradient parallel to the row is removed; after the update,
every row is put back on the unit sphere. Both are `GradientTransformation`s so they compose with
any optax optimiser in one `optax.chain`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

DECODER = "W_dec"


def _unit_rows(w: jax.Array) -> jax.Array:
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


def _rewrite_decoder_update(rewrite, name: str, param_name: str) -> optax.GradientTransformation:
    """A stateless transformation replacing `updates[param_name]` by `rewrite(update, param)`."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(f"{name} needs params in update().")
        updates = dict(updates)
        updates[param_name] = rewrite(updates[param_name], params[param_name])
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def remove_parallel_decoder_grad(*, param_name: str = DECODER) -> optax.GradientTransformation:
    """Removes from each row of `updates[param_name]` its component along the current row.

    Args:
      param_name: key of the decoder matrix `[..., n_latents, d]` in the params dict.
    """

    def rewrite(g, w):
        w = _unit_rows(w)
        return g - jnp.sum(g * w, axis=-1, keepdims=True) * w

    return _rewrite_decoder_update(rewrite, "remove_parallel_decoder_grad", param_name)


def project_decoder_rows(*, param_name: str = DECODER) -> optax.GradientTransformation:
    """Rewrites the update so that each row of `params + updates` has unit norm.

    Place it last in the chain: it sees the final update and returns
    `unit_rows(params + updates) - params`.

    Args:
      param_name: key of the decoder matrix `[..., n_latents, d]` in the params dict.
    """
    return _rewrite_decoder_update(lambda u, w: _unit_rows(w + u) - w, "project_decoder_rows",
                                   param_name)


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


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
    """Adam between the two halves of the unit-norm decoder constraint."""
    parts = [remove_parallel_decoder_grad()]
    if float(optim_config.grad_clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(optim_config.grad_clip_norm)))
    parts += [
        optax.adam(learning_rate_schedule(optim_config, total_steps),
                   b1=float(optim_config.b1), b2=float(optim_config.b2),
                   eps=float(optim_config.eps)),
        project_decoder_rows(),
    ]
    return optax.chain(*parts)
