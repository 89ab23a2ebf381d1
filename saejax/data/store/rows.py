"""Sources of rows for the reader: one small interface (`Rows`) over an activation store opened
for reading (`open_store`) and a `.npy` file a user brings (`NpyRows`); `open_rows` picks one by
the path, and `split_rows` divides a source into training and held-out rows."""

from __future__ import annotations

import dataclasses
import os
from typing import Protocol

import numpy as np
import tensorstore as ts

from saejax import paths
from saejax.data.store import format as store_format
from saejax.data.store.format import FORMAT, FORMAT_VERSION, StoreError

# Rows per shuffling unit for a .npy file (a store uses its own chunk_rows).
NPY_CHUNK_ROWS = 4096


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
class ActivationStore(store_format.StoreLayout):
    """A store opened for reading (`open_store`); implements `Rows`."""

    path: str
    metadata: dict
    n_rows: int                  # committed rows (all of n_tokens for a complete store)
    activations: ts.TensorStore
    token_id_array: ts.TensorStore
    trace_arrays: dict = dataclasses.field(default_factory=dict)  # positions, documents

    @property
    def name(self) -> str:
        return self.path

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

    def _trace(self, name: str, start: int, stop: int) -> np.ndarray:
        return _StoreRead(self.trace_arrays[name][start:stop].read(), self.path, start,
                          stop).result()

    def positions(self, start: int, stop: int) -> np.ndarray:
        """int32 [stop - start, 2]: (sequence, position in it) of rows [start, stop); in a
        store without positions (no row left out), row r is (r // context, r % context)."""
        if self.has_positions:
            return self._trace("positions", start, stop)
        rows = np.arange(start, stop, dtype=np.int64)
        return np.stack(divmod(rows, self.context_length), axis=1).astype(np.int32)

    def documents(self, start: int, stop: int) -> np.ndarray:
        """int32 [stop - start, 2]: (document, index in its tokens) of rows [start, stop);
        -1 where unknown (a store without positions, token ids from a .npy) or inserted (BOS)."""
        if self.has_positions:
            return self._trace("documents", start, stop)
        return np.full((max(stop - start, 0), 2), -1, np.int32)

    def sequence_position(self, row: int) -> tuple[int, int]:
        """(sequence, position in it) of `row`."""
        sequence, position = self.positions(int(row), int(row) + 1)[0]
        return int(sequence), int(position)

    def sequence_positions(self, rows) -> np.ndarray:
        """int32 [len(rows), 2]: (sequence, position) of each of `rows` (any order)."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if not self.has_positions:
            return np.stack(divmod(rows, self.context_length), axis=1).astype(np.int32)
        if rows.size == 0:
            return np.zeros((0, 2), np.int32)
        return _StoreRead(self.trace_arrays["positions"].oindex[rows].read(), self.path,
                          int(rows.min()), int(rows.max()) + 1).result()


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
    expected_name = None if expected_dtype is None else store_format.dtype_name(expected_dtype)
    if expected_name is not None and metadata["dtype"] != expected_name:
        raise StoreError(f"{path}: the store holds {metadata['dtype']} but {expected_name} was "
                         "expected.")
    committed = store_format.committed_rows(path)
    if committed < metadata["n_tokens"] and not allow_partial:
        raise StoreError(f"{path}: incomplete store: {committed:,} of {metadata['n_tokens']:,} "
                         "rows committed. Finish the harvest (it resumes), or allow a partial "
                         "store (data.allow_partial=True) to train on the committed rows.")
    names = ("activations", "token_ids",
             *(store_format.TRACE_ARRAYS if metadata.get("positions") else ()))
    specs = [{**store_format.array_spec(paths.join(path, name)), "fill_missing_data_reads": False}
             for name in names]
    try:
        activations, token_ids, *trace = [f.result()
                                          for f in [ts.open(s, read=True) for s in specs]]
    except ValueError as e:
        raise StoreError(f"{path}: cannot open the zarr arrays: {e}") from e
    if tuple(activations.shape) != (metadata["n_tokens"], metadata["d"]):
        raise StoreError(f"{path}: activations are {tuple(activations.shape)} but "
                         f"metadata.json says [{metadata['n_tokens']}, {metadata['d']}].")
    return ActivationStore(path, metadata, committed, activations, token_ids,
                           dict(zip(store_format.TRACE_ARRAYS, trace)))


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
