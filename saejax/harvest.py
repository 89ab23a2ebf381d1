"""Harvests LM activations into activation stores on disk, one store per hook point:

    python -m saejax.harvest --checkpoint=DIR --tokens=FILE --out=STORES \
        --hooks=blocks.8.hook_resid_post --context_length=128

`--checkpoint` is a local Hugging Face format directory of any family saejax reads (GPT-2,
Llama, Mistral, Qwen, Gemma 2/3, GPT-NeoX; config.json, model.safetensors or a sharded index,
and tokenizer.json for text); `--tokens` a .npy of token ids, or text: a .txt file with one
document per line, a folder of .txt files (a document per file) or a .jsonl of documents
(`{"text": ...}` per line), packed into windows as `saejax/models/tokenizer.py` says (a BOS
per window where the model expects one). Each hook's store is `STORES/<hook>` (zarr v3 via
tensorstore; see `saejax/data/store/format.py`).

Attention sinks are left out: no row is written for the positions in `--exclude_positions`
(default 0) nor for the tokens in `--exclude_token_ids` (default `special`: the tokenizer's
special tokens and the model's BOS). The store records both settings in its metadata and each
row's (sequence, position) and (document, offset), which is what traces a row back to its text.
Interrupt it at any point and run the same command again: it resumes after the last committed
chunk, writing no row twice and losing none.

Run on every process of a JAX cluster (`python -m launch.local --processes=2 -- python -m
saejax.harvest ...`, or launch.tpu / launch.slurm), the processes write each store together:
each data replica forwards its own run of the sequences and writes whole chunks (shards) of its
own (`saejax/data/store/parts.py`); the store is the one a single process writes. Killed on any
host, it resumes with the same or another process count.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace
from typing import Sequence

from absl import flags, logging
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from saejax import cli, models, paths, sharding
from saejax.data import lm, store
from saejax.errors import ConfigError


def harvest(checkpoint: str, tokens: str, out: str, *, hooks: Sequence[str],
            context_length: int, batch_sequences: int = 32, holdout_sequences: int = 0,
            max_sequences: int = 0, dtype: str = "float32", chunk_rows: int = 4096,
            shard_rows: int = 0, exclude_positions=(0,), exclude_token_ids=lm.SPECIAL,
            progress_every_s: float = 30.0, mesh_model: int = 1,
            rules=sharding.DEFAULT_RULES) -> dict:
    """Runs the model over the token sequences and writes `out/<hook>` for every hook; returns
    {"stores": {hook: path}, "tokens_per_s": ..., ...}. Resumes stores that exist.

    `exclude_positions` (ints, or "0,1") and `exclude_token_ids` ("special", "" for none, or
    ids) are the rows left out (`saejax.data.lm.keep_mask`). `mesh_model` devices split the
    model (tensor parallel, by `rules`: `models.param_shardings`), each group of them reading
    its params' shards straight from the checkpoint; the batch is split over the rest."""
    mesh = _mesh(mesh_model, batch_sequences)
    model_config, params = models.load(checkpoint, mesh=mesh, rules=rules)
    for hook in hooks:
        models.check_hook(model_config, hook, f"--hooks: {hook!r} is not a hook point of "
                          f"{checkpoint}", ConfigError)
    sequences = models.tokenizer.load_token_sequences(
        tokens, context_length, tokenizer_path=checkpoint, vocab_size=model_config.vocab_size,
        bos_token_id=model_config.bos_token_id)
    n = len(sequences) - holdout_sequences
    if max_sequences:
        n = min(n, max_sequences)
    if n <= 0:
        raise ConfigError(f"--tokens={tokens!r} holds {len(sequences)} sequences of "
                          f"{context_length} tokens; nothing is left to harvest after "
                          f"--holdout_sequences={holdout_sequences}.")
    sequences = sequences[:n]
    exclude_positions, exclude_token_ids, keep = _exclusion(
        sequences.tokens, checkpoint, model_config, exclude_positions, exclude_token_ids)
    row_starts = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int64)
    if row_starts[-1] == 0:
        raise ConfigError(f"--exclude_positions={list(exclude_positions)} and "
                          f"--exclude_token_ids leave no token of --tokens={tokens!r} to store.")

    forward = models.make_forward(model_config, hooks=tuple(hooks),
                                  stop_at_layer=max(models.hook_layer(h) for h in hooks) + 1)
    token_sharding = NamedSharding(mesh, P("data"))

    def activation_fn(batch: np.ndarray):
        # A smaller batch (the last of a process's run of sequences) is padded: one compiled
        # shape, and a sequence's activations do not depend on where the processes' runs end.
        rows = len(batch)
        batch = np.pad(batch, ((0, batch_sequences - rows), (0, 0)))
        with sharding.activate(mesh, rules):  # traced with the rules: per-shard projections
            acts = forward(params, jax.device_put(batch, token_sharding))[1]
        return {hook: x[:rows] for hook, x in acts.items()}

    def open_writers():
        return {hook: store.ActivationStoreWriter.create_or_open(
            paths.join(out, hook), d=model_config.d_model, dtype=dtype,
            context_length=context_length, n_tokens=int(row_starts[-1]),
            chunk_rows=chunk_rows, shard_rows=shard_rows or None, positions=True,
            metadata={"model": os.path.abspath(checkpoint), "hook": hook,
                      "layer": models.hook_layer(hook), "tokens": os.path.abspath(tokens),
                      "holdout_sequences": holdout_sequences,
                      "exclude_positions": list(exclude_positions),
                      "exclude_token_ids": list(exclude_token_ids)})
            for hook in hooks}

    # Every process writes whole chunks (shards) of its data replica's part of each store.
    replica, replicas = _data_replica()
    writers, rows_todo = store.open_parts(open_writers, replica=replica, replicas=replicas)
    n_rows = int(row_starts[-1])
    if rows_todo < n_rows:
        logging.info("Resuming the harvest: %s of %s rows are committed.",
                     f"{n_rows - rows_todo:,}", f"{n_rows:,}")
    logging.info("Harvesting %s tokens (%d sequences x %d, %s excluded) at %s from %s on %d "
                 "%s device(s) x %d process(es).", f"{n_rows:,}", n, context_length,
                 f"{n * context_length - n_rows:,}", ", ".join(hooks), checkpoint, mesh.size,
                 jax.default_backend(), jax.process_count())
    batches = _token_batches(sequences, keep, row_starts,
                             _sequence_ranges(writers.values(), row_starts), batch_sequences)
    seconds = _write_parts(activation_fn, batches, writers, progress_every_s)
    return {"stores": {h: w.path for h, w in writers.items()}, "tokens_written": rows_todo,
            "tokens_skipped": n_rows - rows_todo, "seconds": seconds,
            "tokens_per_s": rows_todo / seconds if seconds > 0 else 0.0}


def _write_parts(activation_fn, batches, writers, progress_every_s: float) -> float:
    """Writes this process's parts of the stores, then waits for every process's; the seconds."""
    t0 = time.perf_counter()
    store.harvest_loop(activation_fn, batches, writers, log_every_s=progress_every_s)
    # A slower process may take longer than this one, but not twice as long.
    store.finish_parts(writers, timeout_s=max(600.0, 2 * (time.perf_counter() - t0)))
    return time.perf_counter() - t0


def _mesh(mesh_model: int, batch_sequences: int):
    """A (data, model) mesh of this process's devices: `mesh_model` devices split the model;
    the batch of sequences is split over as many groups of them as the devices hold and the
    batch divides (else one). Each process is a data replica of its own (`_data_replica`)."""
    devices = jax.local_devices()
    if mesh_model < 1 or len(devices) % mesh_model:
        raise ConfigError(f"--mesh_model={mesh_model} must be a positive divisor of the "
                          f"{len(devices)} devices.")
    data = len(devices) // mesh_model
    data = data if batch_sequences % data == 0 else 1
    return sharding.make_mesh(SimpleNamespace(data=data, model=mesh_model),
                              devices[:data * mesh_model])


def _exclusion(tokens: np.ndarray, checkpoint: str, model_config, exclude_positions,
               exclude_token_ids):
    """(exclude_positions, exclude_token_ids, keep [n, context]) of the flags, checked."""
    positions = lm.exclude_positions_of(exclude_positions, tokens.shape[1],
                                        what="--exclude_positions", error=ConfigError)
    token_ids = lm.exclude_token_ids_of(exclude_token_ids, checkpoint, model_config.bos_token_id,
                                        what="--exclude_token_ids", error=ConfigError)
    return positions, token_ids, lm.keep_mask(tokens, positions, token_ids)


def _data_replica() -> tuple[int, int]:
    """(this process's data replica, replicas): the processes that forward the same sequences
    (a model-parallel group) form one replica; for now every process is one."""
    return jax.process_index(), jax.process_count()


def _sequence_ranges(writers, row_starts: np.ndarray) -> list[tuple[int, int]]:
    """The runs of sequences [a, b) whose rows this process writes (in order, merged)."""
    ranges = []
    for start, stop in sorted(p for w in writers for p in w.parts):
        a = int(np.searchsorted(row_starts, start, "right")) - 1
        b = int(np.searchsorted(row_starts, stop, "left"))
        if ranges and a <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], b))
        else:
            ranges.append((a, b))
    return ranges


def _token_batches(sequences, keep: np.ndarray, row_starts: np.ndarray,
                   ranges: list[tuple[int, int]], batch_sequences: int):
    """`store.TokenBatch`es of `batch_sequences` sequences of each run of `ranges`, each token
    with its (sequence, position) and (document, offset)."""
    n, context_length = sequences.tokens.shape
    traced = np.stack([sequences.documents, sequences.offsets], axis=-1)
    where = np.stack(np.broadcast_arrays(np.arange(n, dtype=np.int32)[:, None],
                                         np.arange(context_length, dtype=np.int32)), axis=-1)
    for first, stop in ranges:
        for s in range(first, stop, batch_sequences):
            b = slice(s, min(s + batch_sequences, stop))
            yield store.TokenBatch(int(row_starts[s]), sequences.tokens[b], keep[b], where[b],
                                   traced[b])


# ------------------------------------------------------------------------------------------
# Command line (saejax/cli.py).
# ------------------------------------------------------------------------------------------
def _define_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "Local HF-format model directory.")
    flags.DEFINE_string("tokens", None, ".npy of token ids, or text tokenised with the "
                        "checkpoint's tokenizer.json: a .txt (one document per line), a folder "
                        "of .txt files (one document each) or a .jsonl ({\"text\": ...} per "
                        "line).")
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
    flags.DEFINE_list("exclude_positions", ["0"], "Positions of each sequence not stored "
                      "(attention sinks); empty for none.")
    flags.DEFINE_string("exclude_token_ids", lm.SPECIAL, "Token ids not stored: 'special' (the "
                        "tokenizer's special tokens and the model's BOS), '' for none, or "
                        "ids '0,1,2'.")
    flags.DEFINE_integer("mesh_model", 1, "Devices that split the model (tensor parallel: its "
                         "heads, MLP and vocabulary); the batch is split over the rest. Query "
                         "heads must divide it.")
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
                     chunk_rows=values.chunk_rows, shard_rows=values.shard_rows,
                     exclude_positions=values.exclude_positions,
                     exclude_token_ids=values.exclude_token_ids,
                     mesh_model=values.mesh_model)
    if jax.process_index():
        return  # process 0 reports for all
    print(f"Harvested {result['tokens_written']:,} tokens at {result['tokens_per_s']:,.0f} "
          f"tok/s ({result['tokens_skipped']:,} already there).")
    for hook, path in result["stores"].items():
        print(f"{hook}: {path}")


if __name__ == "__main__":
    # A token file or checkpoint the readers cannot parse raises ValueError: one line too.
    cli.run(main, _define_flags, errors=(*cli.KNOWN_ERRORS, ValueError))
