"""The interpretability score of human validation: the fraction of a dictionary's latents that
people rate interpretable, with a Wilson confidence interval, beside the same fraction for
random-direction controls rated the same way (what chance gives). The ratings come from
`python -m saejax.analysis.review` (`<workdir>/analysis/ratings.jsonl`, one JSON object a
line); this is the one definition the review's pages, its report and the sweep's read.

What counts: ratings with a rater's name; a rater's latest rating of an item (a page: a
latent or a control) replaces their earlier ones; each (rater, item) is one trial, so two
raters of one latent count twice. Only "interpretable" counts as a success; "partly" is
reported beside it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

RATINGS = ("interpretable", "partly", "not")
LATENT, CONTROL = "latent", "control"
Z_95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion successes / n ((0, 1) for n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclasses.dataclass(frozen=True)
class Fraction:
    """How one kind of item (the SAE's latents, or the controls) was rated."""

    rated: int                # (rater, item) trials
    interpretable: int
    partly: int
    fraction: float           # interpretable / rated (NaN when nothing was rated)
    low: float                # the Wilson interval of `fraction`
    high: float


@dataclasses.dataclass(frozen=True)
class InterpretabilityScore:
    latents: Fraction
    controls: Fraction
    raters: dict[str, int]    # who rated how many items (latents and controls)
    unnamed: int              # ratings left out: no rater's name


def _fraction(ratings: list[str], z: float) -> Fraction:
    n, k = len(ratings), ratings.count("interpretable")
    low, high = wilson_interval(k, n, z)
    return Fraction(rated=n, interpretable=k, partly=ratings.count("partly"),
                    fraction=k / n if n else math.nan, low=low, high=high)


def latest_ratings(records: Iterable[dict]) -> dict[tuple[str, str], dict]:
    """{(rater, item): the rater's latest record of the item}, named raters only, in file
    order (a later line replaces an earlier one)."""
    latest: dict[tuple[str, str], dict] = {}
    for record in records:
        rater = str(record.get("rater") or "").strip()
        if rater and record.get("rating") in RATINGS and record.get("item"):
            latest[(rater, str(record["item"]))] = record
    return latest


def interpretability_score(records: Iterable[dict], z: float = Z_95) -> InterpretabilityScore:
    """The score of rating records, each {"rater", "item", "kind": "latent"|"control",
    "rating": one of RATINGS, ...} (the review's ratings.jsonl lines)."""
    records = list(records)
    latest = latest_ratings(records)
    by_kind: dict[str, list[str]] = {LATENT: [], CONTROL: []}
    raters: dict[str, int] = {}
    for (rater, _), record in latest.items():
        by_kind[CONTROL if record.get("kind") == CONTROL else LATENT].append(record["rating"])
        raters[rater] = raters.get(rater, 0) + 1
    unnamed = sum(1 for r in records if not str(r.get("rater") or "").strip())
    return InterpretabilityScore(latents=_fraction(by_kind[LATENT], z),
                                 controls=_fraction(by_kind[CONTROL], z),
                                 raters=dict(sorted(raters.items())), unnamed=unnamed)
