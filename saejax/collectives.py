"""The collectives of a compiled program: `collectives(hlo_text, mesh)` lists each one's
elements and bytes (of its result), the mesh axes its device groups span, and the source line
that made it (tests/test_communication.py: a model-parallel step moves O(batch d), not O(d n)).
Read from the optimized HLO text alone; `memory.py` re-exports `collectives` and `Collective`,
where the tests and benchmarks name them.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import numpy as np

COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                  "ragged-all-to-all", "collective-permute", "collective-broadcast")
_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16}
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s+"
    r"(?P<op>" + "|".join(sorted(COLLECTIVE_OPS, key=len, reverse=True)) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_IOTA = r"\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?"


class Collective(NamedTuple):
    """One collective of a compiled program."""

    name: str               # the HLO instruction
    op: str                 # all-reduce, all-gather, ..., with -start for the async form
    arrays: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, shape) of each result array
    elements: int           # elements in those arrays
    bytes: int
    mesh_axes: tuple[str, ...]  # the mesh axes its device groups span
    op_name: str            # the JAX operation (HLO metadata)
    source: str             # file:line (function) of the Python that made it, innermost first

    @property
    def shapes(self) -> tuple[str, ...]:
        return tuple(f"{dtype}[{','.join(map(str, dims))}]" for dtype, dims in self.arrays)

    def __str__(self) -> str:
        return (f"{self.op} {', '.join(self.shapes)} ({self.elements} elements) over "
                f"{'+'.join(self.mesh_axes) or 'no axis'}: {self.op_name} at {self.source}")


def _ints(text: str | None) -> list[int]:
    return [int(v) for v in text.split(",") if v] if text else []


def _iota(shape, dims, perm) -> np.ndarray:
    ids = np.arange(math.prod(dims)).reshape(dims)
    return ids.transpose(perm or range(len(dims))).reshape(shape)


def _device_groups(line: str, n_devices: int) -> list[np.ndarray] | None:
    """The device groups (positions in the program's device assignment) of a collective, or
    None when its format is not one recognised here."""
    pairs = re.search(r"source_target_pairs=\{((?:\{[0-9,]+\},?)*)\}", line)
    if pairs:
        return [np.asarray(_ints(p)) for p in re.findall(r"\{([0-9,]+)\}", pairs.group(1))]
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]"
                     r"(?:,\s*device_ids=\((\[[0-9,]*\](?:T\([0-9,]*\))?)\))?\s*\{([^}]*)\}", line)
    if mesh:
        axes = re.findall(r"'([^']+)'=([0-9]+)", mesh.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        selected = re.findall(r"'([^']+)'", mesh.group(3))
        if ":" in mesh.group(3) or not set(selected) <= set(names):
            return None  # sub-axes: not parsed
        ids = np.arange(math.prod(sizes))
        if mesh.group(2):
            m = re.fullmatch(r"\[([0-9,]*)\](?:T\(([0-9,]*)\))?", mesh.group(2))
            dims = _ints(m.group(1))
            ids = _iota((math.prod(sizes),), dims, _ints(m.group(2)))
        ids = ids.reshape(sizes)
        chosen = [names.index(a) for a in selected]
        rest = [i for i in range(len(names)) if i not in chosen]
        ids = ids.transpose(rest + chosen).reshape(-1, math.prod(sizes[i] for i in chosen))
        return list(ids)
    iota = re.search(r"replica_groups=" + _IOTA, line)
    if iota:
        return list(_iota(_ints(iota.group(1)), _ints(iota.group(2)), _ints(iota.group(3))))
    explicit = re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", line)
    if explicit:
        groups = [np.asarray(_ints(g)) for g in re.findall(r"\{([0-9,]*)\}", explicit.group(1))]
        return groups or [np.arange(n_devices)]
    return None


def _spanned_axes(groups, mesh) -> tuple[str, ...]:
    """The mesh axes along which some group holds devices with different coordinates."""
    shape = tuple(mesh.shape.values())
    names = tuple(mesh.shape.keys())
    if groups is None:  # unrecognised: assume the worst
        return tuple(a for a, s in zip(names, shape) if s > 1)
    spanned = set()
    for group in groups:
        coords = np.stack(np.unravel_index(np.asarray(group, int), shape), axis=-1)
        spanned.update(a for i, a in enumerate(names) if len(set(coords[:, i])) > 1)
    return tuple(a for a in names if a in spanned)


def _source_table(text: str):
    """HLO stack_frame_id -> ["file:line (function)", ...], innermost frame first."""

    def table(title: str) -> dict[int, str]:
        block = re.search(rf"^{title}\n(.*?)(?:\n\n|\Z)", text, re.S | re.M)
        rows = re.findall(r"^([0-9]+) (.*)$", block.group(1), re.M) if block else []
        return {int(i): v for i, v in rows}

    files = {i: v.strip('"') for i, v in table("FileNames").items()}
    functions = {i: v.strip('"') for i, v in table("FunctionNames").items()}
    locations = {}
    for i, v in table("FileLocations").items():
        f = dict((k, int(x)) for k, x in re.findall(r"(\w+)=([0-9]+)", v))
        path = files.get(f.get("file_name_id"), "?")
        path = path.split("/site-packages/")[-1]
        path = re.sub(r"^.*/(saejax|tests|benchmarks|experiments)/", r"\1/", path)
        locations[i] = f"{path}:{f.get('line')} ({functions.get(f.get('function_name_id'), '?')})"
    frames = {i: dict((k, int(x)) for k, x in re.findall(r"(\w+)=([0-9]+)", v))
              for i, v in table("StackFrames").items()}

    def stack(frame_id: int) -> list[str]:
        out = []
        while frame_id in frames and len(out) < 32:
            out.append(locations.get(frames[frame_id].get("file_location_id"), "?"))
            # The printed parent is one more than the parent frame's id (0: none).
            parent = frames[frame_id].get("parent_frame_id", 0) - 1
            if not 0 < parent < frame_id:
                break
            frame_id = parent
        return out

    return stack


def collectives(hlo_text: str, mesh) -> list[Collective]:
    """Every collective in optimized HLO text (`compiled.as_text()`) of a program on `mesh`.

    A collective's size is that of its result: what each device receives (all-gather), holds
    reduced (all-reduce) or is sent (all-to-all, collective-permute); for the async `-start`
    form, the arrays it writes (the second half of its result tuple, without the u32 context
    scalars). `-done` halves are not counted again.
    """
    stack = _source_table(hlo_text)
    n_devices = math.prod(mesh.shape.values())
    found = []
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        arrays = [(dtype, tuple(_ints(dims)))
                  for dtype, dims in _ARRAY.findall(m.group("shape")) if dtype in _DTYPE_BYTES]
        if m.group("start") and m.group("op") != "all-reduce":
            arrays = [a for a in arrays if a[1]]  # drop context scalars
            arrays = arrays[len(arrays) // 2:]
        elements = sum(math.prod(dims) for _, dims in arrays)
        op_name = re.search(r'op_name="([^"]*)"', line)
        frame = re.search(r"stack_frame_id=([0-9]+)", line)
        source = " <- ".join(stack(int(frame.group(1)))[:4]) if frame else "?"
        found.append(Collective(
            name=m.group("name"), op=m.group("op") + (m.group("start") or ""),
            arrays=tuple(arrays),
            elements=elements,
            bytes=sum(math.prod(dims) * _DTYPE_BYTES[t] for t, dims in arrays),
            mesh_axes=_spanned_axes(_device_groups(line, n_devices), mesh),
            op_name=op_name.group(1) if op_name else "?", source=source))
    return found
