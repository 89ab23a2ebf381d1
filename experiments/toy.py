"""Toy model of superposition: recover 512 known features from 256-d synthetic activations.

The default experiment (Sharkey et al. 2022's recipe; no downloads):

    python -m saejax.main --config=experiments/toy.py --workdir=/tmp/saejax/toy

Hardware: any; about 3 minutes on 2 CPU cores (4000 steps x 1024 tokens, n_latents = 1024).
Expected (measured, benchmarks/RESULTS.md): MMCS 0.997 (each of the 512 true features has a
learned decoder row at cosine ~0.997), FVU 0.028, L0 7.4 (the data has ~5 active features per
sample), dead_fraction ~0.01. The L1 optimum is sharp: 0.3 gives MMCS 0.984, 1.2 gives 0.980.

`get_config("smoke")` shrinks the run to seconds for tests.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.source = "synthetic"
    config.data.d = 256
    config.data.n_features = 512
    config.data.features_per_sample = 5.0
    config.data.frequency_decay = 0.99
    config.data.correlated = True
    config.data.seed = 0
    config.data.normalize_inputs = False  # True: scale inputs to unit mean squared norm
    config.data.init_batches = 4          # batches for the input scale and b_dec_init

    config.sae = ml_collections.ConfigDict()
    config.sae.architecture = "relu"
    config.sae.expansion_factor = 4       # n_latents = 1024 = 2x the true features
    config.sae.l1_coefficient = 0.6
    config.sae.b_dec_init = "zeros"       # or "geometric_median" (Towards Monosemanticity), "mean"
    config.sae.k = 32                     # topk, batchtopk: latents per token
    config.sae.k_aux = 128                # topk, batchtopk: dead latents in the AuxK loss
    config.sae.auxk_coefficient = 1 / 32  # topk, batchtopk (Gao et al. 2024)
    config.sae.switch_experts = 4         # switch: experts (each n_latents / E latents, TopK k)
    config.sae.switch_capacity_factor = 1.25
    config.sae.switch_balance_coefficient = 0.01
    config.sae.l0_coefficient = 1e-4      # jumprelu: weight of the L0 penalty
    config.sae.jumprelu_bandwidth = 1e-3  # jumprelu: width of the threshold's pseudo-gradient
    config.sae.jumprelu_init_threshold = 1e-3

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 100
    config.optim.decay = "linear"
    config.optim.decay_fraction = 0.2
    config.optim.l1_warmup_steps = 0
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.grad_clip_norm = 0.0     # 0 = off

    # A group trains one SAE per sparsity coefficient in one vmapped step (same shape, same
    # batches): e.g. (0.3, 0.6, 1.2). Empty: a single SAE with sae.l1_coefficient.
    config.group = ml_collections.ConfigDict()
    config.group.sparsity_coefficients = ()
    # "vmap" the members (batched matmuls), "map" them one after another inside the step, or
    # "auto": vmap on accelerators, map on CPU (a little faster there).
    config.group.vectorize = "auto"

    # Dead-latent resampling (Towards Monosemanticity); every_steps = 0 turns it off.
    config.resample = ml_collections.ConfigDict()
    config.resample.every_steps = 0
    config.resample.until_step = 0        # last step that may resample
    config.resample.batches = 4           # batches whose losses pick the new directions
    config.resample.encoder_scale = 0.2
    config.resample.rewarm_steps = 100    # learning-rate re-warm after each resampling

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 1024
    config.train.steps = 4_000
    config.train.log_every = 500
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 3

    config.evals = ml_collections.ConfigDict()
    config.evals.dead_window_tokens = 100_000
    config.evals.density_window_tokens = 100_000  # feature density histogram window
    config.evals.dense_threshold = 0.1    # dense_fraction: latents firing on > 10% of tokens
    config.evals.eval_batches = 8

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.model = 1
    # Logical axis -> mesh axis. "group" (the members of a group) stays unsplit.
    config.sharding_rules = (("batch", "data"), ("latent", "model"), ("embed", None),
                             ("group", None))

    if arg == "smoke":
        config.train.batch_size = 256
        config.train.steps = 20
        config.train.log_every = 5
        config.train.checkpoint_every = 10
        config.evals.eval_batches = 2
    elif arg:
        raise ValueError(f"experiments/toy.py: unknown argument {arg!r}; use 'smoke' or nothing.")
    return config


def get_sweep() -> list[dict]:
    """Dictionary size x sparsity: expansion 4..512 by powers of two, L1 on a log grid."""
    return [{"sae.expansion_factor": e, "sae.l1_coefficient": l1}
            for e in (4, 8, 16, 32, 64, 128, 256, 512)
            for l1 in (0.1, 0.3, 1.0, 3.0, 10.0)]
