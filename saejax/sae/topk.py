"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Each token keeps its k largest pre-activations (then ReLU); sparsity is set by k, so the loss is
the reconstruction error plus the AuxK term that revives dead latents. The top-k is exact on a
dictionary split across devices (`sharding.top_k`).

With `sae.sparse_decode` (the default) the training step never forms the [batch, n_latents]
latents: it selects each token's k latents from the pre-activations, then recomputes their
values from k encoder columns and decodes them from k decoder rows (`sparse.py`), so only the
selection costs O(d n_latents) per token. `sparse_decode=False` is the dense reference (mask,
then a full decoder matmul); the two give the same losses, gradients and params within float32
rounding (tests/test_sharding.py).
"""

import jax

from saejax import evals, sharding
from saejax.sae import base, sparse


def _encode(params, x, k):
    pre = base.pre_activations(params, x)
    return pre, jax.nn.relu(pre) * sharding.top_k_mask(pre, k)


def encode(params, x, sae_config):
    return _encode(params, x, int(sae_config.k))[1]


def _dense_loss(params, x, sae_config):
    pre, latents = _encode(params, x, int(sae_config.k))
    x_hat = base.decode(params, latents)
    return pre, x_hat, {"latents": latents}


def _sparse_loss(params, x, sae_config):
    # The selection needs every pre-activation but no gradient: the latents' values, and with
    # them the encoder's gradient, come from encode_selected's k columns per token.
    pre = jax.lax.stop_gradient(base.pre_activations(params, x))
    _, indices = sharding.top_k(pre, int(sae_config.k))
    values = jax.nn.relu(sparse.encode_selected(params, x, pre, indices))
    x_hat = sparse.decode_selected(params["W_dec"], indices, values) + params["b_dec"]
    return pre, x_hat, {"fire_counts": sparse.fire_counts(indices, values, pre.shape[-1])}


def loss(params, x, sae_config, sparsity_coefficient, dead):
    del sparsity_coefficient
    sparse_decode = bool(sae_config.sparse_decode)
    pre, x_hat, aux = (_sparse_loss if sparse_decode else _dense_loss)(params, x, sae_config)
    auxk = base.auxk_loss(params, x, x_hat, pre, dead, sae_config.k_aux,
                          sparse_decode=sparse_decode)
    mse = evals.mse(x, x_hat)
    return mse + float(sae_config.auxk_coefficient) * auxk, {
        "mse": mse, "auxk_loss": auxk, "x_hat": x_hat, **aux}


def flops_per_token(d, n_latents, sae_config):
    """Dense: `base.dense_flops_per_token`. Sparse: the selection's encoder matmul (2 d n),
    then per selected latent (k, and k_aux for AuxK) its encoder column and decoder row, each
    2 d forward and 4 d backward."""
    if not sae_config.sparse_decode:
        return base.dense_flops_per_token(d, n_latents)
    selected = int(sae_config.k) + min(int(sae_config.k_aux), n_latents)
    return 2 * d * n_latents + 12 * d * selected


ARCHITECTURE = base.Architecture(
    name="topk",
    init=base.init_params,
    encode=encode,
    decode=base.decode,
    loss=loss,
    flops_per_token=flops_per_token,
    param_axes=base.PARAM_AXES,
    sparsity_coefficient=None,
)
