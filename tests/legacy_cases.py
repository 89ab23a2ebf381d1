"""The runs behind tests/fixtures/legacy/ (written by tests/fixtures/make_legacy.py with the code
before the structure refactor): every architecture and the variants whose step differs, on a
sharded mesh, a few steps each. Overrides use the user's config keys, which must keep working."""

from conftest import toy_config

_BASE = {"data.d": 16, "data.n_features": 24, "sae.expansion_factor": 4,
         "train.batch_size": 64, "train.steps": 6, "train.log_every": 3,
         "train.checkpoint_every": 3, "evals.eval_batches": 1, "mesh.model": 2,
         "evals.dead_window_tokens": 128}

CASES = {
    "relu": {"sae.l1_coefficient": 0.6},
    "relu_resample_median_normalized": {
        "sae.l1_coefficient": 0.6, "resample.every_steps": 3, "resample.until_step": 3,
        "resample.batches": 2, "sae.b_dec_init": "geometric_median",
        "data.normalize_inputs": True, "data.init_batches": 2, "optim.l1_warmup_steps": 4},
    "topk_dense": {"sae.architecture": "topk", "sae.k": 4, "sae.k_aux": 8,
                   "sae.topk_decoder": "dense"},
    "topk_sparse_annealed": {"sae.architecture": "topk", "sae.k": 4, "sae.k_aux": 8,
                             "sae.topk_decoder": "sparse", "sae.k_anneal_steps": 4,
                             "sae.k_anneal_start": 12},
    "batchtopk": {"sae.architecture": "batchtopk", "sae.k": 4, "sae.k_aux": 8},
    "batchtopk_annealed": {"sae.architecture": "batchtopk", "sae.k": 4, "sae.k_aux": 8,
                           "sae.k_anneal_steps": 4, "sae.k_anneal_start": 12},
    "jumprelu": {"sae.architecture": "jumprelu", "sae.l0_coefficient": 1e-3},
    "gated": {"sae.architecture": "gated", "sae.l1_coefficient": 0.6,
              "resample.every_steps": 3, "resample.until_step": 3, "resample.batches": 2},
    "switch": {"sae.architecture": "switch", "sae.k": 4, "sae.switch_experts": 2},
    "relu_group": {"group.sparsity_coefficients": (0.3, 0.6), "mesh.model": 1},
    "topk_bfloat16": {"sae.architecture": "topk", "sae.k": 4, "sae.k_aux": 8,
                      "train.compute_dtype": "bfloat16"},
}
# The workdir kept whole: resumed with more steps and loaded by today's code.
WORKDIR_CASE = "topk_dense"


def config_for(name: str, **overrides):
    return toy_config("smoke", **{**_BASE, **CASES[name], **overrides})
