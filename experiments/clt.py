"""Cross-layer transcoder ground truth: at each of 3 layers a sparse code of 64 known features of
its own, read through per-layer directions into the layer's MLP input (d = 64) and written by
known per-(source, target) directions into the MLP outputs of that layer and every later one;
recovered by a TopK CLT of 128 latents per layer (twice the features) whose decoder rows (each
latent's decoders into every layer, side by side) are the features' output directions.

    python -m saejax.main --config=experiments/clt.py --workdir=/tmp/saejax/clt
    python -m saejax.sweep --config=experiments/clt.py --workdir=/tmp/saejax/clt_seeds

The sweep is seeds 0, 1 and 2. Hardware: any; about a minute a run on 2 CPU cores (1500 steps
x 256 tokens). Expected (measured, benchmarks/RESULTS.md "Cross-layer transcoders"): MMCS
(every true feature against the best CLT decoder row, matched by decoder cosine) >= 0.99 for
each seed, and FVU per target layer (fvu/blocks.{m}.hook_mlp_out) in summary.json.
`get_config("smoke")` is seconds, for tests.
"""

import ml_collections

from experiments import toy

LAYERS = 3


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "smoke"):
        raise ValueError(f"experiments/clt.py: unknown argument {arg!r}; use 'smoke' or "
                         "nothing.")
    config = toy.get_config("small")        # d = 64, batch 256
    config.data.source = "synthetic_clt"
    config.data.n_layers = LAYERS
    config.data.n_features = 64           # per layer
    config.data.features_per_sample = 3   # per layer
    config.sae.shape = "clt"
    config.sae.layers = f"0-{LAYERS - 1}"  # the MLP input and output hooks by default
    config.sae.architecture = "topk"
    config.sae.expansion_factor = 2       # 128 latents per layer: twice its 64 features
    config.sae.k = 4                      # per layer and token
    config.sae.k_anneal_steps = 500
    config.sae.k_anneal_start = 16
    config.train.steps = 1_500
    if arg == "smoke":
        config.train.steps = 20
        config.train.log_every = 5
        config.train.checkpoint_every = 10
        config.evals.eval_batches = 2
    return config


def get_sweep(arg: str | None = None) -> list[dict]:
    """Three seeds of the recipe."""
    del arg
    return [{"data.seed": seed} for seed in (0, 1, 2)]
