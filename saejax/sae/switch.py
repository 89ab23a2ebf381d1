"""Switch SAE (Mudide et al. 2024, "Efficient dictionary learning with switch sparse
autoencoders").

A router sends each token to one of E experts; each expert is a TopK SAE over its own block of
n_latents / E latents, so a step computes 1/E of the encoder and decoder. The dictionary keeps
the layout of every other SAE here (`W_enc [d, n_latents]`, `W_dec [n_latents, d]`), expert e
owning the contiguous block e, so the decoder constraint, metrics and resampling apply
unchanged, and splitting the latent axis over the mesh's model axis splits the experts.

Tokens are dispatched to per-expert slots of fixed capacity (ceil(capacity_factor * batch / E),
as in Switch Transformers) so every shape is static; a token beyond its expert's capacity is
dropped (reconstructed by b_dec alone) and counted in `dropped_fraction`. The reconstruction is
scaled by the router probability of the chosen expert, which trains the router; a
load-balancing loss (E * sum_e tokens_e * probability_e) keeps the experts in use.

A mechanism for the single-hook shape only: the dispatch subtracts b_dec from the input and
reads the single-hook layout directly.
"""

import math

import jax
import jax.numpy as jnp

from saejax.sae import base, ops, topk_family
from saejax.sae.base import ConfigField

PARAM_AXES = {"W_router": ("embed", None)}  # besides the shape's layout


def init(key, d, n_latents, sae_config, *, shape):
    params_key, router_key = jax.random.split(key)
    params = shape.init_layout(params_key, d, n_latents)
    experts = int(sae_config.switch_experts)
    params["W_router"] = jax.random.normal(router_key, (d, experts), jnp.float32) / math.sqrt(d)
    return params


def _route(params, x, sae_config, capacity):
    """Dispatch plan: each token's expert, its slot in that expert, and its router weight."""
    experts = int(sae_config.switch_experts)
    probabilities = jax.nn.softmax((x - params["b_dec"]) @ params["W_router"], axis=-1)
    expert = jnp.argmax(probabilities, axis=-1)                          # [tokens]
    one_hot = jax.nn.one_hot(expert, experts, dtype=jnp.int32)           # [tokens, E]
    position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)
    kept = position < capacity
    slot = jnp.where(kept, expert * capacity + position, experts * capacity)  # out of range
    gate = jnp.take_along_axis(probabilities, expert[:, None], axis=-1)[:, 0]
    balance = experts * jnp.sum(jnp.mean(one_hot.astype(x.dtype), axis=0)
                                * jnp.mean(probabilities, axis=0))
    return expert, slot, kept, gate, balance


def _forward(params, x, sae_config, *, training: bool, k=None, kept=None):
    """(latents [tokens, n_latents] scaled by the router weight, x_hat, balance, dropped);
    while training, the latents' `ops.fire_counts` [n_latents] in place of the latents.

    Training dispatches with the configured capacity; encoding for use (`encode`) gives every
    expert room for all tokens, so no token is dropped and each is encoded on its own.
    """
    experts = int(sae_config.switch_experts)
    d, n_latents = params["W_enc"].shape
    width = n_latents // experts
    capacity = (math.ceil(float(sae_config.switch_capacity_factor) * x.shape[0] / experts)
                if training else x.shape[0])
    expert, slot, fits, gate, balance = _route(params, x, sae_config, capacity)
    # Tokens into their experts' slots: [E, capacity, d]; empty slots are zero.
    slots = jnp.zeros((experts * capacity, d), x.dtype).at[slot].set(
        x - params["b_dec"], mode="drop").reshape(experts, capacity, d)
    W_enc = params["W_enc"].reshape(d, experts, width)
    b_enc = params["b_enc"].reshape(experts, width)
    pre = jnp.einsum("ecd,dew->ecw", slots, W_enc) + b_enc[:, None, :]
    latents = jax.nn.relu(pre) * topk_family.top_k_mask(pre, int(k or sae_config.k), kept)
    decoded = jnp.einsum("ecw,ewd->ecd", latents, params["W_dec"].reshape(experts, width, d))
    # Back to tokens; a dropped token gathers nothing (fill 0). Scaling by the router weight
    # (x_hat = p_e * W_dec,e f + b_dec) is what trains the router.
    take = lambda a: jnp.take(a.reshape(experts * capacity, -1), slot, axis=0, mode="fill",
                              fill_value=0)
    x_hat = gate[:, None] * take(decoded) + params["b_dec"]
    if training:
        # The step needs only each latent's firing count, summed over its expert's occupied
        # slots (an empty slot's input is zero, but its pre-activations are b_enc, which can
        # fire); scattering every token's latents back into a [tokens, n_latents] array costs a
        # gather of them over the model axis.
        occupied = jnp.zeros((experts * capacity,), jnp.float32).at[slot].set(
            1.0, mode="drop").reshape(experts, capacity, 1)
        counts = ops.batch_sum((latents != 0) * occupied, 1).reshape(n_latents)
        return counts.astype(jnp.int32), x_hat, balance, 1.0 - jnp.mean(fits.astype(x.dtype))
    # Per-token latents in the flat [tokens, n_latents] layout (L0, density, dead counts), with
    # the router weight folded in so that plain `decode` reproduces x_hat.
    token_latents = gate[:, None] * take(latents)                        # [tokens, width]
    columns = expert[:, None] * width + jnp.arange(width)[None, :]
    flat = jnp.zeros((x.shape[0], n_latents), x.dtype).at[
        jnp.arange(x.shape[0])[:, None], columns].set(token_latents)
    return flat, x_hat, balance, 1.0 - jnp.mean(fits.astype(x.dtype))


def encode(params, x, sae_config, *, shape):
    del shape
    return _forward(params, x, sae_config, training=False)[0]


def loss(params, batch, sae_config, sparsity_coefficient, dead, step=None, *, shape):
    x, target = shape.input(batch), shape.target(batch)
    del sparsity_coefficient, dead

    def loss_at_k(k, kept):
        counts, x_hat, balance, dropped = _forward(params, x, sae_config, training=True, k=k,
                                                   kept=kept)
        mse = ops.mse(target, x_hat)
        total = mse + float(sae_config.switch_balance_coefficient) * balance
        return total, {"mse": mse, "fire_counts": counts, "x_hat": x_hat,
                       "balance_loss": balance, "dropped_fraction": dropped}

    return topk_family.with_k_annealing(loss_at_k, sae_config, step)


def flops_per_token(d, n_latents, sae_config, *, shape):
    """One expert's encoder and decoder (10 d n / E, times the capacity factor's padding) plus
    the router (2 d E forward, 4 d E backward)."""
    del shape
    experts = int(sae_config.switch_experts)
    padding = float(sae_config.switch_capacity_factor)
    return int(10 * d * n_latents / experts * padding + 6 * d * experts)


CONFIG_FIELDS = {
    **topk_family.K_FIELDS,
    "switch_experts": ConfigField(4, "experts (each n_latents / E latents, TopK k)"),
    "switch_capacity_factor": ConfigField(1.25, "an expert's slots per token routed evenly"),
    "switch_balance_coefficient": ConfigField(0.01, "weight of the load-balancing loss"),
}


def validate(config, n_latents, *, shape):
    del shape
    sae_config = config.sae
    experts = int(sae_config.switch_experts)
    base.require(experts >= 1 and n_latents % experts == 0,
                 f"sae.switch_experts={experts} must divide n_latents={n_latents} (each expert "
                 f"owns an equal block of latents).")
    width = n_latents // experts
    base.require(1 <= int(sae_config.k) <= width,
                 f"sae.k={sae_config.k} must be between 1 and the {width} latents of one "
                 f"expert (n_latents / sae.switch_experts); lower sae.k or use fewer experts.")
    base.require(sae_config.switch_capacity_factor >= 1.0,
                 f"sae.switch_capacity_factor={sae_config.switch_capacity_factor} must be >= 1.")
    topk_family.validate_k(config, n_latents, width=width)


MECHANISM = base.Mechanism(
    name="switch",
    init=init,
    encode=encode,
    loss=loss,
    flops_per_token=flops_per_token,
    param_axes=PARAM_AXES,
    sparsity_coefficient=None,
    config_fields=CONFIG_FIELDS,
    validate=validate,
    metrics=("balance_loss", "dropped_fraction"),
    # Counted: the dispatched [experts, capacity, width] blocks, the per-token scatter back to
    # [batch, n_latents] and their gradients (with the experts split over the model axis XLA
    # reshards the dispatch, which this does not model).
    temporaries=lambda sae_config, n_latents, *, shape: base.Temporaries(7),
    level_field="k",
    shapes=("single_hook",),
)
