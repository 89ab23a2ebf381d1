"""A store written by several processes at once (a multi-host harvest), holding the same rows in
the same order as a store written by one.

The rows are cut into write units, a chunk (`chunk_rows`) or with `shard_rows` a shard file,
and each process writes whole units of its own, so no two processes ever write one file.
`plan` cuts the rows a store lacks into parts (a unit, or the rest of one a killed run left half
done) and gives each data replica a contiguous run of parts of about equal rows. Every process
plans alike from what is on disk, so `open_parts` lets no process write before all have
planned. A `PartWriter` gathers the rows of its current part, writes the part in one go and
commits it: process 0 by moving progress.json on when the part joins on to it, the others by
a file `parts/A-B.json` (`format.committed_rows` counts both, but only a whole prefix, so a
reader of a store still being written never reads a row that is not on disk). `finish_parts`
waits for every process, folds the parts into progress.json and removes them: a finished store
is the store one process would have written.
"""

from __future__ import annotations

import os
import signal
from typing import Callable, Mapping

import jax
import numpy as np

from saejax import distributed, paths
from saejax.data.store import format as store_format
from saejax.data.store.format import StoreError
from saejax.data.store.writer import ActivationStoreWriter

# A test hook: "P:K" makes process P kill itself (SIGKILL) after it has committed K parts.
KILL_ENV = "SAEJAX_TEST_KILL_AFTER_PARTS"


def unit_rows(writer: ActivationStoreWriter) -> int:
    """The rows of one write unit: a shard file if the store is sharded, else a chunk."""
    return writer.metadata.get("shard_rows") or writer.chunk_rows


def todo_parts(n_rows: int, unit: int, done: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The row ranges in [0, n_rows) outside the `done` ranges, cut at multiples of `unit`."""
    todo, done, j = [], sorted(done), 0
    for unit_start in range(0, n_rows, unit):
        unit_stop, row = min(unit_start + unit, n_rows), unit_start
        while j < len(done) and done[j][1] <= row:
            j += 1
        k = j
        while k < len(done) and done[k][0] < unit_stop:
            if done[k][0] > row:
                todo.append((row, done[k][0]))
            row = max(row, done[k][1])
            k += 1
        if row < unit_stop:
            todo.append((row, unit_stop))
    return todo


def plan(writers: Mapping[str, ActivationStoreWriter], replica: int,
         replicas: int) -> tuple[dict[str, list[tuple[int, int]]], int]:
    """({hook: the parts replica `replica` of `replicas` writes}, rows left to write in all).

    The units any store lacks rows of are split into `replicas` contiguous runs of about equal
    rows (of the store that lacks most in each unit); every store's parts in replica's run are
    its parts. Contiguous runs keep the sequences a replica forwards together: only a sequence
    across the boundary of two runs is forwarded by both replicas."""
    first = next(iter(writers.values()))
    unit = unit_rows(first)
    for writer in writers.values():
        if (unit_rows(writer), writer.n_tokens) != (unit, first.n_tokens):
            raise StoreError(f"{writer.path}: its write unit or n_tokens differ from "
                             f"{first.path}'s; stores of one harvest are laid out alike.")
    todo = {}
    for hook, writer in writers.items():
        committed = store_format.committed_rows(writer.path)
        done = [(0, committed), *store_format.committed_parts(writer.path)]
        todo[hook] = todo_parts(writer.n_tokens, unit, done)
    weight: dict[int, int] = {}
    for parts in todo.values():
        per_unit: dict[int, int] = {}
        for start, stop in parts:
            per_unit[start // unit] = per_unit.get(start // unit, 0) + stop - start
        for u, rows in per_unit.items():
            weight[u] = max(weight.get(u, 0), rows)
    units = sorted(weight)
    total = sum(weight.values())
    before = np.cumsum([0] + [weight[u] for u in units])[:-1]
    mine = {u for u, b in zip(units, before) if min(replicas - 1, b * replicas // total) == replica}
    return {hook: [p for p in parts if p[0] // unit in mine] for hook, parts in todo.items()}, total


class PartWriter(store_format.StoreLayout):
    """One process's parts of one store. To `harvest_loop` it is a writer like
    `ActivationStoreWriter`: `committed_rows` is the next row it wants, and `write` takes rows
    from there on, keeping those of its parts and dropping those between them (other replicas')."""

    def __init__(self, writer: ActivationStoreWriter, parts: list[tuple[int, int]], *,
                 leader: bool, writes: bool = True):
        self._writer, self._parts, self._leader, self._writes = writer, list(parts), leader, writes
        self.path, self.metadata = writer.path, writer.metadata
        self._part, self._filled, self._committed_parts = 0, 0, 0
        size = max((stop - start for start, stop in self._parts), default=0)
        self._buffers = [np.empty((size, self.d), self.dtype), np.empty(size, np.int32),
                         *(np.empty((size, 2), np.int32) for _ in range(2 * self.has_positions))]
        self._rows_total = sum(stop - start for start, stop in self._parts)
        self._rows_done = 0

    @property
    def parts(self) -> list[tuple[int, int]]:
        """The row ranges [start, stop) this process writes, in order."""
        return list(self._parts)

    @property
    def committed_rows(self) -> int:
        if self._part == len(self._parts):
            return self.n_tokens
        return self._parts[self._part][0] + self._filled

    def progress(self) -> tuple[int, int]:
        """(rows of this process's parts written, rows of its parts)."""
        return self._rows_done, self._rows_total

    def write(self, start_row: int, activations, token_ids, positions=None,
              documents=None) -> None:
        if start_row != self.committed_rows:
            raise StoreError(f"{self.path}: this process's next row is {self.committed_rows}, "
                             f"not {start_row}.")
        arrays = [np.asarray(activations), np.asarray(token_ids),
                  *((positions, documents) if self.has_positions else ())]
        row, offset, n = start_row, 0, len(arrays[0])
        while self._part < len(self._parts) and offset < n:
            start, stop = self._parts[self._part]
            if row < start:  # rows between two parts: another replica's
                offset, row = offset + start - row, start
                continue
            take = min(stop - row, n - offset)
            for buffer, array in zip(self._buffers, arrays):
                buffer[self._filled:self._filled + take] = array[offset:offset + take]
            self._filled, offset, row = self._filled + take, offset + take, row + take
            if self._filled == stop - start:
                self._write_part(start, stop)

    def _write_part(self, start: int, stop: int) -> None:
        if self._writes:
            self._writer.write_rows(start, *(b[:stop - start] for b in self._buffers))
            commit_part(self._writer, start, stop, leader=self._leader)
        self._part, self._filled = self._part + 1, 0
        self._rows_done += stop - start
        self._committed_parts += 1
        if os.environ.get(KILL_ENV) == f"{jax.process_index()}:{self._committed_parts}":
            os.kill(os.getpid(), signal.SIGKILL)


def commit_part(writer: ActivationStoreWriter, start: int, stop: int, *, leader: bool) -> None:
    """Records rows [start, stop), which are on disk. The leader (process 0) alone writes
    progress.json: it moves it on over this part and the parts that join on after it, when
    this part joins on to it; any other part is a file of its own."""
    if leader:
        parts = store_format.committed_parts(writer.path)
        prefix = store_format.joined_rows(writer.committed_rows, parts)
        if start <= prefix:
            writer.commit(store_format.joined_rows(max(prefix, stop), parts))
            return
    folder = paths.join(writer.path, store_format.PARTS)
    paths.makedirs(folder)
    paths.write_json(paths.join(folder, store_format.part_name(start, stop)),
                     {"process": jax.process_index(), "time": store_format.utc_now()})


def open_parts(open_writers: Callable[[], dict[str, ActivationStoreWriter]], *, replica: int,
               replicas: int, writes: bool = True,
               timeout_s: float = 600.0) -> tuple[dict[str, PartWriter], int]:
    """Every process calls it: ({hook: this replica's PartWriter}, rows left in all).

    Process 0 opens (creates) the stores first, the others after it; each plans from what is on
    disk, and none returns before all have planned (nothing is written in between). A replica
    of several processes (a model-parallel group) plans the same parts in each; only its
    processes with `writes` write them."""
    leader = jax.process_index() == 0
    writers, error = None, None
    if leader:
        try:
            writers = open_writers()
        except Exception as e:  # pylint: disable=broad-except  (raised after the barrier:
            error = e           # the others then fail alike, rather than wait for process 0)
    distributed.barrier("saejax.store.opened", timeout_s)
    if error is not None:
        raise error
    if not leader:
        writers = open_writers()
    parts, rows_todo = plan(writers, replica, replicas)
    distributed.barrier("saejax.store.planned", timeout_s)
    return ({hook: PartWriter(writer, parts[hook], leader=leader, writes=writes)
             for hook, writer in writers.items()}, rows_todo)


def finish_parts(writers: Mapping[str, PartWriter], *, timeout_s: float) -> None:
    """After this process's parts: waits for every process's, then (process 0) folds the parts
    into progress.json and removes them."""
    distributed.barrier("saejax.store.finished", timeout_s)
    if jax.process_index() != 0:
        return
    for part_writer in writers.values():
        writer = part_writer._writer  # pylint: disable=protected-access
        rows = store_format.committed_rows(writer.path)
        if rows != writer.n_tokens:
            raise StoreError(f"{writer.path}: every process finished but only {rows:,} of "
                             f"{writer.n_tokens:,} rows are committed; run the harvest again "
                             "to write the rest.")
        writer.commit(rows)
        paths.rmtree(paths.join(writer.path, store_format.PARTS))
