"""The result of the top-activations pass (`TopActivations`) and its directory on disk:
`summary.json` (provenance and the fingerprint that says whether it can be reused), the arrays
as zarr v3 (tensorstore) and `latents.jsonl`, one line per latent with its examples' text.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import numpy as np
import tensorstore as ts

from saejax.analysis.loading import AnalysisError
from saejax.analysis.token_text import TokenText

FORMAT = "saejax.top_activations"
FORMAT_VERSION = 2
ARRAYS = ("values", "rows", "positions", "context_tokens", "context_activations", "fired",
          "activation_sum", "histogram", "histogram_max")


@dataclasses.dataclass
class TopActivations:
    """Per latent: the top examples (activation descending), counts and a histogram."""

    values: np.ndarray               # [n, top_n] float32; 0 where there is no example
    rows: np.ndarray                 # [n, top_n] int64 store rows; -1 where no example
    context_tokens: np.ndarray       # [n, top_n, window] int32; -1 outside the sequence
    context_activations: np.ndarray  # [n, top_n, window] float32
    fired: np.ndarray                # [n] int64: tokens on which the latent is > 0
    activation_sum: np.ndarray       # [n] float64
    histogram: np.ndarray            # [n, bins] int64: equal bins over [0, histogram_max)
    histogram_max: np.ndarray        # [n] float32, a power of two; 0 if the latent never fired
    info: dict[str, Any]             # n_rows, context_length, context_before, ... provenance
    # [n, top_n, 2] int32: each example's (sequence, position) as the store records it; -1
    # where no example. None (results of format 1): row r is (r // context, r % context).
    positions: np.ndarray | None = None

    def __post_init__(self):
        if self.positions is None:
            rows, context_length = np.asarray(self.rows), int(self.info["context_length"])
            self.positions = np.where(rows[..., None] >= 0, np.stack(
                divmod(rows, context_length), axis=-1), -1).astype(np.int32)

    @property
    def n_latents(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_rows(self) -> int:
        return int(self.info["n_rows"])

    @property
    def density(self) -> np.ndarray:
        """Fraction of tokens on which each latent fires."""
        return self.fired / max(self.n_rows, 1)

    @property
    def mean_activation(self) -> np.ndarray:
        """Mean activation over the tokens each latent fires on (0 if it never fires)."""
        return np.where(self.fired > 0, self.activation_sum / np.maximum(self.fired, 1), 0.0)

    @property
    def max_activation(self) -> np.ndarray:
        return np.maximum(self.values[:, 0], 0.0)

    def examples(self, latent: int) -> list[dict[str, Any]]:
        """The latent's top examples: store row, sequence, position, activation, and the
        context window (token ids, the latent's activation on each, the example's index)."""
        before = self.info["context_before"]
        out = []
        for j in np.flatnonzero(self.rows[latent] >= 0):
            row = int(self.rows[latent, j])
            sequence, position = (int(v) for v in self.positions[latent, j])
            tokens = self.context_tokens[latent, j]
            inside = np.flatnonzero(tokens >= 0)
            lo, hi = int(inside[0]), int(inside[-1]) + 1
            out.append({
                "row": row, "sequence": sequence, "position": position,
                "activation": float(self.values[latent, j]),
                "token_index": before - lo,
                "context_token_ids": tokens[lo:hi].tolist(),
                "context_activations": self.context_activations[latent, j, lo:hi].tolist(),
            })
        return out


def fingerprint(info: dict) -> dict:
    """What fixes a result: the same fingerprint, the same arrays."""
    keys = ("sae", "step", "store", "n_rows", "top_n", "context_before", "context_after",
            "format_version")
    return {k: info.get(k) for k in keys}


def _array_spec(path: str, shape=None, dtype=None) -> dict:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
    if shape is not None:
        chunk = [max(1, min(4096, shape[0])), *shape[1:]]
        spec["metadata"] = {
            "shape": list(shape), "data_type": np.dtype(dtype).name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 3, "checksum": False}}],
            "fill_value": 0}
    return spec


def latent_record(top: TopActivations, latent: int, token_text: TokenText | None = None
                  ) -> dict[str, Any]:
    examples = top.examples(latent)
    if token_text is not None:
        for example in examples:
            example["context_tokens"] = [token_text(t) for t in example["context_token_ids"]]
    for example in examples:
        example["context_activations"] = [float(f"{a:.5g}")
                                          for a in example["context_activations"]]
    return {"latent": int(latent), "density": float(top.density[latent]),
            "fired": int(top.fired[latent]),
            "mean_activation": float(top.mean_activation[latent]),
            "max_activation": float(top.max_activation[latent]), "examples": examples}


def write(top: TopActivations, directory: str, *, tokenizer=None) -> str:
    """Writes `directory/` (replacing it once the new one is complete): summary.json, the
    arrays (zarr v3) and latents.jsonl."""
    directory = os.path.abspath(directory)
    tmp = directory + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    futures = []
    for name in ARRAYS:
        array = np.ascontiguousarray(getattr(top, name))
        opened = ts.open(_array_spec(os.path.join(tmp, name), array.shape, array.dtype),
                         create=True).result()
        futures.append(opened.write(array))
    token_text = TokenText(tokenizer) if tokenizer is not None else None
    with open(os.path.join(tmp, "latents.jsonl"), "w") as f:
        for latent in range(top.n_latents):
            f.write(json.dumps(latent_record(top, latent, token_text)) + "\n")
    for future in futures:
        future.result()
    with open(os.path.join(tmp, "summary.json"), "w") as f:
        json.dump({**top.info, "fingerprint": fingerprint(top.info),
                   "dead_fraction": float(np.mean(top.fired == 0)),
                   "arrays": list(ARRAYS)}, f, indent=1)
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def read(directory: str) -> TopActivations:
    """A result `write` wrote."""
    summary_path = os.path.join(directory, "summary.json")
    if not os.path.isfile(summary_path):
        raise AnalysisError(f"{directory}: no top-activations result (summary.json missing).")
    with open(summary_path) as f:
        info = json.load(f)
    if info.get("format") != FORMAT or info.get("format_version", 0) > FORMAT_VERSION:
        raise AnalysisError(f"{directory}: not a top-activations result this saejax reads.")
    names = [n for n in ARRAYS if os.path.isdir(os.path.join(directory, n))]
    arrays = [ts.open(_array_spec(os.path.join(directory, name)), read=True).result()
              for name in names]
    values = dict(zip(names, (np.asarray(a.read().result()) for a in arrays)))
    return TopActivations(**values, info=info)  # format 1 has no positions: derived


def matches(directory: str, wanted: dict) -> bool:
    """Whether `directory` holds a result with this fingerprint (so it can be reused)."""
    try:
        with open(os.path.join(directory, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return False
    return summary.get("fingerprint") == wanted and summary.get("arrays") == list(ARRAYS)
