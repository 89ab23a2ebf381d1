"""The compiled pieces of one run: `make_trainer(config, mesh, ...)` builds the optimizer, the
state's shardings and the jitted init, train, resample and eval steps (saejax.step), for a
single SAE or for a group's members stacked on one axis (saejax.groups).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from saejax import groups, optim, sae, sharding, validation
from saejax.step import (HOOK_AXES, MEMBER_AXES, eval_step, init_from_data, init_train_state,
                         resample_step, state_logical_axes, train_step)


class Trainer(NamedTuple):
    """The compiled pieces of one run on one mesh; `train_and_evaluate` drives them."""

    architecture: sae.Architecture
    n_latents: int
    flops_per_token: int
    tx: optax.GradientTransformation
    state_shardings: Any
    abstract_state: Any           # ShapeDtypeStructs carrying their shardings
    init: Callable[[jax.Array], dict]  # key -> state, created already sharded
    train_step: Callable[[dict, dict], tuple[dict, dict]]  # state, {hook: batch}
    resample_step: Callable[[dict, tuple], tuple[dict, jax.Array]]
    init_from_data: Callable[[dict, tuple], dict]
    eval_step: Callable[[dict, jax.Array, dict], dict]  # params, input_scale, batch


def make_trainer(config, mesh, *, d: int, batch_sharding) -> Trainer:
    """Builds the sharded init, train step and eval step for `config` on `mesh`.

    With `group.sparsity_coefficients` set, every function handles a group: one SAE per
    coefficient, stacked on a leading member axis and vmapped, all reading the same batch; with
    `group.hooks`, one SAE (or coefficient group) per hook, stacked on a hook axis outside it,
    each reading its hook's entry of the batch. Call inside `sharding.activate(mesh, rules)`:
    the sharded top-k reads the ambient mesh.
    """
    architecture = sae.from_config(config.sae)
    n_latents = validation.n_latents(config)
    tx = optim.make_optimizer(config.optim, int(config.train.steps),
                              rewarm_steps=int(config.resample.rewarm_steps),
                              unit_norm_params=architecture.shape.unit_norm_params)
    init, step, resample, from_data, evaluate = _step_functions(
        config, architecture, tx, d=d, n_latents=n_latents)

    abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
    state_shardings = sharding.named_shardings(
        mesh, state_logical_axes(architecture, tx, abstract_state,
                                 levels=groups.members(config).levels),
        config.sharding_rules)
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


def _step_functions(config, architecture: sae.Architecture, tx: optax.GradientTransformation,
                    *, d: int, n_latents: int) -> tuple[Callable, ...]:
    """The init, train, resample, data-init and eval functions with `config`'s settings bound,
    over a group's members where there is a group (and its hooks outside them); not yet
    jitted."""
    total_steps = int(config.train.steps)
    coefficients = groups.group_coefficients(config)
    dead_window_tokens = int(config.evals.dead_window_tokens)

    init_one = functools.partial(init_train_state, architecture=architecture, tx=tx, d=d,
                                 n_latents=n_latents, sae_config=config.sae)
    if coefficients:
        init = lambda key: jax.vmap(init_one, in_axes=(None, 0), out_axes=MEMBER_AXES)(
            key, jnp.asarray(coefficients, jnp.float32))
    else:
        default = (config.sae[architecture.sparsity_coefficient]
                   if architecture.sparsity_coefficient else 0.0)
        init = lambda key: init_one(key, default)
    step = functools.partial(
        train_step, architecture=architecture, tx=tx, sae_config=config.sae,
        sparsity_warmup=optim.l1_coefficient_schedule(1.0,
                                                      config.optim.sparsity_warmup_steps),
        lr_schedule=optim.learning_rate_schedule(config.optim, total_steps),
        dead_window_tokens=dead_window_tokens,
        density_window_tokens=int(config.evals.density_window_tokens),
        dense_threshold=float(config.evals.dense_threshold),
        compute_dtype=jnp.dtype(config.train.compute_dtype))
    resample = functools.partial(resample_step, architecture=architecture, tx=tx,
                                 sae_config=config.sae, dead_window_tokens=dead_window_tokens,
                                 encoder_scale=float(config.resample.encoder_scale), d=d,
                                 n_latents=n_latents)
    from_data = functools.partial(init_from_data, architecture=architecture,
                                  normalize_inputs=bool(config.data.normalize_inputs),
                                  b_dec_init=str(config.sae.b_dec_init))
    evaluate = functools.partial(eval_step, architecture=architecture, sae_config=config.sae)
    if coefficients:
        over_members = groups.over_members(config)
        step = over_members(step, extra=True)
        resample = over_members(resample, extra=True)
        from_data = over_members(from_data, extra=False)
        evaluate = jax.vmap(evaluate, in_axes=(0, None, None))
    hooks = groups.group_hooks(config)
    if hooks:
        init = _over_hooks_init(init, len(hooks))
        step = groups.over_hooks(config, step, extra=True)
        resample = groups.over_hooks(config, resample, extra=True)
        from_data = groups.over_hooks(config, from_data, extra=False)
        evaluate = _over_hooks_eval(evaluate, hooks)
    return init, step, resample, from_data, evaluate


def _over_hooks_init(init: Callable, n_hooks: int) -> Callable:
    """Every hook's SAE (or coefficient group) initialised from the one key, as each would be
    alone with the run's seed."""
    return jax.vmap(init, in_axes=None, out_axes=HOOK_AXES, axis_size=n_hooks)


def _over_hooks_eval(evaluate: Callable, hooks: tuple[str, ...]) -> Callable:
    """(params, input_scale, batch) -> metrics, over a hook group's hook axis."""
    return lambda params, input_scale, batch: jax.vmap(evaluate)(
        params, input_scale, groups.stack_hooks(batch, hooks))
