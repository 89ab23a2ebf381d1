"""Scores of a dictionary against the true features of a synthetic source: `mmcs` and, on a
hierarchy of true features, `absorption` (`hierarchy_metrics` runs both over a source's
held-out batches; `absorption_rate` is the one definition the first-letter evaluation also
counts); and SAELens' synthetic-benchmark scores of ground-truth recovery
(`mean_correlation_coefficient`, `feature_uniqueness`, `firing_classification`, gathered by
`recovery_metrics`). Re-exported by `saejax.evals`, where every caller names them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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

