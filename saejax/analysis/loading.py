"""One trained dictionary to read, whatever wrote it: a saejax run's workdir or a SAELens
directory, loaded as a `LoadedSAE` (`loaded.py`), plus the checks every analysis tool shares
(latent index, width against a hook or store).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import jax

from saejax import models, sharding
from saejax.analysis import kinds, saelens
from saejax.analysis.loaded import (AnalysisError, LoadedSAE, describe,  # noqa: F401
                                    is_run_dir, load_run, read_run_config, sae_config_for)


# ------------------------------------------------------------------------------------------
# Loading.
# ------------------------------------------------------------------------------------------
def load_sae(path: str, *, step: int | None = None) -> LoadedSAE:
    """A saejax run's workdir (config.json + checkpoints/, the newest step unless `step`) or a
    SAELens directory (cfg.json + sae_weights.safetensors)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise AnalysisError(f"{path}: no such directory; pass a saejax run's workdir or a "
                            "SAELens SAE directory.")
    if saelens.is_saelens_dir(path):
        return saelens.load(path)
    if is_run_dir(path):
        return load_run(path, step)
    raise AnalysisError(
        f"{path} is neither a saejax run directory (config.json and checkpoints/, as "
        "`python -m saejax.main --workdir` writes) nor a SAELens SAE directory (cfg.json and "
        "sae_weights.safetensors).")


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
        kind = kinds.kind_of(loaded)
        flat = (f" (a CLT's flat index layer * {kind.per_layer} + i over its {kind.n_layers} "
                "layers)" if kind.name == "clt" else "")
        raise AnalysisError(f"--latent={index}: latent {index} is out of range: "
                            f"{describe(loaded)} has latents 0..{loaded.n_latents - 1}{flat}.")
    return index


def check_width(loaded: LoadedSAE, d: int, what: str, fix: str) -> None:
    """The SAE reads d-wide activations; `what` (a hook of a model, a store) must be as wide."""
    if int(d) != loaded.d:
        raise AnalysisError(f"{describe(loaded)} reads activations of width d={loaded.d}, but "
                            f"{what} has width {d}. {fix}")


def load_language_model(loaded: LoadedSAE, *, checkpoint: str | None = None,
                        hook: str | None = None, mesh_model: int = 1):
    """The LM the SAE reads (`checkpoint`/`hook`, else the ones it was trained with), checked:
    the hook exists and its width is the SAE's. Returns a `saejax.data.lm.LanguageModel`,
    split over the first `mesh_model` devices (tensor parallel) when that is more than one."""
    from saejax.data import lm  # pylint: disable=import-outside-toplevel
    checkpoint = checkpoint or loaded.lm_checkpoint
    kind = kinds.kind_of(loaded)
    if kind.name != "sae":
        # It is steered at the hooks it reads and writes; the model runs to the deepest.
        hooks = (*kind.reads, *kind.writes)
        if hook and hook not in hooks:
            raise AnalysisError(f"--hook={hook}: a {kind.name} reads {list(kind.reads)} and "
                                f"writes {list(kind.writes)}, where it is steered; leave "
                                "--hook out.")
        hook = max(hooks, key=models.hook_layer)
    hook = hook or loaded.hook
    if not checkpoint:
        raise AnalysisError(f"{describe(loaded)} does not record a language model checkpoint; "
                            "pass --checkpoint=DIR (a local Hugging Face format model "
                            "directory).")
    if not hook:
        raise AnalysisError(f"{describe(loaded)} does not record its hook point; pass "
                            "--hook=blocks.<layer>.hook_resid_post (or the hook it was trained "
                            "at).")
    mesh = None
    if mesh_model > 1:
        if mesh_model > jax.device_count():
            raise AnalysisError(f"--mesh_model={mesh_model} exceeds the "
                                f"{jax.device_count()} devices.")
        mesh = sharding.make_mesh(SimpleNamespace(data=1, model=mesh_model),
                                  jax.devices()[:mesh_model])
    model = lm.from_checkpoint(checkpoint, hook, what="hook", error=AnalysisError, mesh=mesh)
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
