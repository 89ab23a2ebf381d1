"""SAEBench core's reconstruction, sparsity, density and weight metrics: per-batch sums that add
over batches (`reconstruction_sums`), the metrics of the sums (`reconstruction_metrics`), the
per-latent densities and their metrics (`feature_density`, `density_metrics`) and the largest
cosine of each decoder row with the others (`max_cosine_to_others`). Re-exported by
`saejax.evals`, where every caller names them."""

from __future__ import annotations

import jax
import jax.numpy as jnp


# ------------------------------------------------------------------------------------------
# SAEBench core (Karvonen et al. 2025; the definitions of sae_lens.evals, which SAEBench's
# core eval runs): per-batch sums that add over batches, then the metrics of the sums.
# ------------------------------------------------------------------------------------------
def reconstruction_sums(x: jax.Array, x_hat: jax.Array, latents: jax.Array) -> dict:
    """Sums over the rows of `x [n, d]` (what the dictionary reconstructs), `x_hat [n, d]`
    and `latents [n, n_latents]` that `reconstruction_metrics` turns into SAEBench core's
    reconstruction, shrinkage and sparsity metrics; they add over batches."""
    x, x_hat = x.astype(jnp.float32), x_hat.astype(jnp.float32)
    residual = jnp.sum(jnp.square(x - x_hat), axis=-1)
    norm_in, norm_out = jnp.linalg.norm(x, axis=-1), jnp.linalg.norm(x_hat, axis=-1)
    return {
        "rows": jnp.asarray(x.shape[0], jnp.float32),
        "sum_x": jnp.sum(x, axis=0),                        # [d]: the mean, for the variance
        "sum_squared_norm": jnp.sum(jnp.square(norm_in)),
        "sum_squared_residual": jnp.sum(residual),
        # sae_lens' earlier formula, per row against this batch's mean (batches of one size).
        "sum_explained_variance_legacy": jnp.sum(1.0 - residual / jnp.sum(
            jnp.square(x - jnp.mean(x, axis=0)), axis=-1)),
        "sum_cossim": jnp.sum(jnp.sum(x * x_hat, axis=-1)
                              / (jnp.maximum(norm_in, 1e-30) * jnp.maximum(norm_out, 1e-30))),
        "sum_l2_norm_in": jnp.sum(norm_in),
        "sum_l2_norm_out": jnp.sum(norm_out),
        # sae_lens: a row whose input norm is below 1e-4 divides by 1 instead.
        "sum_l2_ratio": jnp.sum(norm_out / jnp.where(norm_in < 1e-4, 1.0, norm_in)),
        # sae_lens: a ratio of this batch's means, averaged over batches.
        "batches": jnp.asarray(1.0, jnp.float32),
        "sum_relative_reconstruction_bias": jnp.mean(jnp.square(norm_out))
                                            / jnp.mean(jnp.sum(x * x_hat, axis=-1)),
        "sum_l0": jnp.sum(latents != 0).astype(jnp.float32),
        "sum_l1": jnp.sum(jnp.abs(latents)).astype(jnp.float32),
        "fire_counts": jnp.sum(latents != 0, axis=0).astype(jnp.float32),  # [n_latents]
    }


def reconstruction_metrics(sums: dict) -> dict:
    """SAEBench core's metrics of `reconstruction_sums` (added over batches): each a mean over
    rows, except `explained_variance` = 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2) (the
    variance summed over dimensions; `explained_variance_legacy` is sae_lens' earlier formula,
    the mean over rows of 1 - ||x - x_hat||^2 / ||x - batch mean||^2) and
    `relative_reconstruction_bias`, E||x_hat||^2 / E<x, x_hat> (Wright and Sharkey 2024,
    eq. 10) per batch, averaged over batches. `mse` is E||x - x_hat||^2, summed over
    dimensions (sae_lens' convention; saejax's training `mse` is the mean over elements)."""
    n = sums["rows"]
    variance = sums["sum_squared_norm"] / n - jnp.sum(jnp.square(sums["sum_x"] / n))
    mse_ = sums["sum_squared_residual"] / n
    return {
        "explained_variance": 1.0 - mse_ / variance,
        "explained_variance_legacy": sums["sum_explained_variance_legacy"] / n,
        "mse": mse_,
        "cossim": sums["sum_cossim"] / n,
        "l2_norm_in": sums["sum_l2_norm_in"] / n,
        "l2_norm_out": sums["sum_l2_norm_out"] / n,
        "l2_ratio": sums["sum_l2_ratio"] / n,
        "relative_reconstruction_bias": sums["sum_relative_reconstruction_bias"]
                                        / sums["batches"],
        "l0": sums["sum_l0"] / n,
        "l1": sums["sum_l1"] / n,
    }


def feature_density(fire_counts_: jax.Array, n_tokens) -> jax.Array:
    """Per latent, the fraction of tokens on which it fired."""
    return fire_counts_ / n_tokens


def density_metrics(density: jax.Array) -> dict:
    """SAEBench core's misc density metrics of per-latent densities: the fraction alive (fired
    at least once), the fractions firing on more than 1% and 10% of tokens, and the share of
    all firings that those latents make (`normalized_freq_over_*`; 0 when nothing fired)."""
    total = jnp.sum(density)
    share = lambda above: jnp.where(total > 0, jnp.sum(jnp.where(above, density, 0)) /
                                    jnp.maximum(total, 1e-30), 0.0)
    return {"frac_alive": jnp.mean(density > 0),
            "freq_over_1_percent": jnp.mean(density > 0.01),
            "freq_over_10_percent": jnp.mean(density > 0.1),
            "normalized_freq_over_1_percent": share(density > 0.01),
            "normalized_freq_over_10_percent": share(density > 0.1)}


def max_cosine_to_others(rows: jax.Array, chunk: int = 4096) -> jax.Array:
    """Per row of `rows [n, d]` (a decoder's rows, an encoder's columns transposed), the
    largest cosine similarity with any other row: `[n]`. In chunks of rows, so the n x n
    matrix never exists whole."""
    unit = rows / jnp.maximum(jnp.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    out = []
    for start in range(0, unit.shape[0], chunk):
        sims = unit[start:start + chunk] @ unit.T
        own = jnp.arange(sims.shape[0])
        out.append(jnp.max(sims.at[own, own + start].set(-jnp.inf), axis=-1))
    return jnp.concatenate(out)

