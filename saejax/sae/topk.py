"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Each token keeps its k largest pre-activations (then ReLU); sparsity is set by k, so the loss is
the reconstruction error plus the AuxK term that revives dead latents. The top-k is exact on a
dictionary split across devices (`sharding.top_k`).

With the sparse decoder (`sae.topk_decoder`) the training step never forms the
[batch, n_latents] latents: it selects each token's k latents from the pre-activations, reads
their values there and decodes them from k decoder rows (`sparse.py`), so only the selection
costs O(d n_latents) per token. The dense decoder is the reference (mask, then a full decoder
matmul); the two give the same losses, gradients and params within float32 rounding
(tests/test_sharding.py). Gathers and scatter-adds run far below a matmul's FLOP rate on a CPU,
so "auto" decodes sparsely only when the dictionary is at least SPARSE_RATIO times the k + k_aux
rows a token touches (measured on CPU-2, benchmarks/RESULTS.md: 1.2-1.3x faster at x16 with
d 512, k 32, k_aux 128, a ratio of 51; 4x slower at 1024 latents, k 6, k_aux 128, a ratio of 8).
"""

import jax
import jax.numpy as jnp

from saejax import evals, sharding
from saejax.sae import base, sparse

SPARSE_RATIO = 32
DECODERS = ("auto", "sparse", "dense")


def sparse_decode(sae_config, n_latents: int) -> bool:
    """Whether the step decodes only the selected rows (`sae.topk_decoder`)."""
    if sae_config.topk_decoder != "auto":
        return sae_config.topk_decoder == "sparse"
    selected = int(sae_config.k) + min(int(sae_config.k_aux), n_latents)
    return n_latents >= SPARSE_RATIO * selected


def _encode(params, x, k, kept=None):
    pre = base.pre_activations(params, x)
    return pre, jax.nn.relu(pre) * base.top_k_mask(pre, k, kept)


def encode(params, x, sae_config):
    return _encode(params, x, int(sae_config.k))[1]


def _dense_loss(params, x, k, kept):
    pre, latents = _encode(params, x, k, kept)
    x_hat = base.decode(params, latents)
    return pre, x_hat, {"latents": latents}


def _sparse_loss(params, x, k, kept):
    # The selection needs every pre-activation but no gradient through them: the selected
    # latents' values are read from them, and their gradient reaches the encoder through k
    # columns per token (encode_selected's custom VJP).
    pre = jax.lax.stop_gradient(base.pre_activations(params, x))
    _, indices = sharding.top_k(pre, k)
    values = jax.nn.relu(sparse.encode_selected(params, x, pre, indices))
    if kept is not None:  # the selection is sorted: keep its first `kept`
        values = values * (jnp.arange(k) < kept).astype(values.dtype)
    x_hat = sparse.decode_selected(params["W_dec"], indices, values) + params["b_dec"]
    return pre, x_hat, {"fire_counts": sparse.fire_counts(indices, values, pre.shape[-1])}


def loss(params, x, sae_config, sparsity_coefficient, dead, step=None):
    del sparsity_coefficient
    use_sparse = sparse_decode(sae_config, params["W_dec"].shape[-2])

    def loss_at_k(k, kept):
        pre, x_hat, aux = (_sparse_loss if use_sparse else _dense_loss)(params, x, k, kept)
        auxk = base.auxk_loss(params, x, x_hat, pre, dead, sae_config.k_aux,
                              sparse_decode=use_sparse)
        mse = evals.mse(x, x_hat)
        return mse + float(sae_config.auxk_coefficient) * auxk, {
            "mse": mse, "auxk_loss": auxk, "x_hat": x_hat, **aux}

    return base.with_k_annealing(loss_at_k, sae_config, step)


def flops_per_token(d, n_latents, sae_config):
    """Dense: `base.dense_flops_per_token`. Sparse: the selection's encoder matmul (2 d n),
    then per selected latent (k, and k_aux for AuxK) its encoder column and decoder row, each
    2 d forward and 4 d backward."""
    if not sparse_decode(sae_config, n_latents):
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
