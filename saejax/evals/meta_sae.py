"""The decoder-structure evaluation (Bussmann et al. 2024, "Showing SAE latents are not atomic
using meta-SAEs"): a small BatchTopK SAE trained on the SAE's unit-norm decoder rows, with
saejax's own training (`train.train_and_evaluate` on the rows as a `.npy` source). Where a
latent's direction is rebuilt from a few meta-latents, it is a composition of more basic
directions rather than an atom.

Needs only the decoder. `decomposition` scores a trained meta-SAE's reconstruction;
`evaluate` trains one in a folder and scores it.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from saejax import checkpoint, configs, sae


def unit_rows(decoder) -> np.ndarray:
    """Decoder rows [n, d] scaled to unit norm (zero rows stay zero)."""
    decoder = np.asarray(decoder, np.float32)
    return decoder / np.maximum(np.linalg.norm(decoder, axis=1, keepdims=True), 1e-12)


def decomposition(rows, reconstruction, meta_latents, *, min_explained: float = 0.5
                  ) -> dict[str, float]:
    """How a meta-SAE rebuilds the rows: its FVU (over all rows), L0, and the fraction of
    rows that decompose, i.e. whose own explained variance `1 - |r - x|^2 / |x|^2` is at least
    `min_explained` from two or more meta-latents.

    Args: rows, reconstruction `[n, d]`; meta_latents `[n, n_meta]`.
    """
    rows = np.asarray(rows, np.float32)
    error = np.sum((np.asarray(reconstruction, np.float32) - rows) ** 2, axis=1)
    centred = rows - rows.mean(axis=0)
    per_row = 1 - error / np.maximum(np.sum(rows ** 2, axis=1), 1e-12)
    used = np.sum(np.asarray(meta_latents) != 0, axis=1)
    return {"meta_fvu": float(error.sum() / np.sum(centred ** 2)),
            "meta_l0": float(used.mean()),
            "decomposed_fraction": float(np.mean((per_row >= min_explained) & (used >= 2))),
            "min_explained": float(min_explained)}


def meta_config(n_rows: int, d: int, *, expansion_factor: int = 1, k: int = 4,
                steps: int = 2000, batch_size: int = 256, learning_rate: float = 1e-3):
    """The meta-SAE's config: BatchTopK with `k` (Bussmann et al. use 4) and
    `expansion_factor x d` meta-latents, on the `n_rows` rows as a `.npy` source (one batch of
    them held out for the run's own evaluation; `decomposition` scores every row)."""
    config = configs.base_config()
    config.data.source = "npy"
    config.data.d = d
    batch_size = max(1, min(batch_size, n_rows // 4))
    config.data.npy_chunk_rows = batch_size   # a batch a chunk, one held out
    config.data.eval_tokens = batch_size
    config.data.shuffle_buffer_chunks = 4
    config.sae.architecture = "batchtopk"
    config.sae.expansion_factor = expansion_factor
    config.sae.k = k
    config.sae.k_aux = max(2 * k, d // 2)
    config.optim.learning_rate = learning_rate
    config.optim.warmup_steps = min(100, steps // 10)
    config.train.batch_size = batch_size
    config.train.steps = steps
    config.train.log_every = max(1, steps // 4)
    config.train.checkpoint_every = steps
    config.evals.eval_batches = 1
    config.evals.dead_window_tokens = batch_size * max(1, steps // 4)
    config.evals.density_window_tokens = batch_size * max(1, steps // 4)
    return config


def evaluate(decoder, workdir: str, *, min_explained: float = 0.5, **config_fields) -> dict:
    """Trains (or resumes) a meta-SAE on the unit decoder rows in `workdir` and scores it on
    every row (`decomposition`); `config_fields` go to `meta_config`."""
    from saejax import train  # pylint: disable=import-outside-toplevel  (train imports evals)
    rows = unit_rows(decoder)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "decoder_rows.npy")
    np.save(path, rows)
    config = meta_config(*rows.shape, **config_fields)
    config.data.path = path
    train.train_and_evaluate(config, workdir)
    params = checkpoint.load_params(workdir, None)
    scale = float(np.asarray(params.pop("input_scale")))
    architecture = sae.from_config(config.sae)
    x = jnp.asarray(rows) * scale
    latents = architecture.encode(params, x, config.sae)
    reconstruction = np.asarray(architecture.decode(params, latents, x)) / scale
    return {**decomposition(rows, reconstruction, latents, min_explained=min_explained),
            "n_meta_latents": int(latents.shape[1]), "k": int(config.sae.k)}
