"""Toy model of superposition: recover 512 known features from 256-d synthetic activations.

The default experiment (Sharkey et al. 2022's recipe; no downloads):

    python -m saejax.main --config=experiments/toy.py --workdir=/tmp/saejax/toy

Hardware: any; about 3 minutes on 2 CPU cores (4000 steps x 1024 tokens, n_latents = 1024).
Expected (measured, benchmarks/RESULTS.md): MMCS 0.997 (each of the 512 true features has a
learned decoder row at cosine ~0.997), FVU 0.028, L0 7.4 (the data has ~5 active features per
sample), dead_fraction ~0.01. The L1 optimum is sharp: 0.3 gives MMCS 0.984, 1.2 gives 0.980.

`get_config("small")` is the same recipe at a quarter of the width and batch (d = 64, 128 true
features, 256 latents, batch 256): MMCS 0.9965-0.9973, dead_fraction < 0.01 for seeds 0-3 in
about 15 s on 2 cores. `get_config("smoke")` shrinks the run to seconds for tests.
"""

import ml_collections

from saejax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = configs.base_config()  # every default below is the toy recipe's
    config.data.source = "synthetic"
    config.data.d = 256
    config.data.n_features = 512
    config.sae.architecture = "relu"
    config.sae.expansion_factor = 4       # n_latents = 1024 = 2x the true features
    config.sae.l1_coefficient = 0.6
    config.train.batch_size = 1024
    config.train.steps = 4_000

    if arg == "small":  # the recipe at a quarter of the width and batch: ~15 s on 2 cores
        config.data.d = 64
        config.data.n_features = 128
        config.train.batch_size = 256
    elif arg == "smoke":
        config.train.batch_size = 256
        config.train.steps = 20
        config.train.log_every = 5
        config.train.checkpoint_every = 10
        config.evals.eval_batches = 2
    elif arg:
        raise ValueError(f"experiments/toy.py: unknown argument {arg!r}; use 'small', 'smoke' "
                         "or nothing.")
    return config


def get_sweep() -> list[dict]:
    """Dictionary size x sparsity: expansion 4..512 by powers of two x five L1 levels. The L1
    term is a mean over latents, so a level (l1_coefficient / expansion_factor) is what stays
    fixed along a scaling curve; x4 at level 0.15 is the default recipe. experiments/scaling.py
    is the sweep with TopK points and a :runlocal version."""
    return [{"sae.expansion_factor": e, "sae.l1_coefficient": level * e}
            for e in (4, 8, 16, 32, 64, 128, 256, 512)
            for level in (0.0375, 0.075, 0.15, 0.3, 0.6)]
