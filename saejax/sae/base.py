"""What every SAE architecture provides, and the parameter layout they share.

Params are a plain dict pytree: `W_enc [d, n_latents]`, `b_enc [n_latents]`,
`W_dec [n_latents, d]`, `b_dec [d]`. Every function here is pure and jit-able.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from saejax import evals, sharding
from saejax.sae import sparse

PARAM_AXES = {
    "W_enc": ("embed", "latent"),
    "b_enc": ("latent",),
    "W_dec": ("latent", "embed"),
    "b_dec": ("embed",),
}


class Architecture(NamedTuple):
    """One SAE variant.

    init(key, d, n_latents, sae_config) -> params
    encode(params, x, sae_config) -> latents [batch, n_latents]
    loss(params, x, sae_config, sparsity_coefficient, dead, step=None) -> (loss, aux) where
        `dead` [n_latents] marks latents that have not fired within the dead window, `step` is
        the training step (schedules inside the loss: TopK's k annealing), and aux holds at
        least `mse`, `x_hat`, the `latents` [batch, n_latents] (or, for a step that never forms
        them, their `evals.fire_counts` as `fire_counts`), and `sparsity_loss` when the loss has
        one.
    flops_per_token(d, n_latents, sae_config) -> training FLOPs (forward + backward) per token.
    sparsity_coefficient: the `sae.<field>` that weights the sparsity term (warmed up by
        `optim.l1_warmup_steps`), or None when sparsity is structural (TopK).
    """

    name: str
    init: Callable[..., dict]
    encode: Callable[..., jax.Array]
    decode: Callable[..., jax.Array]
    loss: Callable[..., tuple[jax.Array, dict[str, Any]]]
    flops_per_token: Callable[..., int]
    param_axes: dict[str, tuple[str, ...]]
    sparsity_coefficient: str | None


def init_params(key: jax.Array, d: int, n_latents: int, sae_config=None,
                dtype=jnp.float32) -> dict:
    """Unit-norm random decoder rows; the encoder starts as the decoder's transpose."""
    del sae_config
    W_dec = jax.random.normal(key, (n_latents, d), dtype)
    W_dec = W_dec / jnp.linalg.norm(W_dec, axis=-1, keepdims=True)
    return {
        "W_enc": W_dec.T,
        "b_enc": jnp.zeros((n_latents,), dtype),
        "W_dec": W_dec,
        "b_dec": jnp.zeros((d,), dtype),
    }


def pre_activations(params: dict, x: jax.Array) -> jax.Array:
    """Encoder pre-activations; the decoder bias is subtracted first (Towards Monosemanticity).

    The value is `(x - b_dec) @ W_enc + b_enc`. The decoder bias's gradient through this path is
    `-W_enc @ (sum over the batch of the pre-activations' gradient)`, a matrix-vector product;
    written naively, XLA computes it as a [batch, n_latents] x [n_latents, d] matmul and then
    sums, a sixth dictionary-sized matmul (20% more FLOPs than the step's 10 d n per token).
    So `x - b_dec` is formed with the bias held constant, and its gradient is carried by a term
    whose value is zero: the same forward numbers, the cheap gradient.
    """
    b_dec, W_enc = params["b_dec"], params["W_enc"]
    frozen = jax.lax.stop_gradient(b_dec)
    return add_bias((x - frozen) @ W_enc, params["b_enc"] - (b_dec - frozen) @ W_enc)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """`y [tokens, n] + bias [n]`, whose bias gradient is `evals.batch_sum` of y's: the sum
    autodiff writes for a broadcast is the slow column reduction on XLA's CPU backend."""
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, None


def _add_bias_bwd(_, grad):
    return grad, evals.batch_sum(grad).astype(grad.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def decode(params: dict, latents: jax.Array) -> jax.Array:
    return latents @ params["W_dec"] + params["b_dec"]


def dense_flops_per_token(d: int, n_latents: int, sae_config=None) -> int:
    """Encoder and decoder matmuls: 4 d n forward, 6 d n backward (no gradient to the input)."""
    del sae_config
    return 10 * d * n_latents


def auxk_loss(params: dict, x: jax.Array, x_hat: jax.Array, pre: jax.Array, dead: jax.Array,
              k_aux: int, *, sparse_decode: bool = False) -> jax.Array:
    """AuxK (Gao et al. 2024): the k_aux largest dead latents reconstruct the residual.

    Returns the residual's reconstruction error normalised by the residual's energy, 0 when no
    latent is dead; it trains dead latents back to life with gradients they would not get.
    Skipped (a `lax.cond`) while no latent is dead. With `sparse_decode` the selected dead
    latents are encoded and decoded from their own k_aux rows (`sparse.py`) instead of a
    masked [batch, n_latents] matmul.
    """
    residual = jax.lax.stop_gradient(x - x_hat)
    k_aux = min(int(k_aux), pre.shape[-1])
    candidates = jnp.where(dead, jax.lax.stop_gradient(pre) if sparse_decode else pre, -jnp.inf)

    def error():
        if sparse_decode:
            top, indices = sharding.top_k(candidates, k_aux)
            # Fewer than k_aux dead latents: the rest of the selection is live ones, at -inf.
            selected = sparse.encode_selected(params, x, pre, indices)
            values = jnp.where(jnp.isfinite(top), jax.nn.relu(selected), 0.0)
            decoded = sparse.decode_selected(params["W_dec"], indices, values)
        else:
            latents = (jnp.where(dead, jax.nn.relu(pre), 0.0)
                       * sharding.top_k_mask(candidates, k_aux))
            decoded = latents @ params["W_dec"]
        error = jnp.sum(jnp.square(decoded - residual))
        return error / jnp.maximum(jnp.sum(jnp.square(residual)), 1e-12)

    return jax.lax.cond(jnp.any(dead), error, lambda: jnp.zeros((), x.dtype))


def top_k_mask(pre: jax.Array, k: int, kept: jax.Array | None = None) -> jax.Array:
    """`sharding.top_k_mask` of each token's k largest pre-activations; with `kept` (a traced
    count <= k, k annealing) only the `kept` largest of them."""
    if kept is None:
        return sharding.top_k_mask(pre, k)
    values, _ = sharding.top_k(jax.lax.stop_gradient(pre), k)
    kth = jnp.take(values, kept - 1, axis=-1)[..., None]
    return jax.lax.stop_gradient((pre >= kth).astype(pre.dtype))


def annealed_k(sae_config, step: jax.Array) -> jax.Array:
    """The k of `step` under `sae.k_anneal_steps`: from `sae.k_anneal_start` down to `sae.k`,
    linearly, rounded to an integer; `sae.k` from then on."""
    start, k = int(sae_config.k_anneal_start), int(sae_config.k)
    fraction = jnp.clip(step / int(sae_config.k_anneal_steps), 0.0, 1.0)
    return jnp.round(start + (k - start) * fraction).astype(jnp.int32)


def with_k_annealing(loss_at_k: Callable, sae_config, step: jax.Array | None):
    """Runs a TopK-family loss with its k annealed (`sae.k_anneal_steps`, 0 for off).

    `loss_at_k(k, kept)` selects k latents per token (a static k, the shapes' size) and, when
    `kept` (a traced count <= k) is given, keeps only the `kept` largest of them. Annealing runs
    the loss at `k_anneal_start` with `kept = annealed_k(step)`; once it is over (and for
    evaluation, `step=None`) a `lax.cond` takes the plain branch at `sae.k`, so a finished
    anneal costs nothing. Starting wide lets every latent take part while directions form:
    at the final k from step 0, the latents that lose the first top-k contests die before the
    rare features appear, and AuxK cannot revive a latent whose pre-activations are all negative
    (benchmarks/RESULTS.md, TopK on the toy recipe).
    """
    k, steps = int(sae_config.k), int(sae_config.k_anneal_steps)
    if step is None or steps == 0:
        return loss_at_k(k, None)
    return jax.lax.cond(
        step < steps,
        lambda: loss_at_k(int(sae_config.k_anneal_start), annealed_k(sae_config, step)),
        lambda: loss_at_k(k, None))


def geometric_median(points: jax.Array, iterations: int = 100, eps: float = 1e-8) -> jax.Array:
    """The point minimising the summed Euclidean distance to `points [n, d]` (Weiszfeld).

    Towards Monosemanticity initialises the decoder bias here: a robust centre of the data.
    """

    def step(median, _):
        weights = 1.0 / jnp.maximum(jnp.linalg.norm(points - median, axis=-1), eps)
        return jnp.sum(points * weights[:, None], axis=0) / jnp.sum(weights), None

    median, _ = jax.lax.scan(step, jnp.mean(points, axis=0), None, length=iterations)
    return median
