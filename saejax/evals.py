"""Every metric of an SAE, each computed in exactly one place and named the same everywhere.

`mse`, `fvu`, `l0`, `dead_fraction`, `dense_fraction`, the feature-density histogram and `mmcs`
are pure functions of arrays, usable inside a jitted step or on a restored SAE.
"""

from __future__ import annotations

from typing import NamedTuple

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
    """Per-latent count of tokens since the latent last fired, after one batch. Saturates at
    2**30 so that a latent dead for billions of tokens stays dead rather than wrapping."""
    fired = jnp.any(latents != 0, axis=0)
    count = jnp.minimum(tokens_since_fired, 2**30 - latents.shape[0]) + latents.shape[0]
    return jnp.where(fired, 0, count)


def dead_fraction(tokens_since_fired: jax.Array, window_tokens: int) -> jax.Array:
    """Fraction of latents that have not fired in the last `window_tokens` tokens (per SAE:
    the last axis is the latent axis)."""
    return jnp.mean((tokens_since_fired >= window_tokens).astype(jnp.float32), axis=-1)


class Density(NamedTuple):
    """Per-latent firing frequency over fixed windows of tokens."""

    counts: jax.Array         # [n_latents] int32, firings in the current window
    window_tokens: jax.Array  # () int32, tokens seen in the current window
    density: jax.Array        # [n_latents] float32, firing frequency over the last full window


def init_density(n_latents: int) -> Density:
    return Density(jnp.zeros((n_latents,), jnp.int32), jnp.zeros((), jnp.int32),
                   jnp.full((n_latents,), jnp.nan, jnp.float32))


def update_density(density: Density, latents: jax.Array, window_tokens: int) -> Density:
    """Adds one batch; when the window is full, publishes its frequencies and starts anew."""
    counts = density.counts + jnp.sum(latents != 0, axis=0).astype(jnp.int32)
    tokens = density.window_tokens + latents.shape[0]
    full = tokens >= window_tokens
    return Density(counts=jnp.where(full, 0, counts), window_tokens=jnp.where(full, 0, tokens),
                   density=jnp.where(full, counts / jnp.maximum(tokens, 1), density.density))


# Edges of the log10 feature-density histogram: bin 0 is (-inf, -8) and holds the latents that
# never fired in the window, bin i is [edge[i-1], edge[i]) for i = 1..16, and the last bin, [0],
# holds the latents that fired on every token.
LOG_DENSITY_EDGES = tuple(float(e) for e in jnp.arange(-8.0, 0.01, 0.5))


def log_density_histogram(density: jax.Array) -> jax.Array:
    """Counts of latents per log10-density bin (see LOG_DENSITY_EDGES); all zero before the
    first window has completed (density NaN)."""
    log_density = jnp.log10(jnp.maximum(density, 1e-30))
    edges = jnp.asarray(LOG_DENSITY_EDGES)
    bins = jnp.searchsorted(edges, log_density, side="right")
    counted = (~jnp.isnan(density)).astype(jnp.int32)
    return jnp.zeros((len(LOG_DENSITY_EDGES) + 1,), jnp.int32).at[bins].add(counted)


def dense_fraction(density: jax.Array, threshold: float) -> jax.Array:
    """Fraction of latents firing on more than `threshold` of tokens (NaN before a window)."""
    fraction = jnp.mean((density > threshold).astype(jnp.float32))
    return jnp.where(jnp.any(jnp.isnan(density)), jnp.nan, fraction)


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
