"""Gated SAE (Rajamanoharan et al. 2024, "Improving dictionary learning with gated sparse
autoencoders").

A gate decides which latents fire, H(pi_gate > 0); a magnitude path sets how much,
ReLU(pi_mag). Both share the encoder directions: pi_mag = raw * exp(r_mag) + b_mag with
pi_gate = raw + b_enc, raw = (x - b_dec) @ W_enc, so one encoder matmul serves both. The L1
penalty (weighted by decoder norms) acts on ReLU(pi_gate), and an auxiliary reconstruction from
ReLU(pi_gate) through a frozen decoder trains the gate. A mechanism: any shape (`raw` is the
shape's encoder matmul without its bias: for a transcoder, `x @ W_enc`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from saejax.sae import base, ops

PARAM_AXES = {"r_mag": ("latent",), "b_mag": ("latent",)}  # besides the shape's layout


def init(key, d, n_latents, sae_config=None, *, shape):
    params = shape.init_layout(key, d, n_latents)
    params["r_mag"] = jnp.zeros(base.latent_shape(shape, n_latents), jnp.float32)
    params["b_mag"] = jnp.zeros(base.latent_shape(shape, n_latents), jnp.float32)
    return params


def _paths(params, x, shape):
    raw = shape.raw(params, x)
    return raw + params["b_enc"], raw * jnp.exp(params["r_mag"]) + params["b_mag"]


def encode(params, x, sae_config=None, *, shape):
    del sae_config
    pi_gate, pi_mag = _paths(params, x, shape)
    return (pi_gate > 0) * jax.nn.relu(pi_mag)


def loss(params, batch, sae_config, sparsity_coefficient, dead, step=None, *, shape):
    x, target = shape.input(batch), shape.target(batch)
    del dead
    del sae_config
    pi_gate, pi_mag = _paths(params, x, shape)
    latents = (pi_gate > 0) * jax.nn.relu(pi_mag)
    x_hat = shape.decode(params, latents, x)
    mse = ops.mse(target, x_hat)
    gate = jax.nn.relu(pi_gate)
    l1 = jnp.mean(gate * shape.decoder_norms(params))
    frozen = jax.lax.stop_gradient(params)  # the decoder, frozen: only the gate learns here
    auxiliary = ops.mse(target, shape.decode(frozen, gate, x))
    return (mse + sparsity_coefficient * l1 + auxiliary,
            {"mse": mse, "sparsity_loss": l1, "auxiliary_loss": auxiliary, "latents": latents,
             "x_hat": x_hat})


def flops_per_token(d, n_latents, sae_config=None, *, shape):
    """The dense step plus the auxiliary decode: 2 d n forward, 2 d n backward to the gate."""
    return base.dense_flops(d, n_latents, shape=shape) + 4 * d * n_latents


def validate(config, n_latents, *, shape):
    del n_latents, shape
    base.require_non_negative(config.sae, "l1_coefficient")


def to_saelens(params, sae_config):
    del sae_config
    return "gated", {**base.dense_tensors(params), "b_gate": params["b_enc"],
                     "r_mag": params["r_mag"], "b_mag": params["b_mag"]}, {}


def required(saelens_architecture, d_sae, tensors):
    del saelens_architecture, tensors
    return {"b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,)}


def from_saelens(saelens_architecture, tensors, cfg):
    del saelens_architecture, cfg
    params = {k: tensors[k] for k in ("W_enc", "W_dec", "b_dec", "r_mag", "b_mag")}
    return "gated", {**params, "b_enc": tensors["b_gate"]}, {}, []


def fold_input_shift(params, shift):
    """Both paths read `x @ W_enc`: the gate's bias takes the shift, the magnitude's its
    rescaled copy."""
    return {**params, "b_enc": params["b_enc"] + shift,
            "b_mag": params["b_mag"] + shift * np.exp(params["r_mag"])}


MECHANISM = base.Mechanism(
    name="gated",
    init=init,
    encode=encode,
    loss=loss,
    flops_per_token=flops_per_token,
    param_axes=PARAM_AXES,
    sparsity_coefficient="l1_coefficient",
    config_fields=base.L1_FIELDS,
    validate=validate,
    metrics=("auxiliary_loss", "sparsity_loss"),
    # Counted (default): the pre-activations (the two paths share one matmul), the latents,
    # and the gradient flowing back through them.
    # The magnitude path's per-latent gain and bias start again from zero, as at init.
    resample={"r_mag": "zero", "b_mag": "zero"},
    sparsity_mean_over_latents=True,
    saelens=base.SaeLens(to_saelens=to_saelens, imports=("gated",), required=required,
                         from_saelens=from_saelens, fold_input_shift=fold_input_shift),
)
