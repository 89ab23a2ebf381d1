"""Encoding and decoding only the selected latents: k dictionary rows per token, not n_latents.

A TopK SAE's decoder needs, per token, the k decoder rows of its active latents, and the
gradient of its encoder touches only their k encoder columns. Gathering those rows makes the
decoder O(k d) per token instead of O(n_latents d) (its transpose, in the backward pass, is a
scatter-add of k rows per token). Only the selection itself (the top-k of the pre-activations)
still reads the whole dictionary.

When the ambient sharding rules split `latent` across a mesh axis, each device gathers the
rows it holds of the globally selected indices and the partial sums are added across that axis:
what moves is [batch, d] (and [batch, k]), never the dictionary.
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


def _encode_rows(W_enc_rows, b_enc, x, indices):
    rows = jnp.take(W_enc_rows, indices, axis=0)                # [batch, k, d]
    return jnp.einsum("bd,bkd->bk", x, rows) + jnp.take(b_enc, indices)


def _decode_rows(W_dec, indices, values):
    rows = jnp.take(W_dec, indices, axis=0)                     # [batch, k, d]
    return jnp.einsum("bk,bkd->bd", values, rows)


def encode_selected(params: dict, x: jax.Array, indices: jax.Array) -> jax.Array:
    """Pre-activations of the selected latents: `[batch, k]`, entry (b, j) equal to
    `pre_activations(params, x)[b, indices[b, j]]`, from k encoder columns per token.

    The encoder is stored `[d, n_latents]` for the dense matmul; its transpose makes each
    latent's weights a contiguous row to gather (a copy of the dictionary per step, O(d n)
    bytes, against the O(batch d n) FLOPs of the selection).
    """
    x = x - params["b_dec"]
    W_enc_rows = params["W_enc"].T
    split = _latent_split(W_enc_rows.shape[0], x.shape[0])
    if split is None:
        return _encode_rows(W_enc_rows, params["b_enc"], x, indices)
    mesh, batch_axis, latent_axis = split
    shard_size = W_enc_rows.shape[0] // mesh.shape[latent_axis]

    def local(W_shard, b_shard, x_block, indices_block):
        rows, held = _local(indices_block, shard_size, latent_axis)
        pre = jnp.where(held, _encode_rows(W_shard, b_shard, x_block, rows), 0.0)
        return jax.lax.psum(pre, latent_axis)

    return jax.shard_map(
        local,
        in_specs=(P(latent_axis, None), P(latent_axis), P(batch_axis, None), P(batch_axis, None)),
        out_specs=P(batch_axis, None))(W_enc_rows, params["b_enc"], x, indices)


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
    """`evals.fire_counts` of latents that are `values` at `indices` and zero elsewhere."""
    fired = (values != 0).astype(jnp.float32)
    split = _latent_split(n_latents, values.shape[0])
    if split is None:
        return jnp.zeros((n_latents,), jnp.float32).at[indices].add(fired).astype(jnp.int32)
    mesh, batch_axis, latent_axis = split
    shard_size = n_latents // mesh.shape[latent_axis]

    def local(indices_block, fired_block):
        rows, held = _local(indices_block, shard_size, latent_axis)
        counts = jnp.zeros((shard_size,), jnp.float32).at[rows].add(
            jnp.where(held, fired_block, 0.0))
        return counts if batch_axis is None else jax.lax.psum(counts, batch_axis)

    counts = jax.shard_map(local, in_specs=(P(batch_axis, None), P(batch_axis, None)),
                           out_specs=P(latent_axis))(indices, fired)
    return counts.astype(jnp.int32)
