"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; the Gemma Scope recipe).

f_i = z_i * H(z_i - theta_i) with a learned per-latent threshold theta = exp(log_threshold).
The loss penalises L0 directly: `l0_coefficient * mean over tokens of ||f||_0`. H has no useful
gradient, so both the JumpReLU and the L0 term use straight-through estimators whose gradient
with respect to theta is a kernel-density estimate with a rectangle kernel of width
`sae.jumprelu_bandwidth`.
"""

import functools

import jax
import jax.numpy as jnp

from saejax import evals
from saejax.sae import base

PARAM_AXES = {**base.PARAM_AXES, "log_threshold": ("latent",)}


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


def init(key, d, n_latents, sae_config):
    params = base.init_params(key, d, n_latents)
    params["log_threshold"] = jnp.full((n_latents,),
                                       jnp.log(float(sae_config.jumprelu_init_threshold)))
    return params


def encode(params, x, sae_config):
    return jumprelu(base.pre_activations(params, x), jnp.exp(params["log_threshold"]),
                    float(sae_config.jumprelu_bandwidth))


def loss(params, x, sae_config, sparsity_coefficient, dead, step=None):
    del dead
    bandwidth = float(sae_config.jumprelu_bandwidth)
    pre = base.pre_activations(params, x)
    threshold = jnp.exp(params["log_threshold"])
    latents = jumprelu(pre, threshold, bandwidth)
    x_hat = base.decode(params, latents)
    mse = evals.mse(x, x_hat)
    l0 = jnp.mean(jnp.sum(heaviside(pre, threshold, bandwidth), axis=-1))
    return mse + sparsity_coefficient * l0, {"mse": mse, "sparsity_loss": l0,
                                             "latents": latents, "x_hat": x_hat}


ARCHITECTURE = base.Architecture(
    name="jumprelu",
    init=init,
    encode=encode,
    decode=base.decode,
    loss=loss,
    flops_per_token=base.dense_flops_per_token,
    param_axes=PARAM_AXES,
    sparsity_coefficient="l0_coefficient",
)
