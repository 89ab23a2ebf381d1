"""Matryoshka BatchTopK against BatchTopK on a hierarchy of features (absorption).

    python -m saejax.main --config=experiments/matryoshka.py --workdir=/tmp/saejax/matryoshka
    python -m saejax.main --config=experiments/matryoshka.py:batchtopk --workdir=/tmp/saejax/btk
    python benchmarks/matryoshka_absorption.py --workdir=/tmp/saejax/absorption   # 3 seeds

The data is `data.source="synthetic_hierarchy"` (saejax/data/hierarchy.py): 16 parent features,
each with 3 children that fire only with it, 64 orthonormal features in 64 dimensions, 3 active
per sample on average. Both SAEs have 128 latents (twice the true features) and k = 3, annealed
from 16 over the first 1000 of 4000 steps x 512 tokens; the Matryoshka one has nested prefixes
of 16 and 128 latents (`sae.matryoshka_widths=(16,)`; the whole dictionary is implied), so its
first 16 latents must reconstruct on their own; the prefix's loss weighs 1 up to step 2500 and
0.1 from then on. The argument is `matryoshka` (the default) or `batchtopk`, optionally followed
by `,tiny` (d = 32, 4 parents, 500 steps: seconds; what the tests run) and `,random` (random
unit directions instead of orthonormal: the recipe before session 7).

Hardware: any; each run 1.5-2 min of training on 2 CPU cores shared at load 20-30.
Expected (2026-12-02, benchmarks/RESULTS.md, "Matryoshka BatchTopK on a hierarchy", "MMCS
0.99"), over seeds 0, 1, 2:

    variant      absorption             MMCS                   FVU
    matryoshka   0.000 / 0.000 / 0.020  0.996 / 0.996 / 0.992  0.0024-0.0028
    batchtopk    0.696 / 0.779 / 0.609  0.827 / 0.809 / 0.838  0.0000-0.0005

BatchTopK learns latents at parent + child that fire in the parent's place. Matryoshka's first
16 latents are the parents; at weight 1 throughout they keep a share of their children's mean
direction (MMCS 0.974), which the late weight 0.1 takes out. With `,random` neither reaches
0.99 (Matryoshka 0.96: children near their parent's direction stay partly absorbed).
"""

import ml_collections

from saejax import configs

VARIANTS = ("matryoshka", "batchtopk")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, *options = (arg or "matryoshka").split(",")
    if variant not in VARIANTS or set(options) - {"tiny", "random"}:
        raise ValueError(f"experiments/matryoshka.py: unknown argument {arg!r}; use one of "
                         f"{VARIANTS}, optionally followed by ',tiny' and/or ',random'.")
    config = configs.base_config()
    config.data.source = "synthetic_hierarchy"
    config.data.d = 64
    config.data.hierarchy_parents = 16
    config.data.hierarchy_children = 3
    config.data.hierarchy_child_probability = 0.5
    config.data.features_per_sample = 3.0
    # Orthonormal directions: random ones in d = 64 (`,random`) have pairs at cosine up to
    # 0.5, and a child near its parent's direction is partly absorbed whatever the loss.
    config.data.hierarchy_orthogonal = "random" not in options
    config.sae.architecture = "batchtopk"
    config.sae.expansion_factor = 2       # 128 latents: twice the 64 true features
    config.sae.k = 3
    config.sae.k_aux = 32
    # k annealed from 16 over the first 1000 steps (each token keeping its own top k meanwhile,
    # batchtopk.py), as experiments/architectures.py does for BatchTopK.
    config.sae.k_anneal_steps = 1_000
    config.sae.k_anneal_start = 16
    config.sae.matryoshka_widths = (16,) if variant == "matryoshka" else ()
    # The first prefix at full weight places one parent on each of the first 16 latents; from
    # step 2500 at weight 0.1, so that the whole dictionary's loss takes back out of them the
    # children's mean direction the prefix's own MSE pulls in (feature hedging, Chanin et al.
    # 2025). At weight 1 throughout the parents stay at cosine 0.98 (MMCS 0.974).
    config.sae.matryoshka_weights = (0.1,) if variant == "matryoshka" else ()
    config.sae.matryoshka_weights_from_step = 2_500
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
        config.sae.matryoshka_weights_from_step = 300
        config.train.batch_size = 256
        config.train.steps = 500
        config.train.log_every = 250
        config.train.checkpoint_every = 250
        config.evals.eval_batches = 4
        config.evals.dead_window_tokens = 5_000
    return config
