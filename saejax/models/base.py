"""What every LM family shares: the description of one parameter (shape, logical axes, init)
and the config properties the rest of saejax reads, whatever the family.

Params are stacked over layers: every per-block weight is one array with a leading `layers`
axis (params["blocks"]["attn"]["q"] is [n_layers, d_model, heads, head_dim]). One array per
kind of weight gives one logical-axes entry per kind for the sharding rules (issue 17: `heads`
and `mlp` over the mesh's model axis, `layers` unsharded or over a pipeline axis), the same
shapes every layer for `jax.lax.scan`, and checkpoints of a handful of arrays instead of
thousands. The forward pass scans each run of alike blocks that no hook reads (compile time
independent of depth) and slices out a block a hook reads, so per-layer differences (Gemma's
sliding/global pattern, its two rope bases: `layer_kind`) stay static Python.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Spec:
    """One parameter: its shape, logical axis names (one per dim), and its init: a normal std,
    or a constant (`value`) for norms and biases."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    std: float | None = None
    value: float = 0.0

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"Spec shape {self.shape} and axes {self.axes} differ in rank.")


def layered(n_layers: int, specs: dict) -> dict:
    """Per-layer specs stacked: a leading `layers` axis on each."""
    return jax.tree.map(lambda s: dataclasses.replace(s, shape=(n_layers, *s.shape),
                                                      axes=("layers", *s.axes)),
                        specs, is_leaf=lambda x: isinstance(x, Spec))


def init_from_specs(key: jax.Array, specs: dict) -> dict:
    """float32 params from specs: normal(std) or the constant, one fold of `key` per leaf."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=lambda x: isinstance(x, Spec))

    def init(k, spec: Spec):
        if spec.std is None:
            return jnp.full(spec.shape, spec.value, jnp.float32)
        return spec.std * jax.random.normal(k, spec.shape, jnp.float32)

    keys = [jax.random.fold_in(key, i) for i in range(len(leaves))]
    return jax.tree.unflatten(treedef, [init(k, s) for k, s in zip(keys, leaves)])


def axes_of(specs: dict) -> dict:
    """The logical axis names of every param, as a pytree matching the params."""
    return jax.tree.map(lambda s: s.axes, specs, is_leaf=lambda x: isinstance(x, Spec))


class LMConfig:
    """The properties every family's config has, under the same names: `n_layers`, `d_model`,
    `vocab_size`, `max_positions`, `bos_token_id` (None: use the tokenizer's separator) and
    `block_hooks` (the hook names one block has), besides `model_type`."""

    model_type: str
    block_hooks: tuple[str, ...]

    def layer_kind(self, layer: int):
        """What sets block `layer` apart from the others (its sliding window, and with it its
        rope); blocks of one kind run the same code, so runs of them can be scanned."""
        del layer

    def describe(self) -> str:
        return f"{self.model_type} ({self.n_layers} layers, d_model={self.d_model})"

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)
