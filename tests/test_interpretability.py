"""The interpretability score of human ratings (saejax.evals.interpretability) on a case
computed by hand: the Wilson interval, which ratings count, and the controls beside it."""

import math

import pytest

from saejax.evals import interpretability as interp


def test_wilson_interval_of_a_hand_computed_case():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.716737, half-width
    # 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.226581.
    low, high = interp.wilson_interval(8, 10, z=1.96)
    assert low == pytest.approx(0.490157, abs=1e-6) and high == pytest.approx(0.943319, abs=1e-6)
    assert interp.wilson_interval(0, 0) == (0.0, 1.0)
    low, high = interp.wilson_interval(0, 4, z=1.96)   # z^2 / (n + z^2) = 3.8416 / 7.8416
    assert low == 0.0 and high == pytest.approx(0.489900, abs=1e-6)


def test_score_counts_each_named_raters_latest_rating():
    records = [
        {"rater": "ann", "item": "latent-1", "kind": "latent", "rating": "not"},
        {"rater": "ann", "item": "latent-1", "kind": "latent", "rating": "interpretable"},
        {"rater": "ann", "item": "latent-2", "kind": "latent", "rating": "partly"},
        {"rater": "bob", "item": "latent-1", "kind": "latent", "rating": "interpretable"},
        {"rater": "bob", "item": "latent-3", "kind": "latent", "rating": "not"},
        {"rater": "bob", "item": "control-s0-0", "kind": "control", "rating": "interpretable"},
        {"rater": "ann", "item": "control-s0-1", "kind": "control", "rating": "not"},
        {"rater": "", "item": "latent-4", "kind": "latent", "rating": "interpretable"},
        {"rater": "  ", "item": "latent-5", "kind": "latent", "rating": "interpretable"},
        {"rater": "ann", "item": "latent-6", "kind": "latent", "rating": "great"},  # not a rating
    ]
    score = interp.interpretability_score(records, z=1.96)
    # Latents: ann latent-1 interpretable (her later rating), ann latent-2 partly, bob latent-1
    # interpretable, bob latent-3 not: 2 of 4. Controls: 1 of 2.
    assert (score.latents.rated, score.latents.interpretable, score.latents.partly) == (4, 2, 1)
    assert score.latents.fraction == 0.5
    # Wilson, 2 of 4: (0.5 + 0.4802) / 1.9604 -/+ 1.96 * sqrt(0.0625 + 0.060025) / 1.9604.
    assert score.latents.low == pytest.approx(0.150036, abs=1e-6)
    assert score.latents.high == pytest.approx(0.849964, abs=1e-6)
    assert (score.controls.rated, score.controls.interpretable, score.controls.fraction) == (
        2, 1, 0.5)
    assert score.raters == {"ann": 3, "bob": 3} and score.unnamed == 2
    empty = interp.interpretability_score([])
    assert empty.latents.rated == 0 and math.isnan(empty.latents.fraction)


def test_the_sweep_report_scores_the_points_people_rated(tmp_path):
    from saejax.analysis import ratings  # pylint: disable=import-outside-toplevel
    path = ratings.ratings_path(str(tmp_path / "x8_k16"))
    for item, kind, rating in (("latent-1", "latent", "interpretable"),
                               ("latent-2", "latent", "not"),
                               ("control-s0-0", "control", "not")):
        ratings.append(path, {"rater": "ann", "item": item, "kind": kind, "rating": rating,
                              "latent": 1, "label": "a | b"})
    lines = ratings.sweep_report_lines(str(tmp_path), ["x8_k16", "x8_k32"])
    rows = [line for line in lines if line.startswith("| x8")]
    assert rows == ["| x8_k16 | 1/2 (50.0%) | 9.5% to 90.5% | 0/1 (0.0%) | 0.0% to 79.3% "
                    "| ann 3 |"]
    assert ratings.sweep_report_lines(str(tmp_path), ["x8_k32"]) == []
    report = "\n".join(ratings.report_lines(ratings.summary_for(str(tmp_path / "x8_k16"))))
    assert "| latent 1 | 1 | 0 | 0 | a \\| b (ann) |" in report
