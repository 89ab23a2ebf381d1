"""Several hooks read in lockstep: the stores one harvest wrote for several hooks (`python -m
saejax.harvest --hooks=a,b`), or the LM's rows of several hooks (`lm.hook=a,b`), opened
together as one source whose batches are `{hook: [batch,
d_hook]}` with the same rows (tokens) at every hook: what a transcoder, a crosscoder or
several SAEs from one pass read.

`data.path` names the stores separated by commas. Each store is an `ArraySource` with the same
seed, batch size and shuffle: batch i is a pure function of (seed, i) and the row layout, so
stores of one harvest (the same rows, in the same order) give aligned batches. That is checked
when they are opened (row count, chunking, token ids and positions), so stores of different
harvests are refused rather than silently paired.
"""

from __future__ import annotations

import numpy as np

from saejax import paths
from saejax.data.store import ArraySource
from saejax.data.store.format import StoreError

# Rows compared between the stores when they are opened (a sample: the whole trace arrays of
# a billion-row harvest are large).
_CHECKED_ROWS = 4096


def split_paths(path: str) -> list[str]:
    """The stores `data.path` names: one path, or several separated by commas."""
    return [p.strip() for p in str(path).split(",") if p.strip()]


def store_hooks(path: str) -> tuple[str, ...]:
    """The hook of each store `data.path` names (its harvest metadata; a store that cannot be
    read yet is named by its folder, and refused when it is opened)."""
    hooks = []
    for store_path in split_paths(path):
        metadata_path = paths.join(store_path, "metadata.json")
        metadata = paths.read_json(metadata_path) if paths.exists(metadata_path) else {}
        hooks.append(str(metadata.get("hook") or store_path.rstrip("/").split("/")[-1]))
    return tuple(hooks)


def _check_aligned(sources: list[ArraySource], store_paths: list[str]) -> None:
    first, first_path = sources[0].rows, store_paths[0]
    n = min(first.n_rows, _CHECKED_ROWS)
    for source, path in zip(sources[1:], store_paths[1:]):
        rows = source.rows
        for what, a, b in (("rows", first.n_rows, rows.n_rows),
                           ("chunk_rows", first.chunk_rows, rows.chunk_rows)):
            if a != b:
                raise StoreError(f"data.path: {first_path} has {what}={a:,} but {path} has "
                                 f"{b:,}; stores read in lockstep must come from one harvest.")
        for trace in ("token_ids", "positions"):
            if not (hasattr(first, trace) and hasattr(rows, trace)):
                continue
            try:
                same = np.array_equal(getattr(first, trace)(0, n), getattr(rows, trace)(0, n))
            except StoreError:  # an old store without positions: the token ids decide
                continue
            if not same:
                raise StoreError(f"data.path: {first_path} and {path} hold other tokens "
                                 f"({trace} differ in the first {n:,} rows); stores read in "
                                 "lockstep must come from one harvest "
                                 "(`python -m saejax.harvest --hooks=a,b`).")


class LockstepSource:
    """The stores of `data.path` (comma-separated) as one source keyed by each store's hook."""

    def __init__(self, data_config, *, batch_size: int, mesh, rules, eval_batches: int = 0):
        store_paths = split_paths(data_config.path)
        self.sources = []
        for path in store_paths:
            one = data_config.copy_and_resolve_references()
            with one.unlocked():
                one.path = path
            self.sources.append(ArraySource(one, batch_size=batch_size, mesh=mesh, rules=rules,
                                            eval_batches=eval_batches))
        hooks = store_hooks(data_config.path)
        if len(set(hooks)) != len(hooks):
            raise StoreError(f"data.path names two stores of one hook ({hooks}); give each "
                             "hook's store once.")
        _check_aligned(self.sources, store_paths)
        self._adopt(dict(zip(hooks, self.sources)))

    @classmethod
    def of(cls, sources: dict) -> "LockstepSource":
        """Sources already aligned (the LM's rows of several hooks from one forward pass)."""
        self = cls.__new__(cls)
        self._adopt(sources)
        return self

    def _adopt(self, sources: dict) -> None:
        self.sources = list(sources.values())
        self.hooks = tuple(sources)
        self.d = self.sources[0].d
        self.sharding = self.sources[0].sharding
        self.batch_size = self.sources[0].batch_size
        self.rows = self.sources[0].rows   # where a row came from (top activations, ...)
        self.true_features = None

    @property
    def widths(self) -> dict[str, int]:
        return {hook: int(source.d) for hook, source in zip(self.hooks, self.sources)}

    @property
    def position(self) -> int:
        return self.sources[0].position

    def next_batch(self) -> dict:
        return {hook: source.next_batch() for hook, source in zip(self.hooks, self.sources)}

    def eval_batch(self, index: int) -> dict:
        return {hook: source.eval_batch(index)
                for hook, source in zip(self.hooks, self.sources)}

    def state(self) -> dict:
        return self.sources[0].state()

    def restore(self, state: dict) -> None:
        for source in self.sources:
            source.restore(state)

    def close(self) -> None:
        for source in self.sources:
            source.close()
