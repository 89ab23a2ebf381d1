"""Ground-truth recovery of a run on a synthetic source (registered as "ground_truth"): MMCS and
the metrics of SAELens' synthetic benchmark (sae_lens.synthetic), defined in `saejax.evals`."""

from __future__ import annotations

from saejax.evals import suite


@suite.register("ground_truth", needs=("ground_truth",),
                description="MMCS, Hungarian-matched MCC, uniqueness, firing precision/recall/F1")
def ground_truth(context: suite.Context) -> dict:
    raise NotImplementedError("ground_truth: being written")
