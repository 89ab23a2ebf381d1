"""One trained dictionary to read, whatever wrote it: a saejax run's workdir or a SAELens
directory, loaded as a `LoadedSAE` (params, input scale, architecture, and what it was trained
on), plus the checks every analysis tool shares (latent index, width against a hook or store).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from saejax import checkpoint, configs, models, sae
from saejax.errors import ConfigError


class AnalysisError(ConfigError):
    """An input the analysis tools cannot use; the message names it and the fix."""


class LoadedSAE(NamedTuple):
    """A trained SAE and its provenance. `params` are NumPy arrays in the layout of
    `saejax.sae` (`W_enc [d, n]`, `W_dec [n, d]`, ...); the SAE reads raw activations
    multiplied by `input_scale`."""

    params: dict[str, np.ndarray]
    input_scale: float
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
        return int(self.params["W_enc"].shape[0])

    @property
    def n_latents(self) -> int:
        return int(self.params["W_enc"].shape[1])

    def encode(self, activations) -> jax.Array:
        """Latents [..., n] of raw activations [..., d] (the input scale applied)."""
        x = jnp.asarray(activations, jnp.float32)
        flat = x.reshape(-1, x.shape[-1]) * self.input_scale
        latents = self.architecture.encode(self.params, flat, self.sae_config)
        return latents.reshape(*x.shape[:-1], latents.shape[-1])

    def reconstruct(self, activations) -> jax.Array:
        """The SAE's reconstruction of raw activations, in raw units."""
        latents = self.encode(activations)
        x = jnp.asarray(activations, jnp.float32) * self.input_scale  # a skip connection's input
        return self.architecture.decode(self.params, latents, x) / self.input_scale

    def decoder_directions(self) -> np.ndarray:
        """W_dec [n, d] in raw activation units: what one unit of each latent adds at the hook."""
        return np.asarray(self.params["W_dec"], np.float32) / np.float32(self.input_scale)


def describe(loaded: LoadedSAE) -> str:
    step = f" step {loaded.step}" if loaded.step is not None else ""
    return (f"{loaded.architecture.name} SAE ({loaded.kind}{step}, d={loaded.d}, "
            f"n_latents={loaded.n_latents}) at {loaded.source}")


# ------------------------------------------------------------------------------------------
# Loading.
# ------------------------------------------------------------------------------------------
def is_saelens_dir(path: str) -> bool:
    from saejax.analysis import saelens  # pylint: disable=import-outside-toplevel
    return (os.path.isfile(os.path.join(path, saelens.CFG_FILENAME))
            and os.path.isfile(os.path.join(path, saelens.WEIGHTS_FILENAME)))


def is_run_dir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "config.json"))
            and os.path.isdir(os.path.join(path, "checkpoints")))


def load_sae(path: str, *, step: int | None = None) -> LoadedSAE:
    """A saejax run's workdir (config.json + checkpoints/, the newest step unless `step`) or a
    SAELens directory (cfg.json + sae_weights.safetensors)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise AnalysisError(f"{path}: no such directory; pass a saejax run's workdir or a "
                            "SAELens SAE directory.")
    if is_saelens_dir(path):
        from saejax.analysis import saelens  # pylint: disable=import-outside-toplevel
        return saelens.load(path)
    if is_run_dir(path):
        return _load_run(path, step)
    raise AnalysisError(
        f"{path} is neither a saejax run directory (config.json and checkpoints/, as "
        "`python -m saejax.main --workdir` writes) nor a SAELens SAE directory (cfg.json and "
        "sae_weights.safetensors).")


def read_run_config(workdir: str) -> dict:
    with open(os.path.join(workdir, "config.json")) as f:
        return json.load(f)


def _load_run(workdir: str, step: int | None) -> LoadedSAE:
    config = read_run_config(workdir)
    members = tuple(config.get("group", {}).get("sparsity_coefficients", ()) or ())
    if members:
        folders = list(config["group"].get("member_workdirs") or ())
        if not folders and os.path.isdir(os.path.join(workdir, "members")):
            folders = [os.path.join(workdir, "members", name)
                       for name in sorted(os.listdir(os.path.join(workdir, "members")))]
        raise AnalysisError(
            f"{workdir} trained a group of {len(members)} SAEs in one run; point at one "
            f"member's directory instead"
            + (f": one of {folders}." if folders else f": {workdir}/members/<name>."))
    sae_config = configs.base_config().sae
    sae_config.update(config.get("sae", {}))
    architecture = sae.from_config(sae_config)  # the mechanism with its shape (sae.shape)
    try:
        state = checkpoint.load_params(workdir, step)
    except FileNotFoundError as e:
        raise AnalysisError(f"{workdir}: {e}; the run has not saved a checkpoint yet.") from e
    input_scale = float(np.asarray(state.pop("input_scale")))
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


# ------------------------------------------------------------------------------------------
# Checks shared by the tools.
# ------------------------------------------------------------------------------------------
def check_latent(loaded: LoadedSAE, latent) -> int:
    """`latent` as an int in [0, n_latents), or an error naming the range."""
    try:
        index = int(latent)
    except (TypeError, ValueError):
        raise AnalysisError(f"latent={latent!r} is not an integer index.") from None
    if index != latent and not isinstance(latent, str):
        raise AnalysisError(f"latent={latent!r} is not an integer index.")
    if not 0 <= index < loaded.n_latents:
        raise AnalysisError(f"latent {index} is out of range: {describe(loaded)} has latents "
                            f"0..{loaded.n_latents - 1}.")
    return index


def check_width(loaded: LoadedSAE, d: int, what: str, fix: str) -> None:
    """The SAE reads d-wide activations; `what` (a hook of a model, a store) must be as wide."""
    if int(d) != loaded.d:
        raise AnalysisError(f"{describe(loaded)} reads activations of width d={loaded.d}, but "
                            f"{what} has width {d}. {fix}")


def load_language_model(loaded: LoadedSAE, *, checkpoint: str | None = None,
                        hook: str | None = None):
    """The LM the SAE reads (`checkpoint`/`hook`, else the ones it was trained with), checked:
    the hook exists and its width is the SAE's. Returns a `saejax.data.lm.LanguageModel`."""
    from saejax.data import lm  # pylint: disable=import-outside-toplevel
    checkpoint = checkpoint or loaded.lm_checkpoint
    hook = hook or loaded.hook
    if not checkpoint:
        raise AnalysisError(f"{describe(loaded)} does not record a language model checkpoint; "
                            "pass --checkpoint=DIR (a local Hugging Face format model "
                            "directory).")
    if not hook:
        raise AnalysisError(f"{describe(loaded)} does not record its hook point; pass "
                            "--hook=blocks.<layer>.hook_resid_post (or the hook it was trained "
                            "at).")
    model = lm.from_checkpoint(checkpoint, hook, what="hook", error=AnalysisError)
    check_width(loaded, model.config.d_model, f"{hook} of {checkpoint}",
                "The SAE was trained on another model (or hook); pass the checkpoint it was "
                "trained on with --checkpoint, or an SAE trained at this model's hook.")
    return model


def load_tokenizer(loaded: LoadedSAE, checkpoint: str | None = None):
    """The checkpoint's tokenizer.json, or None when there is none to read."""
    for path in (checkpoint, loaded.lm_checkpoint):
        if path and os.path.isfile(os.path.join(path, "tokenizer.json")):
            return models.load_tokenizer(path)
    return None
