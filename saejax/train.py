"""Training one SAE: the train state, the pure sharded train step, and
`train_and_evaluate(config, workdir)`, read top to bottom in the order data flows.

Everything a run produces lives under its workdir: `config.json` (the resolved config),
`checkpoints/` (orbax), `metrics.jsonl` (one line per logging step) and `summary.json`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from saejax import checkpoint, data, evals, optim, sae, sharding, validation
from saejax.sharding import ConfigError

# Config fields that may change when resuming a workdir; anything else must match what the
# workdir was started with, or the resumed run would not be the run it claims to continue.
RESUMABLE_CHANGES = ("mesh.", "train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.steps", "evals.")
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


# ------------------------------------------------------------------------------------------
# Train state and step (pure functions).
# ------------------------------------------------------------------------------------------
def init_train_state(key: jax.Array, *, architecture: sae.Architecture,
                     tx: optax.GradientTransformation, d: int, n_latents: int,
                     sae_config) -> dict:
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
        "rng": rng,
    }


def state_logical_axes(architecture: sae.Architecture, tx: optax.GradientTransformation,
                       abstract_state: dict) -> dict:
    """Logical axes of every array of the state; optimizer moments follow their params."""
    axes = architecture.param_axes
    return {
        "step": (),
        "params": axes,
        "opt_state": optax.tree_map_params(tx, lambda _, a: a, abstract_state["opt_state"], axes,
                                           transform_non_params=lambda _: (),
                                           is_leaf=sharding.is_axes),
        "tokens_since_fired": ("latent",),
        "density": evals.Density(counts=("latent",), window_tokens=(), density=("latent",)),
        "input_scale": (),
        "rng": (None,),
    }


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(state: dict, batch: jax.Array, *, architecture: sae.Architecture,
               tx: optax.GradientTransformation, sae_config, sparsity_schedule: optax.Schedule,
               lr_schedule: optax.Schedule, dead_window_tokens: int, density_window_tokens: int,
               dense_threshold: float) -> tuple[dict, dict]:
    """One optimisation step: `state, metrics = train_step(state, batch)`."""
    step = state["step"]
    batch = batch * state["input_scale"]
    sparsity_coefficient = sparsity_schedule(step)

    dead = state["tokens_since_fired"] >= dead_window_tokens

    def loss_fn(params):
        return architecture.loss(params, batch, sae_config, sparsity_coefficient, dead)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # Non-gradient buffers an architecture keeps in its params (BatchTopK's threshold).
    params = {**params, **aux.get("buffers", {})}
    tokens_since_fired = evals.update_tokens_since_fired(state["tokens_since_fired"],
                                                         aux["latents"])
    density = evals.update_density(state["density"], aux["latents"], density_window_tokens)
    metrics = {
        "loss": loss,
        "mse": aux["mse"],
        "fvu": evals.fvu(batch, aux["x_hat"]),
        "l0": evals.l0(aux["latents"]),
        "dead_fraction": evals.dead_fraction(tokens_since_fired, dead_window_tokens),
        "dense_fraction": evals.dense_fraction(density.density, dense_threshold),
        "log_density_histogram": evals.log_density_histogram(density.density),
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": lr_schedule(step),
        "finite": jnp.isfinite(loss) & _all_finite(params),
    }
    for name in ("auxk_loss", "auxiliary_loss"):
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
    params, opt_state = optim.resample_dead_latents(key, params, state["opt_state"], x, x_hat,
                                                    dead, tx=tx, encoder_scale=encoder_scale)
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


def make_trainer(config, mesh, *, d: int, batch_sharding) -> Trainer:
    """Builds the sharded init, train step and eval step for `config` on `mesh`.

    Call inside `sharding.activate(mesh, rules)`: the sharded top-k reads the ambient mesh.
    """
    rules = config.sharding_rules
    total_steps = int(config.train.steps)
    architecture = sae.get(config.sae.architecture)
    n_latents = validation.n_latents(config)
    tx = optim.make_optimizer(config.optim, total_steps,
                              rewarm_steps=int(config.resample.rewarm_steps))
    init = functools.partial(init_train_state, architecture=architecture, tx=tx, d=d,
                             n_latents=n_latents, sae_config=config.sae)
    abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
    state_shardings = sharding.named_shardings(
        mesh, state_logical_axes(architecture, tx, abstract_state), rules)
    step = functools.partial(
        train_step, architecture=architecture, tx=tx, sae_config=config.sae,
        sparsity_schedule=optim.l1_coefficient_schedule(
            config.sae[architecture.sparsity_coefficient]
            if architecture.sparsity_coefficient else 0.0, config.optim.l1_warmup_steps),
        lr_schedule=optim.learning_rate_schedule(config.optim, total_steps),
        dead_window_tokens=int(config.evals.dead_window_tokens),
        density_window_tokens=int(config.evals.density_window_tokens),
        dense_threshold=float(config.evals.dense_threshold))
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
                           out_shardings=(state_shardings, sharding.replicated(mesh)),
                           donate_argnums=0),
        resample_step=jax.jit(
            functools.partial(resample_step, architecture=architecture, tx=tx,
                              sae_config=config.sae,
                              dead_window_tokens=int(config.evals.dead_window_tokens),
                              encoder_scale=float(config.resample.encoder_scale)),
            in_shardings=(state_shardings, (batch_sharding,) * int(config.resample.batches)),
            out_shardings=(state_shardings, sharding.replicated(mesh)),
            donate_argnums=0),
        init_from_data=jax.jit(
            functools.partial(init_from_data, normalize_inputs=bool(config.data.normalize_inputs),
                              b_dec_init=str(config.sae.b_dec_init)),
            in_shardings=(state_shardings, (batch_sharding,) * int(config.data.init_batches)),
            out_shardings=state_shardings, donate_argnums=0),
        eval_step=jax.jit(functools.partial(eval_step, architecture=architecture,
                                            sae_config=config.sae)),
    )


# ------------------------------------------------------------------------------------------
# Workdir helpers (only process 0 writes).
# ------------------------------------------------------------------------------------------
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _write_config(config, workdir: str) -> None:
    """Writes the resolved config; refuses to resume a workdir started with another config."""
    path = os.path.join(workdir, "config.json")
    new = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        old_flat, new_flat = _flatten(old), _flatten(new)
        changed = sorted(k for k in set(old_flat) | set(new_flat)
                         if old_flat.get(k) != new_flat.get(k))
        fixed = [k for k in changed if not k.startswith(RESUMABLE_CHANGES)]
        if fixed:
            raise ConfigError(
                f"{workdir} holds a run started with another config: "
                + ", ".join(f"{k}={old_flat.get(k)!r} there, {new_flat.get(k)!r} now"
                            for k in fixed)
                + ". Use a new --workdir, or pass the original values to resume.")
        if changed:
            logging.warning("Resuming %s with changed %s.", workdir, ", ".join(changed))
    if jax.process_index() == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(new, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)


class MetricsLog:
    """`metrics.jsonl`: one JSON line per logging step. On resume, lines from steps after the
    restored checkpoint (which will be trained again) are dropped so each step appears once."""

    def __init__(self, path: str, resume_step: int):
        self.path = path
        self.enabled = jax.process_index() == 0
        if self.enabled and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f
                        if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _jsonable(value: np.ndarray):
    """A metric as JSON: lists for arrays, None for NaN (e.g. a density before its window)."""
    value = np.asarray(value).tolist()
    return None if isinstance(value, float) and math.isnan(value) else value


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


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint of `step` was saved before stopping."""

    def __init__(self, step: int):
        super().__init__(f"SIGTERM: saved a checkpoint at step {step} and stopped.")
        self.step = step


def load_params(workdir: str, step: int | None = None) -> dict[str, np.ndarray]:
    """The SAE params of a run's checkpoint (default: the newest) as NumPy arrays, with
    `input_scale`: the SAE expects raw activations multiplied by it."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    with ocp.CheckpointManager(directory, item_names=("state", "data")) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {directory}")
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))
    return {**jax.tree.map(np.asarray, restored.state["params"]),
            "input_scale": np.asarray(restored.state["input_scale"])}


# ------------------------------------------------------------------------------------------
# train_and_evaluate
# ------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) one SAE in `workdir` and returns its final summary."""
    # Config and workdir ---------------------------------------------------------------------
    validation.validate(config, jax.device_count())
    os.makedirs(workdir, exist_ok=True)
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
            source.restore(data_state)
        else:
            state = trainer.init(jax.random.PRNGKey(int(config.seed)))
            if config.data.normalize_inputs or config.sae.b_dec_init != "zeros":
                init_batches = int(config.data.init_batches)
                state = trainer.init_from_data(
                    state, tuple(source.next_batch() for _ in range(init_batches)))
        start_step = int(state["step"])
        metrics_log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), start_step)
        logging.info("%s at step %d of %d.", "Resuming" if restored else "Starting",
                     start_step, total_steps)

        # Loop -------------------------------------------------------------------------------
        true_features = (None if getattr(source, "true_features", None) is None
                         else jax.device_put(source.true_features, sharding.replicated(mesh)))
        mmcs_fn = jax.jit(evals.mmcs)
        log_every = int(config.train.log_every)
        checkpoint_every = int(config.train.checkpoint_every)
        last_checked = start_step
        # XLA's CPU backend runs independent programs concurrently, and with several (fake)
        # devices sharing a few cores, two programs' collectives can wait on each other forever
        # (the next batch's generation vs the current step). On CPU, finish each step before
        # dispatching the next program; accelerators keep the asynchronous pipeline.
        serialize_steps = jax.default_backend() == "cpu" and mesh.size > 1
        # Throughput is timed from the end of this session's first step (compilation excluded).
        t_first, first_done = None, start_step
        resampled = 0  # dead latents resampled since the last log line
        train_seconds = 0.0
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
                    resampled += int(n_dead)
                    logging.info("step %d: resampled %d dead latents.", done, int(n_dead))
                log_now = done % log_every == 0 or done == total_steps
                save_now = done % checkpoint_every == 0 or done == total_steps or sigterm.raised
                if not (log_now or save_now):
                    continue
                metrics = jax.device_get(metrics)
                if not metrics.pop("finite"):
                    ckpt.wait()
                    raise FloatingPointError(
                        f"Non-finite loss or params between step {last_checked + 1} and step "
                        f"{done}; stopping. The last good checkpoint (step "
                        f"{ckpt.latest_step()}) is kept in {ckpt.directory}.")
                last_checked = done
                if log_now:
                    now = time.perf_counter()
                    train_seconds = now - t_first
                    tokens_per_s = ((done - first_done) * batch_size / train_seconds
                                    if done > first_done else 0.0)
                    eta = (total_steps - done) * batch_size / tokens_per_s if tokens_per_s else 0.0
                    record = {"step": done, "tokens": done * batch_size,
                              **{k: _jsonable(v) for k, v in metrics.items()},
                              "tokens_per_s": tokens_per_s, "resampled_latents": resampled}
                    resampled = 0
                    if true_features is not None:
                        record["mmcs"] = float(mmcs_fn(state["params"]["W_dec"], true_features))
                    metrics_log.write(record)
                    logging.info(
                        "step %d/%d | %.0f tok/s | loss %.4g | L0 %.2f | FVU %.4f | dead %.3f%s | "
                        "ETA %s", done, total_steps, tokens_per_s, record["loss"], record["l0"],
                        record["fvu"], record["dead_fraction"],
                        f" | MMCS {record['mmcs']:.4f}" if "mmcs" in record else "",
                        _format_duration(eta))
                if save_now:
                    ckpt.save(done, state, source.state(), force=True)
                if sigterm.raised:
                    ckpt.close()
                    raise Preempted(done)
        ckpt.wait()

        # Evals ------------------------------------------------------------------------------
        results = [jax.device_get(trainer.eval_step(state["params"], state["input_scale"],
                                                    source.eval_batch(i)))
                   for i in range(int(config.evals.eval_batches))]
        summary: dict[str, Any] = {
            "step": int(state["step"]),
            "tokens": int(state["step"]) * batch_size,
            **{k: float(np.mean([r[k] for r in results])) for k in results[0]},
            "dead_fraction": float(evals.dead_fraction(state["tokens_since_fired"],
                                                       int(config.evals.dead_window_tokens))),
            "architecture": architecture.name,
            "d": d,
            "n_latents": n_latents,
            "expansion_factor": int(config.sae.expansion_factor),
            "flops_per_token": trainer.flops_per_token,
            "train_flops": trainer.flops_per_token * int(state["step"]) * batch_size,
            "train_seconds_this_session": train_seconds,
        }
        if architecture.sparsity_coefficient:
            summary[architecture.sparsity_coefficient] = float(
                config.sae[architecture.sparsity_coefficient])
        else:
            summary["k"] = int(config.sae.k)
        if true_features is not None:
            summary["mmcs"] = float(mmcs_fn(state["params"]["W_dec"], true_features))
        ckpt.close()

    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    logging.info("Summary: %s", json.dumps(summary))
    if math.isnan(summary["mse"]):
        raise FloatingPointError("Final evaluation is NaN.")
    return summary
