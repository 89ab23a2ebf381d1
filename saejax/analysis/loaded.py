"""A trained dictionary as analysis reads it: `LoadedSAE` (params, input scale, architecture,
and what it was trained on), the error every analysis tool raises, and reading a saejax run's
workdir. The SAELens format (`saelens`) and the loader of either (`loading`) build on it.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from saejax import checkpoint, configs, sae
from saejax.analysis import kinds
from saejax.errors import ConfigError


class AnalysisError(ConfigError):
    """An input the analysis tools cannot use; the message names it and the fix."""


class LoadedSAE(NamedTuple):
    """A trained SAE and its provenance. `params` are NumPy arrays in the layout of
    `saejax.sae` (`W_enc [d, n]`, `W_dec [n, d]`, ...); the SAE reads raw activations
    multiplied by `input_scale`: one float, or, for a shape that normalises each hook on its
    own (a crosscoder), an array [n_hooks] (`scale_of(hook)` gives any hook's)."""

    params: dict[str, np.ndarray]
    input_scale: float | np.ndarray
    architecture: sae.Architecture
    sae_config: ml_collections.ConfigDict
    source: str                  # the directory it was loaded from
    kind: str                    # "saejax" (a run's workdir) or "saelens"
    step: int | None = None      # the checkpoint's step (saejax)
    hook: str | None = None      # where in the LM its activations come from
    lm_checkpoint: str | None = None
    store: str | None = None     # the activation store it was trained on, when known
    data_source: str | None = None
    context_length: int | None = None
    metadata: dict[str, Any] | None = None

    @property
    def d(self) -> int:
        """The width of each hook it reads."""
        return kinds.kind_of(self).width

    @property
    def n_latents(self) -> int:
        """Its latents in the flat index the tools use (a CLT's layers x latents per layer)."""
        return kinds.kind_of(self).n_latents

    def scale_of(self, hook: str) -> float:
        """The factor raw activations at `hook` are multiplied by before the SAE reads them
        (the one input scale, or that hook's; `sae.base.scale_batch`)."""
        scale = np.asarray(self.input_scale, np.float32)
        if not scale.ndim:
            return float(scale)
        try:
            scaled = sae.base.scale_batch(self.architecture.shape, {hook: np.float32(1)}, scale)
        except ValueError as e:
            raise AnalysisError(f"{self.source}: {e}") from None
        return float(scaled[hook])

    def _columns(self, width: int):
        """What each of `width` columns of the input (or target) side by side is scaled by."""
        return sae.base.column_scales(self.architecture.shape,
                                      jnp.asarray(self.input_scale, jnp.float32), width)

    def encode(self, activations) -> jax.Array:
        """Latents [..., n] of raw activations [..., d] (the input scale applied; a
        crosscoder's hooks side by side, each with its own)."""
        x = jnp.asarray(activations, jnp.float32)
        flat = x.reshape(-1, x.shape[-1]) * self._columns(x.shape[-1])
        latents = self.architecture.encode(self.params, flat, self.sae_config)
        return latents.reshape(*x.shape[:-1], latents.shape[-1])

    def reconstruct(self, activations) -> jax.Array:
        """The SAE's reconstruction of raw activations, in raw units."""
        latents = self.encode(activations)
        x = jnp.asarray(activations, jnp.float32)
        x = x * self._columns(x.shape[-1])  # a skip connection's input
        x_hat = self.architecture.decode(self.params, latents, x)
        return x_hat / self._columns(x_hat.shape[-1])

    def decoder_directions(self) -> np.ndarray:
        """W_dec [n, d] in raw activation units: what one unit of each latent adds at the hook
        (at each hook, side by side, for a crosscoder)."""
        W_dec = np.asarray(self.params["W_dec"], np.float32)
        return W_dec / np.asarray(self._columns(W_dec.shape[-1]), np.float32)


def describe(loaded: LoadedSAE) -> str:
    step = f" step {loaded.step}" if loaded.step is not None else ""
    return (f"{loaded.architecture.name} SAE ({loaded.kind}{step}, d={loaded.d}, "
            f"n_latents={loaded.n_latents}) at {loaded.source}")


# ------------------------------------------------------------------------------------------
# A saejax run's workdir.
# ------------------------------------------------------------------------------------------
def is_run_dir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "config.json"))
            and os.path.isdir(os.path.join(path, "checkpoints")))


def read_run_config(workdir: str) -> dict:
    with open(os.path.join(workdir, "config.json")) as f:
        return json.load(f)


def load_run(workdir: str, step: int | None = None) -> LoadedSAE:
    """A saejax run's workdir: its newest checkpoint, or `step`."""
    config = read_run_config(workdir)
    group = config.get("group", {})
    members = tuple(group.get("sparsity_coefficients", ()) or ())
    hooks = [h for h in str(group.get("hooks", "")).split(",") if h.strip()]
    if members or hooks:
        folders = list(config["group"].get("member_workdirs") or ())
        if not folders and os.path.isdir(os.path.join(workdir, "members")):
            folders = [os.path.join(workdir, "members", name)
                       for name in sorted(os.listdir(os.path.join(workdir, "members")))]
        raise AnalysisError(
            f"{workdir} trained a group of {max(len(members), 1) * max(len(hooks), 1)} SAEs in "
            f"one run; point at one "
            f"member's directory instead"
            + (f": one of {folders}." if folders else f": {workdir}/members/<name>."))
    sae_config = configs.base_config().sae
    sae_config.update(config.get("sae", {}))
    architecture = sae.from_config(sae_config)  # the mechanism with its shape (sae.shape)
    try:
        state = checkpoint.load_params(workdir, step)
    except FileNotFoundError as e:
        raise AnalysisError(f"{workdir}: {e}; the run has not saved a checkpoint yet.") from e
    scale = np.asarray(state.pop("input_scale"), np.float32)
    input_scale = float(scale) if not scale.ndim else scale  # per hook: a crosscoder's
    params = {k: np.asarray(v) for k, v in state.items()}
    data_config, lm_config = config.get("data", {}), config.get("lm", {})
    data_source = data_config.get("source")
    store_path = (data_config.get("path") or None) if data_source in ("store", "npy") else None
    return LoadedSAE(
        params=params, input_scale=input_scale, architecture=architecture,
        sae_config=sae_config, source=workdir, kind="saejax", step=_checkpoint_step(workdir, step),
        hook=lm_config.get("hook") or None, lm_checkpoint=lm_config.get("checkpoint") or None,
        store=store_path, data_source=data_source,
        context_length=lm_config.get("context_length"), metadata={"config": config})


def _checkpoint_step(workdir: str, step: int | None) -> int | None:
    if step is not None:
        return int(step)
    directory = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
    return max(steps) if steps else None


def sae_config_for(architecture: str, **fields) -> ml_collections.ConfigDict:
    """The `sae` config section `architecture.encode` reads, with the given fields set."""
    sae_config = configs.base_config().sae
    sae_config.architecture = architecture
    for key, value in fields.items():
        sae_config[key] = value
    return sae_config
