"""Training one SAE (or a group of them): `train_and_evaluate(config, workdir)`, read top to
bottom in the order data flows. The pieces it calls live in their own modules: the state and
the pure step in `saejax.step`, the jitted, sharded functions in `saejax.trainer`, a group's
member axis and folders in `saejax.groups`, the loop in `saejax.loop`.

Everything a run produces lives under its workdir: `config.json` (the resolved config),
`checkpoints/` (orbax), `metrics.jsonl` (one line per logging step) and `summary.json`.
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
        trainer.architecture.shape.entries(source.widths)  # the batch has what the SAE reads
        logging.info("SAE %s: d=%d, n_latents=%d (x%d), %.3g FLOPs per token.",
                     trainer.architecture.name, source.d, trainer.n_latents,
                     config.sae.expansion_factor, trainer.flops_per_token)

        # Checkpoint: resuming from the newest readable step is the first branch ------------
        ckpt = groups.open_checkpointer(config, workdir)
        state, seconds_before = _restore_or_init(config, trainer, ckpt, source)
        outputs = groups.open_outputs(config, workdir, int(state["step"]), trainer.architecture)

        # Loop -------------------------------------------------------------------------------
        mmcs = _mmcs(source, mesh, grouped=bool(group_coefficients(config)))
        state, train_seconds = loop.train(config, trainer, state, source, mesh, ckpt, outputs,
                                          mmcs=mmcs, seconds_before=seconds_before)

        # Evals ------------------------------------------------------------------------------
        evaluated, final_mmcs = _evaluate(config, trainer, state, source, mmcs)
        downstream = _downstream(config, state, trainer.architecture, mesh, source.d,
                                 len(outputs))
        summaries = _summaries(config, trainer, state, evaluated, final_mmcs, downstream,
                               d=source.d, train_seconds=train_seconds)
        groups.close(ckpt, outputs)

    # Summary --------------------------------------------------------------------------------
    return _write_summaries(config, workdir, outputs, summaries)


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


def _mmcs(source: data.KeyedSource, mesh, *, grouped: bool) -> Callable | None:
    """W_dec -> its MMCS against the source's true features (per member of a group), or None
    for a source without them."""
    if getattr(source, "true_features", None) is None:
        return None
    true_features = jax.device_put(source.true_features, sharding.replicated(mesh))
    mmcs_fn = jax.jit(jax.vmap(evals.mmcs, in_axes=(0, None)) if grouped else evals.mmcs)
    return lambda W_dec: mmcs_fn(W_dec, true_features)


def _evaluate(config, trainer: Trainer, state: dict, source: data.KeyedSource,
              mmcs: Callable | None) -> tuple[dict, np.ndarray | None]:
    """The final core evals, averaged over `evals.eval_batches` held-out batches (a value per
    member in a group): mse, fvu, l0, dead_fraction; and the final MMCS, where there is one."""
    results = [jax.device_get(trainer.eval_step(state["params"], state["input_scale"],
                                                source.eval_batch(i)))
               for i in range(int(config.evals.eval_batches))]
    results = {k: np.mean([r[k] for r in results], axis=0) for k in results[0]}
    results["dead_fraction"] = np.asarray(evals.dead_fraction(
        state["tokens_since_fired"], int(config.evals.dead_window_tokens)))
    return results, None if mmcs is None else np.asarray(mmcs(state["params"]["W_dec"]))


def _downstream(config, state: dict, architecture: sae.Architecture, mesh, d: int,
                n_saes: int) -> list[dict]:
    """Per SAE: loss recovered and KL with it spliced into the LM at `lm.hook` (a transcoder:
    reading its input hook, replacing its target hook; `shape.spliced_hooks`) by
    `evals.downstream_metrics`, or nothing when `evals.loss_recovered_sequences` is 0."""
    n = int(config.evals.loss_recovered_sequences)
    if not n:
        return [{} for _ in range(n_saes)]
    input_hook, hook = architecture.shape.spliced_hooks(str(config.lm.hook))
    lm_config = config.lm.copy_and_resolve_references()
    with lm_config.unlocked():
        lm_config.hook = hook
    model = lm.load(lm_config, d=d, mesh=mesh, rules=config.sharding_rules)
    _, tokens = lm.split(config.lm, model, n)

    def reconstruct(sae_state, x):
        params, scale = sae_state
        x = x * scale
        return architecture.decode(params, architecture.encode(params, x, config.sae), x) / scale

    members = ([member_state(state, i) for i in range(n_saes)] if group_coefficients(config)
               else [state])
    results = downstream.evaluate(
        model, tokens, batch_sequences=int(config.lm.batch_sequences), reconstruct=reconstruct,
        sae_params=[(m["params"], m["input_scale"]) for m in members], mesh=mesh,
        keep=lm.keep_mask(tokens, *lm.exclusion(config.lm, model)), input_hook=input_hook)
    for i, result in enumerate(results):
        logging.info("Loss recovered%s: %.4f (CE clean %.4f, with the SAE %.4f, zero-ablated "
                     "%.4f; KL %.4g)", f" ({i})" if n_saes > 1 else "",
                     result["loss_recovered"], result["ce_clean"], result["ce_sae"],
                     result["ce_zero_ablation"], result["kl_sae"])
    return results


def _summaries(config, trainer: Trainer, state: dict, evaluated: dict,
               mmcs: np.ndarray | None, downstream: list[dict], *, d: int,
               train_seconds: float) -> list[dict]:
    """Per SAE, what `summary.json` holds: its final evals and what was trained, for how
    long."""
    architecture, step = trainer.architecture, int(state["step"])
    batch_size = int(config.train.batch_size)
    coefficients = group_coefficients(config)
    grouped = bool(coefficients)
    summaries = []
    for i, downstream_metrics in enumerate(downstream):
        summary: dict[str, Any] = {
            "step": step,
            "tokens": step * batch_size,
            **{k: float(groups.pick(v, i, grouped)) for k, v in evaluated.items()},
            "architecture": architecture.name,
            "shape": architecture.shape.name,
            "d": d,
            "n_latents": trainer.n_latents,
            "expansion_factor": int(config.sae.expansion_factor),
            "flops_per_token": trainer.flops_per_token,
            "train_flops": trainer.flops_per_token * step * batch_size,
            "train_seconds": train_seconds,
        }
        if architecture.sparsity_coefficient:
            summary[architecture.sparsity_coefficient] = (
                coefficients[i] if grouped
                else float(config.sae[architecture.sparsity_coefficient]))
        elif architecture.level_field:
            summary[architecture.level_field] = config.sae[architecture.level_field]
        if mmcs is not None:
            summary["mmcs"] = float(groups.pick(mmcs, i, grouped))
        summary.update(downstream_metrics)
        summaries.append(summary)
    return summaries


def _write_summaries(config, workdir: str, outputs: list[groups.Output],
                     summaries: list[dict]) -> dict:
    """Writes each member's summary in its folder and the run's in the workdir (a group's
    names its members'); stops with an error when the final evaluation is NaN."""
    grouped = bool(group_coefficients(config))
    if grouped:
        for output, member_summary in zip(outputs, summaries, strict=True):
            write_json(paths.join(output.workdir, "summary.json"), member_summary)
    summary = summaries[0] if not grouped else {
        "step": summaries[0]["step"], "tokens": summaries[0]["tokens"],
        "members": {o.name: s for o, s in zip(outputs, summaries)}}
    write_json(paths.join(workdir, "summary.json"), summary)
    logging.info("Summary: %s", json.dumps(summary))
    if any(math.isnan(s["mse"]) for s in summaries):
        raise FloatingPointError("Final evaluation is NaN.")
    return summary
