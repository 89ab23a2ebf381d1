"""Top activations: one streaming pass over an activation store that keeps, per latent, the
top-n activating tokens with their context, plus firing counts, activation sums and an
activation histogram.

The pass is one jitted step per batch, sharded like training: the dictionary split over the
mesh's `model` axis, the batch over `data`. Each batch is whole sequences, so every token's
context lies in the batch: for each latent, each device takes the top-n tokens of its block of
the batch (with the latent's activations and the token ids of the window around each), the
candidates of the `data` devices are gathered (n per device, never the batch), and the top-n of
[running top-n, candidates] is kept. Nothing is read twice; the store's token ids supply the
text.

Results go to a directory (default `<workdir>/analysis/top_activations/`): `summary.json`, the
arrays as zarr v3 (tensorstore), and `latents.jsonl` with one line per latent (density, mean
activation, examples with their row, sequence, position and context, decoded with the
checkpoint's tokenizer.json when there is one).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
import time
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from jax.sharding import NamedSharding, PartitionSpec as P

from saejax import cli, sharding
from saejax.analysis.loading import AnalysisError, LoadedSAE, check_width, describe
from saejax.data import store as store_lib

FORMAT = "saejax.top_activations"
FORMAT_VERSION = 1
DEFAULT_TOP_N = 20
CONTEXT_BEFORE = 12
CONTEXT_AFTER = 4
DEFAULT_BATCH_TOKENS = 4096
# Each latent's activation histogram has HISTOGRAM_BINS equal bins over [0, 2^e), e the
# smallest exponent with 2^e >= its largest activation so far. When a batch exceeds 2^e, e grows
# and neighbouring bins merge (a doubling histogram), so the final bins are linear over
# [0, max] with at least half of them below the maximum, in one pass.
HISTOGRAM_BINS = 64
_NO_EXPONENT = -(2**20)  # a latent that has not fired yet
ARRAYS = ("values", "rows", "context_tokens", "context_activations", "fired",
          "activation_sum", "histogram", "histogram_max")


class TopState(NamedTuple):
    """The running result, every array split over latents like the SAE."""

    values: jax.Array               # [n, top_n] float32, descending; -inf: no example yet
    batch: jax.Array                # [n, top_n] int32: the batch each example came from
    offset: jax.Array               # [n, top_n] int32: its row within that batch
    context_tokens: jax.Array       # [n, top_n, window] int32; -1 outside the sequence
    context_activations: jax.Array  # [n, top_n, window] float32: the latent on the window
    fired: jax.Array                # [n] int32, since the last flush to the host
    activation_sum: jax.Array       # [n] float32, since the last flush
    # [batch shards, n, bins] int32 since the last flush: each device of the batch axis counts
    # its own rows (no all-reduce per batch); the host sums them.
    histogram: jax.Array
    histogram_exponent: jax.Array   # [n] int32: the bins span [0, 2^e)


STATE_AXES = TopState(values=("latent", None), batch=("latent", None),
                      offset=("latent", None), context_tokens=("latent", None, None),
                      context_activations=("latent", None, None), fired=("latent",),
                      activation_sum=("latent",), histogram=("batch", "latent", None),
                      histogram_exponent=("latent",))


def init_state(n_latents: int, top_n: int, window: int, batch_shards: int = 1) -> TopState:
    return TopState(
        values=jnp.full((n_latents, top_n), -jnp.inf, jnp.float32),
        batch=jnp.full((n_latents, top_n), -1, jnp.int32),
        offset=jnp.full((n_latents, top_n), -1, jnp.int32),
        context_tokens=jnp.full((n_latents, top_n, window), -1, jnp.int32),
        context_activations=jnp.zeros((n_latents, top_n, window), jnp.float32),
        fired=jnp.zeros((n_latents,), jnp.int32),
        activation_sum=jnp.zeros((n_latents,), jnp.float32),
        histogram=jnp.zeros((batch_shards, n_latents, HISTOGRAM_BINS), jnp.int32),
        histogram_exponent=jnp.full((n_latents,), _NO_EXPONENT, jnp.int32))


def rebin(counts, factor_exponent, xp=jnp):
    """Merges each run of 2^m neighbouring bins into one (the low bins; the rest empty):
    counts [..., n, bins], m [n] >= 0 per latent. Works on NumPy arrays with xp=np."""
    bins = counts.shape[-1]
    factor = 2 ** xp.minimum(factor_exponent, int(math.log2(bins)))[..., None]   # [n, 1]
    cumulative = xp.concatenate([xp.zeros_like(counts[..., :1]), xp.cumsum(counts, axis=-1)],
                                axis=-1)
    j = xp.arange(bins)
    hi = xp.minimum((j + 1) * factor, bins)
    lo = xp.minimum(j * factor, bins)
    hi, lo = (xp.broadcast_to(i, counts.shape) for i in (hi, lo))
    return (xp.take_along_axis(cumulative, hi, axis=-1)
            - xp.take_along_axis(cumulative, lo, axis=-1))


def _update_histogram(histogram, exponent, acts, batch_max):
    """One device's histogram counts [1, latents, bins] of its rows `acts [rows, latents]`; the
    bins' range follows the batch's (global) maximum `batch_max [latents]`."""
    mantissa, e = jnp.frexp(batch_max)
    batch_exponent = jnp.where(mantissa == 0.5, e - 1, e)   # smallest e with 2^e >= max
    fired = batch_max > 0
    new_exponent = jnp.where(fired, jnp.maximum(exponent, batch_exponent), exponent)
    grow = jnp.where(exponent == _NO_EXPONENT, 0, new_exponent - exponent)
    histogram = rebin(histogram, grow)
    latents, bins = acts.shape[1], histogram.shape[-1]
    position = jnp.ldexp(acts, -new_exponent[None, :]) * bins   # exact scaling by 2^-e
    index = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, bins - 1)
    flat = jnp.where(acts > 0, jnp.arange(latents)[None, :] * bins + index, latents * bins)
    counts = jnp.zeros((latents * bins,), jnp.int32).at[flat.reshape(-1)].add(1, mode="drop")
    return histogram + counts.reshape(1, latents, bins), new_exponent


def _merge_block(acts, tokens, values, batch, offset, context_tokens, context_activations,
                 histogram, histogram_exponent, batch_max, batch_index, *, top_n: int,
                 context_length: int, before: int, after: int, batch_axis):
    """One device's block of latents: its candidates from its rows of the batch, gathered over
    the batch axis and merged with the running top-n; and its rows' histogram counts.
    acts [rows, latents] (this block)."""
    histogram, histogram_exponent = _update_histogram(histogram, histogram_exponent, acts,
                                                      batch_max)
    rows = acts.shape[0]
    a = acts.T                                            # [latents, rows]
    values_new, index = jax.lax.top_k(a, min(top_n, rows))
    # The window around each candidate, clipped to its own sequence (rows are whole sequences).
    position = index[..., None] + jnp.arange(-before, after + 1)
    inside = ((position >= 0) & (position < rows)
              & (position // context_length == index[..., None] // context_length))
    clipped = jnp.clip(position, 0, rows - 1)
    tokens_new = jnp.where(inside, tokens[clipped], -1)
    acts_new = jnp.take_along_axis(a, clipped.reshape(a.shape[0], -1), axis=1)
    acts_new = jnp.where(inside, acts_new.reshape(clipped.shape), 0.0)
    offset_new = index
    if batch_axis is not None:
        offset_new = index + jax.lax.axis_index(batch_axis) * rows
        gather = lambda x: jax.lax.all_gather(x, batch_axis, axis=1, tiled=True)
        values_new, offset_new, tokens_new, acts_new = map(
            gather, (values_new, offset_new, tokens_new, acts_new))
    # Running examples first, then candidates in row order: ties keep the earlier row, as
    # jax.lax.top_k over the whole batch on one device would.
    kept_values, order = jax.lax.top_k(jnp.concatenate([values, values_new], axis=1), top_n)

    def take(old, new):  # the kept entries of [running, candidates], along the example axis
        both = jnp.concatenate([old, new], axis=1)
        return jnp.take_along_axis(both, order.reshape(order.shape + (1,) * (both.ndim - 2)),
                                   axis=1)

    return (kept_values,
            take(batch, jnp.full(offset_new.shape, batch_index, jnp.int32)),
            take(offset, offset_new.astype(jnp.int32)),
            take(context_tokens, tokens_new),
            take(context_activations, acts_new),
            histogram, histogram_exponent)


def make_step(loaded: LoadedSAE, mesh, rules, *, top_n: int, context_length: int,
              before: int, after: int) -> Callable:
    """`step(state, params, input_scale, x [B, d], tokens [B], batch_index, n_valid) -> state`,
    jitted and sharded over `mesh` by `rules`. Call it inside `sharding.activate(mesh, rules)`
    (TopK's sharded top-k reads the ambient mesh)."""
    architecture, sae_config = loaded.architecture, loaded.sae_config
    act_spec = sharding.logical_to_spec(("batch", "latent"), rules)
    batch_axis, latent_axis = act_spec[0], act_spec[1]
    if batch_axis is not None and mesh.shape[batch_axis] == 1:
        batch_axis = None
    specs = jax.tree.map(lambda axes: sharding.logical_to_spec(axes, rules), STATE_AXES,
                         is_leaf=sharding.is_axes)
    merge = jax.shard_map(
        lambda *args: _merge_block(*args, top_n=top_n, context_length=context_length,
                                   before=before, after=after, batch_axis=batch_axis),
        in_specs=(P(act_spec[0], latent_axis), P(act_spec[0]), specs.values, specs.batch,
                  specs.offset, specs.context_tokens, specs.context_activations,
                  specs.histogram, specs.histogram_exponent, P(latent_axis), P()),
        out_specs=(specs.values, specs.batch, specs.offset, specs.context_tokens,
                   specs.context_activations, specs.histogram, specs.histogram_exponent),
        # The gathered candidates, so the outputs, are identical on every device of the batch
        # axis; check_vma cannot infer that through all_gather + top_k (as in sharding.top_k).
        check_vma=False)

    def step(state: TopState, params, input_scale, x, tokens, batch_index, n_valid):
        acts = architecture.encode(params, x * input_scale, sae_config)
        valid = jnp.arange(x.shape[0]) < n_valid
        acts = jnp.where(valid[:, None], acts, 0.0).astype(jnp.float32)
        acts = jax.lax.with_sharding_constraint(acts, NamedSharding(mesh, act_spec))
        (values, batch, offset, context_tokens, context_activations, histogram,
         histogram_exponent) = merge(
            acts, tokens, state.values, state.batch, state.offset, state.context_tokens,
            state.context_activations, state.histogram, state.histogram_exponent,
            jnp.max(acts, axis=0), batch_index)
        return TopState(
            values=values, batch=batch, offset=offset, context_tokens=context_tokens,
            context_activations=context_activations,
            fired=state.fired + jnp.sum(acts > 0, axis=0, dtype=jnp.int32),
            activation_sum=state.activation_sum + jnp.sum(acts, axis=0),
            histogram=histogram, histogram_exponent=histogram_exponent)

    state_shardings = sharding.named_shardings(mesh, STATE_AXES, rules)
    param_shardings = sharding.named_shardings(
        mesh, {k: loaded.architecture.param_axes[k] for k in loaded.params}, rules)
    replicated = sharding.replicated(mesh)
    x_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch", "embed"), rules))
    token_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch",), rules))
    return jax.jit(step, in_shardings=(state_shardings, param_shardings, replicated,
                                       x_sharding, token_sharding, replicated, replicated),
                   out_shardings=state_shardings, donate_argnums=0)


# ------------------------------------------------------------------------------------------
# The result.
# ------------------------------------------------------------------------------------------
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
        context_length, before = self.info["context_length"], self.info["context_before"]
        out = []
        for j in np.flatnonzero(self.rows[latent] >= 0):
            row = int(self.rows[latent, j])
            sequence, position = divmod(row, context_length)
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


# ------------------------------------------------------------------------------------------
# The pass.
# ------------------------------------------------------------------------------------------
def open_store_with_tokens(path: str):
    """The activation store at `path`, which must keep token ids (a `saejax.harvest` store)."""
    path = os.path.abspath(os.fspath(path))
    harvest = ("harvest one with `python -m saejax.harvest --checkpoint=DIR --tokens=FILE "
               "--out=STORES --hooks=<the SAE's hook>` and pass --store=STORES/<hook>")
    if path.endswith(".npy") or os.path.isfile(path):
        raise AnalysisError(f"{path} is an array of activations without token ids; top "
                            f"contexts need an activation store that keeps them: {harvest}.")
    if not os.path.isdir(path):
        raise AnalysisError(f"{path}: no such activation store; {harvest}.")
    if (os.path.isfile(os.path.join(path, "metadata.json"))
            and not os.path.isdir(os.path.join(path, "token_ids"))):
        raise AnalysisError(f"{path}: the store has no token_ids array, so its rows cannot be "
                            f"traced back to text; top contexts need one: {harvest}.")
    opened = store_lib.open_store(path, allow_partial=True)
    if opened.n_rows < opened.metadata["n_tokens"]:
        logging.warning("%s is unfinished: reading its %s committed rows.", path,
                        f"{opened.n_rows:,}")
    return opened


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
    for name, value in (("top_n", top_n), ("context_before", context_before + 1),
                        ("context_after", context_after + 1)):
        if int(value) < 1:
            raise AnalysisError(f"{name}={value} must be positive (context sizes >= 0).")
    store = open_store_with_tokens(store_path)
    check_width(loaded, store.d, f"the activation store {store.path}",
                "Use the store of the hook this SAE was trained at (--store).")
    context_length = store.context_length
    n_rows = store.n_rows // context_length * context_length
    if max_rows:
        n_rows = min(n_rows, int(max_rows) // context_length * context_length)
    if n_rows <= 0:
        raise AnalysisError(f"{store.path} holds no whole sequence of {context_length} rows to "
                            f"read (committed rows {store.n_rows}, max_rows={max_rows}).")
    mesh = default_mesh(loaded.n_latents) if mesh is None else mesh
    batch_axis = sharding.logical_to_spec(("batch",), rules)[0]
    data_size = mesh.shape[batch_axis] if batch_axis is not None else 1
    if batch_sequences is None:
        batch_sequences = max(1, DEFAULT_BATCH_TOKENS // context_length)
        batch_sequences = -(-batch_sequences // data_size) * data_size
    if batch_sequences % data_size:
        raise AnalysisError(f"batch_sequences={batch_sequences} must be a multiple of the "
                            f"mesh's {data_size} data devices (each holds whole sequences).")
    latent_axis = sharding.logical_to_spec(("latent",), rules)[0]
    if latent_axis is not None and loaded.n_latents % mesh.shape[latent_axis]:
        raise AnalysisError(f"the SAE's {loaded.n_latents} latents do not split over the "
                            f"mesh's {mesh.shape[latent_axis]} {latent_axis} devices; choose a "
                            "divisor (--mesh_model).")
    batch_rows = batch_sequences * context_length
    n_batches = -(-n_rows // batch_rows)
    window = context_before + 1 + context_after
    # Device counters are int32: move them to the host before they could overflow.
    flush_every = flush_every or max(1, min(256, 2**30 // batch_rows))
    logging.info("Top activations of %s over %s rows of %s (%d batches of %d sequences, mesh "
                 "%s).", describe(loaded), f"{n_rows:,}", store.path, n_batches,
                 batch_sequences, dict(mesh.shape))

    fired = np.zeros((loaded.n_latents,), np.int64)
    activation_sum = np.zeros((loaded.n_latents,), np.float64)
    histogram = np.zeros((loaded.n_latents, HISTOGRAM_BINS), np.int64)
    histogram_exponent = np.full((loaded.n_latents,), _NO_EXPONENT, np.int64)
    t0 = last_log = time.perf_counter()
    with sharding.activate(mesh, rules):
        step = make_step(loaded, mesh, rules, top_n=top_n, context_length=context_length,
                         before=context_before, after=context_after)
        state_shardings = sharding.named_shardings(mesh, STATE_AXES, rules)
        state = jax.jit(lambda: init_state(loaded.n_latents, top_n, window, data_size),
                        out_shardings=state_shardings)()
        params = jax.device_put(
            {k: np.asarray(v) for k, v in loaded.params.items()},
            sharding.named_shardings(
                mesh, {k: loaded.architecture.param_axes[k] for k in loaded.params}, rules))
        scale = jax.device_put(np.float32(loaded.input_scale), sharding.replicated(mesh))
        # Several fake CPU devices share a few cores: finish each step before the next (see
        # train.py); accelerators keep the asynchronous pipeline.
        serialize = jax.default_backend() == "cpu" and mesh.size > 1

        def flush(state: TopState) -> TopState:
            nonlocal fired, activation_sum, histogram, histogram_exponent
            counts, sums, partial, exponent = jax.device_get(
                (state.fired, state.activation_sum, state.histogram, state.histogram_exponent))
            fired = fired + counts
            activation_sum = activation_sum + sums
            # The host's counts were binned for the exponents of the last flush.
            grow = np.where(histogram_exponent == _NO_EXPONENT, 0, exponent - histogram_exponent)
            histogram = rebin(histogram, grow, xp=np) + partial.sum(axis=0)
            histogram_exponent = exponent.astype(np.int64)
            return state._replace(fired=jnp.zeros_like(state.fired),
                                  activation_sum=jnp.zeros_like(state.activation_sum),
                                  histogram=jnp.zeros_like(state.histogram))

        pending = store.read(0, min(batch_rows, n_rows))
        for b in range(n_batches):
            start, stop = b * batch_rows, min((b + 1) * batch_rows, n_rows)
            x = np.asarray(pending.result(), np.float32)
            if b + 1 < n_batches:  # the next read overlaps this step
                pending = store.read(stop, min(stop + batch_rows, n_rows))
            tokens = store.token_ids(start, stop).astype(np.int32)
            if stop - start < batch_rows:  # the last batch: padded, the padding masked out
                x = np.concatenate([x, np.zeros((batch_rows - len(x), x.shape[1]), np.float32)])
                tokens = np.concatenate([tokens, np.full(batch_rows - len(tokens), -1,
                                                         np.int32)])
            state = step(state, params, scale, x, tokens, np.int32(b), np.int32(stop - start))
            if serialize:
                jax.block_until_ready(state)
            if (b + 1) % flush_every == 0:
                state = flush(state)
            now = time.perf_counter()
            if now - last_log >= progress_every_s:
                last_log = now
                rate = stop / (now - t0)
                logging.info("top activations: %s/%s rows (%.1f%%) | %.0f tok/s | ETA %s",
                             f"{stop:,}", f"{n_rows:,}", 100 * stop / n_rows, rate,
                             cli.format_duration((n_rows - stop) / rate))
        state = flush(state)
        state = jax.device_get(state)
    seconds = time.perf_counter() - t0

    found = np.isfinite(state.values) & (state.values > 0)
    rows = np.where(found, state.batch.astype(np.int64) * batch_rows + state.offset, -1)
    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "sae": loaded.source, "sae_kind": loaded.kind, "step": loaded.step,
        "architecture": loaded.architecture.name, "d": loaded.d, "n_latents": loaded.n_latents,
        "input_scale": float(loaded.input_scale), "hook": store.metadata.get("hook"),
        "model": store.metadata.get("model"), "store": store.path, "n_rows": int(n_rows),
        "context_length": int(context_length), "top_n": int(top_n),
        "context_before": int(context_before), "context_after": int(context_after),
        "histogram_bins": HISTOGRAM_BINS, "batch_sequences": int(batch_sequences),
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "seconds": seconds,
        "tokens_per_s": n_rows / seconds if seconds > 0 else 0.0,
        "created_time": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
    }
    logging.info("Top activations: %s rows in %.1f s (%.0f tok/s).", f"{n_rows:,}", seconds,
                 info["tokens_per_s"])
    return TopActivations(
        values=np.where(found, state.values, 0.0).astype(np.float32), rows=rows,
        context_tokens=np.where(found[..., None], state.context_tokens, -1).astype(np.int32),
        context_activations=np.where(found[..., None], state.context_activations,
                                     0.0).astype(np.float32),
        fired=fired, activation_sum=activation_sum,
        histogram=histogram,
        histogram_max=np.where(histogram_exponent == _NO_EXPONENT, 0.0,
                               np.ldexp(1.0, np.maximum(histogram_exponent, -1000))
                               ).astype(np.float32),
        info=info)


# ------------------------------------------------------------------------------------------
# On disk.
# ------------------------------------------------------------------------------------------
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


class TokenText:
    """Token ids to their text with a tokenizer (each token on its own), cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self._cache:
            if self.tokenizer is None:
                text = f"<{token_id}>"
            else:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False)
                piece = self.tokenizer.id_to_token(token_id) or ""
                if piece.startswith("\u2581") and not text.startswith(" "):
                    # A SentencePiece word start, whose space a Strip decoder (Llama 2's)
                    # removes from a lone token.
                    text = " " + text
                if not text:
                    text = piece or f"<{token_id}>"
            self._cache[token_id] = text
        return self._cache[token_id]


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
    arrays = [ts.open(_array_spec(os.path.join(directory, name)), read=True).result()
              for name in ARRAYS]
    values = [np.asarray(a.read().result()) for a in arrays]
    return TopActivations(**dict(zip(ARRAYS, values)), info=info)


def matches(directory: str, wanted: dict) -> bool:
    """Whether `directory` holds a result with this fingerprint (so it can be reused)."""
    try:
        with open(os.path.join(directory, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return False
    return summary.get("fingerprint") == wanted and summary.get("arrays") == list(ARRAYS)


def planned_fingerprint(loaded: LoadedSAE, store_path: str, *, top_n: int,
                        context_before: int, context_after: int,
                        max_rows: int | None) -> dict:
    """The fingerprint `compute_top_activations` would give, without running it."""
    store = open_store_with_tokens(store_path)
    ctx = store.context_length
    n_rows = store.n_rows // ctx * ctx
    if max_rows:
        n_rows = min(n_rows, int(max_rows) // ctx * ctx)
    return fingerprint({"sae": loaded.source, "step": loaded.step, "store": store.path,
                        "n_rows": n_rows, "top_n": top_n, "context_before": context_before,
                        "context_after": context_after, "format_version": FORMAT_VERSION})

