"""Every metric of an SAE, each computed in exactly one place and named the same everywhere.

`mse`, `fvu`, `l0`, `dead_fraction`, `dense_fraction`, the feature-density histogram, `mmcs`
and, on a hierarchy of true features, `absorption` are pure functions of arrays, usable inside
a jitted step or on a restored SAE (`hierarchy_metrics` runs the last two over a source's
held-out batches); the downstream metrics (`loss_recovered`, next-token cross-entropies, KL)
take the LM's logits.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


def mmcs(decoder: jax.Array, true_features: jax.Array) -> jax.Array:
    """Mean max cosine similarity (Sharkey et al. 2022).

    For each true feature, the best cosine similarity with any learned decoder row, averaged
    over the true features: 1.0 means every true feature has a learned copy.

    Args:
      decoder: learned dictionary `[n_latents, d]` (rows are directions).
      true_features: ground-truth directions `[n_features, d]`.
    """
    return jnp.mean(jnp.max(_cosines(decoder, true_features), axis=-1))


def _cosines(decoder: jax.Array, true_features: jax.Array) -> jax.Array:
    """`[n_features, n_latents]` cosine similarities of true features and decoder rows."""
    unit = lambda m: m / jnp.maximum(jnp.linalg.norm(m, axis=-1, keepdims=True), 1e-12)
    return unit(true_features) @ unit(decoder).T


def match_latents(decoder: jax.Array, true_features: jax.Array) -> jax.Array:
    """For each true feature, the latent whose decoder row is closest in cosine (the match
    `mmcs` scores): `[n_features]` latent indices."""
    return jnp.argmax(_cosines(decoder, true_features), axis=-1)


def absorption(latents: jax.Array, codes: jax.Array, parents: jax.Array,
               matched: jax.Array) -> jax.Array:
    """Feature absorption (Chanin et al. 2024) on ground truth with a hierarchy: among the
    (row, child) pairs where a child feature and its parent are both active, the fraction where
    the parent's latent is silent while the child's latent fires; the child's latent has
    absorbed the parent's direction. 0 when no pair is active.

    Args:
      latents: `[rows, n_latents]` the SAE's latents of the rows (as it encodes for inference).
      codes: `[rows, n_features]` the true codes of the same rows (non-zero: active).
      parents: `[n_features]` each feature's parent, -1 for a feature without one.
      matched: `[n_features]` each feature's latent (`match_latents`).
    """
    fires = jnp.take(latents != 0, matched, axis=-1)               # [rows, n_features]
    parent = jnp.maximum(parents, 0)
    is_child = parents >= 0
    pairs = (codes != 0) & jnp.take(codes != 0, parent, axis=-1) & is_child
    absorbed = pairs & fires & ~jnp.take(fires, parent, axis=-1)
    return jnp.sum(absorbed) / jnp.maximum(jnp.sum(pairs), 1)


def hierarchy_metrics(encode, decoder, source, batches: int) -> dict[str, float]:
    """`absorption` and `mmcs` of a trained SAE on `batches` held-out batches of a source with
    a hierarchy of true features (`data.source="synthetic_hierarchy"`: its `eval_batch`,
    `eval_codes`, `true_features` and `parents`); `encode` maps a batch to the SAE's latents
    (as it encodes for inference: BatchTopK's threshold)."""
    true_features = jnp.asarray(source.true_features)
    matched = match_latents(jnp.asarray(decoder), true_features)
    latents = jnp.concatenate([jnp.asarray(encode(source.eval_batch(i)))
                               for i in range(batches)])
    codes = jnp.concatenate([jnp.asarray(source.eval_codes(i)) for i in range(batches)])
    return {"absorption": float(absorption(latents, codes, jnp.asarray(source.parents),
                                           matched)),
            "mmcs": float(mmcs(jnp.asarray(decoder), true_features))}


# ------------------------------------------------------------------------------------------
# Downstream: the SAE spliced into the language model at its hook point.
# ------------------------------------------------------------------------------------------
def next_token_losses(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Per-position cross-entropy (nats) of predicting `tokens[:, 1:]` from `logits[:, :-1]`:
    `[batch, seq - 1]`."""
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]


def kl_divergences(clean_logits: jax.Array, logits: jax.Array) -> jax.Array:
    """Per-position KL(clean || other) of the next-token distributions, `[batch, seq]`."""
    p_log = jax.nn.log_softmax(clean_logits.astype(jnp.float32), axis=-1)
    q_log = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)


def loss_recovered(ce_clean, ce_sae, ce_zero_ablation):
    """Fraction of the loss gap between zero-ablating the hook point and the clean model that
    the SAE's reconstruction closes: 1 = as good as the clean model, 0 = as bad as ablation."""
    return (ce_zero_ablation - ce_sae) / (ce_zero_ablation - ce_clean)


def downstream_sums(lm_forward, tokens: jax.Array, hook, reconstructs, *,
                    ce_fn=None, kl_fn=None) -> list[dict]:
    """Summed next-token losses and KL of the clean LM, the LM with the activation at `hook`
    replaced by each SAE's reconstruction, and with it zero-ablated, over one token batch.

    Args:
      lm_forward: `(tokens, interventions) -> logits`, the LM with its params bound.
      tokens: int token ids `[batch, seq]`.
      hook: the hook point the SAEs were trained on, e.g. "blocks.8.hook_resid_post"; or
        several hooks, all zero-ablated together (a cross-layer transcoder's MLP outputs).
      reconstructs: per SAE, activation `[batch, seq, d]` -> its reconstruction at `hook`; or
        per SAE the interventions `{hook: fn}` of its one spliced forward pass (the
        replacement model of a cross-layer transcoder). The clean and zero-ablated passes are
        shared by all of them (a group's members).
      ce_fn, kl_fn: `(output, tokens) -> [batch, seq - 1]` and `(clean output, output) ->
        [batch, seq]` when `lm_forward` returns something other than logits (the final
        residual, for losses computed over the vocabulary in chunks); default
        `next_token_losses` and `kl_divergences` of logits.

    Returns one dict per SAE. Sums (not means) so batches add up; `positions` counts the
    predicted tokens.
    """
    next_token_losses_ = ce_fn or next_token_losses
    kl_divergences_ = kl_fn or kl_divergences
    hooks = (hook,) if isinstance(hook, str) else tuple(hook)
    clean = lm_forward(tokens, None)
    ablated = lm_forward(tokens, {h: jnp.zeros_like for h in hooks})
    shared = {
        "ce_clean": jnp.sum(next_token_losses_(clean, tokens)),
        "ce_zero_ablation": jnp.sum(next_token_losses_(ablated, tokens)),
        "kl_zero_ablation": jnp.sum(kl_divergences_(clean, ablated)[:, :-1]),
        "positions": jnp.asarray(tokens.shape[0] * (tokens.shape[1] - 1), jnp.float32),
    }
    sums = []
    for reconstruct in reconstructs:
        interventions = reconstruct if isinstance(reconstruct, dict) else {hooks[0]: reconstruct}
        spliced = lm_forward(tokens, interventions)
        sums.append({**shared, "ce_sae": jnp.sum(next_token_losses_(spliced, tokens)),
                     "kl_sae": jnp.sum(kl_divergences_(clean, spliced)[:, :-1])})
    return sums


def downstream_metrics(sums: dict) -> dict:
    """Per-token means of `downstream_sums` (added over batches) and the loss recovered."""
    n = sums["positions"]
    means = {k: v / n for k, v in sums.items() if k != "positions"}
    return {**means, "loss_recovered": loss_recovered(means["ce_clean"], means["ce_sae"],
                                                      means["ce_zero_ablation"])}
