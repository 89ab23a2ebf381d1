"""Encoding and decoding only the selected latents: k dictionary rows per token, not n_latents.

A TopK SAE's decoder needs, per token, the k decoder rows of its active latents, and the
gradient of its encoder touches only their k encoder columns. Gathering those decoder rows makes
the decoder O(k d) per token instead of O(n_latents d); the selected latents' values are read
from the pre-activations the selection already computed, and the gradients of both go back as
scatter-adds of k rows per token. Only the selection itself (the encoder matmul and the top-k)
reads the whole dictionary.

When the ambient sharding rules split `latent` across a mesh axis, each device works on the
rows it holds of the globally selected indices and the partial sums are added across that axis:
what moves is [batch, d] and [batch, k], never the dictionary (tests/test_communication.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from saejax import sharding


def _latent_split(n_latents: int, batch: int):
    """(mesh, batch axis, latent axis) when the ambient rules split the dictionary evenly,
    else None."""
    mesh, spec = sharding._ambient_axes(("batch", "latent"))  # pylint: disable=protected-access
    if mesh is None or len(spec) != 2 or spec[1] is None or mesh.shape[spec[1]] == 1:
        return None
    batch_axis, latent_axis = spec
    if n_latents % mesh.shape[latent_axis] or (
            batch_axis is not None and batch % mesh.shape[batch_axis]):
        return None
    return mesh, batch_axis, latent_axis


def _local(indices: jax.Array, shard_size: int, latent_axis):
    """This device's rows of global `indices`: (local index, clamped to 0 where another device
    holds the row; a mask of the indices held here)."""
    local = indices - jax.lax.axis_index(latent_axis) * shard_size
    held = (local >= 0) & (local < shard_size)
    return jnp.where(held, local, 0), held


def _decode_rows(W_dec, indices, values):
    rows = jnp.take(W_dec, indices, axis=0)                     # [batch, k, d]
    return jnp.einsum("bk,bkd->bd", values, rows)


def _take(pre: jax.Array, indices: jax.Array) -> jax.Array:
    """`take_along_axis(pre, indices, axis=-1)` of latent-sharded `pre` and global indices."""
    split = _latent_split(pre.shape[-1], pre.shape[0])
    if split is None:
        return jnp.take_along_axis(pre, indices, axis=-1)
    mesh, batch_axis, latent_axis = split
    shard_size = pre.shape[-1] // mesh.shape[latent_axis]

    def local(pre_shard, indices_block):
        rows, held = _local(indices_block, shard_size, latent_axis)
        taken = jnp.take_along_axis(pre_shard, rows, axis=-1)
        return jax.lax.psum(jnp.where(held, taken, 0.0), latent_axis)

    return jax.shard_map(local, in_specs=(P(batch_axis, latent_axis), P(batch_axis, None)),
                         out_specs=P(batch_axis, None))(pre, indices)


def _scatter_add(n_latents: int, indices: jax.Array, updates: jax.Array) -> jax.Array:
    """`[n_latents, *updates.shape[2:]]`: the sum of `updates[b, j]` into row `indices[b, j]`,
    each device adding into the rows it holds (and summing its data axis' blocks)."""
    shape = (n_latents, *updates.shape[2:])
    split = _latent_split(n_latents, indices.shape[0])
    if split is None:
        return jnp.zeros(shape, updates.dtype).at[indices].add(updates)
    mesh, batch_axis, latent_axis = split
    shard_size = n_latents // mesh.shape[latent_axis]

    def local(indices_block, updates_block):
        rows, held = _local(indices_block, shard_size, latent_axis)
        held = held.reshape(held.shape + (1,) * (updates_block.ndim - 2))
        summed = jnp.zeros((shard_size, *shape[1:]), updates.dtype).at[rows].add(
            jnp.where(held, updates_block, 0.0))
        return summed if batch_axis is None else jax.lax.psum(summed, batch_axis)

    spec = P(batch_axis, *(None,) * (updates.ndim - 1))
    return jax.shard_map(local, in_specs=(P(batch_axis, None), spec),
                         out_specs=P(latent_axis, *(None,) * (len(shape) - 1)))(indices, updates)


@jax.custom_vjp
def _selected(W_enc, b_enc, b_dec, x, pre, indices):
    del W_enc, b_enc, b_dec, x
    return _take(pre, indices)


def _selected_fwd(W_enc, b_enc, b_dec, x, pre, indices):
    return _take(pre, indices), (W_enc, b_dec, x, indices)


def _selected_bwd(residuals, g):
    W_enc, b_dec, x, indices = residuals
    n_latents = W_enc.shape[1]
    # d pre[b, i] is g[b, j] where i = indices[b, j], else 0; so each selected latent's encoder
    # column gets g x (x - b_dec), its bias g, and the decoder bias -W_enc (sum of g per latent).
    d_b_enc = _scatter_add(n_latents, indices, g)
    d_W_enc = _scatter_add(n_latents, indices, g[..., None] * (x - b_dec)[:, None, :]).T
    d_x = decode_selected(W_enc.T, indices, g)   # unused in training: XLA drops it
    return (d_W_enc.astype(W_enc.dtype), d_b_enc, -(W_enc @ d_b_enc), d_x, None, None)


_selected.defvjp(_selected_fwd, _selected_bwd)


def encode_selected(params: dict, x: jax.Array, pre: jax.Array,
                    indices: jax.Array) -> jax.Array:
    """The selected latents' pre-activations `[batch, k]`: `pre[b, indices[b, j]]`, where `pre`
    is `base.pre_activations(params, x)` (as the selection read it; its own gradient is
    ignored). The gradient reaches `params` and `x` through those k entries per token only:
    k encoder columns get a scatter-add each, instead of a [batch, n_latents] gradient through
    a dense matmul."""
    return _selected(params["W_enc"], params["b_enc"], params["b_dec"], x,
                     jax.lax.stop_gradient(pre), indices)


def decode_selected(W_dec: jax.Array, indices: jax.Array, values: jax.Array) -> jax.Array:
    """`sum_j values[b, j] * W_dec[indices[b, j]]`: `[batch, d]`, the decoder (without its bias)
    applied to latents that are zero outside `indices`."""
    split = _latent_split(W_dec.shape[0], values.shape[0])
    if split is None:
        return _decode_rows(W_dec, indices, values)
    mesh, batch_axis, latent_axis = split
    shard_size = W_dec.shape[0] // mesh.shape[latent_axis]

    def local(W_shard, indices_block, values_block):
        rows, held = _local(indices_block, shard_size, latent_axis)
        return jax.lax.psum(_decode_rows(W_shard, rows, jnp.where(held, values_block, 0.0)),
                            latent_axis)

    return jax.shard_map(
        local,
        in_specs=(P(latent_axis, None), P(batch_axis, None), P(batch_axis, None)),
        out_specs=P(batch_axis, None))(W_dec, indices, values)


def fire_counts(indices: jax.Array, values: jax.Array, n_latents: int) -> jax.Array:
    """`ops.fire_counts` of latents that are `values` at `indices` and zero elsewhere."""
    fired = (values != 0).astype(jnp.float32)
    return _scatter_add(n_latents, indices, fired).astype(jnp.int32)
