"""The interventions steering runs through `models.forward`, for every kind of dictionary
(`kinds.py`): latent i's activation f_i read at the hooks it is encoded from, and
`delta * d_i^h` added at each hook h it writes, with `delta = on * (value - replace * f_i)`
(add: replace 0; clamp: 1; ablate: 1 with value 0) and d_i^h its direction there in raw units:

- SAE: f_i read at its hook, W_dec[i] added at the same hook;
- transcoder: f_i read at its input hook, W_dec[i] added at its target hook;
- CLT latent (l, i) (flat index l * n + i): f read at layer l's input hook from the running
  (steered) stream, W_dec[l, m, i] added at every MLP output m >= l;
- crosscoder: its code reads hooks after some it writes (acausal across layers), so f_i is
  encoded from a clean forward's activations at every hook, and each hook's decoder slice is
  added in a second, steered forward.

Every value (the latent, the mode, the value, on/off) is traced, so one compiled program serves
every latent and mode, and with on = 0 the clean run.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from saejax import models
from saejax.analysis import kinds
from saejax.analysis.loading import AnalysisError, LoadedSAE
from saejax.sae import clt


def intervention_args(loaded: LoadedSAE, latent: int, mode: str, value: float, *,
                      on: bool = True, kind: kinds.Kind | None = None) -> tuple:
    """The traced arguments of the interventions for one latent and mode: (params, {hook:
    input scale} of every hook read or written, latent, value, on, replace)."""
    kind = kind or kinds.kind_of(loaded)
    params = {k: jnp.asarray(v) for k, v in loaded.params.items()}
    scales = {h: jnp.float32(loaded.scale_of(h)) for h in (*kind.reads, *kind.writes)}
    return (params, scales, jnp.int32(latent),
            jnp.float32(0.0 if mode == "ablate" else value), jnp.float32(1.0 if on else 0.0),
            jnp.float32(0.0 if mode == "add" else 1.0))


def _direction(kind: kinds.Kind, args, j: int) -> jax.Array:
    """[d]: what one unit of the latent adds at write hook j, raw units (zero where a CLT
    latent does not write: layers before its own)."""
    params, scales, latent = args[:3]
    W_dec = params["W_dec"]
    if kind.name == "clt":
        layer, index = latent // kind.per_layer, latent % kind.per_layer
        row = W_dec[layer, j, index] * (j >= layer)
    elif kind.name == "crosscoder":
        row = jnp.take(W_dec, latent, axis=0).reshape(len(kind.writes), -1)[j]
    else:
        row = jnp.take(W_dec, latent, axis=0)
    return row / scales[kind.writes[j]]


def _read(kind: kinds.Kind, loaded: LoadedSAE, args, j: int, x: jax.Array):
    """(f [rows], whether it is the latent's) from raw activations x [rows, d] at read hook j."""
    params, scales, latent = args[:3]
    x = x * scales[kind.reads[j]]
    if kind.name == "clt":
        layer, index = latent // kind.per_layer, latent % kind.per_layer
        f = clt.encode_layer(loaded.architecture, params, x, j, loaded.sae_config)
        return jnp.take(f, index, axis=-1), layer == j
    f = loaded.architecture.encode(params, x, loaded.sae_config)
    return jnp.take(f, latent, axis=-1), True


def _add(kind, args, j, x, f):
    """x + delta * d at write hook j, delta from the latent's activation f [...]."""
    value, on, replace = args[3:]
    delta = on * (value - replace * f.reshape(x.shape[:-1]))
    return x + (delta[..., None] * _direction(kind, args, j)).astype(x.dtype)


def running_interventions(loaded: LoadedSAE, kind: kinds.Kind, args) -> tuple[dict, dict]:
    """({hook: fn} for `models.forward`, and the dict that holds the latent's activation `f`
    [b, s] once the forward has run) for a kind whose reads come before its writes: each read
    hook records f from the activation the forward reaches it with, each write hook adds."""
    seen: dict = {}

    def at(hook, x):
        flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        if hook in kind.reads:
            f, mine = _read(kind, loaded, args, kind.reads.index(hook), flat)
            seen["f"] = jnp.where(mine, f, seen.get("f", jnp.zeros_like(f)))
        if hook in kind.writes:
            x = _add(kind, args, kind.writes.index(hook), x, seen["f"])
        return x

    hooks = dict.fromkeys((*kind.reads, *kind.writes))
    return {h: functools.partial(at, h) for h in hooks}, seen


def check_order(config, kind: kinds.Kind) -> None:
    """A kind steered in one pass must reach the hook it reads before the first it writes."""
    if kind.acausal:
        return
    order = {h: i for i, h in enumerate(models.hook_names(config))}
    if order[kind.reads[0]] > order[kind.writes[0]]:
        raise AnalysisError(f"the dictionary reads {kind.reads[0]}, after {kind.writes[0]} "
                            "that it writes: the forward pass reaches the write first, so the "
                            "latent cannot be steered there.")


def make_forward(config, loaded: LoadedSAE, kind: kinds.Kind) -> Callable:
    """`forward(lm_params, args, tokens) -> (logits, f [b, s])`, jit-able: the model with the
    latent steered (on = 1) or not (on = 0); f is the latent's activation where it is read
    (a crosscoder's: on the clean forward)."""
    if not kind.acausal:
        def forward(lm_params, args, tokens):
            interventions, seen = running_interventions(loaded, kind, args)
            logits, _ = models.forward(lm_params, tokens, config, interventions=interventions)
            return logits, seen["f"].reshape(tokens.shape)
        return forward

    deepest = max(models.hook_layer(h) for h in kind.reads)

    def forward(lm_params, args, tokens):  # pylint: disable=function-redefined
        _, cache = models.forward(lm_params, tokens, config, hooks=kind.reads,
                                  stop_at_layer=deepest + 1)
        params, scales, latent = args[:3]
        x = jnp.stack([cache[h].astype(jnp.float32) * scales[h] for h in kind.reads], axis=-2)
        latents = kinds.encode_scaled(kind, loaded.architecture, params,
                                      x.reshape(-1, *x.shape[-2:]), loaded.sae_config)
        f = jnp.take(latents, latent, axis=-1).reshape(tokens.shape)
        interventions = {h: functools.partial(_add, kind, args, j, f=f)
                         for j, h in enumerate(kind.writes)}
        logits, _ = models.forward(lm_params, tokens, config, interventions=interventions)
        return logits, f
    return forward
