"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

While training, the k * batch largest ReLU pre-activations across the whole batch are kept, so
tokens share a sparsity budget. For inference the SAE keeps a threshold: a running average of
the smallest activation the batch top-k kept; `encode` compares each token's pre-activations
with it, so the saved SAE encodes one token at a time. A mechanism: any shape (`shapes.py`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from saejax import sharding
from saejax.sae import base, jumprelu, ops, topk_family

PARAM_AXES = {"threshold": ()}  # besides the shape's layout
THRESHOLD_DECAY = 0.99  # the running average's decay per step


def init(key, d, n_latents, sae_config=None, *, shape):
    return {**shape.init_layout(key, d, n_latents), "threshold": jnp.zeros((), jnp.float32)}


def encode(params, x, sae_config=None, *, shape):
    """Inference: every pre-activation above the learned threshold."""
    del sae_config
    pre = jax.nn.relu(shape.pre_activations(params, x))
    return pre * (pre > params["threshold"])


def loss(params, batch, sae_config, sparsity_coefficient, dead, step=None, *, shape):
    x, target = shape.input(batch), shape.target(batch)
    del sparsity_coefficient
    pre = shape.pre_activations(params, x)
    active = jax.nn.relu(pre)
    # k per row of latents: per token, or per token and layer (a CLT's [batch, layer, n]).
    rows = math.prod(active.shape[:-1])

    def loss_at_k(k, kept):
        # While k is annealed each token keeps its own `kept` largest, as TopK does; the
        # shared batch budget starts when the anneal ends. Annealing the batch budget instead
        # lets latents form for pairs of co-occurring features and recovers less (MMCS 0.963
        # against 0.99 on the toy recipe, benchmarks/RESULTS.md).
        if kept is None:
            mask = sharding.batch_top_k_mask(active, k * rows, topk_family.rows_axes(shape))
        else:
            mask = topk_family.top_k_mask(active, k, kept, shape=shape)
        latents = active * mask
        x_hat = shape.decode(params, latents, x)
        mse = ops.mse(target, x_hat)
        auxk = topk_family.auxk_loss(params, x, target, x_hat, pre, dead, sae_config.k_aux,
                                     shape=shape)
        smallest_kept = jnp.min(jnp.where(latents > 0, latents, jnp.inf))
        smallest_kept = jnp.where(jnp.isfinite(smallest_kept), smallest_kept,
                                  params["threshold"])
        old = params["threshold"]
        threshold = jnp.where(old > 0, THRESHOLD_DECAY * old
                              + (1 - THRESHOLD_DECAY) * smallest_kept, smallest_kept)
        return mse + float(sae_config.auxk_coefficient) * auxk, {
            "mse": mse, "auxk_loss": auxk, "latents": latents, "x_hat": x_hat,
            "buffers": {"threshold": jax.lax.stop_gradient(threshold)}}

    return topk_family.with_k_annealing(loss_at_k, sae_config, step)


def validate(config, n_latents, *, shape):
    del shape
    topk_family.validate_auxk(config, n_latents)
    topk_family.validate_k(config, n_latents)


def to_saelens(params, sae_config):
    """SAELens saves a trained BatchTopK SAE as a JumpReLU SAE with the batch threshold on
    every latent (BatchTopKTrainingSAE.process_state_dict_for_saving_inference);
    relu(pre) * (pre > t) is exactly this inference for t >= 0."""
    del sae_config
    n_latents = params["b_enc"].shape[0]
    return "jumprelu", {**base.dense_tensors(params), "b_enc": params["b_enc"],
                        "threshold": np.full((n_latents,), params["threshold"], np.float32)}, {}


def required(saelens_architecture, d_sae, tensors):
    del saelens_architecture
    return {"b_enc": (d_sae,),
            **({"threshold": (d_sae,)} if "threshold" in tensors else {"topk_threshold": ()})}


def from_saelens(saelens_architecture, tensors, cfg):
    """A per-latent threshold reads as the JumpReLU it is; the training form's single
    `topk_threshold` as a BatchTopK SAE."""
    k = topk_family.saelens_k(saelens_architecture, cfg)
    folded = []
    tensors = topk_family.fold_decoder_norms(tensors, cfg, folded)
    if "threshold" in tensors:
        return jumprelu.MECHANISM.name, jumprelu.from_threshold(tensors), {"k": k}, folded
    params = {n: tensors[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    params["threshold"] = np.asarray(tensors["topk_threshold"], np.float32).reshape(())
    return "batchtopk", params, {"k": k}, folded


MECHANISM = base.Mechanism(
    name="batchtopk",
    init=init,
    encode=encode,
    loss=loss,
    param_axes=PARAM_AXES,
    sparsity_coefficient=None,
    config_fields={**topk_family.K_FIELDS, **topk_family.AUXK_FIELDS},
    validate=validate,
    metrics=("auxk_loss",),
    # Counted: the activations, the top-k mask, the latents, AuxK's candidates and mask, and
    # the gradient.
    temporaries=lambda sae_config, n_latents, *, shape: base.Temporaries(6),
    level_field="k",
    saelens=base.SaeLens(to_saelens=to_saelens, imports=("batchtopk",), required=required,
                         from_saelens=from_saelens),
)
