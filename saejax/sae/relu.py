"""ReLU SAE with an L1 penalty weighted by decoder row norms (Anthropic, Towards Monosemanticity).

The sparsity term is `l1_coefficient * mean over tokens and latents of |f_i| * ||W_dec,i||`,
added to the element-mean MSE (Sharkey et al. 2022's normalisation: the L1 norm per token
divided by n_latents). A mechanism: any shape (`shapes.py`).
"""

import jax
import jax.numpy as jnp

from saejax.sae import base, ops


def encode(params, x, sae_config=None, *, shape):
    del sae_config
    return jax.nn.relu(shape.pre_activations(params, x))


def loss(params, batch, sae_config, sparsity_coefficient, dead, step=None, *, shape):
    x, target = shape.input(batch), shape.target(batch)
    del dead
    latents = encode(params, x, sae_config, shape=shape)
    x_hat = shape.decode(params, latents, x)
    mse = ops.mse(target, x_hat)
    decoder_norms = shape.decoder_norms(params)
    # mean(latents * decoder_norms), summed per latent first: one pass over the latents serves
    # the value and the decoder norms' gradient.
    l1 = jnp.sum(ops.batch_sum(latents) * decoder_norms) / latents.size
    return mse + sparsity_coefficient * l1, {"mse": mse, "sparsity_loss": l1,
                                              "latents": latents, "x_hat": x_hat}


def validate(config, n_latents, *, shape):
    del n_latents, shape
    base.require_non_negative(config.sae, "l1_coefficient")


def to_saelens(params, sae_config):
    del sae_config
    return "standard", {**base.dense_tensors(params), "b_enc": params["b_enc"]}, {}


def required(saelens_architecture, d_sae, tensors):
    del saelens_architecture, tensors
    return {"b_enc": (d_sae,)}


def from_saelens(saelens_architecture, tensors, cfg):
    del saelens_architecture, cfg
    return "relu", {k: tensors[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}, {}, []


SAELENS = base.SaeLens(to_saelens=to_saelens, imports=("standard",), required=required,
                       from_saelens=from_saelens)

MECHANISM = base.Mechanism(
    name="relu",
    encode=encode,
    loss=loss,
    sparsity_coefficient="l1_coefficient",
    config_fields=base.L1_FIELDS,
    validate=validate,
    metrics=("sparsity_loss",),
    # Counted (default): the pre-activations, the latents, and the gradient through them.
    sparsity_mean_over_latents=True,
    saelens=SAELENS,
)
