"""The device mesh, logical-axis rules, and the shardings derived from them.

Parallelism is data, not code (as in MaxText): every array carries logical axis names
(`batch`, `embed`, `latent`), and one rules table in the config maps them to the mesh axes
`data` and `model`. Splitting the dictionary means mapping `latent` to `model`. A CLT's params
and latents carry a `layer` axis too: mapped to `model` (with `latent` to None), or to a third
mesh axis `layer` (`mesh.layer` > 1, the mesh data x layer x model) beside `latent` on `model`.
A dictionary whose two sides differ (a transcoder) names them `embed_in` and `embed_out`; a
table without rules for them (every table written before they existed) maps them as it maps
`embed`.

Functions that need the mesh while tracing (the sharded top-k) read the ambient one set with
`jax.set_mesh` and the ambient rules set with `flax.linen.logical_axis_rules`; `activate` sets
both.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from saejax.errors import ConfigError  # noqa: F401  (re-exported: saejax.sharding.ConfigError)

MESH_AXES = ("data", "model")
# With `mesh.layer` > 1 a third axis between them splits a CLT's layers (rule ("layer", "layer")).
LAYER_MESH_AXES = ("data", "layer", "model")
# The default table: the batch is split across `data`, the dictionary across `model`, and so is
# the LM (tensor parallel, as Megatron splits it): its attention by heads, its MLP by hidden
# units, its embedding by vocabulary; its layers and width stay whole.
LM_RULES = (("heads", "model"), ("kv_heads", "model"), ("mlp", "model"), ("vocab", "model"),
            ("layers", None), ("head_dim", None), ("positions", None))
DEFAULT_RULES = (("batch", "data"), ("latent", "model"), ("embed", None), ("group", None),
                 *LM_RULES)
# Logical axes a param must split evenly when the rules split them (`models.param_shardings`):
# any other axis the mesh does not divide stays whole instead.
MUST_DIVIDE = ("heads",)


def mesh_layer(mesh_config) -> int:
    """`mesh.layer`: devices along the `layer` mesh axis (1, the default: no such axis)."""
    layer = int(getattr(mesh_config, "layer", 1) or 1)
    if layer < 1:
        raise ConfigError(f"mesh.layer={layer}: it must be a positive integer (1: no layer "
                          "axis).")
    return layer


def mesh_shape(mesh_config, n_devices: int) -> tuple[int, int]:
    """Resolves `mesh.data` x `mesh.model` (-1 = fill in) against the device count (over
    `mesh.layer` when there is a layer axis: data x model is then the devices per layer
    group)."""
    layer = mesh_layer(mesh_config)
    if n_devices % layer:
        raise ConfigError(f"mesh.layer={layer} does not divide the {n_devices} available "
                          f"devices; choose a divisor of {n_devices}.")
    n_devices //= layer
    data, model = int(mesh_config.data), int(mesh_config.model)
    for name, size in (("data", data), ("model", model)):
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}={size}: a mesh axis size must be a positive integer "
                              "or -1 (use all remaining devices).")
    if data == -1 and model == -1:
        raise ConfigError("mesh.data and mesh.model are both -1: set at most one of them to -1.")
    if data == -1 or model == -1:
        fixed = model if data == -1 else data
        if n_devices % fixed:
            name = "model" if data == -1 else "data"
            raise ConfigError(f"mesh.{name}={fixed} does not divide the {n_devices} available "
                              f"devices; choose a divisor of {n_devices}.")
        data, model = (n_devices // fixed, fixed) if data == -1 else (fixed, n_devices // fixed)
    if data * model != n_devices:
        hint = (" On CPU, pass --num_cpu_devices=N to saejax.main to simulate N devices."
                if jax.default_backend() == "cpu" else "")
        raise ConfigError(f"mesh.data={data} x mesh.model={model} needs {data * model} devices but "
                          f"{n_devices} are available; set mesh.data and mesh.model so their "
                          f"product is {n_devices} (or one of them to -1).{hint}")
    return data, model


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: all devices); (data, layer, model) when
    `mesh.layer` > 1."""
    devices = list(jax.devices() if devices is None else devices)
    data, model = mesh_shape(mesh_config, len(devices))
    layer = mesh_layer(mesh_config)
    if layer == 1:
        return jax.make_mesh((data, model), MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                             devices=devices)
    return jax.make_mesh((data, layer, model), LAYER_MESH_AXES,
                         axis_types=(AxisType.Auto,) * 3, devices=devices)


# Logical axes that follow another's rule when the table has none of their own (a hook
# group's hook axis, groups.py, stays unsplit as a coefficient group's member axis does).
FALLBACKS = {"embed_in": "embed", "embed_out": "embed", "hook": "group"}


def full_rules(rules) -> tuple[tuple, ...]:
    """`rules` as a tuple of pairs, plus a rule for each of `FALLBACKS` it lacks (the rule of
    the axis it follows), so that an old config's table shards every logical axis; an LM axis
    it does not name stays whole (a table written before the LM was sharded keeps it
    replicated)."""
    rules = tuple(map(tuple, rules))
    named = {name for name, _ in rules}
    extra = tuple((axis, mesh_axis) for axis, follows in FALLBACKS.items() if axis not in named
                  for name, mesh_axis in rules if name == follows)
    unsplit = tuple((axis, None) for axis, _ in LM_RULES if axis not in named)
    return rules + extra + unsplit


def logical_to_spec(logical_axes: Sequence[str | None], rules) -> P:
    return nn.logical_to_mesh_axes(tuple(logical_axes), full_rules(rules))


def is_axes(x) -> bool:
    # A plain tuple of axis names (not an optax NamedTuple state, which is also a tuple).
    return type(x) is tuple and all(a is None or isinstance(a, str) for a in x)


def named_shardings(mesh: Mesh, logical_axes_tree, rules):
    """Maps a tree of logical-axis tuples to a tree of NamedShardings."""
    return jax.tree.map(lambda axes: NamedSharding(mesh, logical_to_spec(axes, rules)),
                        logical_axes_tree, is_leaf=is_axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
    """Makes `mesh` and `rules` the ambient ones while tracing and running sharded code."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(full_rules(rules)):
        yield


def split_size(mesh, rules, logical_axis: str) -> int:
    """How many devices of `mesh` the `rules` split `logical_axis` over (1: it stays whole)."""
    spec = logical_to_spec((logical_axis,), rules)
    axes = spec[0] if len(spec) else None
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


def is_split(logical_axis: str) -> bool:
    """Whether the ambient mesh and rules (`activate`) split `logical_axis` over > 1 device."""
    mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
    return not mesh.empty and bool(rules) and split_size(mesh, rules, logical_axis) > 1


def _ambient_axes(logical_axes: Sequence[str]) -> tuple[Any, P]:
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return None, P()
    return mesh, nn.logical_to_mesh_axes(tuple(logical_axes), rules)


def _scatter_mask(shape, indices, dtype):
    """{0, 1} array of `shape` with ones at `indices` along the last axis; out-of-range indices
    (other shards' entries) are dropped rather than clipped, so they cannot overwrite a one."""
    rows = indices.reshape(-1, indices.shape[-1])
    mask = jnp.zeros((rows.shape[0], shape[-1]), dtype)
    mask = mask.at[jnp.arange(rows.shape[0])[:, None], rows].set(1, mode="drop")
    return mask.reshape(shape)


def _rows_spec(x: jax.Array, axes: Sequence[str] | None) -> tuple[Any, P]:
    """(ambient mesh, spec of every axis of `x`) for latents of logical `axes` (default
    `[..., batch, latent]`, leading axes unsplit; a CLT's are `[batch, layer, latent]`):
    (None, P()) without a mesh and rules."""
    names = tuple(axes) if axes is not None else ("batch", "latent")
    mesh, spec = _ambient_axes(names)
    if mesh is None or len(spec) != len(names):
        return None, P()
    return mesh, P(*(None,) * (x.ndim - len(names)), *spec)


def _top_k(x: jax.Array, k: int, *, with_mask: bool, axes: Sequence[str] | None = None):
    mesh, spec = _rows_spec(x, axes)
    latent_axis = spec[-1] if mesh is not None else None
    row_axes = tuple(a for a in spec[:-1] if a is not None)
    model = 1 if latent_axis is None else mesh.shape[latent_axis]
    if (mesh is None or (model == 1 and not row_axes) or x.shape[-1] % model
            or any(a is not None and size % mesh.shape[a] for a, size in zip(spec, x.shape))
            or k > x.shape[-1] // model):
        # Unsplit, or not evenly divisible: XLA's own top-k on the (gathered) axis is exact.
        values, indices = jax.lax.top_k(x, k)
        mask = _scatter_mask(x.shape, indices, x.dtype) if with_mask else None
        return values, indices, mask
    shard_size = x.shape[-1] // model
    sharded, gathered = spec, P(*spec[:-1], None)

    def local_top_k(x_shard):
        values, indices = jax.lax.top_k(x_shard, k)
        offset = 0
        if model > 1:
            offset = jax.lax.axis_index(latent_axis) * shard_size
            values = jax.lax.all_gather(values, latent_axis, axis=x.ndim - 1, tiled=True)
            indices = jax.lax.all_gather(indices + offset, latent_axis, axis=x.ndim - 1,
                                         tiled=True)
            values, order = jax.lax.top_k(values, k)
            indices = jnp.take_along_axis(indices, order, axis=-1)
        if not with_mask:
            return values, indices
        local = indices - offset
        local = jnp.where((local >= 0) & (local < shard_size), local, shard_size)
        return values, indices, _scatter_mask(x_shard.shape, local, x.dtype)

    # A batch split alone is still done per device: XLA's partitioner gathers the whole
    # [batch, n_latents] operand of a top-k whose batch is split (tests/test_communication.py).
    # The gathered candidates, and so values and indices, are identical on every device of
    # `latent_axis`; check_vma cannot infer that through all_gather + top_k, so it is off.
    out_specs = (gathered, gathered, sharded) if with_mask else (gathered, gathered)
    out = jax.shard_map(local_top_k, in_specs=sharded, out_specs=out_specs, check_vma=False)(x)
    return out if with_mask else (*out, None)


def top_k(x: jax.Array, k: int, axes: Sequence[str] | None = None
          ) -> tuple[jax.Array, jax.Array]:
    """Exact `jax.lax.top_k` over the last (latent) axis of `x [..., batch, latent]` (or of
    other logical `axes` ending in `latent`: a CLT's `[batch, layer, latent]`).

    When the ambient rules split `latent` across a mesh axis, each device takes the top-k of its
    own shard, the k candidates of every shard are gathered (k * shards values per row, not the
    whole dictionary), and the top-k of the candidates is the global answer. Candidates are
    concatenated in shard order, so ties break towards the lower index exactly as in
    `jax.lax.top_k`.
    """
    values, indices, _ = _top_k(x, k, with_mask=False, axes=axes)
    return values, indices


def top_k_mask(x: jax.Array, k: int, axes: Sequence[str] | None = None) -> jax.Array:
    """A {0, 1} mask of `x`'s shape and sharding marking each row's k largest entries.

    Each device writes only its own shard of the mask; nothing dictionary-sized moves.
    """
    _, _, mask = _top_k(jax.lax.stop_gradient(x), k, with_mask=True, axes=axes)
    return jax.lax.stop_gradient(mask)


def batch_top_k_mask(x: jax.Array, k: int, axes: Sequence[str] | None = None) -> jax.Array:
    """A {0, 1} mask of the k largest entries of the whole `x [batch, latent]` (BatchTopK; a
    CLT's `[batch, layer, latent]` likewise).

    Sharded like `x`: each device takes the top-k of its own block, the candidates of every
    block are gathered (at most k * devices values, never the activations), and the k-th
    largest candidate is the global threshold. Entries equal to the threshold all pass; with
    continuous activations that is exactly k entries.
    """
    x = jax.lax.stop_gradient(x)
    mesh, spec = _rows_spec(x, axes)
    axes = tuple(a for a in spec if a is not None) if mesh is not None else ()
    if not axes:
        threshold = jax.lax.top_k(x.reshape(-1), k)[0][-1]
        return (x >= threshold).astype(x.dtype)

    def local_mask(x_block):
        flat = x_block.reshape(-1)
        candidates = jax.lax.top_k(flat, min(k, flat.shape[0]))[0]
        candidates = jax.lax.all_gather(candidates, axes, tiled=True)
        threshold = jax.lax.top_k(candidates, k)[0][-1]
        return (x_block >= threshold).astype(x.dtype)

    return jax.lax.stop_gradient(jax.shard_map(local_mask, in_specs=P(*spec),
                                               out_specs=P(*spec))(x))
