"""The activation store's on-disk format: its layout fields, dtypes, zarr specs and StoreError.

One directory holds one hook point's activations:

    STORE/metadata.json   format, d, dtype, context_length, n_tokens (planned), chunk_rows,
                          shard_rows, created_time, and the harvest's own fields (model, hook, ...)
    STORE/activations     zarr v3 (tensorstore) [n_tokens, d] float32 or bfloat16, chunk_rows rows
                          per chunk (with shard_rows: several chunks per file, zarr v3 sharding)
    STORE/token_ids       zarr v3 int32 [n_tokens]: the token of each row
    STORE/positions       zarr v3 int32 [n_tokens, 2]: (sequence, position in it) of each row,
                          in stores with `positions: true` (harvests that leave rows out, such
                          as attention sinks); without it, row r is sequence r // context_length,
                          position r % context_length
    STORE/documents       zarr v3 int32 [n_tokens, 2] beside positions: (document, index in the
                          document's tokens) of each row; -1 where unknown or inserted (a BOS)
    STORE/progress.json   rows committed; replaced atomically only after their data is on disk
    STORE/parts/A-B.json  while several processes write the store at once (`store/parts.py`):
                          rows [A, B) are on disk too, past progress.json's rows; removed once
                          the store is complete, so a finished store reads as one written by one
"""

from __future__ import annotations

import datetime
import re

import ml_dtypes
import numpy as np

from saejax import paths
from saejax.errors import ConfigError

FORMAT = "saejax.activation_store"
FORMAT_VERSION = 1
DTYPES = ("float32", "bfloat16")
# The fields that define a store's layout; the harvest's own metadata may not reuse these names.
LAYOUT_FIELDS = ("format", "format_version", "d", "dtype", "context_length", "n_tokens",
                 "chunk_rows", "shard_rows", "checksum", "positions")
# The per-row arrays a store with `positions: true` holds beside activations and token_ids.
TRACE_ARRAYS = ("positions", "documents")


class StoreError(ConfigError):
    """A store (or .npy file) that cannot be used as asked; the message names it and the problem.

    A ConfigError, so `saejax.main` reports it as one line, like any other unusable setting.
    """


def dtype_name(dtype) -> str:
    """The name of `dtype` (a name or anything np.dtype takes)."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def store_dtype_name(dtype) -> str:
    """The name of `dtype`, which must be one a store can hold."""
    name = dtype_name(dtype)
    if name not in DTYPES:
        raise StoreError(f"dtype {name!r}: an activation store holds one of {DTYPES}.")
    return name


def numpy_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


class StoreLayout:
    """The layout fields of a store's `metadata` (a dict attribute), as attributes: what the
    writer and a store opened for reading both read from metadata.json."""

    @property
    def d(self) -> int:
        return self.metadata["d"]

    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(self.metadata["dtype"])

    @property
    def context_length(self) -> int:
        return self.metadata["context_length"]

    @property
    def n_tokens(self) -> int:
        """The rows planned (n_tokens); fewer may be committed."""
        return self.metadata["n_tokens"]

    @property
    def chunk_rows(self) -> int:
        return self.metadata["chunk_rows"]

    @property
    def has_positions(self) -> bool:
        """Whether each row's (sequence, position) is stored (else row r is r // context,
        r % context)."""
        return bool(self.metadata.get("positions", False))


def utc_now() -> str:
    """The time stamp written into metadata.json and progress.json."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


PARTS = "parts"   # the folder of the row ranges committed out of order


def committed_rows(path: str) -> int:
    """Rows [0, committed_rows) are on disk: progress.json's rows, and after them every part
    committed since that joins on (0 before the first commit). Rows past a gap are not counted:
    readers of a store still being written by several processes read only a whole prefix."""
    progress_path = paths.join(path, "progress.json")
    rows = paths.read_json(progress_path)["committed_rows"] if paths.exists(progress_path) else 0
    return joined_rows(rows, committed_parts(path))


def part_name(start: int, stop: int) -> str:
    return f"{int(start)}-{int(stop)}.json"


def committed_parts(path: str) -> list[tuple[int, int]]:
    """The row ranges [start, stop) under STORE/parts/, sorted (none in a store written by one
    process, or a finished one)."""
    folder = paths.join(path, PARTS)
    if not paths.isdir(folder):
        return []
    parts = []
    for name in paths.listdir(folder):
        match = re.fullmatch(r"(\d+)-(\d+)\.json", name)  # not the temporary files of a write
        if match:
            parts.append((int(match[1]), int(match[2])))
    return sorted(parts)


def joined_rows(rows: int, parts) -> int:
    """`rows` extended over the sorted ranges of `parts` that join on without a gap."""
    for start, stop in parts:
        if start > rows:
            break
        rows = max(rows, stop)
    return rows


def array_spec(path: str) -> dict:
    """The tensorstore spec that opens the zarr array at `path`."""
    return {"driver": "zarr3", "kvstore": paths.kvstore(path)}


def zarr_spec(path: str, *, shape: tuple[int, ...], dtype: str, chunk_rows: int,
              shard_rows: int | None, checksum: bool) -> dict:
    """The spec that creates the array: row-chunked and uncompressed, as activations do not
    compress and reading must be fast.

    A missing or truncated chunk is always a read error. `checksum` adds a crc32c to every
    chunk, so flipped bits are one too; it costs a core's time on every chunk read, which on a
    fast reader is the bottleneck (benchmarks/RESULTS.md, "Real activations").
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
        **array_spec(path),
        "metadata": {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": grid}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": codecs,
            "fill_value": 0,
        },
    }


def layout(*, d, dtype, context_length, n_tokens, chunk_rows, shard_rows, checksum,
           positions: bool = False) -> dict:
    """The layout fields of metadata.json, in their order. `positions` is written only when
    true, so a store without it reads (and resumes) as the stores before it did."""
    fields = {"format": FORMAT, "format_version": FORMAT_VERSION, "d": int(d),
              "dtype": store_dtype_name(dtype), "context_length": int(context_length),
              "n_tokens": int(n_tokens), "chunk_rows": int(chunk_rows),
              "shard_rows": None if shard_rows is None else int(shard_rows),
              "checksum": bool(checksum)}
    if positions:
        fields["positions"] = True
    return fields


def check_layout(path: str, layout_fields: dict) -> None:
    """Raises a StoreError naming `path` and the field if the layout cannot be written."""
    d, ctx, n, chunk, shard = (layout_fields[k] for k in ("d", "context_length", "n_tokens",
                                                          "chunk_rows", "shard_rows"))
    for name, value in (("d", d), ("context_length", ctx), ("n_tokens", n),
                        ("chunk_rows", chunk)):
        if value <= 0:
            raise StoreError(f"{path}: {name}={value} must be positive.")
    if n % ctx and not layout_fields.get("positions"):
        raise StoreError(f"{path}: n_tokens={n} is not a whole number of sequences of "
                         f"context_length={ctx}; use n_tokens={n // ctx * ctx} or "
                         f"{-(-n // ctx) * ctx}.")
    if shard is not None and (shard <= 0 or shard % chunk):
        raise StoreError(f"{path}: shard_rows={shard} must be a positive multiple of "
                         f"chunk_rows={chunk}.")
