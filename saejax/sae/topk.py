"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Each token keeps its k largest pre-activations (then ReLU); sparsity is set by k, so the loss is
the reconstruction error plus the AuxK term that revives dead latents. The top-k is exact on a
dictionary split across devices (`sharding.top_k_mask`).
"""

import jax

from saejax import evals, sharding
from saejax.sae import base


def _encode(params, x, k):
    pre = base.pre_activations(params, x)
    return pre, jax.nn.relu(pre) * sharding.top_k_mask(pre, k)


def encode(params, x, sae_config):
    return _encode(params, x, int(sae_config.k))[1]


def loss(params, x, sae_config, sparsity_coefficient, dead):
    del sparsity_coefficient
    pre, latents = _encode(params, x, int(sae_config.k))
    x_hat = base.decode(params, latents)
    mse = evals.mse(x, x_hat)
    auxk = base.auxk_loss(params, x, x_hat, pre, dead, sae_config.k_aux)
    return mse + float(sae_config.auxk_coefficient) * auxk, {
        "mse": mse, "auxk_loss": auxk, "latents": latents, "x_hat": x_hat}


ARCHITECTURE = base.Architecture(
    name="topk",
    init=base.init_params,
    encode=encode,
    decode=base.decode,
    loss=loss,
    flops_per_token=base.dense_flops_per_token,
    param_axes=base.PARAM_AXES,
    sparsity_coefficient=None,
)
