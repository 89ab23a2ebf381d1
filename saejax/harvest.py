"""Harvests LM activations into activation stores on disk, one store per hook point:

    python -m saejax.harvest --checkpoint=DIR --tokens=FILE --out=STORES \
        --hooks=blocks.8.hook_resid_post --context_length=128

`--checkpoint` is a local Hugging Face format directory of any family saejax reads (GPT-2,
Llama, Mistral, Qwen, Gemma 2/3, GPT-NeoX; config.json, model.safetensors or a sharded index,
and tokenizer.json for text); `--tokens` a .npy of token ids or a text file with one document
per line. Each hook's store is `STORES/<hook>` (zarr v3 via tensorstore; see
`saejax/data/store.py`). Interrupt it at any point and run the same command again: it resumes
after the last committed batch, writing no row twice and losing none.
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import flags, logging
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from saejax import cli, models, paths
from saejax.data import store
from saejax.errors import ConfigError


def harvest(checkpoint: str, tokens: str, out: str, *, hooks: Sequence[str],
            context_length: int, batch_sequences: int = 32, holdout_sequences: int = 0,
            max_sequences: int = 0, dtype: str = "float32", chunk_rows: int = 4096,
            shard_rows: int = 0, progress_every_s: float = 30.0) -> dict:
    """Runs the model over the token sequences and writes `out/<hook>` for every hook; returns
    {"stores": {hook: path}, "tokens_per_s": ..., ...}. Resumes stores that exist."""
    model_config, params = models.load(checkpoint)
    for hook in hooks:
        models.check_hook(model_config, hook, f"--hooks: {hook!r} is not a hook point of "
                          f"{checkpoint}", ConfigError)
    sequences = models.load_sequences(tokens, context_length, tokenizer_path=checkpoint,
                                      vocab_size=model_config.vocab_size,
                                      bos_token_id=model_config.bos_token_id)
    n = len(sequences) - holdout_sequences
    if max_sequences:
        n = min(n, max_sequences)
    if n <= 0:
        raise ConfigError(f"--tokens={tokens!r} holds {len(sequences)} sequences of "
                          f"{context_length} tokens; nothing is left to harvest after "
                          f"--holdout_sequences={holdout_sequences}.")
    sequences = sequences[:n]

    # The batch of sequences is split over every device; the model is replicated.
    devices = jax.devices()
    n_devices = len(devices) if batch_sequences % len(devices) == 0 else 1
    mesh = jax.make_mesh((n_devices,), ("data",), devices=devices[:n_devices],
                         axis_types=(jax.sharding.AxisType.Auto,))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    forward = models.make_forward(model_config, hooks=tuple(hooks),
                                  stop_at_layer=max(models.hook_layer(h) for h in hooks) + 1)
    token_sharding = NamedSharding(mesh, P("data"))

    def activation_fn(batch: np.ndarray):
        if len(batch) % n_devices:  # a last, smaller batch
            return forward(params, batch)[1]
        return forward(params, jax.device_put(batch, token_sharding))[1]

    writers = {
        hook: store.ActivationStoreWriter.create_or_open(
            paths.join(out, hook), d=model_config.d_model, dtype=dtype,
            context_length=context_length, n_tokens=n * context_length, chunk_rows=chunk_rows,
            shard_rows=shard_rows or None,
            metadata={"model": os.path.abspath(checkpoint), "hook": hook,
                      "layer": models.hook_layer(hook), "tokens": os.path.abspath(tokens),
                      "holdout_sequences": holdout_sequences})
        for hook in hooks}
    done = min(w.committed_rows for w in writers.values()) // context_length
    if done:
        logging.info("Resuming the harvest after %d of %d sequences.", done, n)
    logging.info("Harvesting %s tokens (%d sequences x %d) at %s from %s on %d %s device(s).",
                 f"{n * context_length:,}", n, context_length, ", ".join(hooks), checkpoint,
                 n_devices, jax.default_backend())
    # Start at the batch holding the first uncommitted row: nothing before it is recomputed.
    first = done // batch_sequences * batch_sequences
    batches = ((s * context_length, sequences[s:s + batch_sequences])
               for s in range(first, n, batch_sequences))
    result = store.harvest_loop(activation_fn, batches, writers, log_every_s=progress_every_s)
    result["tokens_skipped"] += first * context_length
    return {"stores": {h: w.path for h, w in writers.items()}, **result}


# ------------------------------------------------------------------------------------------
# Command line (saejax/cli.py).
# ------------------------------------------------------------------------------------------
def _define_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "Local HF-format model directory.")
    flags.DEFINE_string("tokens", None, ".npy of token ids, or a text file (one document per "
                        "line, tokenised with the checkpoint's tokenizer.json).")
    flags.DEFINE_string("out", None, "Directory for the stores, one per hook: OUT/<hook>.")
    flags.DEFINE_list("hooks", ["blocks.8.hook_resid_post"], "Hook points to store.")
    flags.DEFINE_integer("context_length", 128, "Tokens per sequence.")
    flags.DEFINE_integer("batch_sequences", 32, "Sequences per forward pass.")
    flags.DEFINE_integer("holdout_sequences", 0, "Leave the last N sequences out (for "
                         "evals.loss_recovered_sequences=N).")
    flags.DEFINE_integer("max_sequences", 0, "Harvest at most this many sequences (0: all).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored dtype.")
    flags.DEFINE_integer("chunk_rows", 4096, "Rows per chunk (the unit of shuffling).")
    flags.DEFINE_integer("shard_rows", 0, "Rows per shard file (zarr v3 sharding; 0: one file "
                         "per chunk).")
    cli.define_device_flags()
    flags.mark_flags_as_required(["checkpoint", "tokens", "out"])


def main(argv):
    cli.positional(argv, 0, "python -m saejax.harvest --checkpoint=DIR --tokens=FILE "
                            "--out=STORES [--hooks=...]")
    cli.setup_from_flags()
    values = flags.FLAGS
    result = harvest(values.checkpoint, values.tokens, values.out, hooks=values.hooks,
                     context_length=values.context_length,
                     batch_sequences=values.batch_sequences,
                     holdout_sequences=values.holdout_sequences,
                     max_sequences=values.max_sequences, dtype=values.dtype,
                     chunk_rows=values.chunk_rows, shard_rows=values.shard_rows)
    print(f"Harvested {result['tokens_written']:,} tokens at {result['tokens_per_s']:,.0f} "
          f"tok/s ({result['tokens_skipped']:,} already there).")
    for hook, path in result["stores"].items():
        print(f"{hook}: {path}")


if __name__ == "__main__":
    # A token file or checkpoint the readers cannot parse raises ValueError: one line too.
    cli.run(main, _define_flags, errors=(*cli.KNOWN_ERRORS, ValueError))
