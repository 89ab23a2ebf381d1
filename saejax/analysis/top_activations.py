"""Top activations: one streaming pass over an activation store that keeps, per latent, the
top-n activating tokens with their context, plus firing counts, activation sums and an
activation histogram. A dictionary that reads several hooks (a crosscoder; a CLT, one input
hook per layer) reads their stores of one harvest in lockstep (`stores.py`), and a CLT's
latents are indexed flat, `layer * n_per_layer + i` (`kinds.py`).

This module drives the pass: it opens the store (which must keep token ids), plans the batches
over the mesh, feeds the jitted step (`top_step.py`: the sharded merge and its running state)
batch by batch, moves the device counters to the host before they could overflow, and returns
a `TopActivations` (`top_results.py`, which also writes and reads the result directory,
default `<workdir>/analysis/top_activations/`). Nothing is read twice; the store's token ids
supply the text (`token_text.py`).
"""

from __future__ import annotations

import datetime
import time
from types import SimpleNamespace
from typing import Iterator, NamedTuple, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from saejax import cli, sharding
from saejax.analysis import kinds
from saejax.analysis.loading import AnalysisError, LoadedSAE, describe
from saejax.analysis.stores import open_read_stores, open_store_with_tokens
from saejax.analysis.token_text import TokenText
from saejax.analysis.top_results import (ARRAYS, FORMAT, FORMAT_VERSION, TopActivations,
                                         fingerprint, latent_record, matches, read, write)
from saejax.analysis.top_step import (HISTOGRAM_BINS, NO_EXPONENT, STATE_AXES, TopState,
                                      init_state, make_step, rebin)

__all__ = [  # the pass, and the names of its pieces this module has always offered
    "ARRAYS", "CONTEXT_AFTER", "CONTEXT_BEFORE", "DEFAULT_BATCH_TOKENS", "DEFAULT_TOP_N",
    "FORMAT", "FORMAT_VERSION", "HISTOGRAM_BINS", "STATE_AXES", "TokenText", "TopActivations",
    "TopState", "compute_top_activations", "default_mesh", "fingerprint", "init_state",
    "latent_record", "make_step", "matches", "open_store_with_tokens", "planned_fingerprint",
    "read", "rebin", "write"]

DEFAULT_TOP_N = 20
CONTEXT_BEFORE = 12
CONTEXT_AFTER = 4
DEFAULT_BATCH_TOKENS = 4096


def default_mesh(n_latents: int, devices: Sequence[jax.Device] | None = None, *,
                 model: int | None = None):
    """A (data, model) mesh over `devices`: the dictionary split over as many devices as divide
    it (or `model`), the rest on the batch."""
    devices = list(jax.devices() if devices is None else devices)
    if model is None:
        model = max(m for m in range(1, len(devices) + 1)
                    if len(devices) % m == 0 and n_latents % m == 0)
    if len(devices) % model or n_latents % model:
        raise AnalysisError(f"mesh_model={model} must divide both the {len(devices)} devices and "
                            f"the SAE's {n_latents} latents.")
    return sharding.make_mesh(SimpleNamespace(data=len(devices) // model, model=model), devices)


def _sequence_starts(store, max_rows: int | None) -> np.ndarray:
    """int64 [n_sequences + 1]: the first row of each whole sequence the pass reads (the
    store's committed rows, at most `max_rows`), then the end. A store that leaves rows out
    records each row's sequence; in one that does not, sequence s is rows [s*ctx, (s+1)*ctx)."""
    context_length = store.context_length
    if not store.has_positions:
        n_rows = store.n_rows // context_length * context_length
        if max_rows:
            n_rows = min(n_rows, int(max_rows) // context_length * context_length)
        return np.arange(0, n_rows + 1, context_length, dtype=np.int64)
    # The harvest commits whole batches of sequences, so the committed rows end on a sequence.
    sequence = store.positions(0, store.n_rows)[:, 0]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(sequence)) + 1, [store.n_rows]])
    starts = np.unique(starts).astype(np.int64)
    if max_rows:
        starts = starts[starts <= int(max_rows)]
    return starts


def _rows_to_read(store, max_rows: int | None) -> int:
    """Whole sequences only: the store's committed rows (at most `max_rows`), rounded down."""
    return int(_sequence_starts(store, max_rows)[-1])


class _Plan(NamedTuple):
    """How the pass reads the store: `n_batches` batches of `batch_sequences` whole sequences,
    each of `batch_rows` rows (padded), `data_size` blocks of `block_rows` (one per device of
    the batch axis, each whole sequences); the device counters moved to the host every
    `flush_every` batches. `block_starts [n_batches, data_size]`: each block's first store row.
    """

    store: object                # the first read hook's (its token ids, positions, documents)
    stores: tuple                # every read hook's, in the order the encoder stacks them
    n_rows: int
    context_length: int
    batch_sequences: int
    batch_rows: int
    n_batches: int
    data_size: int
    flush_every: int
    sequence_starts: np.ndarray
    block_starts: np.ndarray

    @property
    def block_rows(self) -> int:
        return self.batch_rows // self.data_size


def _plan(loaded: LoadedSAE, store_path: str, mesh, rules, *, top_n: int, context_before: int,
          context_after: int, batch_sequences: int | None, max_rows: int | None,
          flush_every: int | None) -> _Plan:
    """Checks the settings against the SAE, the store and the mesh; sizes the batches."""
    for name, value in (("top_n", top_n), ("context_before", context_before + 1),
                        ("context_after", context_after + 1)):
        if int(value) < 1:
            raise AnalysisError(f"{name}={value} must be positive (context sizes >= 0).")
    opened = open_read_stores(loaded, store_path)
    store = opened[0]
    context_length = store.context_length
    starts = _sequence_starts(store, max_rows)
    n_rows = int(starts[-1])
    if n_rows <= 0:
        raise AnalysisError(f"{store.path} holds no whole sequence of {context_length} rows to "
                            f"read (committed rows {store.n_rows}, max_rows={max_rows}).")
    batch_axis = sharding.logical_to_spec(("batch",), rules)[0]
    data_size = mesh.shape[batch_axis] if batch_axis is not None else 1
    if batch_sequences is None:
        batch_sequences = max(1, DEFAULT_BATCH_TOKENS // context_length)
        batch_sequences = -(-batch_sequences // data_size) * data_size
    if batch_sequences % data_size:
        raise AnalysisError(f"batch_sequences={batch_sequences} must be a multiple of the "
                            f"mesh's {data_size} data devices (each holds whole sequences).")
    latent_axis = sharding.logical_to_spec(("latent",), rules)[0]
    per_layer = kinds.kind_of(loaded).per_layer   # the params split a CLT's layers alike
    if latent_axis is not None and per_layer % mesh.shape[latent_axis]:
        raise AnalysisError(f"the SAE's {per_layer} latents (per layer) do not split over the "
                            f"mesh's {mesh.shape[latent_axis]} {latent_axis} devices; choose a "
                            "divisor (--mesh_model).")
    batch_rows = batch_sequences * context_length
    # Device counters are int32: move them to the host before they could overflow.
    flush_every = flush_every or max(1, min(256, 2**30 // batch_rows))
    n_sequences = len(starts) - 1
    n_batches = -(-n_sequences // batch_sequences)
    first = (np.arange(n_batches)[:, None] * batch_sequences
             + np.arange(data_size)[None, :] * (batch_sequences // data_size))
    return _Plan(store=store, stores=tuple(opened), n_rows=n_rows, context_length=context_length,
                 batch_sequences=batch_sequences, batch_rows=batch_rows,
                 n_batches=n_batches, data_size=data_size, flush_every=flush_every,
                 sequence_starts=starts,
                 block_starts=starts[np.minimum(first, n_sequences)])


class _HostCounters:
    """Firing counts, activation sums and histograms accumulated on the host (int64, float64),
    so the device's int32 counters can be reset before they overflow."""

    def __init__(self, n_latents: int):
        self.fired = np.zeros((n_latents,), np.int64)
        self.activation_sum = np.zeros((n_latents,), np.float64)
        self.histogram = np.zeros((n_latents, HISTOGRAM_BINS), np.int64)
        self.histogram_exponent = np.full((n_latents,), NO_EXPONENT, np.int64)

    def flush(self, state: TopState) -> TopState:
        """Adds the device's counters to the host's; returns `state` with them zeroed."""
        counts, sums, partial, exponent = jax.device_get(
            (state.fired, state.activation_sum, state.histogram, state.histogram_exponent))
        self.fired = self.fired + counts
        self.activation_sum = self.activation_sum + sums
        # The host's counts were binned for the exponents of the last flush.
        grow = np.where(self.histogram_exponent == NO_EXPONENT, 0,
                        exponent - self.histogram_exponent)
        self.histogram = rebin(self.histogram, grow, xp=np) + partial.sum(axis=0)
        self.histogram_exponent = exponent.astype(np.int64)
        return state._replace(fired=jnp.zeros_like(state.fired),
                              activation_sum=jnp.zeros_like(state.activation_sum),
                              histogram=jnp.zeros_like(state.histogram))

    def histogram_max(self) -> np.ndarray:
        """The upper end of each latent's bins, 2^e (0 for a latent that never fired)."""
        return np.where(self.histogram_exponent == NO_EXPONENT, 0.0,
                        np.ldexp(1.0, np.maximum(self.histogram_exponent, -1000))
                        ).astype(np.float32)


def _segments(store, start: int, stop: int) -> np.ndarray:
    """int32 [stop - start]: a number per run of rows of one sequence and one document, so
    that a context never runs across either."""
    sequence = store.positions(start, stop)[:, 0]
    document = store.documents(start, stop)[:, 0]
    change = np.concatenate([[0], (np.diff(sequence) != 0) | (np.diff(document) != 0)])
    return np.cumsum(change).astype(np.int32)


def _batches(plan: _Plan) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """(batch index, valid rows, activations [batch_rows, hooks, d] of the hooks the dictionary
    reads, token ids [batch_rows], segments [batch_rows]) per batch: each device's block holds
    its whole sequences, then padding (token -1, segment -1, masked out by the step). The next
    batch's read is in flight while the caller steps on this one."""
    store, starts, S = plan.store, plan.sequence_starts, plan.batch_sequences
    n_sequences = len(starts) - 1

    def span(b):
        return int(starts[min(b * S, n_sequences)]), int(starts[min((b + 1) * S, n_sequences)])

    def read(b):
        return [one.read(*span(b)) for one in plan.stores]

    pending = read(0)
    for b in range(plan.n_batches):
        start, stop = span(b)
        rows = np.stack([np.asarray(p.result(), np.float32) for p in pending], axis=1)
        if b + 1 < plan.n_batches:
            pending = read(b + 1)
        tokens, segments = store.token_ids(start, stop).astype(np.int32), _segments(
            store, start, stop)
        x = np.zeros((plan.batch_rows, *rows.shape[1:]), np.float32)
        batch_tokens = np.full(plan.batch_rows, -1, np.int32)
        batch_segments = np.full(plan.batch_rows, -1, np.int32)
        block_stops = [*plan.block_starts[b, 1:], stop]
        for j, (lo, hi) in enumerate(zip(plan.block_starts[b], block_stops)):
            at, n = j * plan.block_rows, int(hi - lo)
            x[at:at + n] = rows[lo - start:hi - start]
            batch_tokens[at:at + n] = tokens[lo - start:hi - start]
            batch_segments[at:at + n] = segments[lo - start:hi - start]
        yield b, stop - start, x, batch_tokens, batch_segments


def _stream(loaded: LoadedSAE, plan: _Plan, mesh, rules, counters: _HostCounters, *,
            top_n: int, context_before: int, context_after: int,
            progress_every_s: float) -> TopState:
    """Runs the step over every batch; returns the final state on the host."""
    window = context_before + 1 + context_after
    with sharding.activate(mesh, rules):
        step = make_step(loaded, mesh, rules, top_n=top_n, before=context_before,
                         after=context_after)
        state_shardings = sharding.named_shardings(mesh, STATE_AXES, rules)
        state = jax.jit(lambda: init_state(loaded.n_latents, top_n, window, plan.data_size),
                        out_shardings=state_shardings)()
        params = jax.device_put(
            {k: np.asarray(v) for k, v in loaded.params.items()},
            sharding.named_shardings(
                mesh, {k: loaded.architecture.param_axes[k] for k in loaded.params}, rules))
        scale = jax.device_put(kinds.read_scales(loaded, kinds.kind_of(loaded)),
                               sharding.replicated(mesh))
        # Several fake CPU devices share a few cores: finish each step before the next (see
        # saejax/loop.py); accelerators keep the asynchronous pipeline.
        serialize = jax.default_backend() == "cpu" and mesh.size > 1
        t0 = last_log = time.perf_counter()
        done = 0
        for b, n_valid, x, tokens, segments in _batches(plan):
            state = step(state, params, scale, x, tokens, segments, np.int32(b))
            if serialize:
                jax.block_until_ready(state)
            if (b + 1) % plan.flush_every == 0:
                state = counters.flush(state)
            done += n_valid
            now = time.perf_counter()
            if now - last_log >= progress_every_s:
                last_log = now
                rate = done / (now - t0)
                logging.info("top activations: %s/%s rows (%.1f%%) | %.0f tok/s | ETA %s",
                             f"{done:,}", f"{plan.n_rows:,}", 100 * done / plan.n_rows, rate,
                             cli.format_duration((plan.n_rows - done) / rate))
        state = counters.flush(state)
        return jax.device_get(state)


def compute_top_activations(loaded: LoadedSAE, store_path: str, *, top_n: int = DEFAULT_TOP_N,
                            context_before: int = CONTEXT_BEFORE,
                            context_after: int = CONTEXT_AFTER,
                            batch_sequences: int | None = None, max_rows: int | None = None,
                            mesh=None, rules=sharding.DEFAULT_RULES,
                            progress_every_s: float = 30.0,
                            flush_every: int | None = None) -> TopActivations:
    """One pass over the store's rows (the first `max_rows`, whole sequences) with `loaded`.

    `mesh` defaults to `default_mesh`; batches are `batch_sequences` whole sequences (default
    about 4096 tokens). The int32 device counters move to the host every `flush_every` batches
    (default: as rarely as they cannot overflow).
    """
    mesh = default_mesh(kinds.kind_of(loaded).per_layer) if mesh is None else mesh
    plan = _plan(loaded, store_path, mesh, rules, top_n=top_n, context_before=context_before,
                 context_after=context_after, batch_sequences=batch_sequences,
                 max_rows=max_rows, flush_every=flush_every)
    logging.info("Top activations of %s over %s rows of %s (%d batches of %d sequences, mesh "
                 "%s).", describe(loaded), f"{plan.n_rows:,}", plan.store.path, plan.n_batches,
                 plan.batch_sequences, dict(mesh.shape))
    counters = _HostCounters(loaded.n_latents)
    t0 = time.perf_counter()
    state = _stream(loaded, plan, mesh, rules, counters, top_n=top_n,
                    context_before=context_before, context_after=context_after,
                    progress_every_s=progress_every_s)
    seconds = time.perf_counter() - t0
    info = _provenance(loaded, plan, mesh, top_n=top_n, context_before=context_before,
                       context_after=context_after, seconds=seconds)
    logging.info("Top activations: %s rows in %.1f s (%.0f tok/s).", f"{plan.n_rows:,}",
                 seconds, info["tokens_per_s"])
    found = np.isfinite(state.values) & (state.values > 0)
    batch, offset = np.where(found, state.batch, 0), np.where(found, state.offset, 0)
    rows = np.where(found, plan.block_starts[batch, offset // plan.block_rows]
                    + offset % plan.block_rows, -1)
    positions = np.full(rows.shape + (2,), -1, np.int32)
    positions[found] = plan.store.sequence_positions(rows[found])
    return TopActivations(
        values=np.where(found, state.values, 0.0).astype(np.float32),
        rows=rows, positions=positions,
        context_tokens=np.where(found[..., None], state.context_tokens, -1).astype(np.int32),
        context_activations=np.where(found[..., None], state.context_activations,
                                     0.0).astype(np.float32),
        fired=counters.fired, activation_sum=counters.activation_sum,
        histogram=counters.histogram, histogram_max=counters.histogram_max(), info=info)


def _provenance(loaded: LoadedSAE, plan: _Plan, mesh, *, top_n: int, context_before: int,
                context_after: int, seconds: float) -> dict:
    """The result's `info`: what was read with what, and the settings (see `fingerprint`)."""
    metadata = plan.store.metadata
    kind = kinds.kind_of(loaded, metadata.get("hook"))
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "sae": loaded.source, "sae_kind": loaded.kind, "step": loaded.step,
        "architecture": loaded.architecture.name, "d": loaded.d, "n_latents": loaded.n_latents,
        "input_scale": np.asarray(loaded.input_scale, np.float64).tolist(),
        "hook": metadata.get("hook") if kind.name == "sae" else ",".join(kind.reads),
        "kind": kind.name, "writes": list(kind.writes), "n_layers": kind.n_layers,
        "latents_per_layer": kind.per_layer, "layers": list(kind.layers),
        "model": metadata.get("model"), "store": ",".join(s.path for s in plan.stores),
        "n_rows": int(plan.n_rows),
        "context_length": int(plan.context_length), "top_n": int(top_n),
        "context_before": int(context_before), "context_after": int(context_after),
        "histogram_bins": HISTOGRAM_BINS, "batch_sequences": int(plan.batch_sequences),
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "seconds": seconds,
        "tokens_per_s": plan.n_rows / seconds if seconds > 0 else 0.0,
        "created_time": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
    }


def planned_fingerprint(loaded: LoadedSAE, store_path: str, *, top_n: int,
                        context_before: int, context_after: int,
                        max_rows: int | None) -> dict:
    """The fingerprint `compute_top_activations` would give, without running it."""
    opened = open_read_stores(loaded, store_path)
    return fingerprint({"sae": loaded.source, "step": loaded.step,
                        "store": ",".join(s.path for s in opened),
                        "n_rows": _rows_to_read(opened[0], max_rows), "top_n": top_n,
                        "context_before": context_before, "context_after": context_after,
                        "format_version": FORMAT_VERSION})
