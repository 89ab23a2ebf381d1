"""The interpretability KPIs a person reads off an SAE: how sparse its features are (the
fraction of the dictionary a token uses, the fraction alive) and how many labelled concepts it
covers (a latent whose firing matches the concept at F1 >= 0.5, named).

The concepts are the labels that ship here: the first letters of the vocabulary's words
(`first_letter`) and the sparse-probing labels (`sparse_probing`, one row per text window).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from saejax.evals import probing


def feature_sparsity(latents) -> dict[str, float]:
    """`sparsity_ratio`: the mean fraction of the dictionary a row uses (L0 / n_latents);
    `alive_fraction`: the fraction of latents that fire on at least one row.

    Args: latents `[rows, n_latents]`.
    """
    fires = np.asarray(latents) != 0
    return {"sparsity_ratio": float(fires.sum(axis=1).mean() / fires.shape[1]),
            "alive_fraction": float(fires.any(axis=0).mean())}


def concept_coverage(latents, concepts, names: Sequence[str], *,
                     min_f1: float = 0.5) -> dict:
    """Of the concepts, the fraction with a latent whose firing (non-zero) matches the
    concept's rows at F1 >= `min_f1`; for each concept the best latent, its F1, and the F1 of
    a latent that fired on every row (the chance level to read it against).

    Args:
      latents: `[rows, n_latents]`. concepts: `[rows, n_concepts]` bool, or `[rows]` int
        labels 0..len(names)-1. names: a name per concept.
    """
    concepts = np.asarray(concepts)
    if concepts.ndim == 1 and concepts.max(initial=0) >= len(names):
        raise ValueError(f"concept_coverage: label {concepts.max()} but only {len(names)} "
                         "names; give one name per concept.")
    if concepts.ndim == 1:
        concepts = concepts[:, None] == np.arange(len(names))[None, :]
    if concepts.shape[1] != len(names):
        raise ValueError(f"concept_coverage: {concepts.shape[1]} concepts but {len(names)} "
                         "names; give one name per concept.")
    f1 = probing.f1_scores(np.asarray(latents) != 0, concepts)       # [n_latents, concepts]
    best = np.argmax(f1, axis=0)
    prevalence = concepts.mean(axis=0)
    per_concept = [{"concept": str(name), "latent": int(best[i]), "f1": float(f1[best[i], i]),
                    "always_on_f1": float(2 * prevalence[i] / (1 + prevalence[i])),
                    "covered": bool(f1[best[i], i] >= min_f1)}
                   for i, name in enumerate(names)]
    return {"coverage": float(np.mean([c["covered"] for c in per_concept])),
            "min_f1": float(min_f1), "concepts": per_concept}
