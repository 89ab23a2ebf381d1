"""Checkpoint tensors not yet read: a safetensors tensor, and the transposes, reshapes, basic
indexing and layer stacking a family's loader applies to it, recorded rather than run, so that
any block of the result can be read alone (`read(index)`: only that block's bytes leave the
file). This is what lets a sharded load read each device's shard straight from disk
(`jax.make_array_from_callback`) and never hold a whole tensor; `np.asarray(lazy)` reads it all.

Values are float32, exactly as reading the whole tensor and converting it would give.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Sequence

import numpy as np

Index = tuple[slice, ...]

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32}


def header(file: str) -> tuple[dict, int]:
    """(safetensors header {name: {dtype, shape, data_offsets}}, offset of the data)."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def full_index(shape: Sequence[int]) -> Index:
    return tuple(slice(0, n) for n in shape)


def _normalize(index, shape) -> Index:
    if index is None or index == ():
        index = ()
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"a lazy tensor reads blocks with step 1, not {s}.")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


class Lazy:
    """A float32 tensor of `shape` whose blocks `read(index)` (one step-1 slice per dim)."""

    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    dtype = np.dtype(np.float32)

    def read(self, index=None) -> np.ndarray:
        return self._read(_normalize(index, self.shape))

    def _read(self, index: Index) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype=None, copy=None):
        del copy
        out = self.read()
        return out if dtype is None else out.astype(dtype)

    @property
    def T(self) -> Lazy:  # pylint: disable=invalid-name
        return Transposed(self, tuple(reversed(range(self.ndim))))

    def reshape(self, *shape) -> Lazy:
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        if -1 in shape:
            known = math.prod(n for n in shape if n != -1)
            shape = tuple(self.size // known if n == -1 else n for n in shape)
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {shape}.")
        return Reshaped(self, tuple(int(n) for n in shape))

    def __getitem__(self, key) -> Lazy:
        return Indexed(self, key)


class Source(Lazy):
    """Tensor `name` of a safetensors file, read through a memory map (bfloat16 widened)."""

    def __init__(self, file: str, entry: dict, data_offset: int):
        self.file, self.shape = file, tuple(entry["shape"])
        self.stored = entry["dtype"]
        if self.stored not in _DTYPES:
            raise ValueError(f"{file}: dtype {self.stored} is not one saejax reads "
                             f"({sorted(_DTYPES)}).")
        self.offset = data_offset + entry["data_offsets"][0]

    def _read(self, index: Index) -> np.ndarray:
        if any(s.stop == s.start for s in index):
            return np.zeros(tuple(s.stop - s.start for s in index), np.float32)
        data = np.memmap(self.file, _DTYPES[self.stored], "r", self.offset, self.shape or (1,))
        block = data[index] if self.shape else data[0]
        if self.stored == "BF16":  # bfloat16 is the top half of a float32
            return (block.astype(np.uint32) << 16).view(np.float32)
        return np.array(block, np.float32)  # a copy: never a view of the map


class Transposed(Lazy):
    def __init__(self, parent: Lazy, perm: tuple[int, ...]):
        self.parent, self.perm = parent, perm
        self.shape = tuple(parent.shape[p] for p in perm)

    def _read(self, index: Index) -> np.ndarray:
        parent_index = [None] * self.ndim
        for i, p in enumerate(self.perm):
            parent_index[p] = index[i]
        return self.parent._read(tuple(parent_index)).transpose(self.perm)


def _groups(parent: Sequence[int], out: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """The dims of a reshape in runs of equal size: (parent dims, out dims) pairs, in order."""
    groups, i, j = [], 0, 0
    while i < len(parent) or j < len(out):
        gi, gj = [], []
        while not (gi or i == len(parent)) or not (gj or j == len(out)) or (
                math.prod(parent[k] for k in gi) != math.prod(out[k] for k in gj)):
            if (gj or j == len(out)) and i < len(parent) and (
                    not gi or math.prod(parent[k] for k in gi) < math.prod(out[k] for k in gj)):
                gi.append(i)
                i += 1
            else:
                gj.append(j)
                j += 1
        groups.append((gi, gj))
    return groups


class Reshaped(Lazy):
    """A reshape, read per run of dims it merges or splits: the parent rows that cover the
    block's flat range in that run, then the block's elements picked out of them."""

    def __init__(self, parent: Lazy, shape: tuple[int, ...]):
        self.parent, self.shape = parent, shape
        self.groups = _groups(parent.shape, shape)

    def _read(self, index: Index) -> np.ndarray:
        parent_index = list(full_index(self.parent.shape))
        picks, lengths = [], []
        for gi, gj in self.groups:
            sizes = [self.shape[j] for j in gj]
            strides = [math.prod(sizes[k + 1:]) for k in range(len(gj))]
            lo = sum(index[j].start * s for j, s in zip(gj, strides))
            hi = sum((index[j].stop - 1) * s for j, s in zip(gj, strides)) + 1
            row = math.prod(self.parent.shape[i] for i in gi[1:])
            first, last = lo // row, -(-hi // row)
            if gi:
                parent_index[gi[0]] = slice(first, last)
            base = first * row
            lengths.append((last - first) * row)
            if hi - lo == math.prod(index[j].stop - index[j].start for j in gj):
                picks.append(slice(lo - base, hi - base))  # the block is contiguous here
            else:
                flat = sum(np.arange(index[j].start, index[j].stop).reshape(
                    [-1 if k == n else 1 for k in range(len(gj))]) * s
                    for n, (j, s) in enumerate(zip(gj, strides)))
                picks.append(flat - base)
        block = self.parent._read(tuple(parent_index)).reshape(lengths)
        axis = 0
        for pick in picks:
            if isinstance(pick, slice):
                block = block[(slice(None),) * axis + (pick,)]
                axis += 1
            else:
                block = np.take(block, pick, axis=axis)
                axis += pick.ndim
        return block.reshape(tuple(s.stop - s.start for s in index))


class Indexed(Lazy):
    """Basic indexing by ints and step-1 slices (`w[:, 0]`, `qkv[:, :, 2]`)."""

    def __init__(self, parent: Lazy, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (parent.ndim - len(key))
        self.parent, self.key = parent, []
        for k, n in zip(key, parent.shape):
            if isinstance(k, (int, np.integer)):
                self.key.append(int(k) % n)
            else:
                self.key.append(_normalize((k,), (n,))[0])
        self.shape = tuple(k.stop - k.start for k in self.key if isinstance(k, slice))

    def _read(self, index: Index) -> np.ndarray:
        parent_index, squeeze, it = [], [], iter(index)
        for d, k in enumerate(self.key):
            if isinstance(k, int):
                parent_index.append(slice(k, k + 1))
                squeeze.append(d)
            else:
                s = next(it)
                parent_index.append(slice(k.start + s.start, k.start + s.stop))
        return self.parent._read(tuple(parent_index)).squeeze(tuple(squeeze))


class Stacked(Lazy):
    """Tensors of one shape stacked along a new leading axis (a param's layers)."""

    def __init__(self, parts: Sequence[Lazy]):
        self.parts = list(parts)
        self.shape = (len(self.parts), *self.parts[0].shape)

    def _read(self, index: Index) -> np.ndarray:
        rows = range(index[0].start, index[0].stop)
        out = np.empty((len(rows), *(s.stop - s.start for s in index[1:])), np.float32)
        for k, i in enumerate(rows):  # filled in place: one block of one layer at a time
            out[k] = self.parts[i]._read(index[1:])
        return out


def as_lazy(x) -> Lazy:
    """A numpy array (a loader's computed param) as a Lazy, so every leaf reads the same way."""
    return x if isinstance(x, Lazy) else InMemory(np.asarray(x, np.float32))


class InMemory(Lazy):
    def __init__(self, array: np.ndarray):
        self.array, self.shape = array, array.shape

    def _read(self, index: Index) -> np.ndarray:
        return np.array(self.array[index], np.float32)
