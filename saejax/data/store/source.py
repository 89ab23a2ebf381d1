"""The trainer's source of real activations: `ArraySource` streams shuffled batches from an
activation store or a `.npy` file, sharded over the mesh. Batch i is a pure function of
(seed, i), so the data position in a checkpoint is just the batch count."""

from __future__ import annotations

from absl import logging
import jax
import numpy as np
from jax.sharding import NamedSharding

from saejax import sharding
from saejax.data.store.format import StoreError
from saejax.data.store.reader import BatchReader, addressable_rows
from saejax.data.store.rows import Rows, open_rows


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
        local = addressable_rows(self.sharding, global_shape)
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
