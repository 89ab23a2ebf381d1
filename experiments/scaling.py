"""Scaling laws: dictionary size x sparsity on the toy model of superposition (known features).

    python -m saejax.sweep --config=experiments/scaling.py --workdir=$DIR
    python -m saejax.plots $DIR        # redraws report.md and plots/ from the runs so far

The sweep (`get_sweep()`): ReLU SAEs at expansion factors 4, 8, ..., 512 (1,024 to 131,072
latents on d = 256 with 512 true features) x five L1 levels on a log grid, and TopK SAEs at the
same sizes x k in (4, 8, 16). The L1 term is a mean over latents (saejax/sae/relu.py), so the
level held fixed along a curve is l1_coefficient / expansion_factor (the coefficient of the
summed L1 norm, as in Anthropic's convention); the sweep sets l1_coefficient = level x
expansion_factor. The ReLU points of one size train as one group; each TopK point is its own
run. 64 points in 32 runs of 4,000 steps x 1,024 tokens, about 2.2e16 training FLOPs in all
(mostly the 512x points): meant for an accelerator (about 1 GB of params and Adam state per
131k-latent SAE). Not yet measured; the runlocal sweep found that at a fixed number of steps the
largest dictionaries are the last to converge, so check their metrics.jsonl before fitting.

`:runlocal` shrinks it to 4.5 minutes on 2 CPU cores (CPU-2, measured): d = 32 with 128 true
features, expansion 1..16 (32 to 512 latents, so the dictionary passes the 128 true features at
x4), L1 levels 0.2, 0.4, 0.8 (L0 about 2 to 20; the data has about 5 active features per
token), ReLU only (TopK's top-k is slow on CPU), Adam at 1e-2, 6,000 steps x 1,024 tokens:

    python -m saejax.sweep --config=experiments/scaling.py:runlocal --workdir=/tmp/saejax/scaling

Expected (benchmarks/RESULTS.md): FVU falls with the number of latents at every L1 level until
the dictionary holds the 128 true features, then stays flat (fitted floors c = 0.14, 0.23, 0.41);
MMCS rises from 0.59 (32 latents) and 0.75 (64) to 0.98-0.99 at 128 and stays there; latents
beyond the true features die (dead fraction 0 up to 128 latents, 0.2-0.3 at 512).
"""

import ml_collections

from saejax import configs

EXPANSION_FACTORS = (4, 8, 16, 32, 64, 128, 256, 512)
L1_LEVELS = (0.0375, 0.075, 0.15, 0.3, 0.6)   # l1_coefficient / expansion_factor
TOPK_K = (4, 8, 16)

RUNLOCAL_EXPANSION_FACTORS = (1, 2, 4, 8, 16)
RUNLOCAL_L1_LEVELS = (0.2, 0.4, 0.8)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = configs.base_config()
    config.data.source = "synthetic"
    config.data.d = 256
    config.data.n_features = 512
    config.sae.architecture = "relu"
    config.sae.expansion_factor = 4
    config.sae.l1_coefficient = 0.6
    config.train.batch_size = 1024
    config.train.steps = 4_000
    config.train.log_every = 250
    config.train.checkpoint_every = 1000

    if arg == "runlocal":
        config.data.d = 32
        config.data.n_features = 128
        # At 3e-3 the dictionaries past the 128 true features were still sparsifying after
        # 3000 steps (x16: MMCS 0.84 against 0.99 at 1e-2); at this width 1e-2 converges.
        config.optim.learning_rate = 1e-2
        config.train.steps = 6_000
        config.train.log_every = 1_000
        config.train.checkpoint_every = 3_000
    elif arg:
        raise ValueError(f"experiments/scaling.py: unknown argument {arg!r}; use 'runlocal' "
                         f"or nothing.")
    return config


def get_sweep(arg: str | None = None) -> list[dict]:
    """Dictionary size x L1 level (ReLU, grouped per size), and size x k (TopK)."""
    if arg and arg != "runlocal":
        raise ValueError(f"experiments/scaling.py: unknown argument {arg!r}; use 'runlocal' "
                         f"or nothing.")
    if arg == "runlocal":
        return [{"sae.expansion_factor": e, "sae.l1_coefficient": round(level * e, 6)}
                for e in RUNLOCAL_EXPANSION_FACTORS for level in RUNLOCAL_L1_LEVELS]
    relu = [{"sae.architecture": "relu", "sae.expansion_factor": e,
             "sae.l1_coefficient": round(level * e, 6)}
            for e in EXPANSION_FACTORS for level in L1_LEVELS]
    topk = [{"sae.architecture": "topk", "sae.expansion_factor": e, "sae.k": k}
            for e in EXPANSION_FACTORS for k in TOPK_K]
    return relu + topk
