"""A group: SAEs trained as one program on the batches of one data stream. They differ in their
sparsity coefficient (`group.sparsity_coefficients`: every member reads the same batch) and/or
in their hook (`group.hooks`: each hook's SAEs read that hook's entry of a batch holding the
same tokens at every hook, from one LM forward pass or from a harvest's stores in lockstep).
Their state is stacked on a leading member axis (`step.MEMBER_AXES`), and in a hook group on a
hook axis outside it (`step.HOOK_AXES`); the step functions run over the members with `vmap`
or `lax.map`; each member is written out like a single run, in a folder of its own.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from saejax import checkpoint, paths, sae, tracking
from saejax import workdir as workdirs
from saejax.data import lockstep
from saejax.errors import ConfigError
from saejax.step import HOOK_AXES, MEMBER_AXES
from saejax.workdir import MetricsLog, write_config


# ------------------------------------------------------------------------------------------
# The member axis.
# ------------------------------------------------------------------------------------------
def group_coefficients(config) -> tuple[float, ...]:
    """The sparsity coefficients of a group's members; () for a single SAE."""
    return tuple(float(c) for c in config.group.sparsity_coefficients)


def vectorize(config) -> bool:
    """`vmap` the members (batched matmuls, for accelerators) or `map` them, one after another
    inside the step (measured a little faster on CPU; benchmarks/RESULTS.md)."""
    if config.group.vectorize == "auto":
        return jax.default_backend() != "cpu"
    return config.group.vectorize == "vmap"


def group_hooks(config) -> tuple[str, ...]:
    """The hooks of a hook group (`group.hooks`, comma-separated); () for none."""
    return tuple(h.strip() for h in str(config.group.hooks).split(",") if h.strip())


def vmap_members(fn, *, extra: bool, axes: dict = MEMBER_AXES, batch_axis: int | None = None):
    """fn(state, batch) -> state, or (state, value) with `extra`, over a stacked group: the
    entries `axes` names stacked, the batch shared (or stacked on `batch_axis`: a hook
    group's)."""
    return jax.vmap(fn, in_axes=(axes, batch_axis), out_axes=(axes, 0) if extra else axes)


def map_members(fn, *, extra: bool, axes: dict = MEMBER_AXES, batch_axis: int | None = None):
    """As `vmap_members`, but one member after another inside the same program."""

    def mapped(state, batch):
        stacked = {k: v for k, v in state.items() if axes[k] is not None}
        common = {k: v for k, v in state.items() if axes[k] is None}
        if batch_axis is None:
            out = jax.lax.map(lambda member: fn({**common, **member}, batch), stacked)
        else:
            out = jax.lax.map(lambda xs: fn({**common, **xs[0]}, xs[1]), (stacked, batch))
        new_state = out[0] if extra else out
        # Entries shared by all members come out once per member, identical: keep one.
        new_state = {k: v if axes[k] is not None else jax.tree.map(lambda a: a[0], v)
                     for k, v in new_state.items()}
        return (new_state, out[1]) if extra else new_state

    return mapped


def over_members(config):
    """`vmap_members` or `map_members`, as `group.vectorize` chooses."""
    return vmap_members if vectorize(config) else map_members


def check_widths(architecture: sae.Architecture, widths: dict[str, int],
                 hooks: tuple[str, ...]) -> None:
    """The batch holds what the SAE reads; in a hook group each hook's entry, all of one width
    (they are stacked on one hook axis)."""
    if not hooks:
        architecture.shape.entries(widths)
        return
    for hook in hooks:
        architecture.shape.entries({hook: widths[hook]})
    if len({widths[hook] for hook in hooks}) > 1:
        raise ConfigError(f"group.hooks={','.join(hooks)!r} have the widths "
                          f"{ {h: widths[h] for h in hooks} }; a hook group stacks its hooks, "
                          "so they must have one width: group the hooks of each width in a "
                          "run of its own.")


def stack_hooks(batch, hooks: tuple[str, ...]):
    """`{hook: [batch, d]}` -> `[len(hooks), batch, d]`, the hooks in order (a tuple of
    batches -> a tuple of those): what a hook group's members read, one hook each."""
    if isinstance(batch, tuple):
        return tuple(stack_hooks(b, hooks) for b in batch)
    return jnp.stack([batch[hook] for hook in hooks])


def over_hooks(config, fn, *, extra: bool):
    """fn(state, batch) of one hook's SAE (or coefficient group) -> the same over a hook
    group, each hook's state reading that hook's entry of every batch."""
    hooks = group_hooks(config)
    mapped = over_members(config)(fn, extra=extra, axes=HOOK_AXES, batch_axis=0)
    return lambda state, batch: mapped(state, stack_hooks(batch, hooks))


def member_state(state: dict, i: int, axes: dict = MEMBER_AXES) -> dict:
    """Member i of a group's state (one level: `axes`), laid out exactly like a single SAE's
    state."""
    return {key: value if axes[key] is None else jax.tree.map(lambda a: a[i], value)
            for key, value in state.items()}


def pick(value, i: int, grouped: bool):
    """Member i's entry of a value with a leading member axis; a single SAE's value itself."""
    return value[i] if grouped else value


class Members(NamedTuple):
    """Who the SAEs of a run are: one per hook of `hooks` (outer) x sparsity coefficient of
    `coefficients` (inner), flattened in that order; a single SAE when both are empty. Every
    value with a member axis (the state, a step's metrics) is indexed through here."""

    hooks: tuple[str, ...]
    coefficients: tuple[float, ...]

    @property
    def grouped(self) -> bool:
        return bool(self.hooks or self.coefficients)

    @property
    def size(self) -> int:
        """How many SAEs: 1 for a single SAE."""
        return max(len(self.hooks), 1) * max(len(self.coefficients), 1)

    @property
    def levels(self) -> tuple[tuple[str, dict], ...]:
        """The stacked member levels, outermost first: (logical axis, the entries stacked)."""
        return ((("hook", HOOK_AXES),) if self.hooks else ()) + (
            (("group", MEMBER_AXES),) if self.coefficients else ())

    def indices(self, i: int) -> tuple[int, ...]:
        """Member i's index at each level."""
        if self.hooks and self.coefficients:
            return divmod(i, len(self.coefficients))
        return (i,) if self.grouped else ()

    def hook(self, i: int) -> str | None:
        """Member i's hook in a hook group; None where every member reads the batch's one."""
        return self.hooks[self.indices(i)[0]] if self.hooks else None

    def coefficient(self, i: int) -> float | None:
        return self.coefficients[self.indices(i)[-1]] if self.coefficients else None

    def state(self, state: dict, i: int) -> dict:
        """Member i's state, laid out exactly like a single SAE's state."""
        for (_, axes), index in zip(self.levels, self.indices(i)):
            state = member_state(state, index, axes)
        return state

    def pick(self, value, i: int):
        """Member i's entry of a value with the members' axes (a step's metric)."""
        for index in self.indices(i):
            value = value[index]
        return value


def members(config) -> Members:
    return Members(group_hooks(config), group_coefficients(config))


# ------------------------------------------------------------------------------------------
# Where each SAE's files go (the workdir's layout: saejax/workdir.py).
# ------------------------------------------------------------------------------------------
class Output(NamedTuple):
    """Where one SAE's metrics go: the run's workdir, or a group member's folder."""

    name: str                     # a member's name (l1-0.3); "" for a single SAE
    workdir: str
    metrics_log: MetricsLog
    ckpt: checkpoint.Checkpointer | None  # a member's own copy of its checkpoints


def member_name(architecture: sae.Architecture, coefficient: float | None,
                hook: str | None = None) -> str:
    """A member's name: its coefficient as the sweep names a point of it (l1-0.3), its hook
    (blocks.8.hook_resid_post), or both (blocks.8.hook_resid_post_l1-0.3)."""
    parts = [] if hook is None else ["".join(c if c.isalnum() or c in "._-" else "-"
                                             for c in hook)]
    if coefficient is not None:
        parts.append(workdirs.member_name(architecture.sparsity_coefficient, coefficient))
    return "_".join(parts)


def open_checkpointer(config, workdir: str) -> checkpoint.Checkpointer:
    """The checkpoints of a run's (or a member's) workdir, keeping `train.keep_checkpoints`."""
    return checkpoint.Checkpointer(workdir, max_to_keep=int(config.train.keep_checkpoints),
                                   save_interval_steps=1)


def member_config(config, architecture: sae.Architecture, hook: str | None,
                  coefficient: float | None):
    """The config of the single run a member equals: no group, its coefficient, and in a hook
    group its hook alone (`lm.hook`, and for stores `data.path` its hook's store)."""
    member = config.copy_and_resolve_references()
    with member.unlocked():
        member.group.sparsity_coefficients = ()
        member.group.member_workdirs = ()
        member.group.hooks = ""
        if coefficient is not None:
            member.sae[architecture.sparsity_coefficient] = coefficient
        if hook is not None:
            member.lm.hook = hook
            if member.data.source == "store":
                stores = dict(zip(lockstep.store_hooks(config.data.path),
                                  lockstep.split_paths(config.data.path)))
                member.data.path = stores[hook]
    return member


def _member_folders(config, workdir: str, group: Members, names: list[str]) -> tuple[str, ...]:
    """`group.member_workdirs`, or <workdir>/members/<name>/ (workdirs.member_folder: an old
    coefficient group's members/l1_coefficient-0.3/ is used where it is there)."""
    if tuple(config.group.member_workdirs):
        return tuple(str(f) for f in config.group.member_workdirs)
    if not group.hooks:
        coefficient_name = sae.from_config(config.sae).sparsity_coefficient
        return tuple(workdirs.member_folder(workdir, coefficient_name, c)
                     for c in group.coefficients)
    return tuple(paths.join(workdir, workdirs.MEMBERS_DIR, name) for name in names)


def open_outputs(config, workdir: str, start_step: int,
                 architecture: sae.Architecture) -> list[Output]:
    """A single SAE writes its metrics in the workdir. A group writes one output per member,
    laid out like a single run's workdir (config, checkpoints, metrics, summary), in
    `group.member_workdirs` (a sweep's point folders) or by default in
    <workdir>/members/<member name>/."""
    group = members(config)
    if not group.grouped:
        return [Output("", workdir, _metrics_log(config, workdir, start_step), None)]
    names = [member_name(architecture, group.coefficient(i), group.hook(i))
             for i in range(group.size)]
    outputs = []
    for i, (name, member_dir) in enumerate(
            zip(names, _member_folders(config, workdir, group, names), strict=True)):
        paths.makedirs(member_dir)
        one = member_config(config, architecture, group.hook(i), group.coefficient(i))
        write_config(one, member_dir)
        member_ckpt = open_checkpointer(config, member_dir)
        # Member checkpoints are copies of the group's: steps past the group's restored step
        # (saved before a kill) will be written again, identically.
        member_ckpt.delete_after(start_step)
        outputs.append(Output(
            name, member_dir, _metrics_log(one, member_dir, start_step),
            member_ckpt))
    return outputs


def _metrics_log(config, workdir: str, start_step: int) -> MetricsLog:
    """`workdir/metrics.jsonl`, mirrored to TensorBoard and W&B as `config.logging` asks."""
    return MetricsLog(paths.join(workdir, "metrics.jsonl"), start_step,
                      open_mirrors=lambda: tracking.open_mirrors(config, workdir, start_step))


def save_members(group: Members, outputs: list[Output], step: int, state: dict,
                 data_state: dict) -> None:
    """Each member's slice of a group's state, in its own folder (nothing for a single SAE)."""
    for i, output in enumerate(outputs):
        if output.ckpt is not None:
            output.ckpt.save(step, group.state(state, i), data_state, force=True)


def close(ckpt: checkpoint.Checkpointer, outputs: list[Output],
          summaries: list[dict] | None = None) -> None:
    """Closes the checkpoints and the metrics' mirrors (giving them each SAE's final
    evaluations, `summaries`, when the run finished)."""
    ckpt.close()
    for i, output in enumerate(outputs):
        if output.ckpt is not None:
            output.ckpt.close()
        output.metrics_log.close(summaries[i] if summaries is not None else None)
