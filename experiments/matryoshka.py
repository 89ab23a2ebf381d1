"""Matryoshka BatchTopK against BatchTopK on a hierarchy of features (absorption).

    python -m saejax.main --config=experiments/matryoshka.py --workdir=/tmp/saejax/matryoshka
    python -m saejax.main --config=experiments/matryoshka.py:batchtopk --workdir=/tmp/saejax/btk
    python benchmarks/matryoshka_absorption.py --workdir=/tmp/saejax/absorption   # 3 seeds

The data is `data.source="synthetic_hierarchy"` (saejax/data/hierarchy.py): 16 parent features,
each with 3 children that fire only with it, 64 features in 64 dimensions, 3 active per sample
on average. Both SAEs have 128 latents (twice the true features) and k = 3, annealed from 16
over the first 1000 of 4000 steps x 512 tokens; the Matryoshka one has nested prefixes of 16
and 128 latents (`sae.matryoshka_widths=(16,)`; the whole dictionary is implied), so its first
16 latents must reconstruct on their own. The argument is `matryoshka` (the default) or
`batchtopk`, optionally followed by `,tiny` (d = 32, 4 parents, 500 steps: seconds; what the
tests run).

Hardware: any; each run about 30 s on 2 shared CPU cores (the benchmark's six runs: 3 min 13 s).
Expected (2026-12-02, benchmarks/RESULTS.md, "Matryoshka BatchTopK on a hierarchy"), over seeds
0, 1, 2:

    variant      absorption            MMCS                  FVU
    matryoshka   0.019 / 0.007 / 0.016  0.959 / 0.957 / 0.959  0.019
    batchtopk    0.284 / 0.428 / 0.299  0.892 / 0.845 / 0.882  0.0015-0.0020

BatchTopK learns latents at parent + child that fire in the parent's place; Matryoshka's first
16 latents are the parents (with a little of their children's mean direction), at the price of
a higher FVU. `,tiny` (the tests): absorption 0.000 against 0.607 at seed 0, Matryoshka's MMCS
0.93.
"""

import ml_collections

from saejax import configs

VARIANTS = ("matryoshka", "batchtopk")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, *options = (arg or "matryoshka").split(",")
    if variant not in VARIANTS or set(options) - {"tiny"}:
        raise ValueError(f"experiments/matryoshka.py: unknown argument {arg!r}; use one of "
                         f"{VARIANTS}, optionally followed by ',tiny'.")
    config = configs.base_config()
    config.data.source = "synthetic_hierarchy"
    config.data.d = 64
    config.data.hierarchy_parents = 16
    config.data.hierarchy_children = 3
    config.data.hierarchy_child_probability = 0.5
    config.data.features_per_sample = 3.0
    config.sae.architecture = "batchtopk"
    config.sae.expansion_factor = 2       # 128 latents: twice the 64 true features
    config.sae.k = 3
    config.sae.k_aux = 32
    # k annealed from 16 over the first 1000 steps (each token keeping its own top k meanwhile,
    # batchtopk.py), as experiments/architectures.py does for BatchTopK.
    config.sae.k_anneal_steps = 1_000
    config.sae.k_anneal_start = 16
    config.sae.matryoshka_widths = (16,) if variant == "matryoshka" else ()
    config.train.batch_size = 512
    config.train.steps = 4_000
    config.train.log_every = 500
    config.train.checkpoint_every = 1_000
    config.evals.dead_window_tokens = 20_000

    if "tiny" in options:  # 4 parents x 3 children in 32 dimensions: seconds
        config.data.d = 32
        config.data.hierarchy_parents = 4
        config.data.features_per_sample = 1.5
        config.sae.k = 2
        config.sae.k_aux = 8
        config.sae.k_anneal_steps = 200
        config.sae.k_anneal_start = 8
        config.sae.matryoshka_widths = (4,) if variant == "matryoshka" else ()
        config.train.batch_size = 256
        config.train.steps = 500
        config.train.log_every = 250
        config.train.checkpoint_every = 250
        config.evals.eval_batches = 4
        config.evals.dead_window_tokens = 5_000
    return config
