"""Writing activation stores: `ActivationStoreWriter` appends committed rows to one store, and
`harvest_loop` fills one store per hook from batches of token sequences, resuming where each
stopped."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from absl import logging
import numpy as np
import tensorstore as ts

from saejax import cli, paths
from saejax.data.store import format as store_format
from saejax.data.store.format import LAYOUT_FIELDS, StoreError


def _metadata_to_write(path: str, wanted: dict) -> dict:
    """The store's metadata.json: the existing one if every field matches `wanted`, or a new one
    written now. A mismatch, or a non-empty directory that is not a store, touches nothing."""
    meta_path = paths.join(path, "metadata.json")
    if paths.exists(meta_path):
        existing = paths.read_json(meta_path)
        for field in sorted((set(wanted) | set(existing)) - {"created_time"}):
            if existing.get(field) != wanted.get(field):
                raise StoreError(
                    f"{path}: cannot resume: the existing store has {field}="
                    f"{existing.get(field)!r} but {wanted.get(field)!r} was asked for. "
                    "Nothing was changed; write to another path, or delete this store to "
                    "start it over.")
        return existing
    if paths.isdir(path) and paths.listdir(path):
        raise StoreError(f"{path}: exists, is not empty and has no metadata.json (not "
                         "an activation store); refusing to write into it.")
    paths.makedirs(path)
    metadata = {**wanted, "created_time": store_format.utc_now()}
    # Metadata first: a crash after it leaves a store that resumes from zero rows.
    paths.write_json(meta_path, metadata, indent=1)
    return metadata


class ActivationStoreWriter(store_format.StoreLayout):
    """Appends rows to one store; `committed_rows` survives crashes. Make one with
    `ActivationStoreWriter.create_or_open(...)`."""

    def __init__(self, path: str, metadata: dict, activations: ts.TensorStore,
                 token_ids: ts.TensorStore, committed_rows: int,
                 trace: dict[str, ts.TensorStore] | None = None):
        self.path = path
        self.metadata = metadata
        self._activations = activations
        self._token_ids = token_ids
        self._trace = trace or {}   # positions, documents: in stores with has_positions
        self._committed_rows = committed_rows

    @classmethod
    def create_or_open(cls, path: str, *, d: int, dtype, context_length: int, n_tokens: int,
                       chunk_rows: int = 4096, shard_rows: int | None = None,
                       checksum: bool = False, positions: bool = False,
                       metadata: Mapping[str, Any] | None = None) -> "ActivationStoreWriter":
        """Creates the store at `path`, or reopens it to resume if it exists.

        Reopening checks that every layout field and every field of `metadata` (model, hook,
        layer, ...) matches what the store was created with; a mismatch raises a StoreError
        naming the store and the field, and nothing on disk is touched.
        `n_tokens` (planned) must be a whole number of sequences; `shard_rows`, if given, a
        multiple of `chunk_rows` (use it for stores of millions of chunks); `checksum`: a
        crc32c per chunk, so that flipped bits are read errors (slower reads, see
        `format.zarr_spec`); `positions`: the store keeps each row's (sequence, position) and
        (document, offset), so rows may be left out (n_tokens need not be whole sequences) and
        every `write` passes them.
        """
        path = paths.absolute(path)
        layout = store_format.layout(d=d, dtype=dtype, context_length=context_length,
                                     n_tokens=n_tokens, chunk_rows=chunk_rows,
                                     shard_rows=shard_rows, checksum=checksum,
                                     positions=positions)
        store_format.check_layout(path, layout)
        extra = json.loads(json.dumps(dict(metadata or {})))  # as it will read back
        clashes = sorted(set(extra) & (set(LAYOUT_FIELDS) | {"created_time"}))
        if clashes:
            raise StoreError(f"{path}: metadata fields {clashes} are set by the store itself; "
                             "pass them as arguments instead.")
        metadata_out = _metadata_to_write(path, {**layout, **extra})
        n, array_args = layout["n_tokens"], dict(dtype=layout["dtype"], chunk_rows=chunk_rows,
                                               shard_rows=shard_rows, checksum=checksum)
        futures = [
            ts.open(store_format.zarr_spec(paths.join(path, "activations"),
                                           shape=(n, layout["d"]), **array_args),
                    create=True, open=True),
            ts.open(store_format.zarr_spec(paths.join(path, "token_ids"), shape=(n,),
                                           **dict(array_args, dtype="int32")),
                    create=True, open=True),
            # Chunks equal to the fill value are written too: a missing chunk is an error.
            *(ts.open({**store_format.zarr_spec(paths.join(path, name), shape=(n, 2),
                                                **dict(array_args, dtype="int32")),
                       "store_data_equal_to_fill_value": True}, create=True, open=True)
              for name in (store_format.TRACE_ARRAYS if positions else ())),
        ]
        try:
            activations, token_ids, *trace = (f.result() for f in futures)
        except ValueError as e:
            raise StoreError(f"{path}: the zarr arrays do not match metadata.json: {e}") from e
        return cls(path, metadata_out, activations, token_ids,
                   store_format.committed_rows(path),
                   dict(zip(store_format.TRACE_ARRAYS, trace)))

    @property
    def committed_rows(self) -> int:
        """Rows [0, committed_rows) are on disk; the next write must start here."""
        return self._committed_rows

    @property
    def complete(self) -> bool:
        return self._committed_rows == self.n_tokens

    def progress(self) -> tuple[int, int]:
        """(rows written, rows to write), for progress lines."""
        return self._committed_rows, self.n_tokens

    def write(self, start_row: int, activations, token_ids, positions=None,
              documents=None) -> None:
        """Writes rows [start_row, start_row + rows) and then commits them.

        `activations [rows, d]` (NumPy or JAX, any float dtype: cast to the store's dtype),
        `token_ids [rows]`; in a store with `has_positions`, `positions [rows, 2]` (sequence,
        position) and `documents [rows, 2]` (document, offset; -1 where unknown). `start_row` must equal `committed_rows`. Any row count works; writes
        that start and end on multiples of `chunk_rows` (of `shard_rows` if sharded) are fastest,
        as no chunk is read back and rewritten. A crash between the data and the commit leaves
        the rows uncommitted, and the resumed harvest rewrites them identically.
        """
        if start_row != self._committed_rows:
            raise StoreError(f"{self.path}: a write must start at committed_rows="
                             f"{self._committed_rows}, not {start_row} (skip what is committed; "
                             "leave no gap).")
        self.write_rows(start_row, activations, token_ids, positions, documents)
        self.commit(start_row + np.shape(activations)[0])

    def write_rows(self, start_row: int, activations, token_ids, positions=None,
                   documents=None) -> None:
        """Writes rows [start_row, start_row + rows) (as `write` does) without committing them:
        for the writers of `store.parts`, which commit the rows they own themselves."""
        activations = np.asarray(activations)
        token_ids = np.asarray(token_ids)
        rows = activations.shape[0]
        if activations.shape != (rows, self.d) or token_ids.shape != (rows,):
            raise StoreError(f"{self.path}: write expects activations [rows, {self.d}] and "
                             f"token_ids [rows], got {activations.shape} and {token_ids.shape}.")
        trace = {"positions": positions, "documents": documents}
        if self.has_positions:
            for name, value in trace.items():
                if value is None or np.shape(value) != (rows, 2):
                    raise StoreError(f"{self.path}: the store keeps each row's {name}; write "
                                     f"expects {name} [rows, 2], got "
                                     f"{None if value is None else np.shape(value)}.")
        elif positions is not None or documents is not None:
            raise StoreError(f"{self.path}: the store was created without positions "
                             "(positions=False); it cannot keep them.")
        stop = start_row + rows
        if stop > self.n_tokens:
            raise StoreError(f"{self.path}: rows [{start_row}, {stop}) go past the planned "
                             f"n_tokens={self.n_tokens}.")
        futures = [self._activations[start_row:stop].write(activations.astype(self.dtype,
                                                                              copy=False)),
                   self._token_ids[start_row:stop].write(token_ids.astype(np.int32, copy=False)),
                   *(array[start_row:stop].write(np.asarray(trace[name], np.int32))
                     for name, array in self._trace.items())]
        for future in futures:
            future.result()  # the data is on disk (file_io_sync) before it is committed

    def commit(self, rows: int) -> None:
        """Records rows [0, rows) as on disk (their data must be). Atomic: a reader sees the old
        progress or the new, never a torn file."""
        paths.write_json(paths.join(self.path, "progress.json"), {
            "committed_rows": int(rows), "n_tokens": self.n_tokens,
            "complete": rows == self.n_tokens,
            "updated_time": store_format.utc_now()}, indent=1)
        self._committed_rows = int(rows)


class TokenBatch(NamedTuple):
    """One batch of `harvest_loop`: `tokens [b, context_length]` whose rows start at store row
    `start_row`. With `keep` (bool [b, context_length]) only the kept tokens are rows, and
    `positions`/`documents` ([b, context_length, 2]) are what a store with positions records
    for each; a plain `(start_row, tokens)` pair keeps every token."""

    start_row: int
    tokens: np.ndarray
    keep: np.ndarray | None = None
    positions: np.ndarray | None = None
    documents: np.ndarray | None = None

    def rows(self, acts, d: int) -> tuple:
        """(activations [rows, d], token_ids [rows], positions, documents) of the kept rows."""
        x, tokens = np.asarray(acts).reshape(-1, d), self.tokens.reshape(-1)
        trace = [None if a is None else np.asarray(a).reshape(-1, 2)
                 for a in (self.positions, self.documents)]
        if self.keep is None:
            return (x, tokens, *trace)
        keep = np.asarray(self.keep).reshape(-1)
        return (x[keep], tokens[keep], *(None if a is None else a[keep] for a in trace))

    @property
    def n_rows(self) -> int:
        return int(self.tokens.size if self.keep is None else np.count_nonzero(self.keep))


def harvest_loop(activation_fn: Callable[[np.ndarray], Mapping[str, Any]],
                 token_batches: Iterable[tuple],
                 writers: Mapping[str, ActivationStoreWriter], *, progress: bool = True,
                 log_every_s: float = 30.0) -> dict:
    """Writes one store per hook from batches of token sequences, resuming where each stopped.

    `token_batches` yields `TokenBatch`es, or `(start_row, token_ids [b, context_length])`
    (start_row = the index of the batch's first sequence times context_length);
    `activation_fn(token_ids)` returns `{hook: [b, context_length, d]}` for every hook in
    `writers`. Batches every store has already committed are skipped without calling
    `activation_fn`; a batch one store has and another has not is computed and written to the
    one that lacks it. The next batch's activations are dispatched (asynchronously, under JAX)
    before the current one is written, so the model and the disk work at the same time.
    Returns row counts and the rate (`tokens_*`: rows written).
    """
    t0 = last_log = time.perf_counter()
    written = skipped = 0

    def write_batch(batch: TokenBatch, acts):
        start, rows = batch.start_row, batch.n_rows
        for hook, writer in writers.items():
            committed = writer.committed_rows
            if committed >= start + rows:
                continue
            if committed < start:
                raise StoreError(f"{writer.path}: committed_rows={committed} but the next batch "
                                 f"starts at row {start}; rows [{committed}, {start}) would be "
                                 "missing. Start token_batches at or before the committed row.")
            if hook not in acts:
                raise KeyError(f"activation_fn returned no activations for hook {hook!r}.")
            skip = committed - start
            x, tokens, positions, documents = batch.rows(acts[hook], writer.d)
            trace = ((positions[skip:], documents[skip:]) if writer.has_positions
                     else ())
            writer.write(committed, x[skip:], tokens[skip:], *trace)
        return rows

    pending = None
    for item in token_batches:
        batch = TokenBatch(*item)
        batch = batch._replace(tokens=np.asarray(batch.tokens))
        tokens = batch.tokens
        for writer in writers.values():
            if tokens.ndim != 2 or tokens.shape[1] != writer.context_length:
                raise StoreError(f"{writer.path}: token batches must be [b, "
                                 f"{writer.context_length}], got {tokens.shape}.")
            if writer.has_positions and batch.positions is None:
                raise StoreError(f"{writer.path}: the store keeps each row's positions; the "
                                 "token batches must carry them (TokenBatch.positions).")
        rows = batch.n_rows
        if all(w.committed_rows >= batch.start_row + rows for w in writers.values()):
            skipped += rows
            continue
        acts = activation_fn(tokens)
        if pending is not None:
            written += write_batch(*pending)
        pending = (batch, acts)
        now = time.perf_counter()
        if progress and now - last_log >= log_every_s and written:
            last_log = now
            # This process's rows: in a multi-process harvest, its part of the store.
            done, n_tokens = min(w.progress() for w in writers.values())
            rate = written / (now - t0)
            logging.info("harvest: %s/%s tokens (%.1f%%) | %.0f tok/s | ETA %s", f"{done:,}",
                         f"{n_tokens:,}", 100 * done / max(n_tokens, 1), rate,
                         cli.format_duration((n_tokens - done) / rate))
    if pending is not None:
        written += write_batch(*pending)
    seconds = time.perf_counter() - t0
    result = {"tokens_written": written, "tokens_skipped": skipped, "seconds": seconds,
              "tokens_per_s": written / seconds if seconds > 0 else 0.0}
    if progress:
        logging.info("harvest: wrote %s tokens in %s (%.0f tok/s), skipped %s already committed.",
                     f"{written:,}", cli.format_duration(seconds), result["tokens_per_s"],
                     f"{skipped:,}")
    return result
