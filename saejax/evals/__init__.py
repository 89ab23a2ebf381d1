"""Every metric of an SAE, each computed in exactly one place and named the same everywhere,
and all of them named here (`evals.fvu`, `evals.recovery_metrics`, ...) whichever module owns
them.

This module owns the metrics a jitted training step keeps: `mse`, `fvu` (from `sae/ops.py`),
`l0`, `dead_fraction`, the windowed feature density, its log10 histogram and `dense_fraction`.
The others are re-exported from the modules that own them:
- `recovery.py`: scores against a synthetic source's true features (`mmcs`, `absorption`,
  `hierarchy_metrics`; SAELens' `recovery_metrics`: MCC, uniqueness, firing classification);
- `reconstruction.py`: SAEBench core's reconstruction, sparsity, density and weight metrics
  (`reconstruction_sums` / `reconstruction_metrics`, `density_metrics`, `max_cosine_to_others`);
- `lm_loss.py`: the downstream metrics from the LM's logits (`downstream_sums` /
  `downstream_metrics`, `loss_recovered`, next-token cross-entropies, KL, `downstream_score`).
The named evaluations that `python -m saejax.evals` runs on a workdir are in `suite.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Each name once, in the module that owns it; `evals.<name>` is how every caller reaches it.
from saejax.evals.lm_loss import (  # noqa: F401
    downstream_metrics, downstream_score, downstream_sums, kl_divergences, loss_recovered,
    next_token_losses)
from saejax.evals.reconstruction import (  # noqa: F401
    density_metrics, feature_density, max_cosine_to_others, reconstruction_metrics,
    reconstruction_sums)
from saejax.evals.recovery import (  # noqa: F401
    RECOVERY_METRICS, absorption, absorption_rate, best_matching_features,
    decoder_rows, feature_uniqueness, firing_classification, firing_counts, hierarchy_metrics,
    match_latents, mean_correlation_coefficient, mmcs, recovery_metrics)
from saejax.sae.ops import (batch_sum, fire_counts, fvu,  # noqa: F401  (one definition each)
                            mse)


def l0(latents: jax.Array, latent_ndim: int = 1) -> jax.Array:
    """Mean number of non-zero latents per token; `latent_ndim` trailing axes are latents (a
    CLT's [batch, layer, latent]: 2, so every layer's count)."""
    active = jnp.sum(latents != 0, axis=tuple(range(-latent_ndim, 0)))
    return jnp.mean(active.astype(jnp.float32))


def l0_of_counts(counts: jax.Array, n_tokens: int) -> jax.Array:
    """`l0` from a batch's `fire_counts`: the same number without another pass."""
    return jnp.sum(counts).astype(jnp.float32) / n_tokens


def update_tokens_since_fired(tokens_since_fired: jax.Array, counts: jax.Array,
                              n_tokens: int) -> jax.Array:
    """Per-latent count of tokens since the latent last fired, after one batch of `n_tokens`
    with `fire_counts` `counts`. Saturates at 2**30 so that a latent dead for billions of tokens
    stays dead rather than wrapping."""
    count = jnp.minimum(tokens_since_fired, 2**30 - n_tokens) + n_tokens
    return jnp.where(counts > 0, 0, count)


def dead_fraction(tokens_since_fired: jax.Array, window_tokens: int,
                  latent_ndim: int = 1) -> jax.Array:
    """Fraction of latents that have not fired in the last `window_tokens` tokens (per SAE:
    the last `latent_ndim` axes are latents, 2 for a CLT's [layer, latent])."""
    return jnp.mean((tokens_since_fired >= window_tokens).astype(jnp.float32),
                    axis=tuple(range(-latent_ndim, 0)))


class Density(NamedTuple):
    """Per-latent firing frequency over fixed windows of tokens."""

    counts: jax.Array         # [n_latents] int32, firings in the current window
    window_tokens: jax.Array  # () int32, tokens seen in the current window
    density: jax.Array        # [n_latents] float32, firing frequency over the last full window


def init_density(n_latents) -> Density:
    """`n_latents`: a count, or the shape of a per-latent array (a CLT's (layers, n))."""
    shape = (n_latents,) if isinstance(n_latents, int) else tuple(n_latents)
    return Density(jnp.zeros(shape, jnp.int32), jnp.zeros((), jnp.int32),
                   jnp.full(shape, jnp.nan, jnp.float32))


def update_density(density: Density, counts: jax.Array, n_tokens: int,
                   window_tokens: int) -> Density:
    """Adds one batch of `n_tokens` with `fire_counts` `counts`; when the window is full,
    publishes its frequencies and starts anew."""
    counts = density.counts + counts
    tokens = density.window_tokens + n_tokens
    full = tokens >= window_tokens
    return Density(counts=jnp.where(full, 0, counts), window_tokens=jnp.where(full, 0, tokens),
                   density=jnp.where(full, counts / jnp.maximum(tokens, 1), density.density))


# Edges of the log10 feature-density histogram: bin 0 is (-inf, -8) and holds the latents that
# never fired in the window, bin i is [edge[i-1], edge[i]) for i = 1..16, and the last bin, [0],
# holds the latents that fired on every token.
LOG_DENSITY_EDGES = tuple(float(e) for e in np.arange(-8.0, 0.01, 0.5))


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

