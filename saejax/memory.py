"""What one train step costs each device: the bytes it holds and the collectives it runs.

`memory_report(config, mesh, d=...)` counts the bytes per device of the train state (params,
Adam moments, the rest) exactly, from the trainer's abstract state and its shardings, and
estimates the step's temporaries (gradients and activations) from the shapes alone: nothing is
compiled or allocated, so it answers for a dictionary far too big for the machine at hand, on an
`AbstractMesh` of any size. `compiled_memory` reads XLA's own numbers for a compiled step, which
the estimate is checked against (tests/test_memory.py). `lm_memory_report` does the same for the
language model's forward (a harvest step), tensor parallel over the mesh.

`collectives(hlo_text, mesh)` lists the collectives of a compiled program: the elements and
bytes each one's result holds, the mesh axes its device groups span, and the source line that
made it (tests/test_communication.py: a model-parallel step moves O(batch d), not O(d n)).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from saejax import data, groups, models, sharding, train
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


# ------------------------------------------------------------------------------------------
# Communication: the collectives of a compiled program.
# ------------------------------------------------------------------------------------------
COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                  "ragged-all-to-all", "collective-permute", "collective-broadcast")
_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16}
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s+"
    r"(?P<op>" + "|".join(sorted(COLLECTIVE_OPS, key=len, reverse=True)) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_IOTA = r"\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?"


class Collective(NamedTuple):
    """One collective of a compiled program."""

    name: str               # the HLO instruction
    op: str                 # all-reduce, all-gather, ..., with -start for the async form
    arrays: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, shape) of each result array
    elements: int           # elements in those arrays
    bytes: int
    mesh_axes: tuple[str, ...]  # the mesh axes its device groups span
    op_name: str            # the JAX operation (HLO metadata)
    source: str             # file:line (function) of the Python that made it, innermost first

    @property
    def shapes(self) -> tuple[str, ...]:
        return tuple(f"{dtype}[{','.join(map(str, dims))}]" for dtype, dims in self.arrays)

    def __str__(self) -> str:
        return (f"{self.op} {', '.join(self.shapes)} ({self.elements} elements) over "
                f"{'+'.join(self.mesh_axes) or 'no axis'}: {self.op_name} at {self.source}")


def _ints(text: str | None) -> list[int]:
    return [int(v) for v in text.split(",") if v] if text else []


def _iota(shape, dims, perm) -> np.ndarray:
    ids = np.arange(math.prod(dims)).reshape(dims)
    return ids.transpose(perm or range(len(dims))).reshape(shape)


def _device_groups(line: str, n_devices: int) -> list[np.ndarray] | None:
    """The device groups (positions in the program's device assignment) of a collective, or
    None when its format is not one recognised here."""
    pairs = re.search(r"source_target_pairs=\{((?:\{[0-9,]+\},?)*)\}", line)
    if pairs:
        return [np.asarray(_ints(p)) for p in re.findall(r"\{([0-9,]+)\}", pairs.group(1))]
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]"
                     r"(?:,\s*device_ids=\((\[[0-9,]*\](?:T\([0-9,]*\))?)\))?\s*\{([^}]*)\}", line)
    if mesh:
        axes = re.findall(r"'([^']+)'=([0-9]+)", mesh.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        selected = re.findall(r"'([^']+)'", mesh.group(3))
        if ":" in mesh.group(3) or not set(selected) <= set(names):
            return None  # sub-axes: not parsed
        ids = np.arange(math.prod(sizes))
        if mesh.group(2):
            m = re.fullmatch(r"\[([0-9,]*)\](?:T\(([0-9,]*)\))?", mesh.group(2))
            dims = _ints(m.group(1))
            ids = _iota((math.prod(sizes),), dims, _ints(m.group(2)))
        ids = ids.reshape(sizes)
        chosen = [names.index(a) for a in selected]
        rest = [i for i in range(len(names)) if i not in chosen]
        ids = ids.transpose(rest + chosen).reshape(-1, math.prod(sizes[i] for i in chosen))
        return list(ids)
    iota = re.search(r"replica_groups=" + _IOTA, line)
    if iota:
        return list(_iota(_ints(iota.group(1)), _ints(iota.group(2)), _ints(iota.group(3))))
    explicit = re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", line)
    if explicit:
        groups = [np.asarray(_ints(g)) for g in re.findall(r"\{([0-9,]*)\}", explicit.group(1))]
        return groups or [np.arange(n_devices)]
    return None


def _spanned_axes(groups, mesh) -> tuple[str, ...]:
    """The mesh axes along which some group holds devices with different coordinates."""
    shape = tuple(mesh.shape.values())
    names = tuple(mesh.shape.keys())
    if groups is None:  # unrecognised: assume the worst
        return tuple(a for a, s in zip(names, shape) if s > 1)
    spanned = set()
    for group in groups:
        coords = np.stack(np.unravel_index(np.asarray(group, int), shape), axis=-1)
        spanned.update(a for i, a in enumerate(names) if len(set(coords[:, i])) > 1)
    return tuple(a for a in names if a in spanned)


def _source_table(text: str):
    """HLO stack_frame_id -> ["file:line (function)", ...], innermost frame first."""

    def table(title: str) -> dict[int, str]:
        block = re.search(rf"^{title}\n(.*?)(?:\n\n|\Z)", text, re.S | re.M)
        rows = re.findall(r"^([0-9]+) (.*)$", block.group(1), re.M) if block else []
        return {int(i): v for i, v in rows}

    files = {i: v.strip('"') for i, v in table("FileNames").items()}
    functions = {i: v.strip('"') for i, v in table("FunctionNames").items()}
    locations = {}
    for i, v in table("FileLocations").items():
        f = dict((k, int(x)) for k, x in re.findall(r"(\w+)=([0-9]+)", v))
        path = files.get(f.get("file_name_id"), "?")
        path = path.split("/site-packages/")[-1]
        path = re.sub(r"^.*/(saejax|tests|benchmarks|experiments)/", r"\1/", path)
        locations[i] = f"{path}:{f.get('line')} ({functions.get(f.get('function_name_id'), '?')})"
    frames = {i: dict((k, int(x)) for k, x in re.findall(r"(\w+)=([0-9]+)", v))
              for i, v in table("StackFrames").items()}

    def stack(frame_id: int) -> list[str]:
        out = []
        while frame_id in frames and len(out) < 32:
            out.append(locations.get(frames[frame_id].get("file_location_id"), "?"))
            # The printed parent is one more than the parent frame's id (0: none).
            parent = frames[frame_id].get("parent_frame_id", 0) - 1
            if not 0 < parent < frame_id:
                break
            frame_id = parent
        return out

    return stack


def collectives(hlo_text: str, mesh) -> list[Collective]:
    """Every collective in optimized HLO text (`compiled.as_text()`) of a program on `mesh`.

    A collective's size is that of its result: what each device receives (all-gather), holds
    reduced (all-reduce) or is sent (all-to-all, collective-permute); for the async `-start`
    form, the arrays it writes (the second half of its result tuple, without the u32 context
    scalars). `-done` halves are not counted again.
    """
    stack = _source_table(hlo_text)
    n_devices = math.prod(mesh.shape.values())
    found = []
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        arrays = [(dtype, tuple(_ints(dims)))
                  for dtype, dims in _ARRAY.findall(m.group("shape")) if dtype in _DTYPE_BYTES]
        if m.group("start") and m.group("op") != "all-reduce":
            arrays = [a for a in arrays if a[1]]  # drop context scalars
            arrays = arrays[len(arrays) // 2:]
        elements = sum(math.prod(dims) for _, dims in arrays)
        op_name = re.search(r'op_name="([^"]*)"', line)
        frame = re.search(r"stack_frame_id=([0-9]+)", line)
        source = " <- ".join(stack(int(frame.group(1)))[:4]) if frame else "?"
        found.append(Collective(
            name=m.group("name"), op=m.group("op") + (m.group("start") or ""),
            arrays=tuple(arrays),
            elements=elements,
            bytes=sum(math.prod(dims) * _DTYPE_BYTES[t] for t, dims in arrays),
            mesh_axes=_spanned_axes(_device_groups(line, n_devices), mesh),
            op_name=op_name.group(1) if op_name else "?", source=source))
    return found
