"""Training one SAE (or a group of them): `train_and_evaluate(config, workdir)`, read top to
bottom in the order data flows. The pieces it calls live in their own modules: the state and
the pure step in `saejax.step`, the jitted, sharded functions in `saejax.trainer`, a group's
member axis and folders in `saejax.groups`, the loop in `saejax.loop`.

Everything a run produces lives under its workdir: `config.json` (the resolved config),
`checkpoints/` (orbax), `metrics.jsonl` (one line per logging step, mirrored to TensorBoard
event files in `tensorboard/` and to W&B when asked: `saejax.tracking`) and `summary.json`.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

from absl import logging
import jax
import numpy as np

from saejax import checkpoint, data, evals, groups, loop, paths, sae, sharding, validation
from saejax.data import lm
from saejax.evals import downstream
from saejax.trainer import Trainer
from saejax.workdir import write_config, write_json
# Re-exported where user code, tests and benchmarks have always found them (train.load_params,
# train.make_trainer, ...).
from saejax.checkpoint import load_params  # noqa: F401
from saejax.errors import SIGTERM_EXIT_CODE, ConfigError, Preempted  # noqa: F401
from saejax.groups import group_coefficients, member_name, member_state  # noqa: F401
from saejax.step import (MEMBER_AXES, eval_step, init_from_data,  # noqa: F401
                         init_train_state, resample_step, state_logical_axes, train_step)
from saejax.trainer import make_trainer  # noqa: F401
from saejax.workdir import (RESUMABLE_CHANGES, MetricsLog, config_changes,  # noqa: F401
                            flatten_config)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) one SAE, or a group, in `workdir` and returns its final summary."""
    # Config and workdir ---------------------------------------------------------------------
    validation.validate(config, jax.device_count())
    paths.makedirs(workdir)
    write_config(config, workdir)

    # Mesh -----------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh)
    logging.info("Mesh %s over %d %s devices.", dict(mesh.shape), mesh.size,
                 jax.default_backend())
    if int(config.evals.loss_recovered_sequences):  # the LM is split like the dictionary
        lm.check_split(config.lm, mesh, config.sharding_rules)

    with sharding.activate(mesh, config.sharding_rules):
        # Input ------------------------------------------------------------------------------
        source = data.make_source(config, mesh=mesh, rules=config.sharding_rules)

        # Model & optimizer: the state's shardings and the jitted steps ---------------------
        trainer = make_trainer(config, mesh, d=source.d, batch_sharding=source.sharding)
        group = groups.members(config)
        groups.check_widths(trainer.architecture, source.widths, group.hooks)
        logging.info("SAE %s: d=%d, n_latents=%d (x%d), %.3g FLOPs per token.",
                     trainer.architecture.name, source.d, trainer.n_latents,
                     config.sae.expansion_factor, trainer.flops_per_token)

        # Checkpoint: resuming from the newest readable step is the first branch ------------
        ckpt = groups.open_checkpointer(config, workdir)
        state, seconds_before = _restore_or_init(config, trainer, ckpt, source)
        outputs = groups.open_outputs(config, workdir, int(state["step"]), trainer.architecture)

        # Loop -------------------------------------------------------------------------------
        mmcs = _mmcs(source, mesh, trainer.architecture.shape, group)
        state, train_seconds = loop.train(config, trainer, state, source, mesh, ckpt, outputs,
                                          mmcs=mmcs, seconds_before=seconds_before)

        # Evals ------------------------------------------------------------------------------
        evaluated, final_mmcs = _evaluate(config, trainer, state, source, mmcs)
        downstream = _downstream(config, state, trainer.architecture, mesh, source.d, group)
        recovery = _recovery(config, trainer, state, source, group)
        hierarchy = _hierarchy(config, trainer, state, source, group)
        summaries = _summaries(config, trainer, state, evaluated, final_mmcs,
                               [{**r, **h, **m} for r, h, m in
                                zip(recovery, hierarchy, downstream, strict=True)],
                               d=source.d, train_seconds=train_seconds,
                               hook=_single_hook(config, source))
        groups.close(ckpt, outputs, summaries)

    # Summary --------------------------------------------------------------------------------
    return _write_summaries(workdir, group, outputs, summaries)


# ------------------------------------------------------------------------------------------
# The pieces of train_and_evaluate, in the order it calls them.
# ------------------------------------------------------------------------------------------
def _restore_or_init(config, trainer: Trainer, ckpt: checkpoint.Checkpointer,
                     source: data.KeyedSource) -> tuple[dict, float]:
    """The state and data position of the newest readable checkpoint, or a fresh state
    (initialised from data where the config asks); and the training seconds of earlier
    sessions."""
    restored = ckpt.restore_latest(trainer.abstract_state)
    if restored is not None:
        state, data_state = restored
        # Training seconds of earlier sessions ride with the data position (0 in checkpoints
        # written before they did).
        data_state = dict(data_state)
        seconds_before = float(data_state.pop("train_seconds", 0.0))
        source.restore(data_state)
    else:
        seconds_before = 0.0
        state = trainer.init(jax.random.PRNGKey(int(config.seed)))
        if config.data.normalize_inputs or config.sae.b_dec_init != "zeros":
            init_batches = int(config.data.init_batches)
            state = trainer.init_from_data(
                state, tuple(source.next_batch() for _ in range(init_batches)))
    logging.info("%s at step %d of %d.", "Resuming" if restored else "Starting",
                 int(state["step"]), int(config.train.steps))
    return state, seconds_before


def _mmcs(source: data.KeyedSource, mesh, shape, group: groups.Members) -> Callable | None:
    """params -> their decoder's MMCS against the source's true features (per member of a
    group; the shape's `decoder_rows`), or None for a source without them (an LM's, a store's:
    every hook group's)."""
    if getattr(source, "true_features", None) is None or group.hooks:
        return None
    true_features = jax.device_put(source.true_features, sharding.replicated(mesh))
    mmcs_fn = jax.jit(jax.vmap(evals.mmcs, in_axes=(0, None)) if group.grouped
                      else evals.mmcs)
    return lambda params: mmcs_fn(sae.base.decoder_rows(shape, params), true_features)


def _evaluate(config, trainer: Trainer, state: dict, source: data.KeyedSource,
              mmcs: Callable | None) -> tuple[dict, np.ndarray | None]:
    """The final core evals, averaged over `evals.eval_batches` held-out batches (a value per
    member in a group): mse, fvu, l0, dead_fraction; and the final MMCS, where there is one."""
    results = [jax.device_get(trainer.eval_step(state["params"], state["input_scale"],
                                                source.eval_batch(i)))
               for i in range(int(config.evals.eval_batches))]
    results = {k: np.mean([r[k] for r in results], axis=0) for k in results[0]}
    latent_ndim = len(sae.base.latent_axes(trainer.architecture.shape))
    results["dead_fraction"] = np.asarray(evals.dead_fraction(
        state["tokens_since_fired"], int(config.evals.dead_window_tokens), latent_ndim))
    return results, None if mmcs is None else np.asarray(mmcs(state["params"]))


def _inference_encode(config, architecture: sae.Architecture):
    """`encode(params, input_scale, batch) -> latents`, jitted: an SAE's inference encoding of a
    raw held-out batch, in the units it trained in, what the ground-truth evaluations read."""
    shape = architecture.shape
    return jax.jit(lambda params, scale, batch: architecture.encode(
        params, shape.input(sae.base.scale_batch(shape, data.as_batch(batch), scale)),
        config.sae))


def _recovery(config, trainer: Trainer, state: dict, source: data.KeyedSource,
              group: groups.Members) -> list[dict]:
    """Per SAE, SAELens' synthetic-benchmark scores (`evals.recovery_metrics`: MCC,
    uniqueness, firing precision / recall / F1) over the held-out batches of a source with
    true features; nothing for a source without them."""
    if getattr(source, "true_features", None) is None:
        return [{} for _ in range(group.size)]
    architecture = trainer.architecture
    encode = _inference_encode(config, architecture)
    batches = range(int(config.evals.eval_batches))
    codes = [source.eval_codes(i) for i in batches]
    members = [group.state(state, i) for i in range(group.size)]
    return [evals.recovery_metrics(
        evals.decoder_rows(architecture.shape, m["params"]), source.true_features,
        [encode(m["params"], m["input_scale"], source.eval_batch(i)) for i in batches], codes)
        for m in members]


def _hierarchy(config, trainer: Trainer, state: dict, source: data.KeyedSource,
               group: groups.Members) -> list[dict]:
    """Per SAE, its `absorption` on the held-out batches of a source with a hierarchy of true
    features (`evals.hierarchy_metrics`, with the SAE's inference encoding: BatchTopK's
    threshold), or nothing for other sources."""
    if getattr(source, "parents", None) is None:
        return [{} for _ in range(group.size)]
    architecture = trainer.architecture
    members = [group.state(state, i) for i in range(group.size)]
    encode = _inference_encode(config, architecture)
    return [{"absorption": evals.hierarchy_metrics(
                lambda batch, m=m: encode(m["params"], m["input_scale"], batch),
                evals.decoder_rows(architecture.shape, m["params"]), source,
                int(config.evals.eval_batches))["absorption"]}
            for m in members]


def _downstream(config, state: dict, architecture: sae.Architecture, mesh, d: int,
                group: groups.Members) -> list[dict]:
    """Per SAE: loss recovered and KL with it spliced into the LM at `lm.hook` (a hook group's
    member: at its hook; a transcoder: reading its input hook, replacing its target hook;
    `shape.spliced_hooks`), or a cross-layer transcoder's replacement model (every MLP output
    it covers replaced at once), by `evals.downstream_metrics`; nothing when
    `evals.loss_recovered_sequences` is 0."""
    n = int(config.evals.loss_recovered_sequences)
    if not n:
        return [{} for _ in range(group.size)]
    member_hooks = [group.hook(i) or str(config.lm.hook) for i in range(group.size)]
    results = [None] * group.size
    for hook in dict.fromkeys(member_hooks):  # a hook group's members, each at its own hook
        at_hook = [i for i, h in enumerate(member_hooks) if h == hook]
        params = [(m["params"], m["input_scale"]) for m in (group.state(state, i)
                                                             for i in at_hook)]
        for i, result in zip(at_hook, downstream.evaluate_run(
                config, architecture, params, mesh, d=d, sequences=n, hook=hook), strict=True):
            results[i] = result
    for i, result in enumerate(results):
        logging.info("Loss recovered%s%s: %.4f (CE clean %.4f, with the SAE %.4f, zero-ablated "
                     "%.4f; KL %.4g)", " (replacement model)"
                     if downstream.replaces_layers(architecture.shape) else "",
                     f" ({i})" if group.grouped else "", result["loss_recovered"],
                     result["ce_clean"], result["ce_sae"], result["ce_zero_ablation"],
                     result["kl_sae"])
    return results


def _single_hook(config, source) -> str | None:
    """The hook a single-hook SAE reads (its batch's one entry), for its summary; None for a
    dictionary of several hooks. A hook group's members each name their own."""
    if config.sae.shape != "single_hook" or len(source.widths) != 1:
        return None
    (hook,) = source.widths
    return hook


def _summaries(config, trainer: Trainer, state: dict, evaluated: dict,
               mmcs: np.ndarray | None, per_sae: list[dict], *, d: int,
               train_seconds: float, hook: str | None) -> list[dict]:
    """Per SAE, what `summary.json` holds: its final evals (`per_sae`: each SAE's own, the
    downstream and ground-truth metrics) and what was trained, for how long."""
    architecture, step = trainer.architecture, int(state["step"])
    batch_size = int(config.train.batch_size)
    group = groups.members(config)
    summaries = []
    for i, own_metrics in enumerate(per_sae):
        summary: dict[str, Any] = {
            "step": step,
            "tokens": step * batch_size,
            **{k: float(group.pick(v, i)) for k, v in evaluated.items()},
            "architecture": architecture.name,
            "shape": architecture.shape.name,
            "d": d,
            "n_latents": trainer.n_latents,
            "expansion_factor": int(config.sae.expansion_factor),
            "flops_per_token": trainer.flops_per_token,
            "train_flops": trainer.flops_per_token * step * batch_size,
            "train_seconds": train_seconds,
        }
        if group.hook(i) or hook:
            summary["hook"] = group.hook(i) or hook
        if architecture.sparsity_coefficient:
            summary[architecture.sparsity_coefficient] = (
                group.coefficient(i) if group.coefficients
                else float(config.sae[architecture.sparsity_coefficient]))
        elif architecture.level_field:
            summary[architecture.level_field] = config.sae[architecture.level_field]
        if mmcs is not None:
            summary["mmcs"] = float(group.pick(mmcs, i))
        summary.update(own_metrics)
        summaries.append(summary)
    return summaries


def _write_summaries(workdir: str, group: groups.Members, outputs: list[groups.Output],
                     summaries: list[dict]) -> dict:
    """Writes each member's summary in its folder and the run's in the workdir (a group's
    names its members'); stops with an error when the final evaluation is NaN."""
    if group.grouped:
        for output, member_summary in zip(outputs, summaries, strict=True):
            write_json(paths.join(output.workdir, "summary.json"), member_summary)
    summary = summaries[0] if not group.grouped else {
        "step": summaries[0]["step"], "tokens": summaries[0]["tokens"],
        "members": {o.name: s for o, s in zip(outputs, summaries)}}
    write_json(paths.join(workdir, "summary.json"), summary)
    logging.info("Summary: %s", json.dumps(summary))
    if any(math.isnan(s["mse"]) for s in summaries):
        raise FloatingPointError("Final evaluation is NaN.")
    return summary
