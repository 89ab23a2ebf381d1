"""The batch reader: training batches cut in order from the shuffled stream's windows, which are
read ahead asynchronously (and transformed in a thread), and held-out batches read in order."""

from __future__ import annotations

import collections
import queue
import threading
import weakref
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding

from saejax.data.store.rows import Rows, split_rows
from saejax.data.store.shuffle import PendingWindow, ShuffledStream, Window, WindowLoader
from saejax.errors import ConfigError


class _BatchCutter:
    """This process's part of consecutive training batches from `position` on, keeping
    `ahead` windows' reads in flight."""

    def __init__(self, loader: WindowLoader, position: int, ahead: int):
        self.loader, self.position, self.ahead = loader, position, ahead
        self._next_key = loader.stream.window_of(position * loader.batch_size + loader.local[0])
        self._pending: collections.deque[PendingWindow] = collections.deque()
        self._windows: list[Window] = []

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


def addressable_rows(batch_sharding: NamedSharding,
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
        self._loader = WindowLoader(self.stream, rows, self.batch_size, self.local)
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
