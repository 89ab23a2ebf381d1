"""Training one SAE: the train state, the pure sharded train step, and
`train_and_evaluate(config, workdir)`, read top to bottom in the order data flows.

Everything a run produces lives under its workdir: `config.json` (the resolved config),
`checkpoints/` (orbax), `metrics.jsonl` (one line per logging step) and `summary.json`.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from saejax import (checkpoint, cli, data, distributed, evals, optim, paths, sae, sharding,
                    validation)
from saejax import workdir as workdirs
from saejax.data import lm
# Re-exported where user code and tests have always found them (train.load_params, ...).
from saejax.checkpoint import load_params  # noqa: F401
from saejax.errors import SIGTERM_EXIT_CODE, ConfigError, Preempted  # noqa: F401
from saejax.workdir import (RESUMABLE_CHANGES, MetricsLog, config_changes,  # noqa: F401
                            flatten_config)
from saejax.workdir import jsonable as _jsonable, write_config as _write_config
from saejax.workdir import write_json as _write_json


# ------------------------------------------------------------------------------------------
# Train state and step (pure functions).
# ------------------------------------------------------------------------------------------
def init_train_state(key: jax.Array, sparsity_coefficient: jax.Array, *,
                     architecture: sae.Architecture, tx: optax.GradientTransformation, d: int,
                     n_latents: int, sae_config) -> dict:
    params_key, rng = jax.random.split(key)
    params = architecture.init(params_key, d, n_latents, sae_config)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "tokens_since_fired": jnp.zeros((n_latents,), jnp.int32),
        "density": evals.init_density(n_latents),
        # Inputs are multiplied by this before the SAE sees them (data.normalize_inputs).
        "input_scale": jnp.ones((), jnp.float32),
        # The weight of the sparsity term after warmup; differs between members of a group.
        "sparsity_coefficient": jnp.asarray(sparsity_coefficient, jnp.float32),
        "rng": rng,
    }


# How the state of a group of SAEs is stacked: these entries carry a leading member axis, the
# others (the step, the RNG, the input scale) are shared by every member.
MEMBER_AXES = {"step": None, "params": 0, "opt_state": 0, "tokens_since_fired": 0,
               "density": 0, "input_scale": None, "sparsity_coefficient": 0, "rng": None}


def state_logical_axes(architecture: sae.Architecture, tx: optax.GradientTransformation,
                       abstract_state: dict, *, grouped: bool = False) -> dict:
    """Logical axes of every array of the state; optimizer moments follow their params; the
    member axis of a group is `group`."""
    axes = architecture.param_axes
    opt_state = abstract_state["opt_state"]
    if grouped:  # tree_map_params needs the per-member structure, not the stacked one
        opt_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), opt_state)
    single = {
        "step": (),
        "params": axes,
        "opt_state": optax.tree_map_params(tx, lambda _, a: a, opt_state, axes,
                                           transform_non_params=lambda _: (),
                                           is_leaf=sharding.is_axes),
        "tokens_since_fired": ("latent",),
        "density": evals.Density(counts=("latent",), window_tokens=(), density=("latent",)),
        "input_scale": (),
        "sparsity_coefficient": (),
        "rng": (None,),
    }
    if not grouped:
        return single
    return {key: value if MEMBER_AXES[key] is None else
            jax.tree.map(lambda a: ("group", *a), value, is_leaf=sharding.is_axes)
            for key, value in single.items()}


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(state: dict, batch: jax.Array, *, architecture: sae.Architecture,
               tx: optax.GradientTransformation, sae_config, sparsity_warmup: optax.Schedule,
               lr_schedule: optax.Schedule, dead_window_tokens: int, density_window_tokens: int,
               dense_threshold: float, compute_dtype=jnp.float32) -> tuple[dict, dict]:
    """One optimisation step: `state, metrics = train_step(state, batch)`.

    The loss runs in `compute_dtype` (mixed precision: a bfloat16 copy of the float32 params
    and batch, so the matmuls and the [batch, n_latents] activations are bfloat16); its
    gradients come back through the cast as float32, for the float32 optimizer state.
    """
    step = state["step"]
    batch = batch * state["input_scale"]
    sparsity_coefficient = state["sparsity_coefficient"] * sparsity_warmup(step)

    dead = state["tokens_since_fired"] >= dead_window_tokens

    def loss_fn(params):
        params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        return architecture.loss(params, batch.astype(compute_dtype), sae_config,
                                 sparsity_coefficient, dead, step=step)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # Non-gradient buffers an architecture keeps in its params (BatchTopK's threshold).
    params = {**params, **{name: value.astype(params[name].dtype)
                           for name, value in aux.get("buffers", {}).items()}}
    # Architectures that never form the dense latents (sparse TopK) count firings themselves.
    counts = aux["fire_counts"] if "fire_counts" in aux else evals.fire_counts(aux["latents"])
    n_tokens = batch.shape[0]
    tokens_since_fired = evals.update_tokens_since_fired(state["tokens_since_fired"], counts,
                                                         n_tokens)
    density = evals.update_density(state["density"], counts, n_tokens, density_window_tokens)
    metrics = {
        "loss": loss,
        "mse": aux["mse"],
        "fvu": evals.fvu(batch, aux["x_hat"]),
        "l0": evals.l0_of_counts(counts, n_tokens),
        "dead_fraction": evals.dead_fraction(tokens_since_fired, dead_window_tokens),
        "dense_fraction": evals.dense_fraction(density.density, dense_threshold),
        "log_density_histogram": evals.log_density_histogram(density.density),
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": lr_schedule(step) * optim.rewarm_factor(state["opt_state"]),
        "finite": jnp.isfinite(loss) & _all_finite(params),
    }
    for name in ("auxk_loss", "auxiliary_loss", "balance_loss", "dropped_fraction"):
        if name in aux:
            metrics[name] = aux[name]
    if architecture.sparsity_coefficient:
        metrics["sparsity_loss"] = aux["sparsity_loss"]
        metrics[architecture.sparsity_coefficient] = sparsity_coefficient
    new_state = dict(state, step=step + 1, params=params, opt_state=opt_state,
                     tokens_since_fired=tokens_since_fired, density=density)
    return new_state, metrics


def resample_step(state: dict, batches: tuple[jax.Array, ...], *,
                  architecture: sae.Architecture, tx: optax.GradientTransformation, sae_config,
                  dead_window_tokens: int, encoder_scale: float) -> tuple[dict, jax.Array]:
    """Resamples the dead latents from `batches`; returns the state and how many were dead."""
    x = jnp.concatenate(batches, axis=0) * state["input_scale"]
    params = state["params"]
    x_hat = architecture.decode(params, architecture.encode(params, x, sae_config))
    dead = state["tokens_since_fired"] >= dead_window_tokens
    key = jax.random.fold_in(state["rng"], state["step"])
    params, opt_state = optim.resample_dead_latents(
        key, params, state["opt_state"], x, x_hat, dead, tx=tx, encoder_scale=encoder_scale,
        param_axes=architecture.param_axes)
    tokens_since_fired = jnp.where(dead, 0, state["tokens_since_fired"])
    return (dict(state, params=params, opt_state=opt_state,
                 tokens_since_fired=tokens_since_fired), jnp.sum(dead))


def init_from_data(state: dict, batches: tuple[jax.Array, ...], *, normalize_inputs: bool,
                   b_dec_init: str) -> dict:
    """Data-dependent initialisation on a fresh run: the input scale that gives unit mean squared
    norm (kept in the state, so a saved SAE applies it to raw activations) and `b_dec` at the
    geometric median (Towards Monosemanticity) or mean of the scaled inputs."""
    x = jnp.concatenate(batches, axis=0)
    scale = (jax.lax.rsqrt(jnp.mean(jnp.sum(jnp.square(x), axis=-1))) if normalize_inputs
             else state["input_scale"])
    x = x * scale
    params = dict(state["params"])
    if b_dec_init == "geometric_median":
        params["b_dec"] = sae.base.geometric_median(x)
    elif b_dec_init == "mean":
        params["b_dec"] = jnp.mean(x, axis=0)
    return dict(state, params=params, input_scale=scale.astype(jnp.float32))


def eval_step(params: dict, input_scale: jax.Array, batch: jax.Array, *,
              architecture: sae.Architecture, sae_config) -> dict:
    batch = batch * input_scale
    latents = architecture.encode(params, batch, sae_config)
    x_hat = architecture.decode(params, latents)
    return {"mse": evals.mse(batch, x_hat), "fvu": evals.fvu(batch, x_hat),
            "l0": evals.l0(latents)}


class Trainer(NamedTuple):
    """The compiled pieces of one run on one mesh; `train_and_evaluate` drives them."""

    architecture: sae.Architecture
    n_latents: int
    flops_per_token: int
    tx: optax.GradientTransformation
    state_shardings: Any
    abstract_state: Any           # ShapeDtypeStructs carrying their shardings
    init: Callable[[jax.Array], dict]  # key -> state, created already sharded
    train_step: Callable[[dict, jax.Array], tuple[dict, dict]]
    resample_step: Callable[[dict, tuple], tuple[dict, jax.Array]]
    init_from_data: Callable[[dict, tuple], dict]
    eval_step: Callable[[dict, jax.Array, jax.Array], dict]  # params, input_scale, batch


def _vectorize_group(config) -> bool:
    """`vmap` the members (batched matmuls, for accelerators) or `map` them, one after another
    inside the step (measured a little faster on CPU; benchmarks/RESULTS.md)."""
    if config.group.vectorize == "auto":
        return jax.default_backend() != "cpu"
    return config.group.vectorize == "vmap"


def _vmap_members(fn, *, extra: bool):
    """fn(state, shared) -> state, or (state, value) with `extra`, over a stacked group."""
    return jax.vmap(fn, in_axes=(MEMBER_AXES, None),
                    out_axes=(MEMBER_AXES, 0) if extra else MEMBER_AXES)


def _map_members(fn, *, extra: bool):
    """As `_vmap_members`, but one member after another inside the same program."""

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


def group_coefficients(config) -> tuple[float, ...]:
    """The sparsity coefficients of a group's members; () for a single SAE."""
    return tuple(float(c) for c in config.group.sparsity_coefficients)


def make_trainer(config, mesh, *, d: int, batch_sharding) -> Trainer:
    """Builds the sharded init, train step and eval step for `config` on `mesh`.

    With `group.sparsity_coefficients` set, every function handles a group: one SAE per
    coefficient, stacked on a leading member axis and vmapped, all reading the same batch.
    Call inside `sharding.activate(mesh, rules)`: the sharded top-k reads the ambient mesh.
    """
    rules = config.sharding_rules
    total_steps = int(config.train.steps)
    architecture = sae.get(config.sae.architecture)
    n_latents = validation.n_latents(config)
    coefficients = group_coefficients(config)
    grouped = bool(coefficients)
    tx = optim.make_optimizer(config.optim, total_steps,
                              rewarm_steps=int(config.resample.rewarm_steps))
    dead_window_tokens = int(config.evals.dead_window_tokens)

    init_one = functools.partial(init_train_state, architecture=architecture, tx=tx, d=d,
                                 n_latents=n_latents, sae_config=config.sae)
    if grouped:
        init = lambda key: jax.vmap(init_one, in_axes=(None, 0), out_axes=MEMBER_AXES)(
            key, jnp.asarray(coefficients, jnp.float32))
    else:
        default = (config.sae[architecture.sparsity_coefficient]
                   if architecture.sparsity_coefficient else 0.0)
        init = lambda key: init_one(key, default)
    step = functools.partial(
        train_step, architecture=architecture, tx=tx, sae_config=config.sae,
        sparsity_warmup=optim.l1_coefficient_schedule(1.0, config.optim.l1_warmup_steps),
        lr_schedule=optim.learning_rate_schedule(config.optim, total_steps),
        dead_window_tokens=dead_window_tokens,
        density_window_tokens=int(config.evals.density_window_tokens),
        dense_threshold=float(config.evals.dense_threshold),
        compute_dtype=jnp.dtype(config.train.compute_dtype))
    resample = functools.partial(resample_step, architecture=architecture, tx=tx,
                                 sae_config=config.sae, dead_window_tokens=dead_window_tokens,
                                 encoder_scale=float(config.resample.encoder_scale))
    from_data = functools.partial(init_from_data,
                                  normalize_inputs=bool(config.data.normalize_inputs),
                                  b_dec_init=str(config.sae.b_dec_init))
    evaluate = functools.partial(eval_step, architecture=architecture, sae_config=config.sae)
    if grouped:
        over_members = _vmap_members if _vectorize_group(config) else _map_members
        step = over_members(step, extra=True)
        resample = over_members(resample, extra=True)
        from_data = over_members(from_data, extra=False)
        evaluate = jax.vmap(evaluate, in_axes=(0, None, None))

    abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
    state_shardings = sharding.named_shardings(
        mesh, state_logical_axes(architecture, tx, abstract_state, grouped=grouped), rules)
    replicated = sharding.replicated(mesh)
    return Trainer(
        architecture=architecture,
        n_latents=n_latents,
        flops_per_token=architecture.flops_per_token(d, n_latents, config.sae),
        tx=tx,
        state_shardings=state_shardings,
        abstract_state=jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state, state_shardings),
        init=jax.jit(init, out_shardings=state_shardings),
        train_step=jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                           out_shardings=(state_shardings, replicated), donate_argnums=0),
        resample_step=jax.jit(
            resample,
            in_shardings=(state_shardings, (batch_sharding,) * int(config.resample.batches)),
            out_shardings=(state_shardings, replicated), donate_argnums=0),
        init_from_data=jax.jit(
            from_data,
            in_shardings=(state_shardings, (batch_sharding,) * int(config.data.init_batches)),
            out_shardings=state_shardings, donate_argnums=0),
        eval_step=jax.jit(evaluate),
    )


# ------------------------------------------------------------------------------------------
# Group members' outputs (the workdir's files: saejax/workdir.py).
# ------------------------------------------------------------------------------------------
class _Output(NamedTuple):
    """Where one SAE's metrics go: the run's workdir, or a group member's folder."""

    name: str                     # a member's name (l1-0.3); "" for a single SAE
    workdir: str
    metrics_log: MetricsLog
    ckpt: checkpoint.Checkpointer | None


def member_name(architecture: sae.Architecture, coefficient: float) -> str:
    """A member's name, as the sweep names a point of that coefficient: l1-0.3."""
    return workdirs.member_name(architecture.sparsity_coefficient, coefficient)


def member_state(state: dict, i: int) -> dict:
    """Member i of a group's state, laid out exactly like a single SAE's state."""
    return {key: value if MEMBER_AXES[key] is None else jax.tree.map(lambda a: a[i], value)
            for key, value in state.items()}


def _open_members(config, workdir: str, start_step: int,
                  architecture: sae.Architecture) -> list[_Output]:
    """One output per member of a group, in `group.member_workdirs` (a sweep's point folders)
    or by default in <workdir>/members/<member name>/ (workdirs.member_folder: an old
    workdir's members/l1_coefficient-0.3/ is used where it is there)."""
    coefficients = group_coefficients(config)
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
        _write_config(member_config, member_dir)
        member_ckpt = checkpoint.Checkpointer(
            member_dir, max_to_keep=int(config.train.keep_checkpoints), save_interval_steps=1)
        # Member checkpoints are copies of the group's: steps past the group's restored step
        # (saved before a kill) will be written again, identically.
        member_ckpt.delete_after(start_step)
        members.append(_Output(
            name, member_dir, MetricsLog(paths.join(member_dir, "metrics.jsonl"), start_step),
            member_ckpt))
    return members


def _close(ckpt: checkpoint.Checkpointer, members: list[_Output]) -> None:
    ckpt.close()
    for member in members:
        member.ckpt.close()


def _resample_due(resample_config, done: int, total_steps: int) -> bool:
    every = int(resample_config.every_steps)
    return (every > 0 and done % every == 0 and done <= int(resample_config.until_step)
            and done < total_steps)


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between steps, so it can save and exit."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _downstream(config, state: dict, architecture: sae.Architecture, mesh, d: int,
                n_saes: int) -> list[dict]:
    """Per SAE: loss recovered and KL with it spliced into the LM at `lm.hook`
    (`evals.downstream_metrics`), or nothing when `evals.loss_recovered_sequences` is 0."""
    n = int(config.evals.loss_recovered_sequences)
    if not n:
        return [{} for _ in range(n_saes)]
    model = lm.load(config.lm, d=d)
    _, tokens = lm.split(config.lm, model, n)

    def reconstruct(sae_state, x):
        params, scale = sae_state
        x_hat = architecture.decode(params, architecture.encode(params, x * scale, config.sae))
        return x_hat / scale

    members = ([member_state(state, i) for i in range(n_saes)] if group_coefficients(config)
               else [state])
    results = lm.downstream_evaluation(
        model, tokens, batch_sequences=int(config.lm.batch_sequences), reconstruct=reconstruct,
        sae_params=[(m["params"], m["input_scale"]) for m in members], mesh=mesh,
        keep=lm.keep_mask(tokens, *lm.exclusion(config.lm, model)))
    for i, result in enumerate(results):
        logging.info("Loss recovered%s: %.4f (CE clean %.4f, with the SAE %.4f, zero-ablated "
                     "%.4f; KL %.4g)", f" ({i})" if n_saes > 1 else "",
                     result["loss_recovered"], result["ce_clean"], result["ce_sae"],
                     result["ce_zero_ablation"], result["kl_sae"])
    return results


# ------------------------------------------------------------------------------------------
# train_and_evaluate
# ------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) one SAE in `workdir` and returns its final summary."""
    # Config and workdir ---------------------------------------------------------------------
    validation.validate(config, jax.device_count())
    paths.makedirs(workdir)
    _write_config(config, workdir)
    total_steps = int(config.train.steps)
    batch_size = int(config.train.batch_size)

    # Mesh -----------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh)
    rules = config.sharding_rules
    logging.info("Mesh %s over %d %s devices.", dict(mesh.shape), mesh.size,
                 jax.default_backend())

    with sharding.activate(mesh, rules):
        # Input ------------------------------------------------------------------------------
        source = data.make_source(config, mesh=mesh, rules=rules)
        d = source.d

        # Model, optimizer, shardings and the update step ------------------------------------
        trainer = make_trainer(config, mesh, d=d, batch_sharding=source.sharding)
        architecture, n_latents = trainer.architecture, trainer.n_latents
        logging.info("SAE %s: d=%d, n_latents=%d (x%d), %.3g FLOPs per token.",
                     architecture.name, d, n_latents, config.sae.expansion_factor,
                     trainer.flops_per_token)

        # Checkpoint: resuming from the newest readable step is the first branch ------------
        ckpt = checkpoint.Checkpointer(workdir, max_to_keep=int(config.train.keep_checkpoints),
                                       save_interval_steps=1)
        restored = ckpt.restore_latest(trainer.abstract_state)
        if restored is not None:
            state, data_state = restored
            # Training seconds of earlier sessions ride with the data position (0 in
            # checkpoints written before they did).
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
        start_step = int(state["step"])
        logging.info("%s at step %d of %d.", "Resuming" if restored else "Starting",
                     start_step, total_steps)
        # A single SAE writes its metrics in the workdir; a group, in one folder per member
        # laid out like a single run's workdir (config, checkpoints, metrics, summary).
        members = _open_members(config, workdir, start_step, architecture)
        outputs = members or [_Output("", workdir, MetricsLog(
            paths.join(workdir, "metrics.jsonl"), start_step), None)]

        # Loop -------------------------------------------------------------------------------
        true_features = (None if getattr(source, "true_features", None) is None
                         else jax.device_put(source.true_features, sharding.replicated(mesh)))
        mmcs_fn = jax.jit(jax.vmap(evals.mmcs, in_axes=(0, None)) if members else evals.mmcs)
        log_every = int(config.train.log_every)
        checkpoint_every = int(config.train.checkpoint_every)
        last_checked = start_step
        # XLA's CPU backend runs independent programs concurrently, and with several (fake)
        # devices sharing a few cores, two programs' collectives can wait on each other forever
        # (the next batch's generation vs the current step). On CPU, finish each step before
        # dispatching the next program; accelerators keep the asynchronous pipeline.
        serialize_steps = jax.default_backend() == "cpu" and mesh.size > 1
        single_process = jax.process_count() == 1
        preemption_check_every = int(config.train.preemption_check_every)
        # Throughput is timed from the end of this session's first step (compilation excluded).
        t_first, first_done = None, start_step
        resampled = np.zeros(len(outputs), np.int64)  # since the last log line, per SAE
        train_seconds = seconds_before  # summed over sessions, compilation excluded
        with _SigtermFlag() as sigterm:
            for step in range(start_step, total_steps):
                state, metrics = trainer.train_step(state, source.next_batch())
                if serialize_steps or t_first is None:
                    jax.block_until_ready(metrics)
                done = step + 1
                if t_first is None:
                    t_first, first_done = time.perf_counter(), done
                if _resample_due(config.resample, done, total_steps):
                    state, n_dead = trainer.resample_step(
                        state, tuple(source.next_batch()
                                     for _ in range(int(config.resample.batches))))
                    resampled += np.asarray(n_dead).reshape(-1)
                    logging.info("step %d: resampled %s dead latents.", done, n_dead)
                log_now = done % log_every == 0 or done == total_steps
                # Every host stops at the same step when any of them got SIGTERM. Agreeing is a
                # host sync, so several processes check every `preemption_check_every` steps.
                preempted = ((single_process or done % preemption_check_every == 0)
                             and distributed.any_process(sigterm.raised))
                save_now = done % checkpoint_every == 0 or done == total_steps or preempted
                if not (log_now or save_now):
                    continue
                metrics = jax.device_get(metrics)
                if not np.all(metrics.pop("finite")):
                    ckpt.wait()
                    kept = (f"The last good checkpoint (step {ckpt.latest_step()}) is kept in "
                            f"{ckpt.directory}." if ckpt.latest_step() is not None
                            else "No checkpoint had been saved yet.")
                    raise FloatingPointError(
                        f"Non-finite loss or params between step {last_checked + 1} and step "
                        f"{done}; stopping. {kept}")
                last_checked = done
                session_seconds = time.perf_counter() - t_first
                train_seconds = seconds_before + session_seconds
                if log_now:
                    tokens_per_s = ((done - first_done) * batch_size / session_seconds
                                    if done > first_done else 0.0)
                    eta = (total_steps - done) * batch_size / tokens_per_s if tokens_per_s else 0.0
                    if true_features is not None:
                        metrics["mmcs"] = mmcs_fn(state["params"]["W_dec"], true_features)
                    logging.info("step %d/%d | %.0f tok/s | ETA %s", done, total_steps,
                                 tokens_per_s, cli.format_duration(eta))
                    for i, output in enumerate(outputs):
                        record = {"step": done, "tokens": done * batch_size,
                                  **{k: _jsonable(v[i] if members else v)
                                     for k, v in metrics.items()},
                                  "tokens_per_s": tokens_per_s,
                                  "train_seconds": train_seconds,
                                  "resampled_latents": int(resampled[i])}
                        output.metrics_log.write(record)
                        logging.info(
                            "  %sloss %.4g | L0 %.2f | FVU %.4f | dead %.3f%s",
                            f"{output.name}: " if members else "",
                            record["loss"], record["l0"], record["fvu"],
                            record["dead_fraction"],
                            f" | MMCS {record['mmcs']:.4f}" if "mmcs" in record else "")
                    resampled[:] = 0
                if save_now:
                    data_state = {**source.state(), "train_seconds": train_seconds}
                    ckpt.save(done, state, data_state, force=True)
                    for i, member in enumerate(members):
                        member.ckpt.save(done, member_state(state, i), data_state, force=True)
                if preempted:
                    _close(ckpt, members)
                    raise Preempted(done)
        ckpt.wait()

        # Evals ------------------------------------------------------------------------------
        results = [jax.device_get(trainer.eval_step(state["params"], state["input_scale"],
                                                    source.eval_batch(i)))
                   for i in range(int(config.evals.eval_batches))]
        results = {k: np.mean([r[k] for r in results], axis=0) for k in results[0]}
        dead = evals.dead_fraction(state["tokens_since_fired"],
                                   int(config.evals.dead_window_tokens))
        mmcs = (None if true_features is None
                else np.asarray(mmcs_fn(state["params"]["W_dec"], true_features)))
        downstream = _downstream(config, state, architecture, mesh, d, len(outputs))
        summaries = []
        for i, output in enumerate(outputs):
            pick = (lambda v, i=i: v[i]) if members else (lambda v: v)
            summary: dict[str, Any] = {
                "step": int(state["step"]),
                "tokens": int(state["step"]) * batch_size,
                **{k: float(pick(v)) for k, v in results.items()},
                "dead_fraction": float(pick(np.asarray(dead))),
                "architecture": architecture.name,
                "d": d,
                "n_latents": n_latents,
                "expansion_factor": int(config.sae.expansion_factor),
                "flops_per_token": trainer.flops_per_token,
                "train_flops": trainer.flops_per_token * int(state["step"]) * batch_size,
                "train_seconds": train_seconds,
            }
            if architecture.sparsity_coefficient:
                summary[architecture.sparsity_coefficient] = (
                    group_coefficients(config)[i] if members
                    else float(config.sae[architecture.sparsity_coefficient]))
            else:
                summary["k"] = int(config.sae.k)
            if mmcs is not None:
                summary["mmcs"] = float(pick(mmcs))
            summary.update(downstream[i])
            summaries.append(summary)
            if members:
                _write_json(paths.join(output.workdir, "summary.json"), summary)
        _close(ckpt, members)

    summary = summaries[0] if not members else {
        "step": summaries[0]["step"], "tokens": summaries[0]["tokens"],
        "members": {m.name: s for m, s in zip(members, summaries)}}
    _write_json(paths.join(workdir, "summary.json"), summary)
    logging.info("Summary: %s", json.dumps(summary))
    if any(math.isnan(s["mse"]) for s in summaries):
        raise FloatingPointError("Final evaluation is NaN.")
    return summary
