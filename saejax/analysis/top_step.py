"""The jitted, sharded step of the top-activations pass and its running state.

The dictionary is split over the mesh's `model` axis, the batch over `data`. Each device's block
of the batch is whole sequences (padded), and each row carries its segment (its run of one
document in one sequence; -1: padding), so every token's context lies in the block and never
runs across two sequences or documents: for each latent, each device takes the
top-n tokens of its block of the batch (with the latent's activations and the token ids of the
window around each), the candidates of the `data` devices are gathered (n per device, never the
batch), and the top-n of [running top-n, candidates] is kept.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from saejax import sharding
from saejax.analysis import kinds
from saejax.analysis.loading import LoadedSAE

# Each latent's activation histogram has HISTOGRAM_BINS equal bins over [0, 2^e), e the
# smallest exponent with 2^e >= its largest activation so far. When a batch exceeds 2^e, e grows
# and neighbouring bins merge (a doubling histogram), so the final bins are linear over
# [0, max] with at least half of them below the maximum, in one pass.
HISTOGRAM_BINS = 64
NO_EXPONENT = -(2**20)  # a latent that has not fired yet


class TopState(NamedTuple):
    """The running result, every array split over latents like the SAE."""

    values: jax.Array               # [n, top_n] float32, descending; -inf: no example yet
    batch: jax.Array                # [n, top_n] int32: the batch each example came from
    offset: jax.Array               # [n, top_n] int32: its row within that batch
    context_tokens: jax.Array       # [n, top_n, window] int32; -1 outside the sequence
    context_activations: jax.Array  # [n, top_n, window] float32: the latent on the window
    fired: jax.Array                # [n] int32, since the last flush to the host
    activation_sum: jax.Array       # [n] float32, since the last flush
    # [batch shards, n, bins] int32 since the last flush: each device of the batch axis counts
    # its own rows (no all-reduce per batch); the host sums them.
    histogram: jax.Array
    histogram_exponent: jax.Array   # [n] int32: the bins span [0, 2^e)


STATE_AXES = TopState(values=("latent", None), batch=("latent", None),
                      offset=("latent", None), context_tokens=("latent", None, None),
                      context_activations=("latent", None, None), fired=("latent",),
                      activation_sum=("latent",), histogram=("batch", "latent", None),
                      histogram_exponent=("latent",))


def init_state(n_latents: int, top_n: int, window: int, batch_shards: int = 1) -> TopState:
    return TopState(
        values=jnp.full((n_latents, top_n), -jnp.inf, jnp.float32),
        batch=jnp.full((n_latents, top_n), -1, jnp.int32),
        offset=jnp.full((n_latents, top_n), -1, jnp.int32),
        context_tokens=jnp.full((n_latents, top_n, window), -1, jnp.int32),
        context_activations=jnp.zeros((n_latents, top_n, window), jnp.float32),
        fired=jnp.zeros((n_latents,), jnp.int32),
        activation_sum=jnp.zeros((n_latents,), jnp.float32),
        histogram=jnp.zeros((batch_shards, n_latents, HISTOGRAM_BINS), jnp.int32),
        histogram_exponent=jnp.full((n_latents,), NO_EXPONENT, jnp.int32))


def rebin(counts, factor_exponent, xp=jnp):
    """Merges each run of 2^m neighbouring bins into one (the low bins; the rest empty):
    counts [..., n, bins], m [n] >= 0 per latent. Works on NumPy arrays with xp=np."""
    bins = counts.shape[-1]
    factor = 2 ** xp.minimum(factor_exponent, int(math.log2(bins)))[..., None]   # [n, 1]
    cumulative = xp.concatenate([xp.zeros_like(counts[..., :1]), xp.cumsum(counts, axis=-1)],
                                axis=-1)
    j = xp.arange(bins)
    hi = xp.minimum((j + 1) * factor, bins)
    lo = xp.minimum(j * factor, bins)
    hi, lo = (xp.broadcast_to(i, counts.shape) for i in (hi, lo))
    return (xp.take_along_axis(cumulative, hi, axis=-1)
            - xp.take_along_axis(cumulative, lo, axis=-1))


def _update_histogram(histogram, exponent, acts, batch_max):
    """One device's histogram counts [1, latents, bins] of its rows `acts [rows, latents]`; the
    bins' range follows the batch's (global) maximum `batch_max [latents]`."""
    mantissa, e = jnp.frexp(batch_max)
    batch_exponent = jnp.where(mantissa == 0.5, e - 1, e)   # smallest e with 2^e >= max
    fired = batch_max > 0
    new_exponent = jnp.where(fired, jnp.maximum(exponent, batch_exponent), exponent)
    grow = jnp.where(exponent == NO_EXPONENT, 0, new_exponent - exponent)
    histogram = rebin(histogram, grow)
    latents, bins = acts.shape[1], histogram.shape[-1]
    position = jnp.ldexp(acts, -new_exponent[None, :]) * bins   # exact scaling by 2^-e
    index = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, bins - 1)
    flat = jnp.where(acts > 0, jnp.arange(latents)[None, :] * bins + index, latents * bins)
    counts = jnp.zeros((latents * bins,), jnp.int32).at[flat.reshape(-1)].add(1, mode="drop")
    return histogram + counts.reshape(1, latents, bins), new_exponent


def _merge_block(acts, tokens, segments, values, batch, offset, context_tokens,
                 context_activations, histogram, histogram_exponent, batch_max, batch_index, *,
                 top_n: int, before: int, after: int, batch_axis):
    """One device's block of latents: its candidates from its rows of the batch, gathered over
    the batch axis and merged with the running top-n; and its rows' histogram counts.
    acts [rows, latents] (this block), tokens and segments [rows]."""
    histogram, histogram_exponent = _update_histogram(histogram, histogram_exponent, acts,
                                                      batch_max)
    rows = acts.shape[0]
    a = acts.T                                            # [latents, rows]
    values_new, index = jax.lax.top_k(a, min(top_n, rows))
    # The window around each candidate, clipped to its own segment (the block holds whole ones).
    position = index[..., None] + jnp.arange(-before, after + 1)
    clipped = jnp.clip(position, 0, rows - 1)
    inside = ((position >= 0) & (position < rows)
              & (segments[clipped] == segments[index][..., None]))
    tokens_new = jnp.where(inside, tokens[clipped], -1)
    acts_new = jnp.take_along_axis(a, clipped.reshape(a.shape[0], -1), axis=1)
    acts_new = jnp.where(inside, acts_new.reshape(clipped.shape), 0.0)
    offset_new = index
    if batch_axis is not None:
        offset_new = index + jax.lax.axis_index(batch_axis) * rows
        gather = lambda x: jax.lax.all_gather(x, batch_axis, axis=1, tiled=True)
        values_new, offset_new, tokens_new, acts_new = map(
            gather, (values_new, offset_new, tokens_new, acts_new))
    # Running examples first, then candidates in row order: ties keep the earlier row, as
    # jax.lax.top_k over the whole batch on one device would.
    kept_values, order = jax.lax.top_k(jnp.concatenate([values, values_new], axis=1), top_n)

    def take(old, new):  # the kept entries of [running, candidates], along the example axis
        both = jnp.concatenate([old, new], axis=1)
        return jnp.take_along_axis(both, order.reshape(order.shape + (1,) * (both.ndim - 2)),
                                   axis=1)

    return (kept_values,
            take(batch, jnp.full(offset_new.shape, batch_index, jnp.int32)),
            take(offset, offset_new.astype(jnp.int32)),
            take(context_tokens, tokens_new),
            take(context_activations, acts_new),
            histogram, histogram_exponent)


def make_step(loaded: LoadedSAE, mesh, rules, *, top_n: int, before: int,
              after: int) -> Callable:
    """`step(state, params, input_scales [H], x [B, H, d], tokens [B], segments [B],
    batch_index) -> state` (x: the raw activations of the H hooks the dictionary reads, each
    multiplied by its scale; segments: -1 on padding rows),
    jitted and sharded over `mesh` by `rules`. Call it inside `sharding.activate(mesh, rules)`
    (TopK's sharded top-k reads the ambient mesh)."""
    architecture, sae_config = loaded.architecture, loaded.sae_config
    kind = kinds.kind_of(loaded)
    act_spec = sharding.logical_to_spec(("batch", "latent"), rules)
    batch_axis, latent_axis = act_spec[0], act_spec[1]
    if batch_axis is not None and mesh.shape[batch_axis] == 1:
        batch_axis = None
    specs = jax.tree.map(lambda axes: sharding.logical_to_spec(axes, rules), STATE_AXES,
                         is_leaf=sharding.is_axes)
    merge = jax.shard_map(
        lambda *args: _merge_block(*args, top_n=top_n, before=before, after=after,
                                   batch_axis=batch_axis),
        in_specs=(P(act_spec[0], latent_axis), P(act_spec[0]), P(act_spec[0]), specs.values,
                  specs.batch,
                  specs.offset, specs.context_tokens, specs.context_activations,
                  specs.histogram, specs.histogram_exponent, P(latent_axis), P()),
        out_specs=(specs.values, specs.batch, specs.offset, specs.context_tokens,
                   specs.context_activations, specs.histogram, specs.histogram_exponent),
        # The gathered candidates, so the outputs, are identical on every device of the batch
        # axis; check_vma cannot infer that through all_gather + top_k (as in sharding.top_k).
        check_vma=False)

    def step(state: TopState, params, input_scales, x, tokens, segments, batch_index):
        # Flat latents [B, n_latents]: a CLT's [B, layer, n] as layer * n + i.
        acts = kinds.encode_scaled(kind, architecture, params, x * input_scales[:, None],
                                   sae_config)
        valid = segments >= 0
        acts = jnp.where(valid[:, None], acts, 0.0).astype(jnp.float32)
        acts = jax.lax.with_sharding_constraint(acts, NamedSharding(mesh, act_spec))
        (values, batch, offset, context_tokens, context_activations, histogram,
         histogram_exponent) = merge(
            acts, tokens, segments, state.values, state.batch, state.offset, state.context_tokens,
            state.context_activations, state.histogram, state.histogram_exponent,
            jnp.max(acts, axis=0), batch_index)
        return TopState(
            values=values, batch=batch, offset=offset, context_tokens=context_tokens,
            context_activations=context_activations,
            fired=state.fired + jnp.sum(acts > 0, axis=0, dtype=jnp.int32),
            activation_sum=state.activation_sum + jnp.sum(acts, axis=0),
            histogram=histogram, histogram_exponent=histogram_exponent)

    state_shardings = sharding.named_shardings(mesh, STATE_AXES, rules)
    param_shardings = sharding.named_shardings(
        mesh, {k: loaded.architecture.param_axes[k] for k in loaded.params}, rules)
    replicated = sharding.replicated(mesh)
    x_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch", None, "embed"),
                                                              rules))
    token_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch",), rules))
    return jax.jit(step, in_shardings=(state_shardings, param_shardings, replicated,
                                       x_sharding, token_sharding, token_sharding,
                                       replicated),
                   out_shardings=state_shardings, donate_argnums=0)
