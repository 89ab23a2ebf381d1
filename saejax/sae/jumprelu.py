"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; the Gemma Scope recipe).

f_i = z_i * H(z_i - theta_i) with a learned per-latent threshold theta = exp(log_threshold).
The loss penalises L0 directly: `l0_coefficient * mean over tokens of ||f||_0`. H has no useful
gradient, so both the JumpReLU and the L0 term use straight-through estimators whose gradient
with respect to theta is a kernel-density estimate with a rectangle kernel of width
`sae.jumprelu_bandwidth`. A mechanism: any shape (`shapes.py`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from saejax.sae import base, ops
from saejax.sae.base import ConfigField

PARAM_AXES = {"log_threshold": ("latent",)}  # besides the shape's layout


def _rectangle(u):
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _threshold_grad(z, threshold, bandwidth, g):
    """Kernel-density pseudo-derivative: -(1/eps) K((z - theta)/eps) g, summed over tokens."""
    d = -(1.0 / bandwidth) * _rectangle((z - threshold) / bandwidth) * g
    return jnp.sum(d, axis=tuple(range(d.ndim - threshold.ndim)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z, threshold, bandwidth):
    return z * (z > threshold)


def _jumprelu_fwd(z, threshold, bandwidth):
    return jumprelu(z, threshold, bandwidth), (z, threshold)


def _jumprelu_bwd(bandwidth, residuals, g):
    z, threshold = residuals
    return g * (z > threshold), _threshold_grad(z, threshold, bandwidth, threshold * g)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(z, threshold, bandwidth):
    return (z > threshold).astype(z.dtype)


def _heaviside_fwd(z, threshold, bandwidth):
    return heaviside(z, threshold, bandwidth), (z, threshold)


def _heaviside_bwd(bandwidth, residuals, g):
    z, threshold = residuals
    return jnp.zeros_like(z), _threshold_grad(z, threshold, bandwidth, g)


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)


def init(key, d, n_latents, sae_config, *, shape):
    params = shape.init_layout(key, d, n_latents)
    params["log_threshold"] = jnp.full(base.latent_shape(shape, n_latents),
                                       jnp.log(float(sae_config.jumprelu_init_threshold)))
    return params


def encode(params, x, sae_config, *, shape):
    return jumprelu(shape.pre_activations(params, x), jnp.exp(params["log_threshold"]),
                    float(sae_config.jumprelu_bandwidth))


def loss(params, batch, sae_config, sparsity_coefficient, dead, step=None, *, shape):
    x, target = shape.input(batch), shape.target(batch)
    del dead
    bandwidth = float(sae_config.jumprelu_bandwidth)
    pre = shape.pre_activations(params, x)
    threshold = jnp.exp(params["log_threshold"])
    latents = jumprelu(pre, threshold, bandwidth)
    x_hat = shape.decode(params, latents, x)
    mse = ops.mse(target, x_hat)
    # Every latent of a token counts (a CLT's of every layer): the `l0` metric's number.
    steps = heaviside(pre, threshold, bandwidth)
    l0 = jnp.mean(jnp.sum(steps, axis=tuple(range(1, steps.ndim))))
    return mse + sparsity_coefficient * l0, {"mse": mse, "sparsity_loss": l0,
                                             "latents": latents, "x_hat": x_hat}


CONFIG_FIELDS = {
    "l0_coefficient": ConfigField(1e-4, "weight of the L0 penalty"),
    "jumprelu_bandwidth": ConfigField(1e-3, "width of the threshold's pseudo-gradient"),
    "jumprelu_init_threshold": ConfigField(1e-3, "every latent's threshold at init"),
}


def validate(config, n_latents, *, shape):
    del n_latents, shape
    base.require_non_negative(config.sae, "l0_coefficient")
    for field in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
        base.require(config.sae[field] > 0, f"sae.{field}={config.sae[field]!r} must be > 0.")


def to_saelens(params, sae_config):
    del sae_config
    return "jumprelu", {**base.dense_tensors(params), "b_enc": params["b_enc"],
                        "threshold": np.exp(params["log_threshold"])}, {}


def required(saelens_architecture, d_sae, tensors):
    del saelens_architecture, tensors
    return {"b_enc": (d_sae,), "threshold": (d_sae,)}


def from_threshold(tensors):
    """A SAELens JumpReLU's params; relu(pre) * (pre > t) == pre * (pre > max(t, 0)), so a
    negative threshold acts as 0 (SAELens saves a trained BatchTopK SAE this way too)."""
    params = {k: tensors[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    with np.errstate(divide="ignore"):
        params["log_threshold"] = np.log(np.maximum(tensors["threshold"], 0.0))
    return params


def from_saelens(saelens_architecture, tensors, cfg):
    del saelens_architecture, cfg
    return "jumprelu", from_threshold(tensors), {}, []


MECHANISM = base.Mechanism(
    name="jumprelu",
    init=init,
    encode=encode,
    loss=loss,
    param_axes=PARAM_AXES,
    sparsity_coefficient="l0_coefficient",
    config_fields=CONFIG_FIELDS,
    validate=validate,
    metrics=("sparsity_loss",),
    # Counted: the dense step's three, plus the residuals and kernel-density terms of its two
    # straight-through estimators (the JumpReLU and the L0 step).
    temporaries=lambda sae_config, n_latents, *, shape: base.Temporaries(6),
    # A dead latent's threshold returns to sae.jumprelu_init_threshold with its encoder.
    resample={"log_threshold": "init"},
    saelens=base.SaeLens(to_saelens=to_saelens, imports=("jumprelu",), required=required,
                         from_saelens=from_saelens),
)
