"""What one train step costs each device: the bytes it holds and the collectives it runs.

`memory_report(config, mesh, d=...)` counts the bytes per device of the train state (params,
Adam moments, the rest) exactly, from the trainer's abstract state and its shardings, and
estimates the step's temporaries (gradients and activations) from the shapes alone: nothing is
compiled or allocated, so it answers for a dictionary far too big for the machine at hand, on an
`AbstractMesh` of any size. `compiled_memory` reads XLA's own numbers for a compiled step, which
the estimate is checked against (tests/test_memory.py). `lm_memory_report` does the same for the
language model's forward (a harvest step), tensor parallel over the mesh.

`collectives(hlo_text, mesh)`, the collectives of a compiled program (their bytes and the mesh
axes they span), is owned by `collectives.py` and re-exported here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from saejax import data, groups, models, sharding, train
# A compiled program's collectives, named here as the tests and benchmarks name them.
from saejax.collectives import COLLECTIVE_OPS, Collective, collectives  # noqa: F401
from saejax.sae import base as sae_base

# ------------------------------------------------------------------------------------------
# Memory.
# ------------------------------------------------------------------------------------------
# [batch, d] arrays: the scaled batch, x - b_dec, x_hat, the residual and its gradient (with
# several entries, the scaled batch counts each; the rest are as wide as the target). A CLT's
# latents are [batch, layer, n]: its activation block is this device's share of all layers'.
EMBED_ARRAYS = 4


class MemoryReport(NamedTuple):
    """Bytes per device of one train step. The state (params, optimizer, other) and the batch
    are exact; gradients and activations are estimates (each architecture's `temporaries`)."""

    params_bytes: int
    optimizer_bytes: int     # Adam's moments and the optimizer's counters
    other_state_bytes: int   # step, firing counters, density, input scale, coefficient, RNG
    batch_bytes: int         # this device's rows of the input batch
    gradient_bytes: int      # estimated: param-sized temporaries (gradients, their all-reduce)
    activation_bytes: int    # estimated: [batch, n_latents] and [batch, d] temporaries

    @property
    def state_bytes(self) -> int:
        return self.params_bytes + self.optimizer_bytes + self.other_state_bytes

    @property
    def temporary_bytes(self) -> int:
        return self.gradient_bytes + self.activation_bytes

    @property
    def total_bytes(self) -> int:
        """What the step needs resident: its arguments (the state, donated and updated in
        place, and the batch) and its temporaries."""
        return self.state_bytes + self.batch_bytes + self.temporary_bytes

    def as_dict(self) -> dict[str, int]:
        return {**self._asdict(), "state_bytes": self.state_bytes,
                "temporary_bytes": self.temporary_bytes, "total_bytes": self.total_bytes}

    def __str__(self) -> str:
        parts = [("params", self.params_bytes), ("optimizer", self.optimizer_bytes),
                 ("other state", self.other_state_bytes), ("batch", self.batch_bytes),
                 ("gradients~", self.gradient_bytes), ("activations~", self.activation_bytes)]
        return (f"{format_bytes(self.total_bytes)} per device: "
                + ", ".join(f"{name} {format_bytes(value)}" for name, value in parts)
                + " (~ estimated)")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _per_device_bytes(tree) -> int:
    """Bytes on one device of a tree of ShapeDtypeStructs that carry their shardings (the
    largest shard: every shard is the same size when the mesh divides the array)."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree))


def memory_report(config, mesh, *, d: int) -> MemoryReport:
    """Bytes per device of `config`'s train step on `mesh` (a `Mesh` or an `AbstractMesh`).

    Builds the trainer (`jax.eval_shape` only: nothing is compiled or allocated) and reads the
    state's shard shapes; the temporaries are counted from the shapes (the architecture's
    `temporaries`).
    """
    rules = config.sharding_rules
    batch_size = int(config.train.batch_size)
    batch_sharding = jax.sharding.NamedSharding(
        mesh, sharding.logical_to_spec(("batch", "embed"), rules))
    trainer = train.make_trainer(config, mesh, d=d, batch_sharding=batch_sharding)
    state = trainer.abstract_state
    params_bytes = _per_device_bytes(state["params"])
    optimizer_bytes = _per_device_bytes(state["opt_state"])
    other_state_bytes = _per_device_bytes(
        {k: v for k, v in state.items() if k not in ("params", "opt_state")})
    itemsize = state["params"]["W_enc"].dtype.itemsize
    group = groups.members(config)
    members = group.size

    # This device's block of a [batch, n_latents] activation (a CLT's [batch, layer, n]) and
    # of the [batch, d] batch.
    shape = trainer.architecture.shape
    latents_sharding = jax.sharding.NamedSharding(
        mesh, sharding.logical_to_spec(("batch", *sae_base.latent_axes(shape)), rules))
    batch_block, *latent_dims = latents_sharding.shard_shape(
        (batch_size, *sae_base.latent_shape(shape, trainer.n_latents)))
    latent_block = math.prod(latent_dims)
    batch_rows = batch_sharding.shard_shape((batch_size, d))[0]
    # Every entry of the batch, whatever the shape reads of it.
    hooks = data.config_hooks(config)
    # A hook group's members each read one of them (counted once per member below).
    _, targets = trainer.architecture.shape.entries({hook: d for hook in group.hooks[:1] or hooks})
    batch_width = d * len(hooks)
    target_width = sum(entry.width for entry in targets)
    batch_bytes = batch_rows * batch_width * itemsize

    n_latents = trainer.n_latents
    # What the architecture's step keeps live (its `temporaries`, saejax/sae/<name>.py).
    counts = trainer.architecture.temporaries(config.sae, n_latents)
    activation_elements = (counts.latent_arrays * batch_block * latent_block
                           + batch_rows * (batch_width + (EMBED_ARRAYS - 1) * target_width)
                           + counts.selected_row_arrays * batch_rows * counts.selected_rows * d)
    # A batch split over devices adds a copy: the gradients' all-reduce writes a new buffer.
    batch_split = batch_size // batch_rows > 1
    gradient_bytes = (counts.param_copies + int(batch_split)) * params_bytes
    # A group's members each have their gradients and activations (vmapped, the accelerator
    # default; group.vectorize=map keeps one member's at a time, so this is an upper bound).
    return MemoryReport(params_bytes=params_bytes, optimizer_bytes=optimizer_bytes,
                        other_state_bytes=other_state_bytes, batch_bytes=batch_bytes,
                        gradient_bytes=gradient_bytes,
                        activation_bytes=members * activation_elements * itemsize)


def compile_train_step(config, mesh, *, d: int, compiler_options=None):
    """(trainer, compiled train step) of `config` on the concrete `mesh`, compiled from
    abstract arguments (nothing is allocated): what `compiled_memory` and `collectives` read."""
    batch_sharding = jax.sharding.NamedSharding(
        mesh, sharding.logical_to_spec(("batch", "embed"), config.sharding_rules))
    with sharding.activate(mesh, config.sharding_rules):
        trainer = train.make_trainer(config, mesh, d=d, batch_sharding=batch_sharding)
        hooks = data.config_hooks(config)
        batch = {hook: jax.ShapeDtypeStruct((int(config.train.batch_size), d), jnp.float32,
                                            sharding=batch_sharding) for hook in hooks}
        return trainer, trainer.train_step.lower(trainer.abstract_state, batch).compile(
            compiler_options)


def compiled_memory(compiled) -> dict[str, int]:
    """XLA's memory analysis of a compiled step, per device: `argument_bytes` (state and
    batch), `output_bytes`, `alias_bytes` (outputs written over donated arguments),
    `temp_bytes` (everything else live during the step), and `total_bytes` = argument +
    output - alias + temp, what `MemoryReport.total_bytes` estimates."""
    stats = compiled.memory_analysis()
    out = {"argument_bytes": int(stats.argument_size_in_bytes),
           "output_bytes": int(stats.output_size_in_bytes),
           "alias_bytes": int(stats.alias_size_in_bytes),
           "temp_bytes": int(stats.temp_size_in_bytes)}
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                          + out["temp_bytes"])
    return out


# ------------------------------------------------------------------------------------------
# The language model's forward (a harvest step), tensor parallel.
# ------------------------------------------------------------------------------------------
class LMMemoryReport(NamedTuple):
    """Bytes per device of one LM forward up to a hook (a harvest step). Params and outputs are
    exact; the activations are estimated from the shapes (one block's live arrays: XLA reuses
    them block after block)."""

    params_bytes: int        # this device's shards of the LM's params
    tokens_bytes: int
    activation_bytes: int    # estimated: one block's residual, attention and MLP arrays, and
                             # the copies of the block params' slices
    output_bytes: int        # the hooks' activations (and logits, with unembed)

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.tokens_bytes + self.activation_bytes + self.output_bytes

    def as_dict(self) -> dict[str, int]:
        return {**self._asdict(), "total_bytes": self.total_bytes}

    def __str__(self) -> str:
        return (f"{format_bytes(self.total_bytes)} per device: params "
                f"{format_bytes(self.params_bytes)}, activations~ "
                f"{format_bytes(self.activation_bytes)}, outputs "
                f"{format_bytes(self.output_bytes)}")


def lm_memory_report(lm_config, mesh, rules=None, *, batch_sequences: int,
                     context_length: int, n_hooks: int = 1, unembed: bool = False,
                     param_dtype=jnp.float32, dtype=jnp.float32) -> LMMemoryReport:
    """Bytes per device of the forward of `lm_config` (any family) on `mesh` (a `Mesh` or an
    `AbstractMesh`: nothing is allocated) split by `rules` (`models.param_shardings`), over
    `batch_sequences` x `context_length` tokens split over the batch's mesh axis, returning
    `n_hooks` activations (and the logits with `unembed`). The sizes are read from the param
    specs by logical axis name (heads, kv_heads, head_dim, mlp, vocab), whatever the family."""
    rules = sharding.DEFAULT_RULES if rules is None else rules
    specs = models.param_specs(lm_config)
    shardings = models.param_shardings(lm_config, mesh, rules)
    is_spec = lambda x: isinstance(x, models.base.Spec)
    item = jnp.dtype(param_dtype).itemsize
    params_bytes = sum(math.prod(where.shard_shape(spec.shape)) * item for spec, where in zip(
        jax.tree.leaves(specs, is_leaf=is_spec), jax.tree.leaves(shardings)))
    # The forward slices the stacked block params (a scanned run of layers, a hooked layer):
    # XLA materialises those slices, about one more copy of the blocks' shards.
    blocks_bytes = sum(math.prod(where.shard_shape(spec.shape)) * item for spec, where in zip(
        jax.tree.leaves(specs["blocks"], is_leaf=is_spec), jax.tree.leaves(shardings["blocks"])))
    local = _local_sizes(specs, shardings, is_spec)
    heads, kv_heads = local["heads"], local.get("kv_heads", local["heads"])
    b = -(-batch_sequences // sharding.split_size(mesh, rules, "batch"))
    s, d, a = context_length, lm_config.d_model, jnp.dtype(dtype).itemsize
    # The residual and a branch's output (norms fuse into the matmuls); q, k, v and the heads'
    # output, the float32 scores and the probabilities; the MLP's hidden units, two arrays.
    attention = (b * s * (2 * heads + 2 * kv_heads) * local["head_dim"] * a
                 + b * heads * s * s * (4 + a))
    mlp = 2 * b * s * local["mlp"] * a
    activation_bytes = blocks_bytes + 2 * b * s * d * a + max(attention, mlp)
    output_bytes = n_hooks * b * s * d * a + (b * s * local["vocab"] * 4 if unembed else 0)
    return LMMemoryReport(params_bytes=params_bytes, tokens_bytes=b * s * 4,
                          activation_bytes=activation_bytes, output_bytes=output_bytes)


def _local_sizes(specs, shardings, is_spec) -> dict[str, int]:
    """Per logical axis, its size on one device (the largest over the params naming it)."""
    sizes: dict[str, int] = {}
    for spec, where in zip(jax.tree.leaves(specs, is_leaf=is_spec), jax.tree.leaves(shardings)):
        for name, n in zip(spec.axes, where.shard_shape(spec.shape)):
            sizes[name] = max(sizes.get(name, 0), n)
    return sizes


def compile_lm_forward(lm_config, mesh, rules=None, *, batch_sequences: int,
                       context_length: int, hooks, unembed: bool = False,
                       param_dtype=jnp.float32, dtype=jnp.float32):
    """The forward of `lm_config` up to the deepest of `hooks` (a harvest step), compiled on
    the concrete `mesh` from abstract arguments: what `compiled_memory` reads."""
    rules = sharding.DEFAULT_RULES if rules is None else rules
    shardings = models.param_shardings(lm_config, mesh, rules)
    params = jax.tree.map(lambda spec, where: jax.ShapeDtypeStruct(spec.shape, param_dtype,
                                                                   sharding=where),
                          models.param_specs(lm_config), shardings,
                          is_leaf=lambda x: isinstance(x, models.base.Spec))
    tokens = jax.ShapeDtypeStruct((batch_sequences, context_length), jnp.int32,
                                  sharding=jax.sharding.NamedSharding(
                                      mesh, sharding.logical_to_spec(("batch",), rules)))
    stop = None if unembed else max(models.hook_layer(h) for h in hooks) + 1
    forward = models.make_forward(lm_config, hooks=tuple(hooks), stop_at_layer=stop,
                                  dtype=dtype)
    with sharding.activate(mesh, rules):
        return forward.lower(params, tokens).compile()
