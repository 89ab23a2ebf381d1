"""Every metric of an SAE, each computed in exactly one place and named the same everywhere.

`mse`, `fvu`, `l0`, `dead_fraction`, `dense_fraction`, the feature-density histogram, `mmcs`
and, on a hierarchy of true features, `absorption` are pure functions of arrays, usable inside
a jitted step or on a restored SAE (`hierarchy_metrics` runs the last two over a source's
held-out batches); SAELens' synthetic-benchmark scores of ground-truth recovery
(`mean_correlation_coefficient`, `feature_uniqueness`, `firing_classification`, gathered by
`recovery_metrics`); SAEBench core's reconstruction, sparsity, density and weight metrics
(`reconstruction_sums` / `reconstruction_metrics`, `density_metrics`, `max_cosine_to_others`);
the downstream metrics (`loss_recovered`, next-token cross-entropies, KL, `downstream_score`)
take the LM's logits.
The named evaluations that `python -m saejax.evals` runs on a workdir are in `suite.py`.
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
    return absorption_rate(pairs, jnp.take(fires, parent, axis=-1), fires)


def absorption_rate(present: jax.Array, main_fires: jax.Array, absorbed: jax.Array
                    ) -> jax.Array:
    """Feature absorption's one definition: among the cases where a concept is present, the
    fraction where its own latents stay silent while another latent carries it (0 when none is
    present). The synthetic hierarchy (`absorption`: the concept a parent feature, the carrier
    its child's latent) and the first-letter evaluation (`first_letter`: the concept a letter
    the probe sees, the carrier the latent projecting most onto the probe) both count this.

    Args (bool, one shape): present, main_fires (any of the concept's own latents fires),
      absorbed (another latent carries the concept).
    """
    count = jnp.sum(present & ~main_fires & absorbed)
    return count / jnp.maximum(jnp.sum(present), 1)


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
# Ground truth, as SAELens' synthetic benchmark scores it (sae_lens.synthetic.evals): signs
# ignored (absolute cosines), each latent matched to its best true feature for firing, and
# decoder rows matched one-to-one to true features for the MCC.
# ------------------------------------------------------------------------------------------
def mean_correlation_coefficient(decoder, true_features) -> float:
    """MCC (Paulo and Belrose 2025, "Mechanistic interpretability should prioritize feature
    consistency"): the mean absolute cosine of decoder rows and true features over the
    one-to-one matching that maximises it (Hungarian, `scipy.optimize.linear_sum_assignment`;
    min(n_latents, n_features) pairs). Host-side: NumPy arrays in, a float out."""
    from scipy import optimize  # pylint: disable=import-outside-toplevel  (only here)
    cos = np.abs(np.asarray(_cosines(jnp.asarray(decoder), jnp.asarray(true_features)))).T
    rows, cols = optimize.linear_sum_assignment(1.0 - cos)
    return float(np.mean(cos[rows, cols]))


def best_matching_features(decoder: jax.Array, true_features: jax.Array) -> jax.Array:
    """For each latent, the true feature its decoder row is closest to in absolute cosine:
    `[n_latents]` feature indices (the other direction of `match_latents`)."""
    return jnp.argmax(jnp.abs(_cosines(decoder, true_features)), axis=0)


def feature_uniqueness(decoder: jax.Array, true_features: jax.Array) -> jax.Array:
    """The number of distinct true features that latents match best
    (`best_matching_features`), over the number of latents: 1 when every latent tracks a
    different feature."""
    matches = best_matching_features(decoder, true_features)
    hit = jnp.zeros((true_features.shape[0],), bool).at[matches].set(True)
    return jnp.sum(hit) / decoder.shape[0]


def firing_counts(latents: jax.Array, codes: jax.Array, matches: jax.Array) -> jax.Array:
    """Per latent, `[4, n_latents]` counts of rows (true positives, false positives, false
    negatives, true negatives) of its firing (non-zero) against its matched true feature's
    activity (`codes [rows, n_features] > 0`, `matches` from `best_matching_features`);
    they add over batches."""
    fires, active = latents != 0, jnp.take(codes, matches, axis=-1) > 0
    count = lambda m: jnp.sum(m, axis=0, dtype=jnp.float32)
    return jnp.stack([count(fires & active), count(fires & ~active),
                      count(~fires & active), count(~fires & ~active)])


def firing_classification(counts: jax.Array) -> dict:
    """Precision, recall, F1 and accuracy of each latent as a detector of its matched feature,
    from `firing_counts`, averaged over latents; an undefined precision, recall or F1 (nothing
    fired, nothing active) counts as 0, as sae_lens does."""
    tp, fp, fn, tn = counts
    ratio = lambda a, b: jnp.where(b > 0, a / jnp.where(b > 0, b, 1), 0.0)
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = ratio(2 * precision * recall, precision + recall)
    accuracy = (tp + tn) / jnp.maximum(tp + fp + fn + tn, 1e-8)
    return {"precision": jnp.mean(precision), "recall": jnp.mean(recall),
            "f1_score": jnp.mean(f1), "accuracy": jnp.mean(accuracy)}


def decoder_rows(shape, params: dict) -> jax.Array:
    """The dictionary's decoder rows `[n_latents, width]` in the layout of its source's
    `true_features`: `W_dec` (an SAE's, a transcoder's output side, a crosscoder's hooks side
    by side), or what a shape's own `decoder_rows(params)` returns (a shape whose decoder is
    stored otherwise, e.g. per layer)."""
    own = getattr(shape, "decoder_rows", None)
    return own(params) if own is not None else params["W_dec"]


RECOVERY_METRICS = ("mcc", "uniqueness", "classification/precision", "classification/recall",
                    "classification/f1_score", "classification/accuracy")


def recovery_metrics(decoder, true_features, latents, codes) -> dict[str, float]:
    """SAELens' synthetic-benchmark scores of a dictionary (`RECOVERY_METRICS`): the MCC and
    uniqueness of its decoder rows `[n_latents, w]` against `true_features [n_features, w]`,
    and `firing_classification` over held-out batches, `latents` and `codes` being sequences
    of `[rows, n_latents]` and `[rows, n_features]` (the true codes of the same rows); latents
    and codes per layer (a CLT's `[rows, L, n]`) are read layer-major, as `decoder_rows` and
    the source's `true_features` lay them out."""
    decoder, true_features = jnp.asarray(decoder, jnp.float32), jnp.asarray(true_features)
    matches = best_matching_features(decoder, true_features)
    rows = lambda a: jnp.asarray(a).reshape(np.shape(a)[0], -1)
    counts = sum(jax.device_get(firing_counts(rows(l), rows(c), matches))
                 for l, c in zip(latents, codes, strict=True))
    classification = firing_classification(jnp.asarray(counts))
    return {"mcc": mean_correlation_coefficient(decoder, true_features),
            "uniqueness": float(feature_uniqueness(decoder, true_features)),
            **{f"classification/{k}": float(v) for k, v in classification.items()}}


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


def downstream_score(with_sae, with_ablation, clean=0.0):
    """SAEBench's normalised downstream scores: the fraction of the gap between zero-ablating
    the hook and the clean model that the SAE closes. CE score: `(ce_ablation - ce_sae) /
    (ce_ablation - ce_clean)` (`loss_recovered`); KL score: clean KL is 0, so
    `(kl_ablation - kl_sae) / kl_ablation`."""
    return (with_ablation - with_sae) / (with_ablation - clean)


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
    the SAE's reconstruction closes: 1 = as good as the clean model, 0 = as bad as ablation
    (SAEBench's CE score, `downstream_score`)."""
    return downstream_score(ce_sae, ce_zero_ablation, ce_clean)


def downstream_sums(lm_forward, tokens: jax.Array, hook, reconstructs, *,
                    ce_fn=None, kl_fn=None) -> list[dict]:
    """Summed next-token losses and KL of the clean LM, the LM with the activation at `hook`
    replaced by each SAE's reconstruction, and with it zero-ablated, over one token batch.

    Args:
      lm_forward: `(tokens, interventions) -> logits`, the LM with its params bound.
      tokens: int token ids `[batch, seq]`.
      hook: the hook point the SAEs were trained on, e.g. "blocks.8.hook_resid_post"; or
        several hooks, all zero-ablated together (a cross-layer transcoder's MLP outputs).
      reconstructs: per SAE, activation `[batch, seq, d]` -> its reconstruction at `hook` (one
        hook only); or per SAE the interventions `{hook: fn}` of its one spliced forward pass
        (the replacement model of a cross-layer transcoder; required with several hooks). The clean and zero-ablated passes are
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
        if not isinstance(reconstruct, dict) and len(hooks) > 1:
            # One function cannot say which of several hooks it replaces; splicing it at the
            # first alone would score a model that the others' ablation never sees replaced.
            raise ValueError(f"downstream_sums: with several hooks {list(hooks)} each entry of "
                             f"`reconstructs` must be a dict of interventions keyed by hook "
                             f"({{hook: fn}}, as the replacement model's), not one function.")
        interventions = reconstruct if isinstance(reconstruct, dict) else {hooks[0]: reconstruct}
        spliced = lm_forward(tokens, interventions)
        sums.append({**shared, "ce_sae": jnp.sum(next_token_losses_(spliced, tokens)),
                     "kl_sae": jnp.sum(kl_divergences_(clean, spliced)[:, :-1])})
    return sums


def downstream_metrics(sums: dict) -> dict:
    """Per-token means of `downstream_sums` (added over batches), the loss recovered (the CE
    score) and the KL score."""
    n = sums["positions"]
    means = {k: v / n for k, v in sums.items() if k != "positions"}
    return {**means, "loss_recovered": loss_recovered(means["ce_clean"], means["ce_sae"],
                                                      means["ce_zero_ablation"]),
            "kl_score": downstream_score(means["kl_sae"], means["kl_zero_ablation"])}
