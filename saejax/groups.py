"""A group: SAEs that differ only in their sparsity coefficient (`group.sparsity_coefficients`),
trained as one program on the same batches. Their state is stacked on a leading member axis
(`step.MEMBER_AXES`); the step functions run over the members with `vmap` or `lax.map`; each
member is written out like a single run, in a folder of its own.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from saejax import checkpoint, paths, sae, tracking
from saejax import workdir as workdirs
from saejax.step import MEMBER_AXES
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


def vmap_members(fn, *, extra: bool):
    """fn(state, shared) -> state, or (state, value) with `extra`, over a stacked group."""
    return jax.vmap(fn, in_axes=(MEMBER_AXES, None),
                    out_axes=(MEMBER_AXES, 0) if extra else MEMBER_AXES)


def map_members(fn, *, extra: bool):
    """As `vmap_members`, but one member after another inside the same program."""

    def mapped(state, shared):
        stacked = {k: v for k, v in state.items() if MEMBER_AXES[k] is not None}
        common = {k: v for k, v in state.items() if MEMBER_AXES[k] is None}
        out = jax.lax.map(lambda member: fn({**common, **member}, shared), stacked)
        new_state = out[0] if extra else out
        # Entries shared by all members come out once per member, identical: keep one.
        new_state = {k: v if MEMBER_AXES[k] is not None else jax.tree.map(lambda a: a[0], v)
                     for k, v in new_state.items()}
        return (new_state, out[1]) if extra else new_state

    return mapped


def over_members(config):
    """`vmap_members` or `map_members`, as `group.vectorize` chooses."""
    return vmap_members if vectorize(config) else map_members


def member_state(state: dict, i: int) -> dict:
    """Member i of a group's state, laid out exactly like a single SAE's state."""
    return {key: value if MEMBER_AXES[key] is None else jax.tree.map(lambda a: a[i], value)
            for key, value in state.items()}


def pick(value, i: int, grouped: bool):
    """Member i's entry of a value with a leading member axis; a single SAE's value itself."""
    return value[i] if grouped else value


# ------------------------------------------------------------------------------------------
# Where each SAE's files go (the workdir's layout: saejax/workdir.py).
# ------------------------------------------------------------------------------------------
class Output(NamedTuple):
    """Where one SAE's metrics go: the run's workdir, or a group member's folder."""

    name: str                     # a member's name (l1-0.3); "" for a single SAE
    workdir: str
    metrics_log: MetricsLog
    ckpt: checkpoint.Checkpointer | None  # a member's own copy of its checkpoints


def member_name(architecture: sae.Architecture, coefficient: float) -> str:
    """A member's name, as the sweep names a point of that coefficient: l1-0.3."""
    return workdirs.member_name(architecture.sparsity_coefficient, coefficient)


def open_checkpointer(config, workdir: str) -> checkpoint.Checkpointer:
    """The checkpoints of a run's (or a member's) workdir, keeping `train.keep_checkpoints`."""
    return checkpoint.Checkpointer(workdir, max_to_keep=int(config.train.keep_checkpoints),
                                   save_interval_steps=1)


def open_outputs(config, workdir: str, start_step: int,
                 architecture: sae.Architecture) -> list[Output]:
    """A single SAE writes its metrics in the workdir. A group writes one output per member,
    laid out like a single run's workdir (config, checkpoints, metrics, summary), in
    `group.member_workdirs` (a sweep's point folders) or by default in
    <workdir>/members/<member name>/ (workdirs.member_folder: an old workdir's
    members/l1_coefficient-0.3/ is used where it is there)."""
    coefficients = group_coefficients(config)
    if not coefficients:
        return [Output("", workdir, _metrics_log(config, workdir, start_step), None)]
    names = [member_name(architecture, c) for c in coefficients]
    folders = (tuple(str(f) for f in config.group.member_workdirs)
               or tuple(workdirs.member_folder(workdir, architecture.sparsity_coefficient, c)
                        for c in coefficients))
    members = []
    for coefficient, name, member_dir in zip(coefficients, names, folders, strict=True):
        paths.makedirs(member_dir)
        member_config = config.copy_and_resolve_references()
        with member_config.unlocked():
            member_config.group.sparsity_coefficients = ()
            member_config.group.member_workdirs = ()
            member_config.sae[architecture.sparsity_coefficient] = coefficient
        write_config(member_config, member_dir)
        member_ckpt = open_checkpointer(config, member_dir)
        # Member checkpoints are copies of the group's: steps past the group's restored step
        # (saved before a kill) will be written again, identically.
        member_ckpt.delete_after(start_step)
        members.append(Output(
            name, member_dir, _metrics_log(member_config, member_dir, start_step),
            member_ckpt))
    return members


def _metrics_log(config, workdir: str, start_step: int) -> MetricsLog:
    """`workdir/metrics.jsonl`, mirrored to TensorBoard and W&B as `config.logging` asks."""
    return MetricsLog(paths.join(workdir, "metrics.jsonl"), start_step,
                      open_mirrors=lambda: tracking.open_mirrors(config, workdir, start_step))


def save_members(outputs: list[Output], step: int, state: dict, data_state: dict) -> None:
    """Each member's slice of a group's state, in its own folder (nothing for a single SAE)."""
    for i, output in enumerate(outputs):
        if output.ckpt is not None:
            output.ckpt.save(step, member_state(state, i), data_state, force=True)


def close(ckpt: checkpoint.Checkpointer, outputs: list[Output],
          summaries: list[dict] | None = None) -> None:
    """Closes the checkpoints and the metrics' mirrors (giving them each SAE's final
    evaluations, `summaries`, when the run finished)."""
    ckpt.close()
    for i, output in enumerate(outputs):
        if output.ckpt is not None:
            output.ckpt.close()
        output.metrics_log.close(summaries[i] if summaries is not None else None)
