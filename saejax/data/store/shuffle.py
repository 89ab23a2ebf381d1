"""The shuffled stream: which row every stream position holds, a pure function of the seed; and
the windows of rows that the reader loads to serve those positions."""

from __future__ import annotations

import dataclasses

import numpy as np

from saejax.data.store.rows import Rows
from saejax.errors import ConfigError


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

    def chunk_span(self, chunk: int) -> tuple[int, int]:
        """The rows [first, stop) of `chunk`."""
        first = int(chunk) * self.chunk_rows
        return first, first + self.chunk_size(chunk)

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
        rows = np.concatenate([np.arange(*self.chunk_span(c)) for c in chunks])
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


@dataclasses.dataclass
class Window:
    """A window's rows as this process reads them: its chunks' data and where its positions
    are in it."""

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


class PendingWindow:
    """A window whose chunk reads are in flight; `wait()` returns it once they are done."""

    def __init__(self, window: Window, reads: list):
        self._window, self._reads = window, reads

    def wait(self) -> Window:
        for read in self._reads:
            read.result()
        return self._window


class WindowLoader:
    """Starts reading windows; holds nothing of the reader (so a dropped reader can stop its
    thread). Used by one thread at a time."""

    def __init__(self, stream: ShuffledStream, rows: Rows, batch_size: int,
                 local: tuple[int, int]):
        self.stream, self.rows, self.batch_size, self.local = stream, rows, batch_size, local
        # Window buffers are reused: the page faults of a fresh window-sized array cost more
        # than reading the window from the page cache (benchmarks/RESULTS.md, "Real
        # activations").
        self._free: list[np.ndarray] = []

    def _buffer(self, n: int) -> np.ndarray:
        for i, buffer in enumerate(self._free):
            if len(buffer) == n:
                return self._free.pop(i)
        return np.empty((n, self.rows.d), self.rows.dtype)

    def release(self, window: Window) -> None:
        """`window` will not be read again; its buffer may hold the next one."""
        if window.data is not None:
            self._free = [window.data, *self._free][:4]

    def begin(self, key: tuple[int, int]) -> PendingWindow:
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
                return PendingWindow(Window(start, start + n, index, local_before, None), [])
        data = self._buffer(n)
        reads, row = [], 0
        for c in chunks:  # all started at once: tensorstore reads them concurrently
            first, stop = self.stream.chunk_span(c)
            reads.append(self.rows.read(first, stop, out=data[row:row + stop - first]))
            row += stop - first
        return PendingWindow(Window(start, start + n, index, local_before, data), reads)
