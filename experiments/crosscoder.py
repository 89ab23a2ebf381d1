"""Crosscoder ground truth: one sparse code of 128 known features read through a set of
directions per layer at 3 layers (d = 64 each), recovered by a ReLU crosscoder of 256 latents
(twice the features) whose decoder rows are each feature's directions at every layer.

    python -m saejax.main --config=experiments/crosscoder.py --workdir=/tmp/saejax/crosscoder
    python -m saejax.sweep --config=experiments/crosscoder.py --workdir=/tmp/saejax/crosscoder_seeds

The sweep is seeds 0, 1 and 2. Hardware: any; tens of seconds a run on 2 CPU cores. Expected
(measured, benchmarks/RESULTS.md "Crosscoders"): MMCS (each true feature against the best
decoder row, all layers together) and FVU per layer for each seed.
`get_config("smoke")` is seconds, for tests.
"""

import ml_collections

from experiments import toy

HOOKS = ("layer_0", "layer_1", "layer_2")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = toy.get_config("small" if arg in (None, "") else arg)
    config.data.source = "synthetic_crosscoder"
    config.data.n_layers = len(HOOKS)
    config.sae.shape = "crosscoder"
    config.sae.hooks = ",".join(HOOKS)
    # The SAE recipe's 0.6 over the 3 hooks: the penalty weighs the sum of a latent's per-hook
    # decoder norms, 3 times one unit row's for the same reconstruction.
    config.sae.l1_coefficient = 0.2
    return config


def get_sweep(arg: str | None = None) -> list[dict]:
    """Three seeds of the recipe."""
    del arg
    return [{"data.seed": seed} for seed in (0, 1, 2)]
