"""Every metric of an SAE, each computed in exactly one place and named the same everywhere.

`mse`, `fvu`, `l0`, `dead_fraction` and `mmcs` are pure functions of arrays, usable inside a
jitted step or on a restored SAE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mse(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """Element-mean squared error, the reconstruction term of every SAE loss."""
    return jnp.mean(jnp.square(x_hat - x))


def fvu(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """Fraction of variance unexplained: residual energy over the batch's total variance."""
    residual = jnp.sum(jnp.square(x - x_hat))
    total = jnp.sum(jnp.square(x - jnp.mean(x, axis=0, keepdims=True)))
    return residual / total


def l0(latents: jax.Array) -> jax.Array:
    """Mean number of non-zero latents per token."""
    return jnp.mean(jnp.sum(latents != 0, axis=-1).astype(jnp.float32))


def update_tokens_since_fired(tokens_since_fired: jax.Array, latents: jax.Array) -> jax.Array:
    """Per-latent count of tokens since the latent last fired, after one batch."""
    fired = jnp.any(latents != 0, axis=0)
    return jnp.where(fired, 0, tokens_since_fired + latents.shape[0])


def dead_fraction(tokens_since_fired: jax.Array, window_tokens: int) -> jax.Array:
    """Fraction of latents that have not fired in the last `window_tokens` tokens."""
    return jnp.mean((tokens_since_fired >= window_tokens).astype(jnp.float32))


def mmcs(decoder: jax.Array, true_features: jax.Array) -> jax.Array:
    """Mean max cosine similarity (Sharkey et al. 2022).

    For each true feature, the best cosine similarity with any learned decoder row, averaged
    over the true features: 1.0 means every true feature has a learned copy.

    Args:
      decoder: learned dictionary `[n_latents, d]` (rows are directions).
      true_features: ground-truth directions `[n_features, d]`.
    """
    unit = lambda m: m / jnp.maximum(jnp.linalg.norm(m, axis=-1, keepdims=True), 1e-12)
    cosine = unit(true_features) @ unit(decoder).T
    return jnp.mean(jnp.max(cosine, axis=-1))
