"""The activation store: LM activations harvested to disk, and the shuffled stream read from it.

One directory holds one hook point's activations:

    STORE/metadata.json   format, d, dtype, context_length, n_tokens (planned), chunk_rows,
                          shard_rows, created_time, and the harvest's own fields (model, hook, ...)
    STORE/activations     zarr v3 (tensorstore) [n_tokens, d] float32 or bfloat16, chunk_rows rows
                          per chunk (with shard_rows: several chunks per file, zarr v3 sharding)
    STORE/token_ids       zarr v3 int32 [n_tokens]: row r is sequence r // context_length,
                          position r % context_length
    STORE/progress.json   rows committed; replaced atomically only after their data is on disk

`ActivationStoreWriter` and `harvest_loop` write stores (resumably); `open_store` opens one for
reading. `ArraySource` streams training batches from a store or a `.npy` file: batch i is a pure
function of (seed, i), so the data position in a checkpoint is just the batch count.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import os
import queue
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Mapping, Protocol

from absl import logging
import jax
import ml_dtypes
import numpy as np
import tensorstore as ts
from jax.sharding import NamedSharding

from saejax import cli, paths, sharding
from saejax.sharding import ConfigError

FORMAT = "saejax.activation_store"
FORMAT_VERSION = 1
DTYPES = ("float32", "bfloat16")
# The fields that define a store's layout; the harvest's own metadata may not reuse these names.
LAYOUT_FIELDS = ("format", "format_version", "d", "dtype", "context_length", "n_tokens",
                 "chunk_rows", "shard_rows", "checksum")
# Rows per shuffling unit for a .npy file (a store uses its own chunk_rows).
NPY_CHUNK_ROWS = 4096


class StoreError(ConfigError):
    """A store (or .npy file) that cannot be used as asked; the message names it and the problem.

    A ConfigError, so `saejax.main` reports it as one line, like any other unusable setting.
    """


# ------------------------------------------------------------------------------------------
# On-disk layout.
# ------------------------------------------------------------------------------------------
def _name(dtype) -> str:
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def _dtype_name(dtype) -> str:
    name = _name(dtype)
    if name not in DTYPES:
        raise StoreError(f"dtype {name!r}: an activation store holds one of {DTYPES}.")
    return name


def _numpy_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _zarr_spec(path: str, *, shape: tuple[int, ...], dtype: str, chunk_rows: int,
               shard_rows: int | None, checksum: bool) -> dict:
    """Row-chunked and uncompressed: activations do not compress, and reading must be fast.

    A missing or truncated chunk is always a read error. `checksum` adds a crc32c to every
    chunk, so flipped bits are one too; it costs about 10 ms of one core per 12 MB chunk read
    (measured with tensorstore 0.1.86), which on a fast reader is the bottleneck.
    """
    raw = [{"name": "bytes", "configuration": {"endian": "little"}}]
    crc = [*raw, {"name": "crc32c"}]
    chunk_codecs = crc if checksum else raw
    if shard_rows:
        codecs = [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [chunk_rows, *shape[1:]],
            "codecs": chunk_codecs,
            "index_codecs": crc,
            "index_location": "end"}}]
        grid = [shard_rows, *shape[1:]]
    else:
        codecs, grid = chunk_codecs, [chunk_rows, *shape[1:]]
    return {
        "driver": "zarr3",
        "kvstore": paths.kvstore(path),
        "metadata": {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": grid}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": codecs,
            "fill_value": 0,
        },
    }


def _layout(*, d, dtype, context_length, n_tokens, chunk_rows, shard_rows, checksum) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "d": int(d),
            "dtype": _dtype_name(dtype), "context_length": int(context_length),
            "n_tokens": int(n_tokens), "chunk_rows": int(chunk_rows),
            "shard_rows": None if shard_rows is None else int(shard_rows),
            "checksum": bool(checksum)}


def _check_layout(path: str, layout: dict) -> None:
    d, ctx, n, chunk, shard = (layout[k] for k in ("d", "context_length", "n_tokens",
                                                   "chunk_rows", "shard_rows"))
    for name, value in (("d", d), ("context_length", ctx), ("n_tokens", n),
                        ("chunk_rows", chunk)):
        if value <= 0:
            raise StoreError(f"{path}: {name}={value} must be positive.")
    if n % ctx:
        raise StoreError(f"{path}: n_tokens={n} is not a whole number of sequences of "
                         f"context_length={ctx}; use n_tokens={n // ctx * ctx} or "
                         f"{-(-n // ctx) * ctx}.")
    if shard is not None and (shard <= 0 or shard % chunk):
        raise StoreError(f"{path}: shard_rows={shard} must be a positive multiple of "
                         f"chunk_rows={chunk}.")


# ------------------------------------------------------------------------------------------
# Writing.
# ------------------------------------------------------------------------------------------
class ActivationStoreWriter:
    """Appends rows to one store; `committed_rows` survives crashes. Make one with
    `ActivationStoreWriter.create_or_open(...)`."""

    def __init__(self, path: str, metadata: dict, activations: ts.TensorStore,
                 token_ids: ts.TensorStore, committed_rows: int):
        self.path = path
        self.metadata = metadata
        self.d = metadata["d"]
        self.dtype = _numpy_dtype(metadata["dtype"])
        self.context_length = metadata["context_length"]
        self.n_tokens = metadata["n_tokens"]
        self.chunk_rows = metadata["chunk_rows"]
        self._activations = activations
        self._token_ids = token_ids
        self._committed_rows = committed_rows

    @classmethod
    def create_or_open(cls, path: str, *, d: int, dtype, context_length: int, n_tokens: int,
                       chunk_rows: int = 4096, shard_rows: int | None = None,
                       checksum: bool = False, metadata: Mapping[str, Any] | None = None
                       ) -> "ActivationStoreWriter":
        """Creates the store at `path`, or reopens it to resume if it exists.

        Reopening checks that every layout field and every field of `metadata` (model, hook,
        layer, ...) matches what the store was created with; a mismatch raises a StoreError
        naming the store and the field, and nothing on disk is touched.
        `n_tokens` (planned) must be a whole number of sequences; `shard_rows`, if given, a
        multiple of `chunk_rows` (use it for stores of millions of chunks); `checksum`: a
        crc32c per chunk, so that flipped bits are read errors (slower reads, see _zarr_spec).
        """
        path = paths.absolute(path)
        layout = _layout(d=d, dtype=dtype, context_length=context_length, n_tokens=n_tokens,
                         chunk_rows=chunk_rows, shard_rows=shard_rows, checksum=checksum)
        _check_layout(path, layout)
        extra = json.loads(json.dumps(dict(metadata or {})))  # as it will read back
        clashes = sorted(set(extra) & (set(LAYOUT_FIELDS) | {"created_time"}))
        if clashes:
            raise StoreError(f"{path}: metadata fields {clashes} are set by the store itself; "
                             "pass them as arguments instead.")
        wanted = {**layout, **extra}
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
            metadata_out = existing
        else:
            if paths.isdir(path) and paths.listdir(path):
                raise StoreError(f"{path}: exists, is not empty and has no metadata.json (not "
                                 "an activation store); refusing to write into it.")
            paths.makedirs(path)
            metadata_out = {**wanted, "created_time": datetime.datetime.now(
                datetime.timezone.utc).isoformat(timespec="seconds")}
            # Metadata first: a crash after it leaves a store that resumes from zero rows.
            paths.write_json(meta_path, metadata_out, indent=1)
        n, array_args = layout["n_tokens"], dict(dtype=layout["dtype"], chunk_rows=chunk_rows,
                                               shard_rows=shard_rows, checksum=checksum)
        futures = [
            ts.open(_zarr_spec(paths.join(path, "activations"), shape=(n, layout["d"]),
                               **array_args), create=True, open=True),
            ts.open(_zarr_spec(paths.join(path, "token_ids"), shape=(n,),
                               **dict(array_args, dtype="int32")), create=True, open=True),
        ]
        try:
            activations, token_ids = (f.result() for f in futures)
        except ValueError as e:
            raise StoreError(f"{path}: the zarr arrays do not match metadata.json: {e}") from e
        progress_path = paths.join(path, "progress.json")
        committed = (paths.read_json(progress_path)["committed_rows"]
                     if paths.exists(progress_path) else 0)
        return cls(path, metadata_out, activations, token_ids, committed)

    @property
    def committed_rows(self) -> int:
        """Rows [0, committed_rows) are on disk; the next write must start here."""
        return self._committed_rows

    @property
    def complete(self) -> bool:
        return self._committed_rows == self.n_tokens

    def write(self, start_row: int, activations, token_ids) -> None:
        """Writes rows [start_row, start_row + rows) and then commits them.

        `activations [rows, d]` (NumPy or JAX, any float dtype: cast to the store's dtype),
        `token_ids [rows]`. `start_row` must equal `committed_rows`. Any row count works; writes
        that start and end on multiples of `chunk_rows` (of `shard_rows` if sharded) are fastest,
        as no chunk is read back and rewritten. A crash between the data and the commit leaves
        the rows uncommitted, and the resumed harvest rewrites them identically.
        """
        if start_row != self._committed_rows:
            raise StoreError(f"{self.path}: a write must start at committed_rows="
                             f"{self._committed_rows}, not {start_row} (skip what is committed; "
                             "leave no gap).")
        activations = np.asarray(activations)
        token_ids = np.asarray(token_ids)
        rows = activations.shape[0]
        if activations.shape != (rows, self.d) or token_ids.shape != (rows,):
            raise StoreError(f"{self.path}: write expects activations [rows, {self.d}] and "
                             f"token_ids [rows], got {activations.shape} and {token_ids.shape}.")
        stop = start_row + rows
        if stop > self.n_tokens:
            raise StoreError(f"{self.path}: rows [{start_row}, {stop}) go past the planned "
                             f"n_tokens={self.n_tokens}.")
        futures = [self._activations[start_row:stop].write(activations.astype(self.dtype,
                                                                              copy=False)),
                   self._token_ids[start_row:stop].write(token_ids.astype(np.int32, copy=False))]
        for future in futures:
            future.result()  # the data is on disk (file_io_sync) before it is committed
        self._commit(stop)

    def _commit(self, rows: int) -> None:
        # Atomic: a reader sees the old progress or the new, never a torn file.
        paths.write_json(paths.join(self.path, "progress.json"), {
            "committed_rows": int(rows), "n_tokens": self.n_tokens,
            "complete": rows == self.n_tokens,
            "updated_time": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}, indent=1)
        self._committed_rows = int(rows)


def harvest_loop(activation_fn: Callable[[np.ndarray], Mapping[str, Any]],
                 token_batches: Iterable[tuple[int, np.ndarray]],
                 writers: Mapping[str, ActivationStoreWriter], *, progress: bool = True,
                 log_every_s: float = 30.0) -> dict:
    """Writes one store per hook from batches of token sequences, resuming where each stopped.

    `token_batches` yields `(start_row, token_ids [b, context_length])` (start_row = the index of
    the batch's first sequence times context_length); `activation_fn(token_ids)` returns
    `{hook: [b, context_length, d]}` for every hook in `writers`. Batches every store has already
    committed are skipped without calling `activation_fn`; a batch one store has and another has
    not is computed and written to the one that lacks it. The next batch's activations are
    dispatched (asynchronously, under JAX) before the current one is written, so the model and
    the disk work at the same time. Returns token counts and the rate.
    """
    n_tokens = max(w.n_tokens for w in writers.values())
    t0 = last_log = time.perf_counter()
    written = skipped = 0

    def write_batch(start, tokens, acts):
        rows = tokens.size
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
            x = np.asarray(acts[hook]).reshape(rows, writer.d)
            writer.write(committed, x[skip:], tokens.reshape(-1)[skip:])
        return rows

    pending = None
    for start, tokens in token_batches:
        tokens = np.asarray(tokens)
        for writer in writers.values():
            if tokens.ndim != 2 or tokens.shape[1] != writer.context_length:
                raise StoreError(f"{writer.path}: token batches must be [b, "
                                 f"{writer.context_length}], got {tokens.shape}.")
        if all(w.committed_rows >= start + tokens.size for w in writers.values()):
            skipped += tokens.size
            continue
        acts = activation_fn(tokens)
        if pending is not None:
            written += write_batch(*pending)
        pending = (start, tokens, acts)
        now = time.perf_counter()
        if progress and now - last_log >= log_every_s and written:
            last_log = now
            done = min(w.committed_rows for w in writers.values())
            rate = written / (now - t0)
            logging.info("harvest: %s/%s tokens (%.1f%%) | %.0f tok/s | ETA %s", f"{done:,}",
                         f"{n_tokens:,}", 100 * done / n_tokens, rate,
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


# ------------------------------------------------------------------------------------------
# Reading: one tiny interface over a store and a .npy file.
# ------------------------------------------------------------------------------------------
class Read(Protocol):
    def result(self) -> np.ndarray: ...


class Rows(Protocol):
    """What the stream needs from a source of rows."""

    name: str         # the path, for error messages
    n_rows: int       # rows that may be read
    d: int
    dtype: np.dtype   # as stored; the stream casts to float32
    chunk_rows: int   # the unit of shuffling and of reading

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> Read:
        """Starts reading rows [start, stop) (into `out [stop - start, d]`, of `dtype`, if
        given); `.result()` waits and returns them."""


class Done:
    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


class _StoreRead:
    """A tensorstore read whose failure names the store and the rows."""

    def __init__(self, future, name: str, start: int, stop: int, out: np.ndarray | None = None):
        self._future, self._name, self._start, self._stop = future, name, start, stop
        self._out = out

    def result(self) -> np.ndarray:
        try:
            value = self._future.result()
            return value if self._out is None else self._out
        except ValueError as e:
            raise StoreError(
                f"{self._name}: rows [{self._start}, {self._stop}) could not be read ({e}). A "
                "chunk file is missing or corrupt: harvest these rows again (or delete the "
                "store and re-harvest it).") from e


@dataclasses.dataclass
class ActivationStore:
    """A store opened for reading (`open_store`); implements `Rows`."""

    path: str
    metadata: dict
    n_rows: int                  # committed rows (all of n_tokens for a complete store)
    activations: ts.TensorStore
    token_id_array: ts.TensorStore

    @property
    def name(self) -> str:
        return self.path

    @property
    def d(self) -> int:
        return self.metadata["d"]

    @property
    def dtype(self) -> np.dtype:
        return _numpy_dtype(self.metadata["dtype"])

    @property
    def chunk_rows(self) -> int:
        return self.metadata["chunk_rows"]

    @property
    def context_length(self) -> int:
        return self.metadata["context_length"]

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> Read:
        if out is None:
            return _StoreRead(self.activations[start:stop].read(), self.path, start, stop)
        # Copying straight into the caller's buffer saves a copy (and is faster than read()).
        target = ts.array(out, copy=False, write=True)
        return _StoreRead(target.write(self.activations[start:stop]), self.path, start, stop,
                          out)

    def token_ids(self, start: int, stop: int) -> np.ndarray:
        return _StoreRead(self.token_id_array[start:stop].read(), self.path, start,
                          stop).result()

    def sequence_position(self, row: int) -> tuple[int, int]:
        """(sequence, position in it) of `row`."""
        return divmod(int(row), self.context_length)


def open_store(path: str, *, expected_d: int | None = None, expected_dtype=None,
               allow_partial: bool = False) -> ActivationStore:
    """Opens a store read-only after checking it is one, it is complete (or `allow_partial`:
    read only the committed rows), and its width and dtype are the expected ones.

    A chunk file that has gone missing is an error when it is read, not zeros.
    """
    path = paths.absolute(path)
    meta_path = paths.join(path, "metadata.json")
    if not paths.isdir(path):
        raise StoreError(f"{path}: no such activation store (not a directory).")
    if not paths.exists(meta_path):
        raise StoreError(f"{path}: not an activation store (no metadata.json).")
    metadata = paths.read_json(meta_path)
    if metadata.get("format") != FORMAT:
        raise StoreError(f"{path}: metadata.json has format={metadata.get('format')!r}, not "
                         f"{FORMAT!r}.")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise StoreError(f"{path}: format_version={metadata['format_version']} is newer than "
                         f"this saejax reads ({FORMAT_VERSION}); update saejax.")
    if expected_d is not None and metadata["d"] != int(expected_d):
        raise StoreError(f"{path}: the store's activations have d={metadata['d']} but "
                         f"data.d={expected_d}; set data.d={metadata['d']} or use the store "
                         "of the intended hook point.")
    if expected_dtype is not None and metadata["dtype"] != _name(expected_dtype):
        raise StoreError(f"{path}: the store holds {metadata['dtype']} but "
                         f"{_name(expected_dtype)} was expected.")
    progress_path = paths.join(path, "progress.json")
    committed = (paths.read_json(progress_path)["committed_rows"]
                 if paths.exists(progress_path) else 0)
    if committed < metadata["n_tokens"] and not allow_partial:
        raise StoreError(f"{path}: incomplete store: {committed:,} of {metadata['n_tokens']:,} "
                         "rows committed. Finish the harvest (it resumes), or allow a partial "
                         "store (data.allow_partial=True) to train on the committed rows.")
    specs = [{"driver": "zarr3", "kvstore": paths.kvstore(paths.join(path, name)),
              "fill_missing_data_reads": False} for name in ("activations", "token_ids")]
    try:
        activations, token_ids = [f.result() for f in [ts.open(s, read=True) for s in specs]]
    except ValueError as e:
        raise StoreError(f"{path}: cannot open the zarr arrays: {e}") from e
    if tuple(activations.shape) != (metadata["n_tokens"], metadata["d"]):
        raise StoreError(f"{path}: activations are {tuple(activations.shape)} but "
                         f"metadata.json says [{metadata['n_tokens']}, {metadata['d']}].")
    return ActivationStore(path, metadata, committed, activations, token_ids)


class NpyRows:
    """A `.npy` array `[tokens, d]` a user brings, memory-mapped; implements `Rows`."""

    def __init__(self, path: str, *, expected_d: int | None = None,
                 chunk_rows: int = NPY_CHUNK_ROWS):
        self.name = os.path.abspath(path)
        try:
            self._array = np.load(self.name, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise StoreError(f"{self.name}: cannot be read as a .npy array ({e}).") from e
        if self._array.ndim != 2:
            raise StoreError(f"{self.name}: expected a [tokens, d] array, got shape "
                             f"{self._array.shape}.")
        if not np.issubdtype(self._array.dtype, np.floating):
            raise StoreError(f"{self.name}: expected floating-point activations, got "
                             f"{self._array.dtype}.")
        self.n_rows, self.d = self._array.shape
        if expected_d is not None and self.d != int(expected_d):
            raise StoreError(f"{self.name}: the array's activations have d={self.d} but "
                             f"data.d={expected_d}; set data.d={self.d}.")
        self.dtype = self._array.dtype
        self.chunk_rows = int(chunk_rows)

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> Read:
        if out is None:
            return Done(np.array(self._array[start:stop]))
        np.copyto(out, self._array[start:stop])
        return Done(out)


def open_rows(path: str, *, expected_d: int | None = None, allow_partial: bool = False,
              npy_chunk_rows: int = NPY_CHUNK_ROWS) -> Rows:
    """A store directory, or a `.npy` file (chosen by the path)."""
    if path.endswith(".npy") or (not paths.is_remote(path) and os.path.isfile(path)):
        return NpyRows(path, expected_d=expected_d, chunk_rows=npy_chunk_rows)
    return open_store(path, expected_d=expected_d, allow_partial=allow_partial)


# ------------------------------------------------------------------------------------------
# The shuffled stream: positions -> rows, pure functions of the seed.
# ------------------------------------------------------------------------------------------
def split_rows(n_rows: int, chunk_rows: int, eval_tokens: int, *, name: str = "") -> int:
    """The number of training rows: everything before the last `eval_tokens` rows, rounded down
    to whole chunks (the evaluation rows are the rest, at least `eval_tokens`)."""
    train_rows = (n_rows - int(eval_tokens)) // chunk_rows * chunk_rows if eval_tokens else n_rows
    if train_rows <= 0:
        raise StoreError(f"{name}: {n_rows:,} rows hold no training chunk of {chunk_rows} rows "
                         f"once data.eval_tokens={eval_tokens:,} are held out; lower "
                         "data.eval_tokens (or data.npy_chunk_rows for a .npy), or harvest "
                         "more.")
    return train_rows


class ShuffledStream:
    """Maps stream positions to rows [0, train_rows): epoch after epoch, each a permutation.

    Epoch e visits the chunks in a random order (seeded by seed, e); it takes them
    `shuffle_buffer_chunks` at a time into a window, whose rows are permuted (seeded by seed, e,
    window); the epoch's stream is its windows one after another. So every training row appears
    exactly once per epoch, and any position's row is computed from (seed, position) alone.
    """

    def __init__(self, *, train_rows: int, chunk_rows: int, seed: int,
                 shuffle_buffer_chunks: int):
        if shuffle_buffer_chunks < 1:
            raise ConfigError(f"data.shuffle_buffer_chunks={shuffle_buffer_chunks} must be >= 1.")
        self.train_rows, self.chunk_rows = int(train_rows), int(chunk_rows)
        self.seed, self.buffer_chunks = int(seed), int(shuffle_buffer_chunks)
        self.n_chunks = -(-self.train_rows // self.chunk_rows)
        self.n_windows = -(-self.n_chunks // self.buffer_chunks)
        self._chunk_sizes = np.full(self.n_chunks, self.chunk_rows, np.int64)
        self._chunk_sizes[-1] = self.train_rows - (self.n_chunks - 1) * self.chunk_rows
        self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's chunk order and its windows' start offsets (n_windows + 1 of them)."""
        if epoch not in self._epoch_cache:
            order = np.random.default_rng([self.seed, 0, epoch]).permutation(self.n_chunks)
            sizes = self._chunk_sizes[order]
            window_sizes = np.add.reduceat(sizes, np.arange(0, self.n_chunks, self.buffer_chunks))
            starts = np.concatenate([[0], np.cumsum(window_sizes)])
            if len(self._epoch_cache) > 4:
                self._epoch_cache.pop(min(self._epoch_cache))
            self._epoch_cache[epoch] = (order, starts)
        return self._epoch_cache[epoch]

    def window_of(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(int(position), self.train_rows)
        _, starts = self._epoch(epoch)
        return epoch, int(np.searchsorted(starts, offset, side="right")) - 1

    def next_window(self, key: tuple[int, int]) -> tuple[int, int]:
        epoch, window = key
        return (epoch, window + 1) if window + 1 < self.n_windows else (epoch + 1, 0)

    def chunks_of(self, key: tuple[int, int]) -> np.ndarray:
        """The chunks of window `key = (epoch, window)`."""
        order, _ = self._epoch(key[0])
        return order[key[1] * self.buffer_chunks:(key[1] + 1) * self.buffer_chunks]

    def chunk_size(self, chunk: int) -> int:
        return int(self._chunk_sizes[chunk])

    def window_layout(self, key: tuple[int, int]) -> tuple[int, np.ndarray, np.ndarray]:
        """Window `key = (epoch, window)`: its first stream position, its chunks, and the
        permutation: stream position first + j holds row j of the window's chunks laid end to
        end (in the order given) at row permutation[j]."""
        epoch, w = key
        _, starts = self._epoch(epoch)
        chunks = self.chunks_of(key)
        n = int(self._chunk_sizes[chunks].sum())
        permutation = np.random.default_rng([self.seed, 1, epoch, w]).permutation(n)
        return epoch * self.train_rows + int(starts[w]), chunks, permutation

    def window(self, key: tuple[int, int]) -> tuple[int, np.ndarray]:
        """(first stream position, rows in stream order) of window `key`."""
        start, chunks, permutation = self.window_layout(key)
        rows = np.concatenate([np.arange(c * self.chunk_rows,
                                         c * self.chunk_rows + self._chunk_sizes[c])
                               for c in chunks])
        return start, rows[permutation]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows at stream positions [start, stop) (for tests and tools; the reader loads whole
        windows instead)."""
        out, key = [], self.window_of(start)
        while start < stop:
            first, rows = self.window(key)
            out.append(rows[start - first:stop - first])
            start = first + len(rows)
            key = self.next_window(key)
        return np.concatenate(out) if out else np.zeros(0, np.int64)


# ------------------------------------------------------------------------------------------
# The reader: windows read ahead asynchronously, batches cut from them in a thread.
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Window:
    start: int                  # first stream position
    stop: int
    index: np.ndarray           # [local positions]: their rows of `data`, in stream order
    local_before: np.ndarray | None  # [stop - start]: local positions before each (None: all)
    data: np.ndarray | None     # [rows, d]: the window's chunks end to end, stored dtype

    def local_rows(self, a: int, b: int) -> np.ndarray:
        """Rows at stream positions [a, b) of this window (all of them this process's)."""
        first = a - self.start if self.local_before is None else int(
            self.local_before[a - self.start])
        return self.data[self.index[first:first + b - a]]


class _PendingWindow:
    def __init__(self, window: _Window, reads: list):
        self._window, self._reads = window, reads

    def wait(self) -> _Window:
        for read in self._reads:
            read.result()
        return self._window


class _WindowLoader:
    """Starts reading windows; holds nothing of the reader (so a dropped reader can stop its
    thread). Used by one thread at a time."""

    def __init__(self, stream: ShuffledStream, rows: Rows, batch_size: int,
                 local: tuple[int, int]):
        self.stream, self.rows, self.batch_size, self.local = stream, rows, batch_size, local
        # Window buffers are reused: a fresh 200 MB array costs more in page faults (~60-200
        # ms measured) than reading the window from the page cache.
        self._free: list[np.ndarray] = []

    def _buffer(self, n: int) -> np.ndarray:
        for i, buffer in enumerate(self._free):
            if len(buffer) == n:
                return self._free.pop(i)
        return np.empty((n, self.rows.d), self.rows.dtype)

    def release(self, window: _Window) -> None:
        """`window` will not be read again; its buffer may hold the next one."""
        if window.data is not None:
            self._free = [window.data, *self._free][:4]

    def begin(self, key: tuple[int, int]) -> _PendingWindow:
        start, chunks, permutation = self.stream.window_layout(key)
        n = len(permutation)
        lo, hi = self.local
        if (lo, hi) == (0, self.batch_size):
            index, local_before = permutation, None
        else:
            # Other processes take this window's other positions. This process's rows are spread
            # over all the window's chunks, so it reads them all: no chunk is read in vain.
            offset = (start + np.arange(n)) % self.batch_size
            mask = (offset >= lo) & (offset < hi)
            index, local_before = permutation[mask], np.cumsum(mask) - mask
            if not len(index):
                return _PendingWindow(_Window(start, start + n, index, local_before, None), [])
        data = self._buffer(n)
        reads, row = [], 0
        for c in chunks:  # all started at once: tensorstore reads them concurrently
            size = self.stream.chunk_size(c)
            first = int(c) * self.rows.chunk_rows
            reads.append(self.rows.read(first, first + size, out=data[row:row + size]))
            row += size
        return _PendingWindow(_Window(start, start + n, index, local_before, data), reads)


class _BatchCutter:
    """This process's part of consecutive training batches from `position` on, keeping
    `ahead` windows' reads in flight."""

    def __init__(self, loader: _WindowLoader, position: int, ahead: int):
        self.loader, self.position, self.ahead = loader, position, ahead
        self._next_key = loader.stream.window_of(position * loader.batch_size + loader.local[0])
        self._pending: collections.deque[_PendingWindow] = collections.deque()
        self._windows: list[_Window] = []

    def _issue(self, n: int) -> None:
        while len(self._pending) < n:
            self._pending.append(self.loader.begin(self._next_key))
            self._next_key = self.loader.stream.next_window(self._next_key)

    def next(self) -> np.ndarray:
        lo, hi = self.loader.local
        start = self.position * self.loader.batch_size + lo
        stop = start + (hi - lo)
        for w in self._windows:
            if w.stop <= start:
                self.loader.release(w)
        self._windows = [w for w in self._windows if w.stop > start]
        while not self._windows or self._windows[-1].stop < stop:
            self._issue(1)
            self._windows.append(self._pending.popleft().wait())
        self._issue(self.ahead)
        parts = [w.local_rows(max(start, w.start), min(stop, w.stop)) for w in self._windows
                 if max(start, w.start) < min(stop, w.stop)]
        self.position += 1
        batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return batch.astype(np.float32, copy=False)


class _Producer:
    """A thread running `transform(cutter.next())` ahead of the consumer, `depth` batches."""

    def __init__(self, cutter: _BatchCutter, transform: Callable, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(cutter, transform), daemon=True,
                                        name="saejax-store-prefetch")
        self._thread.start()

    def _run(self, cutter: _BatchCutter, transform: Callable) -> None:
        while not self._stop.is_set():
            try:
                item = transform(cutter.next())
            except BaseException as e:  # handed to the consumer, raised there
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def get(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def process_rows(batch_size: int, process_index: int | None = None,
                 process_count: int | None = None) -> tuple[int, int]:
    """Rows [p*B/P, (p+1)*B/P) of each global batch: the part process p reads."""
    p = jax.process_index() if process_index is None else int(process_index)
    n = jax.process_count() if process_count is None else int(process_count)
    if batch_size % n:
        raise ConfigError(f"train.batch_size={batch_size} is not divisible by the {n} "
                          "processes.")
    return p * batch_size // n, (p + 1) * batch_size // n


class BatchReader:
    """Shuffled training batches and held-out batches from a `Rows` source.

    Training batch i is stream positions [i*B, (i+1)*B) of `ShuffledStream`; this process takes
    rows `local = (lo, hi)` of it, by default [p*B/P, (p+1)*B/P) for process p of P, so the
    processes' parts concatenated are the one-process batch. Evaluation batches are cut in
    order from the held-out rows after the training rows. `next()` returns `transform(part)`
    (default: the float32 NumPy part). With `prefetch_windows > 0` a thread keeps that many
    windows' reads in flight (tensorstore reads asynchronously) and `prefetch_batches` batches
    transformed ahead; 0 reads in the caller.
    """

    def __init__(self, rows: Rows, *, batch_size: int, seed: int, shuffle_buffer_chunks: int,
                 eval_tokens: int, prefetch_windows: int = 2, prefetch_batches: int = 2,
                 process_index: int | None = None, process_count: int | None = None,
                 local: tuple[int, int] | None = None,
                 transform: Callable[[np.ndarray], Any] | None = None):
        self.rows = rows
        self.batch_size = int(batch_size)
        self.local = (tuple(map(int, local)) if local is not None else
                      process_rows(self.batch_size, process_index, process_count))
        self.train_rows = split_rows(rows.n_rows, rows.chunk_rows, int(eval_tokens),
                                     name=rows.name)
        self.eval_rows = rows.n_rows - self.train_rows
        if self.eval_rows and self.eval_rows < self.batch_size:
            raise ConfigError(f"{rows.name}: data.eval_tokens={eval_tokens} holds out "
                              f"{self.eval_rows} rows, less than one batch of {self.batch_size}; "
                              "raise data.eval_tokens.")
        self.stream = ShuffledStream(train_rows=self.train_rows, chunk_rows=rows.chunk_rows,
                                     seed=seed, shuffle_buffer_chunks=shuffle_buffer_chunks)
        self.prefetch_windows, self.prefetch_batches = int(prefetch_windows), int(prefetch_batches)
        self.transform = transform or (lambda x: x)
        self._loader = _WindowLoader(self.stream, rows, self.batch_size, self.local)
        self.position = 0
        self._cutter: _BatchCutter | None = None
        self._producer: _Producer | None = None
        self._finalizer = None

    def fingerprint(self) -> dict:
        """What, besides the position, fixes the batches: checked when a position is restored."""
        return {"seed": self.stream.seed, "batch_size": self.batch_size,
                "train_rows": self.train_rows, "chunk_rows": self.rows.chunk_rows,
                "shuffle_buffer_chunks": self.stream.buffer_chunks}

    def seek(self, position: int) -> None:
        self.close()
        self.position = int(position)

    def close(self) -> None:
        """Stops the prefetch thread (started again by the next `next()`)."""
        if self._finalizer is not None:
            self._finalizer()
        self._cutter = self._producer = self._finalizer = None

    def next(self):
        """Training batch `position` (this process's part, transformed); advances."""
        if self._cutter is None:
            self._cutter = _BatchCutter(self._loader, self.position, self.prefetch_windows)
            if self.prefetch_windows > 0:
                self._producer = _Producer(self._cutter, self.transform,
                                           max(1, self.prefetch_batches))
                self._finalizer = weakref.finalize(self, self._producer.close)
        batch = (self._producer.get() if self._producer
                 else self.transform(self._cutter.next()))
        self.position += 1
        return batch

    def eval_batch(self, index: int):
        """Held-out batch `index` (this process's part, transformed), wrapping around."""
        if not self.eval_rows:
            raise ConfigError(f"{self.rows.name}: data.eval_tokens=0 holds out no rows to "
                              "evaluate on; set data.eval_tokens.")
        lo, hi = self.local
        start = (int(index) * self.batch_size + lo) % self.eval_rows
        pieces, remaining = [], hi - lo
        while remaining:
            n = min(remaining, self.eval_rows - start)
            pieces.append(self.rows.read(self.train_rows + start, self.train_rows + start + n))
            remaining, start = remaining - n, 0
        return self.transform(
            np.concatenate([p.result() for p in pieces]).astype(np.float32, copy=False))


# ------------------------------------------------------------------------------------------
# The trainer's source.
# ------------------------------------------------------------------------------------------
def _addressable_rows(batch_sharding: NamedSharding,
                      global_shape: tuple[int, int]) -> tuple[int, int]:
    """The rows of the global batch that this process's devices hold (contiguous)."""
    spans = {(s[0].start or 0, global_shape[0] if s[0].stop is None else s[0].stop)
             for s in batch_sharding.addressable_devices_indices_map(global_shape).values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != hi - lo:
        raise ConfigError(f"This process's devices hold the batch rows {sorted(spans)}, not one "
                          "contiguous block; order the mesh so each process's devices are "
                          "consecutive along the batch axis.")
    return lo, hi


class ArraySource:
    """Shuffled batches from an activation store or a `.npy` file, sharded over the mesh.

    Reads `data.path` (a store directory or a .npy file), `data.d` (must match), `data.seed`,
    `data.shuffle_buffer_chunks`, `data.eval_tokens`, `data.prefetch_windows`,
    `data.allow_partial` and `data.npy_chunk_rows`. `data.eval_tokens = 0` holds out
    `eval_batches` batches (the caller passes `evals.eval_batches`; 0: none, and `eval_batch`
    raises). The position is the number of batches consumed; batches are prefetched and put on
    the devices in a background thread.
    """

    true_features = None

    def __init__(self, data_config, *, batch_size: int, mesh, rules, eval_batches: int = 0,
                 rows: Rows | None = None):
        self.config = data_config
        self.batch_size = int(batch_size)
        # `rows` other than the path's: the language model run on the fly (data/lm.py).
        self.rows = rows or open_rows(str(data_config.path), expected_d=int(data_config.d),
                                      allow_partial=bool(data_config.allow_partial),
                                      npy_chunk_rows=int(data_config.npy_chunk_rows))
        self.d = self.rows.d
        self.sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch", "embed"), rules))
        global_shape = (self.batch_size, self.d)
        # The rows this process's devices hold: [p*B/P, (p+1)*B/P) when `batch` is split over
        # the processes in order (jax.make_mesh's layout), all of them when it is replicated.
        local = _addressable_rows(self.sharding, global_shape)
        batch_sharding = self.sharding  # the thread must not hold `self`

        def to_global(local_rows: np.ndarray) -> jax.Array:
            return jax.make_array_from_process_local_data(batch_sharding, local_rows,
                                                          global_shape)

        self.reader = BatchReader(
            self.rows, batch_size=self.batch_size, seed=int(data_config.seed),
            shuffle_buffer_chunks=int(data_config.shuffle_buffer_chunks),
            eval_tokens=int(data_config.eval_tokens) or int(eval_batches) * self.batch_size,
            prefetch_windows=int(data_config.prefetch_windows), local=local,
            transform=to_global)
        logging.info("Data: %s, %s rows x d=%d %s (%s for training, %s held out), chunks of %d "
                     "rows, shuffled %d chunks at a time.", self.rows.name,
                     f"{self.rows.n_rows:,}", self.d, np.dtype(self.rows.dtype).name,
                     f"{self.reader.train_rows:,}", f"{self.reader.eval_rows:,}",
                     self.rows.chunk_rows, int(data_config.shuffle_buffer_chunks))

    @property
    def position(self) -> int:
        return self.reader.position

    def next_batch(self) -> jax.Array:
        return self.reader.next()

    def eval_batch(self, index: int) -> jax.Array:
        return self.reader.eval_batch(index)

    def state(self) -> dict:
        return {"position": self.reader.position,
                "rows_consumed": self.reader.position * self.batch_size,
                "stream": self.reader.fingerprint()}

    def restore(self, state: dict) -> None:
        saved, now = state.get("stream"), self.reader.fingerprint()
        if saved is not None:
            changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
            if changed:
                raise StoreError(
                    f"{self.rows.name}: the checkpoint's data position was saved for another "
                    "stream (" + ", ".join(f"{k} {a!r} then, {b!r} now"
                                           for k, (a, b) in changed.items())
                    + "); the following batches would not be the ones the run would have seen.")
        self.reader.seek(int(state["position"]))

    def close(self) -> None:
        self.reader.close()
