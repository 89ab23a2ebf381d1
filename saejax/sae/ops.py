"""The reductions an SAE's loss and step share with the evaluations: the reconstruction error
and its fraction of the variance, the per-latent sum over a batch, and firing counts. They live
here, below both, so the SAEs do not import `saejax.evals` (which re-exports them under the
same names)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def mse(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """Element-mean squared error, the reconstruction term of every SAE loss (reduced in
    float32 when the step computes in bfloat16)."""
    return jnp.mean(jnp.square(x_hat - x), dtype=jnp.float32)


def fvu(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """Fraction of variance unexplained: residual energy over the batch's total variance."""
    residual = jnp.sum(jnp.square(x - x_hat), dtype=jnp.float32)
    total = jnp.sum(jnp.square(x - jnp.mean(x, axis=0, keepdims=True)), dtype=jnp.float32)
    return residual / total


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def batch_sum(a: jax.Array, axis: int = 0) -> jax.Array:
    """The sum over the batch of `a [tokens, n]`, in float32, as a product with a ones vector.

    The same sum as `jnp.sum(a, axis=0)`, but XLA's CPU backend reduces a [tokens, n_latents]
    array over its leading axis in a loop that ran 4x slower than Eigen's matrix-vector product
    at 8192 latents and 64x slower at 65536 (benchmarks/batch_sum.py); on GPU and TPU both are
    one pass over `a`. Every
    per-latent sum over a batch in the step goes through here: the L1 term, the encoder bias's
    gradient and the firing counts. `axis` is the tokens' axis of a larger array: a CLT's
    latents `[tokens, layer, n]` are summed over their first, a switch SAE's
    `[experts, capacity, n]` over their second.
    """
    axis = axis % a.ndim
    ones = jnp.ones((a.shape[axis],), a.dtype)
    if a.ndim == 2 and axis == 0:
        return jnp.matmul(ones, a, preferred_element_type=jnp.float32)
    return jax.lax.dot_general(ones, a, (((0,), (axis,)), ((), ())),
                               preferred_element_type=jnp.float32)


# Its derivative is a plain sum, whose transpose (the gradient) is a broadcast that XLA fuses
# into the next elementwise op; the product's own transpose is an outer product with the ones
# vector, written out as a whole [tokens, n] array.
@batch_sum.defjvp
def _batch_sum_jvp(axis, primals, tangents):
    return (batch_sum(primals[0], axis),
            jnp.sum(tangents[0], axis=axis % primals[0].ndim, dtype=jnp.float32))


def fire_counts(latents: jax.Array) -> jax.Array:
    """Per latent, on how many tokens of the batch `[tokens, n_latents]` it fired (non-zero):
    one pass over the latents that feeds L0, the dead-latent clock and the density.

    Summed in float32, exact up to 2**24 tokens a batch (an integer sum made XLA's CPU backend
    write an int32 copy of the whole comparison first)."""
    return batch_sum((latents != 0).astype(latents.dtype)).astype(jnp.int32)
