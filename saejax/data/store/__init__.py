"""The activation store: LM activations harvested to disk, and the shuffled stream read from it.

One module per concern, each importing only modules listed above it:

    format   the on-disk layout (metadata.json, zarr arrays, progress.json), dtypes, StoreError
    writer   `ActivationStoreWriter` and `harvest_loop` write stores (resumably)      <- format
    parts    `open_parts`, `PartWriter`: a store written by several processes at once <- writer
    rows     `open_store`, `NpyRows`, `open_rows`: sources of rows; `split_rows`      <- format
    shuffle  `ShuffledStream`: stream position -> row, a pure function of the seed    <- rows
    reader   `BatchReader`: batches cut from windows read ahead in a thread           <- shuffle
    source   `ArraySource`: the trainer's source, batches sharded over the mesh       <- reader

`ArraySource` streams training batches from a store or a `.npy` file: batch i is a pure function
of (seed, i), so the data position in a checkpoint is just the batch count.
"""

from saejax.data.store.format import (DTYPES, FORMAT, FORMAT_VERSION, LAYOUT_FIELDS,
                                      StoreError)
from saejax.data.store.parts import PartWriter, finish_parts, open_parts
from saejax.data.store.reader import BatchReader, process_rows
from saejax.data.store.rows import (NPY_CHUNK_ROWS, ActivationStore, Done, NpyRows, Read, Rows,
                                    open_rows, open_store, split_rows)
from saejax.data.store.shuffle import ShuffledStream
from saejax.data.store.source import ArraySource
from saejax.data.store.writer import ActivationStoreWriter, TokenBatch, harvest_loop

__all__ = [
    "DTYPES", "FORMAT", "FORMAT_VERSION", "LAYOUT_FIELDS", "NPY_CHUNK_ROWS", "ActivationStore",
    "ActivationStoreWriter", "ArraySource", "BatchReader", "Done", "NpyRows", "PartWriter",
    "Read", "Rows", "ShuffledStream", "StoreError", "TokenBatch", "finish_parts",
    "harvest_loop", "open_parts", "open_rows", "open_store", "process_rows", "split_rows",
]
