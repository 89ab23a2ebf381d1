"""What the TopK family (topk, batchtopk, switch) shares: its config fields and their checks,
the AuxK loss that revives dead latents, the top-k mask, and the annealing of k."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from saejax import sharding
from saejax.sae import base, sparse
from saejax.sae.base import ConfigField, require, require_non_negative

K_FIELDS = {
    "k": ConfigField(32, "latents per token (the TopK family)"),
    # k falls linearly from k_anneal_start to k over the first k_anneal_steps steps (0: off),
    # so every latent takes part while directions form.
    "k_anneal_steps": ConfigField(0, "steps over which k is annealed (0: no annealing)",
                                  exclusive=True),
    "k_anneal_start": ConfigField(64, "k at step 0 of the anneal"),
}
AUXK_FIELDS = {
    "k_aux": ConfigField(128, "dead latents in the AuxK loss"),
    "auxk_coefficient": ConfigField(1 / 32, "weight of the AuxK loss (Gao et al. 2024)"),
}


def validate_k(config, n_latents: int, *, width: int | None = None) -> None:
    """`sae.k` and its anneal fit the `width` latents a token chooses from (default: all)."""
    sae_config = config.sae
    width = n_latents if width is None else width
    k = int(sae_config.k)
    require(1 <= k <= width,
            f"sae.k={sae_config.k} must be between 1 and n_latents={n_latents} "
            f"(sae.expansion_factor={sae_config.expansion_factor} x data.d={config.data.d}); "
            f"lower sae.k or raise sae.expansion_factor." if width == n_latents else
            f"sae.k={sae_config.k} must be between 1 and the {width} latents a token chooses "
            f"from; lower sae.k.")
    anneal_steps = int(sae_config.k_anneal_steps)
    require(anneal_steps >= 0, f"sae.k_anneal_steps={anneal_steps} must be >= 0 (0: off).")
    if anneal_steps:
        start = int(sae_config.k_anneal_start)
        require(k < start <= width,
                f"sae.k_anneal_start={start} must be above sae.k={sae_config.k} and at most "
                f"the {width} latents a token chooses from: the anneal runs from it down to "
                f"sae.k.")


def validate_auxk(config, n_latents: int) -> None:
    del n_latents
    require(int(config.sae.k_aux) >= 1,
            f"sae.k_aux={config.sae.k_aux} must be >= 1 (Gao et al. use about d / 2; "
            f"set sae.auxk_coefficient=0 to turn AuxK off).")
    require_non_negative(config.sae, "auxk_coefficient")


def sparse_ops(shape=None):
    """What decodes a shape's selected latents, or None where it decodes densely only: the
    shape's own `encode_selected`, `decode_selected` and `fire_counts` (a CLT's, per layer),
    else those of `sparse.py` for a single hook (`shape` None or the single-hook shape)."""
    if shape is None or shape.name == base.SINGLE_HOOK.name:
        return sparse
    return shape if hasattr(shape, "decode_selected") else None


def auxk_loss(params: dict, x: jax.Array, target: jax.Array, x_hat: jax.Array, pre: jax.Array,
              dead: jax.Array, k_aux: int, *, sparse_decode: bool = False,
              shape=None) -> jax.Array:
    """AuxK (Gao et al. 2024): the k_aux largest dead latents reconstruct the residual.

    `x` is the encoder's input, `target` what the SAE reconstructs. Returns the residual's
    reconstruction error normalised by the residual's energy, 0 when no
    latent is dead; it trains dead latents back to life with gradients they would not get.
    Skipped (a `lax.cond`) while no latent is dead. With `sparse_decode` the selected dead
    latents are encoded and decoded from their own k_aux rows (``sparse``) instead of a
    masked [batch, n_latents] matmul (through `shape.decode_latents`, the decoder without its
    bias, when the shape is given); the shape's own (`sparse_ops`) for a CLT, k_aux a layer.
    """
    residual = jax.lax.stop_gradient(target - x_hat)
    k_aux = min(int(k_aux), pre.shape[-1])
    candidates = jnp.where(dead, jax.lax.stop_gradient(pre) if sparse_decode else pre, -jnp.inf)

    def error():
        if sparse_decode:
            ops = sparse_ops(shape)
            top, indices = sharding.top_k(candidates, k_aux, rows_axes(shape))
            # Fewer than k_aux dead latents: the rest of the selection is live ones, at -inf.
            selected = ops.encode_selected(params, x, pre, indices)
            values = jnp.where(jnp.isfinite(top), jax.nn.relu(selected), 0.0)
            decoded = ops.decode_selected(params["W_dec"], indices, values)
        else:
            latents = (jnp.where(dead, jax.nn.relu(pre), 0.0)
                       * sharding.top_k_mask(candidates, k_aux, rows_axes(shape)))
            decoded = (latents @ params["W_dec"] if shape is None
                       else shape.decode_latents(params, latents))
        error = jnp.sum(jnp.square(decoded - residual))
        return error / jnp.maximum(jnp.sum(jnp.square(residual)), 1e-12)

    return jax.lax.cond(jnp.any(dead), error, lambda: jnp.zeros((), x.dtype))


def rows_axes(shape) -> tuple[str, ...] | None:
    """The logical axes of a shape's latents for the sharded top-k: None for [batch, latent],
    a CLT's ('batch', 'layer', 'latent') (k per token and layer)."""
    if shape is None:
        return None
    axes = base.latent_axes(shape)
    return None if axes == ("latent",) else ("batch", *axes)


def top_k_mask(pre: jax.Array, k: int, kept: jax.Array | None = None, *,
               shape=None) -> jax.Array:
    """`sharding.top_k_mask` of each token's k largest pre-activations (per layer too, for a
    CLT's `shape`); with `kept` (a traced count <= k, k annealing) only the `kept` largest of
    them."""
    if kept is None:
        return sharding.top_k_mask(pre, k, rows_axes(shape))
    values, _ = sharding.top_k(jax.lax.stop_gradient(pre), k, rows_axes(shape))
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


def saelens_k(saelens_architecture: str, cfg: dict) -> int:
    """k of a SAELens TopK-family cfg ('k', or 'activation_fn_kwargs' before SAELens 6)."""
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    require(k is not None, f"a {saelens_architecture} SAE needs k (cfg 'k', or "
            "'activation_fn_kwargs': {'k': ...} before SAELens 6).")
    return int(k)


def fold_decoder_norms(tensors: dict, cfg: dict, folded: list) -> dict:
    """SAELens' `rescale_acts_by_decoder_norm` (hidden_pre * ||W_dec_i||, then decode
    f / ||W_dec_i||) folded into W_enc, b_enc and W_dec, as SAELens' _fold_norm_topk does when it
    saves an inference SAE."""
    if not cfg.get("rescale_acts_by_decoder_norm"):
        return tensors
    norms = np.linalg.norm(tensors["W_dec"], axis=-1)
    folded.append("rescale_acts_by_decoder_norm into W_enc, b_enc, W_dec")
    return {**tensors, "b_enc": tensors["b_enc"] * norms,
            "W_enc": tensors["W_enc"] * norms[None, :], "W_dec": tensors["W_dec"] / norms[:, None]}
