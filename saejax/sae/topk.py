"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Each token keeps its k largest pre-activations (then ReLU); sparsity is set by k, so the loss is
the reconstruction error alone. The top-k is exact on a dictionary split across devices
(`sharding.top_k_mask`).
"""

import jax

from saejax import evals, sharding
from saejax.sae import base


def encode(params, x, sae_config):
    pre = base.pre_activations(params, x)
    return jax.nn.relu(pre) * sharding.top_k_mask(pre, int(sae_config.k))


def loss(params, x, sae_config, sparsity_coefficient):
    del sparsity_coefficient
    latents = encode(params, x, sae_config)
    x_hat = base.decode(params, latents)
    mse = evals.mse(x, x_hat)
    return mse, {"mse": mse, "latents": latents, "x_hat": x_hat}


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
