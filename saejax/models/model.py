"""One interface over every LM family: `load(checkpoint_dir)` reads a Hugging Face directory
(config.json's `model_type` picks the family), and `forward(params, tokens, config, hooks=,
interventions=, stop_at_layer=)` runs any of them, reading and replacing activations at
TransformerLens's hook names. Nothing outside a family file branches on the family.

A family is a module with `MODEL_TYPES`, a frozen config dataclass (`from_hf_dict`, and the
`base.LMConfig` properties), `param_specs(config)`, `load_params(path, config)` and the pieces
of its forward pass: `embed`, `context` (rotary tables for a sequence length), `block`,
`final_norm` and `unembedding`. Params are stacked over layers (`base.py` says why).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from saejax import sharding
from saejax.errors import ConfigError
from saejax.models import base, gemma, gpt2, hf, hooks as hook_lib, layers, lazy, llama, neox

FAMILIES = (gpt2, llama, gemma, neox)
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.MODEL_TYPES}
_CONFIG_CLASSES = {gpt2: gpt2.GPT2Config, llama: llama.LlamaConfig, gemma: gemma.GemmaConfig,
                   neox: neox.NeoXConfig}
_BY_CONFIG = {cls: f for f, cls in _CONFIG_CLASSES.items()}
MODEL_TYPES = tuple(sorted(_BY_MODEL_TYPE))


def family(config):
    """The family module of a config."""
    try:
        return _BY_CONFIG[type(config)]
    except KeyError:
        raise TypeError(f"{type(config).__name__} is not an LM config of saejax "
                        f"({[c.__name__ for c in _BY_CONFIG]}).") from None


def config_from_hf_dict(d: Mapping) -> base.LMConfig:
    """The config of config.json's `model_type`; an unknown one is an error naming it."""
    model_type = d.get("model_type")
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"config.json has model_type={model_type!r}; saejax reads "
                         f"{list(MODEL_TYPES)}.")
    return _CONFIG_CLASSES[_BY_MODEL_TYPE[model_type]].from_hf_dict(d)


class LM(NamedTuple):
    """A loaded model: its config and params (float32 jax arrays, stacked over layers)."""
    config: base.LMConfig
    params: dict


def read_config(path: str | os.PathLike) -> base.LMConfig:
    """The config of the checkpoint directory at `path` (config.json only; no weights read)."""
    return config_from_hf_dict(hf.read_config(os.fspath(path)))


def load(path: str | os.PathLike, *, mesh: Mesh | None = None, rules=None,
         dtype=np.float32) -> LM:
    """The model in a local Hugging Face checkpoint directory (config.json + model.safetensors
    or a sharded model.safetensors.index.json); never touches the hub.

    With a `mesh` (and `rules`, default `sharding.DEFAULT_RULES`), every param is created
    straight in its shards (`param_shardings`): each device's block is read from the file
    alone (`_read_into`), so no host ever holds a whole param it does not keep. Without one, each param is read whole, one at a time, onto the default device.
    `dtype` is the params' (e.g. jnp.bfloat16 for half the memory; the forward reads any)."""
    path = os.fspath(path)
    config = read_config(path)
    tensors = family(config).load_params(path, config)
    if mesh is None:
        return LM(config, jax.tree.map(
            lambda t: jax.device_put(np.asarray(t).astype(dtype, copy=False)), tensors,
            is_leaf=_is_lazy))
    shardings = param_shardings(config, mesh, rules)
    _check_shapes(config, tensors, path)
    return LM(config, jax.tree.map(lambda t, where: _read_into(t, where, dtype), tensors,
                                   shardings, is_leaf=_is_lazy))


def _read_into(tensor: lazy.Lazy, where: NamedSharding, dtype) -> jax.Array:
    """`tensor` as a global array of sharding `where`, each distinct block of this host's
    devices read once and put on its devices before the next is read (what
    `jax.make_array_from_callback` does, but without holding every block on the host at once:
    the host's peak is its shards plus one block)."""
    by_block: dict = {}
    for device, index in where.addressable_devices_indices_map(tensor.shape).items():
        key = tuple(s.indices(n)[:2] for s, n in zip(index, tensor.shape))
        by_block.setdefault(key, []).append(device)
    shards = {}
    for key, devices in by_block.items():
        block = tensor.read(tuple(slice(*k) for k in key)).astype(dtype, copy=False)
        # Blocking: the transfer is done, and the block freed, before the next is read.
        placed = jax.block_until_ready([jax.device_put(block, d) for d in devices])
        shards |= dict(zip(devices, placed))
        del block
    arrays = [shards[d] for d in where.addressable_devices_indices_map(tensor.shape)]
    return jax.make_array_from_single_device_arrays(tensor.shape, where, arrays)


def _is_lazy(x) -> bool:
    return isinstance(x, lazy.Lazy)


def _check_shapes(config, tensors, path: str) -> None:
    got = jax.tree.map(lambda t: tuple(t.shape), tensors, is_leaf=_is_lazy)
    want = jax.tree.map(lambda s: s.shape, param_specs(config),
                        is_leaf=lambda x: isinstance(x, base.Spec))
    if got != want:
        raise ValueError(f"the params read from {path} have shapes {got}, but "
                         f"{config.describe()} implies {want}.")


def load_pretrained(path: str | os.PathLike):
    """(config, params) of `load(path)`."""
    return tuple(load(path))


def param_specs(config) -> dict:
    return family(config).param_specs(config)


def param_axes(config) -> dict:
    """The logical axis names of every param (vocab, embed, heads, kv_heads, head_dim, mlp,
    layers, positions), a pytree matching the params: what the sharding rules map to a mesh."""
    return base.axes_of(param_specs(config))


def param_shardings(config, mesh: Mesh, rules=None) -> dict:
    """The NamedSharding of every param on `mesh` by the logical-axis `rules` (default
    `sharding.DEFAULT_RULES`: heads, kv_heads, mlp and vocab over `model`).

    A dim whose size the mesh axes it maps to do not divide stays whole (replicated): KV heads
    fewer than the model axis (SmolLM2's 3, Gemma 3 270M's 1), an odd vocabulary (GPT-2's
    50257). Query heads are the exception: their split is the tensor-parallel attention, so
    query heads the axis does not divide are a ConfigError naming the sizes that do."""
    rules = sharding.DEFAULT_RULES if rules is None else rules

    def of(spec: base.Spec) -> NamedSharding:
        mesh_axes = list(sharding.logical_to_spec(spec.axes, rules))
        mesh_axes += [None] * (len(spec.shape) - len(mesh_axes))
        for dim, (name, size, axes) in enumerate(zip(spec.axes, spec.shape, mesh_axes)):
            split = math.prod(mesh.shape[a] for a in _names(axes))
            if size % split == 0:
                continue
            if name in sharding.MUST_DIVIDE:
                _heads_error(config, name, size, axes, mesh)
            mesh_axes[dim] = None
        return NamedSharding(mesh, P(*mesh_axes))

    return jax.tree.map(of, param_specs(config), is_leaf=lambda x: isinstance(x, base.Spec))


def _names(axes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _heads_error(config, name: str, size: int, axes, mesh: Mesh):
    split = {a: mesh.shape[a] for a in _names(axes)}
    work = [m for m in range(1, mesh.size + 1) if size % m == 0 and mesh.size % m == 0]
    raise ConfigError(
        f"{config.describe()} has {size} {'query heads' if name == 'heads' else name}, which "
        f"the mesh's {' x '.join(f'{a}={n}' for a, n in split.items())} does not divide: "
        f"tensor-parallel attention gives each device whole heads. Mesh sizes that work on "
        f"{mesh.size} devices: mesh.model in {work}; or map {name!r} to None in "
        f"sharding_rules to replicate the attention.")


def splits(mesh: Mesh | None, rules=None) -> bool:
    """Whether `rules` split the LM's params over more than one device of `mesh` (its heads,
    MLP or vocabulary over a model axis of size > 1): when they do not, callers keep the LM as
    it was before sharding existed (one device, bit for bit the same)."""
    if mesh is None:
        return False
    rules = sharding.DEFAULT_RULES if rules is None else rules
    return any(sharding.split_size(mesh, rules, name) > 1 for name, _ in sharding.LM_RULES)


def shard_params(params: dict, config, mesh: Mesh, rules=None) -> dict:
    """`params` (already loaded) moved into `param_shardings(config, mesh, rules)`."""
    return jax.device_put(params, param_shardings(config, mesh, rules))


def init_params(key: jax.Array, config, *, mesh: Mesh | None = None, rules=None) -> dict:
    """Random params of the family's initialisation (GPT-2's for GPT-2; normal(0.02) weights
    and unit norms elsewhere); with a `mesh`, created in their shards (`param_shardings`) by
    one jitted program, never whole on one device."""
    specs = param_specs(config)
    init = lambda k: base.init_from_specs(k, specs)
    if mesh is None:
        return jax.jit(init)(key)
    return jax.jit(init, out_shardings=param_shardings(config, mesh, rules))(key)


def hook_names(config) -> list[str]:
    return hook_lib.hook_names(config)


def unembedding(params: dict, config) -> jax.Array:
    """W_U [d_model, vocab]: the final residual (after the final norm) @ W_U = the logits
    (before any soft-capping)."""
    return family(config).unembedding(params, config)


# ------------------------------------------------------------------------------------------------
# The forward pass
# ------------------------------------------------------------------------------------------------

Intervention = Callable[[jax.Array], jax.Array]


def forward(params: dict, tokens: jax.Array, config, *, hooks: Sequence[str] = (),
            interventions: Mapping[str, Intervention] | None = None,
            stop_at_layer: int | None = None, dtype=jnp.float32, unembed: bool = True,
            ) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    """Runs the model, reading and optionally replacing named activations.

    Args:
      params: from `load`, `load_pretrained` or `init_params`.
      tokens: int token ids [batch, seq], seq <= config.max_positions.
      config: the architecture (any family's config).
      hooks: names (see `hook_names`) whose activations [batch, seq, d_model] go in the cache.
      interventions: hook name -> fn(activation) -> activation of the same shape, which replaces
        the activation from there on (SAE splicing, zero-ablation, steering). A cached hook
        holds the value after its intervention, i.e. what the rest of the model sees.
      stop_at_layer: run blocks 0 .. stop_at_layer - 1 only and return None for the logits,
        so harvesting a middle layer does not pay for the rest of the model.
      dtype: the activation dtype (e.g. jnp.bfloat16); params stay as given, logits float32.
      unembed: False returns the final normalised residual [batch, seq, d_model] in place of
        the logits, for losses computed over the vocabulary in chunks (`vocab.py`).

    Returns:
      (logits [batch, seq, vocab] float32 or None, {hook name: activation}).

    To jit, keep everything but params and tokens out of the traced arguments: use
    `make_forward`, or close over them in your own jitted function (which is how an
    intervention can use traced values, e.g. an SAE's params).
    """
    hooks, interventions = tuple(hooks), dict(interventions or {})
    hook_lib.check_hooks(config, hooks, interventions, stop_at_layer)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids [batch, seq]; got {tokens.dtype} "
                         f"{tokens.shape}.")
    if tokens.shape[1] > config.max_positions:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's "
                         f"{config.max_positions} positions.")
    fam = family(config)
    cache = {}

    def hook(name: str, x: jax.Array) -> jax.Array:
        if name in interventions:
            replaced = interventions[name](x)
            if replaced.shape != x.shape:
                raise ValueError(f"the intervention at {name} returned shape {replaced.shape}; "
                                 f"it must keep the activation's shape {x.shape}.")
            x = replaced.astype(x.dtype)
        if name in hooks:
            cache[name] = x
        return x

    x = fam.embed(params, tokens, config, dtype)
    ctx = fam.context(config, tokens.shape[1])
    n = config.n_layers if stop_at_layer is None else stop_at_layer
    touched = {hook_lib.hook_layer(name) for name in (*hooks, *interventions)}
    for start, stop in _segments(config, n, touched):
        if stop - start == 1:
            layer_params = jax.tree.map(lambda a, i=start: a[i], params["blocks"])
            layer_hook = lambda name, a, i=start: hook(f"blocks.{i}.{name}", a)
            x = fam.block(layer_params, x, config, start, layer_hook, ctx)
        else:  # a run of alike layers nothing reads: one scanned body, compiled once
            body = lambda h, p, i=start: (fam.block(p, h, config, i, _no_hook, ctx), None)
            x, _ = jax.lax.scan(body, x, jax.tree.map(lambda a, i=start, j=stop: a[i:j],
                                                      params["blocks"]))
    if stop_at_layer is not None:
        return None, cache
    x = fam.final_norm(params, x, config)
    if not unembed:
        return x, cache
    logits = jnp.einsum("bsd,dv->bsv", x, fam.unembedding(params, config).astype(x.dtype))
    return layers.soft_cap(logits.astype(jnp.float32), config.final_logit_softcapping), cache


def _no_hook(name: str, x: jax.Array) -> jax.Array:
    del name
    return x


def _segments(config, n_layers: int, touched: set[int]) -> list[tuple[int, int]]:
    """Blocks 0 .. n_layers - 1 as [start, stop) runs: a block with a hook or an intervention
    alone, and each run of untouched blocks of one `layer_kind` (same window and rope) together,
    so the forward scans it: compile time no longer grows with the model's depth."""
    runs, i = [], 0
    while i < n_layers:
        j = i + 1
        if i not in touched:
            kind = config.layer_kind(i)
            while j < n_layers and j not in touched and config.layer_kind(j) == kind:
                j += 1
        runs.append((i, j))
        i = j
    return runs


def make_forward(config, *, hooks: Sequence[str] = (),
                 interventions: Mapping[str, Intervention] | None = None,
                 stop_at_layer: int | None = None, dtype=jnp.float32, unembed: bool = True,
                 ) -> Callable[[dict, jax.Array], tuple[jax.Array | None, dict[str, jax.Array]]]:
    """`jax.jit`ted `forward(params, tokens)` with everything else fixed; bad hook names fail
    here rather than at the first call."""
    hooks, interventions = tuple(hooks), dict(interventions or {})
    hook_lib.check_hooks(config, hooks, interventions, stop_at_layer)

    def run(params: dict, tokens: jax.Array):
        return forward(params, tokens, config, hooks=hooks, interventions=interventions,
                       stop_at_layer=stop_at_layer, dtype=dtype, unembed=unembed)

    return jax.jit(run)
