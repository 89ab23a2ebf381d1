"""The language model as a data source: loading `config.lm` (checkpoint, hook, token data) with
its checks, and the downstream evaluation that splices an SAE back into the model.

A config names the model by a local checkpoint directory and the activation by a hook point
(`blocks.{layer}.hook_resid_post`, ...); this module turns that into a jitted forward pass that
stops after the hook's layer, and token sequences split into training and held-out parts.

Attention sinks: a real LM's first position (and its BOS tokens) carries activations of a norm
many times the others', which an SAE would spend its capacity on. As SAELens'
`exclude_special_tokens` does, those tokens are not rows: `keep_mask` drops the positions in
`lm.exclude_positions` (default the first) and the tokens in `lm.exclude_token_ids` (default
"special": the tokenizer's special tokens and the model's BOS), for the on-the-fly source here
and for `python -m saejax.harvest` alike.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from saejax import models, sharding
from saejax.data import store
from saejax.errors import ConfigError


class LanguageModel(NamedTuple):
    config: models.base.LMConfig  # any family's config
    params: dict
    hook: str
    layer: int
    # Set when the params are split over a mesh (tensor parallel: `models.param_shardings`);
    # the model's programs are traced and run under them (`sharding.activate`).
    mesh: Any = None
    rules: Any = None

    def context(self):
        """The ambient mesh and rules to trace and run this model's programs under."""
        if self.mesh is None:
            return contextlib.nullcontext()
        return sharding.activate(self.mesh, self.rules)


def from_checkpoint(path: str, hook: str, *, what: str = "lm.hook", error=ConfigError,
                    mesh=None, rules=None) -> LanguageModel:
    """The model at `path` (any family, `models.load`) with `hook` checked to be one of its
    hook points; `what` names the setting in the error. When `rules` split the LM over `mesh`
    (`models.splits`), its params are read straight into their shards; else as before, whole
    on one device."""
    rules = sharding.DEFAULT_RULES if rules is None else rules
    mesh = mesh if models.splits(mesh, rules) else None
    config = models.read_config(path)
    models.check_hook(config, hook, f"{what}={hook!r} is not a hook point of {path}", error)
    if mesh is not None:
        models.param_shardings(config, mesh, rules)  # a ConfigError before any weight is read
    loaded = models.load(path, mesh=mesh, rules=rules)
    return LanguageModel(loaded.config, loaded.params, hook, models.hook_layer(hook),
                         mesh, rules if mesh is not None else None)


def check_split(lm_config, mesh, rules) -> None:
    """A ConfigError now, before any training, when `rules` would split `lm.checkpoint`'s
    model over `mesh` in a way it cannot be (query heads the model axis does not divide)."""
    if models.splits(mesh, rules):
        models.param_shardings(models.read_config(str(lm_config.checkpoint)), mesh, rules)


def load(lm_config, *, d: int | None = None, mesh=None, rules=None) -> LanguageModel:
    """The checkpoint at `lm.checkpoint`, checked against `lm.hook` (each of its hooks, when it
    names several: the model's hook is then the deepest) and the SAE width `d`; split over
    `mesh` by `rules` when they split it (`from_checkpoint`)."""
    path = str(lm_config.checkpoint)
    hooks = split_hooks(lm_config.hook) or (str(lm_config.hook),)
    model = from_checkpoint(path, hooks[0], mesh=mesh, rules=rules)
    for hook in hooks[1:]:
        models.check_hook(model.config, hook, f"lm.hook={lm_config.hook!r}: {hook!r} is not a "
                          f"hook point of {path}", ConfigError)
    deepest = max(hooks, key=models.hook_layer)
    model = model._replace(hook=deepest, layer=models.hook_layer(deepest))
    width = model.config.d_model
    if d is not None and width != d:
        raise ConfigError(f"lm.checkpoint={path!r} has width n_embd={width} but "
                          f"data.d={d}; set --config.data.d={width}.")
    if int(lm_config.context_length) > model.config.max_positions:
        raise ConfigError(f"lm.context_length={lm_config.context_length} exceeds the model's "
                          f"{model.config.max_positions} positions; lower it.")
    return model


SPECIAL = "special"   # exclude_token_ids: the tokenizer's special tokens and the model's BOS


def exclude_positions_of(value, context_length: int, *, what: str = "lm.exclude_positions",
                         error=ConfigError) -> tuple[int, ...]:
    """The positions to leave out, checked to be inside a sequence: a sequence of ints or a
    comma-separated string ("0", "" for none)."""
    given = value
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    try:
        positions = tuple(sorted({int(v) for v in value}))
    except (TypeError, ValueError):
        raise error(f"{what}={given!r}: give positions as integers, e.g. (0,), or () for "
                    "none.") from None
    bad = [p for p in positions if not 0 <= p < context_length]
    if bad:
        raise error(f"{what}={given!r}: position {bad[0]} is outside a sequence of "
                    f"context_length={context_length}.")
    return positions


def exclude_token_ids_of(value, checkpoint: str, bos_token_id: int | None, *,
                         what: str = "lm.exclude_token_ids", error=ConfigError
                         ) -> tuple[int, ...]:
    """The token ids to leave out: "special" (the special tokens of the checkpoint's
    tokenizer.json, with the model's BOS), "" or "none" (none), or ids ("0,1,2" or ints)."""
    if isinstance(value, str) and value.strip().lower() == SPECIAL:
        ids = set() if bos_token_id is None else {int(bos_token_id)}
        if os.path.isfile(os.path.join(checkpoint, models.tokenizer.TOKENIZER_FILE)):
            ids |= set(models.tokenizer.special_token_ids(models.load_tokenizer(checkpoint)))
        return tuple(sorted(ids))
    given = value
    if isinstance(value, str):
        value = [] if value.strip().lower() == "none" else [
            v for v in value.replace(" ", "").split(",") if v]
    try:
        return tuple(sorted({int(v) for v in value}))
    except (TypeError, ValueError):
        raise error(f"{what}={given!r}: use {SPECIAL!r}, '' for none, or token ids like "
                    "'0,1,2'.") from None


def keep_mask(tokens: np.ndarray, exclude_positions, exclude_token_ids) -> np.ndarray:
    """bool [n, context]: the tokens that are rows (not at an excluded position, not an
    excluded id)."""
    keep = ~np.isin(tokens, np.asarray(list(exclude_token_ids), np.int64))
    keep[:, list(exclude_positions)] = False
    return keep


def exclusion(lm_config, model: "LanguageModel") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(exclude_positions, exclude_token_ids) of `config.lm`, checked."""
    return (exclude_positions_of(lm_config.exclude_positions, int(lm_config.context_length)),
            exclude_token_ids_of(lm_config.exclude_token_ids, str(lm_config.checkpoint),
                                 model.config.bos_token_id))


def sequences(lm_config, model: LanguageModel) -> np.ndarray:
    """All token sequences of `lm.tokens` [n, lm.context_length] (text is tokenised with the
    checkpoint's tokenizer.json, each document after the model's BOS)."""
    return models.load_sequences(str(lm_config.tokens), int(lm_config.context_length),
                                 tokenizer_path=str(lm_config.checkpoint),
                                 vocab_size=model.config.vocab_size,
                                 bos_token_id=model.config.bos_token_id)


def split(lm_config, model: LanguageModel, n_held_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) sequences of `lm.tokens`: the last `n_held_out` are held out for
    the loss-recovered evaluation; `python -m saejax.harvest --holdout_sequences=n` leaves the
    same ones out of the store, so the evaluation reads text the SAE never saw."""
    seqs = sequences(lm_config, model)
    if n_held_out >= len(seqs):
        raise ConfigError(f"evals.loss_recovered_sequences={n_held_out} but lm.tokens="
                          f"{str(lm_config.tokens)!r} holds only {len(seqs)} sequences of "
                          f"{lm_config.context_length} tokens; lower it.")
    return seqs[:len(seqs) - n_held_out], seqs[len(seqs) - n_held_out:]


def split_hooks(value) -> tuple[str, ...]:
    """`lm.hook` as the hooks it names: one, or several separated by commas."""
    return tuple(h.strip() for h in str(value).split(",") if h.strip())


def activations_fn(model: LanguageModel, hooks: tuple[str, ...] | None = None):
    """`(params, tokens [b, s]) -> activations [b, s, d]` at the hook (or `{hook: [b, s, d]}`
    for several `hooks`), jitted, running only the layers up to the deepest. A sharded model's
    calls run under its mesh and rules (from any thread), with the batch split over `data`
    when it divides."""
    if hooks is None:
        forward = models.make_forward(model.config, hooks=(model.hook,),
                                      stop_at_layer=model.layer + 1)
        fn = jax.jit(lambda params, tokens: forward(params, tokens)[1][model.hook])
    else:
        deepest = max(models.hook_layer(h) for h in hooks)
        forward = models.make_forward(model.config, hooks=hooks, stop_at_layer=deepest + 1)
        fn = jax.jit(lambda params, tokens: forward(params, tokens)[1])
    if model.mesh is None:
        return fn
    batch = NamedSharding(model.mesh, sharding.logical_to_spec(("batch",), model.rules))
    n_data = sharding.split_size(model.mesh, model.rules, "batch")

    def sharded(params, tokens):
        with model.context():
            if len(tokens) % n_data == 0:
                tokens = jax.device_put(np.asarray(tokens), batch)
            return fn(params, tokens)

    return sharded


class LMRows:
    """Activations at the hook computed on demand: the LM run on the fly as a `store.Rows`
    source (`data.source="lm"`), so shuffling, held-out rows, resuming and prefetching are the
    activation store's. The rows are the tokens `keep` (bool [n, context]; default all) selects,
    in order: the rows `python -m saejax.harvest` writes with the same exclusion. A chunk is
    about one forward batch of `lm.batch_sequences` sequences."""

    def __init__(self, model: LanguageModel, tokens: np.ndarray, *, batch_sequences: int,
                 name: str, keep: np.ndarray | None = None, activations="compile"):
        self.name = name
        self.tokens = np.asarray(tokens, np.int32)
        self.context_length = self.tokens.shape[1]
        self.keep = np.ones(self.tokens.shape, bool) if keep is None else np.asarray(keep, bool)
        # Row row_starts[s] is the first of sequence s.
        self.row_starts = np.concatenate([[0], np.cumsum(self.keep.sum(1))]).astype(np.int64)
        self.n_rows = int(self.row_starts[-1])
        self.d = model.config.d_model
        self.dtype = np.dtype(np.float32)
        self.batch_sequences = int(batch_sequences)
        self.chunk_rows = self.batch_sequences * int(self.keep.sum(1).max(initial=1) or 1)
        self._params = model.params
        # None: read through `rows_of` with another program (SharedForward's, several hooks).
        self._activations = activations_fn(model) if activations == "compile" else activations

    def rows_of(self, start: int, stop: int, activations):
        """Rows [start, stop) of what `activations(params, tokens)` returns: an array [b, s, d]
        gives an array, a dict of them a dict."""
        n = self.batch_sequences
        first = int(np.searchsorted(self.row_starts, start, "right")) - 1
        last = int(np.searchsorted(self.row_starts, stop, "left"))
        pieces = []
        for s in range(first, last, n):
            batch = self.tokens[s:min(s + n, last)]
            # Always a full forward batch (padded by repeating), so one program serves all.
            padded = np.concatenate([batch, np.repeat(batch[-1:], n - len(batch), 0)])
            kept = self.keep[s:s + len(batch)]
            pieces.append(jax.tree.map(lambda a: np.asarray(a)[:len(batch)][kept],
                                       activations(self._params, padded)))
        offset = int(self.row_starts[first])
        empty = np.zeros((0, self.d), np.float32)
        return jax.tree.map(lambda *a: np.concatenate([empty, *a])[start - offset:stop - offset],
                            *pieces)

    def read(self, start: int, stop: int, out: np.ndarray | None = None):
        rows = self.rows_of(start, stop, self._activations)
        if out is not None:
            np.copyto(out, rows)
            rows = out
        return store.Done(rows)


class SharedForward:
    """One forward pass for the rows of several hooks: `HookRows` views read their hook's
    rows of a range, and the range's forward runs once for all of them (the views of one
    lockstep stream read the same ranges; a small cache keyed by the range holds the others'
    rows until they are read). Thread-safe: each view is read by its own prefetch thread."""

    def __init__(self, model: LanguageModel, hooks: tuple[str, ...], tokens: np.ndarray, *,
                 batch_sequences: int, keep: np.ndarray | None, cache_ranges: int = 64):
        import collections  # pylint: disable=import-outside-toplevel
        import threading  # pylint: disable=import-outside-toplevel
        self.hooks = hooks
        # Which tokens are rows, and their chunks: the same for every hook.
        self.layout = LMRows(model, tokens, batch_sequences=batch_sequences, name=",".join(hooks),
                             keep=keep, activations=None)
        self._forward = activations_fn(model, hooks)
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_ranges = int(cache_ranges)
        self._lock = threading.Lock()

    def read(self, hook: str, start: int, stop: int) -> np.ndarray:
        with self._lock:
            if (start, stop) not in self._cache:
                self._cache[(start, stop)] = self.layout.rows_of(start, stop, self._forward)
                while len(self._cache) > self._cache_ranges:
                    self._cache.popitem(last=False)
            return self._cache[(start, stop)][hook]


class HookRows:
    """One hook's rows of a `SharedForward`, as a `store.Rows` source."""

    def __init__(self, shared: SharedForward, hook: str, name: str):
        rows = shared.layout
        self.shared, self.hook, self.name = shared, hook, name
        self.n_rows, self.d, self.dtype = rows.n_rows, rows.d, rows.dtype
        self.chunk_rows, self.context_length = rows.chunk_rows, rows.context_length

    def read(self, start: int, stop: int, out: np.ndarray | None = None):
        rows = self.shared.read(self.hook, start, stop)
        if out is not None:
            np.copyto(out, rows)
            rows = out
        return store.Done(rows)


def make_source(config, *, mesh, rules, eval_batches: int):
    """The trainer's source for `data.source="lm"`: the store's shuffled reader over `LMRows`,
    leaving out the sequences the loss-recovered evaluation holds out and the tokens
    `lm.exclude_positions` / `lm.exclude_token_ids` name. With several hooks in `lm.hook`
    (comma-separated), one forward pass per chunk gives every hook's rows, read in lockstep
    (`saejax.data.lockstep`): `{hook: [batch, d]}`."""
    hooks = split_hooks(config.lm.hook)
    model = load(config.lm, d=int(config.data.d), mesh=mesh, rules=rules)
    seqs, _ = split(config.lm, model, int(config.evals.loss_recovered_sequences))
    keep = keep_mask(seqs, *exclusion(config.lm, model))
    batch_size, batch_sequences = int(config.train.batch_size), int(config.lm.batch_sequences)
    if len(hooks) == 1:
        rows = LMRows(model, seqs, batch_sequences=batch_sequences,
                      name=f"{config.lm.checkpoint} at {model.hook} over {config.lm.tokens}",
                      keep=keep)
        return store.ArraySource(config.data, batch_size=batch_size, mesh=mesh, rules=rules,
                                 eval_batches=eval_batches, rows=rows)
    from saejax.data import lockstep  # pylint: disable=import-outside-toplevel
    shared = SharedForward(model, hooks, seqs, batch_sequences=batch_sequences, keep=keep)
    sources = {hook: store.ArraySource(
        config.data, batch_size=batch_size, mesh=mesh, rules=rules, eval_batches=eval_batches,
        rows=HookRows(shared, hook, f"{config.lm.checkpoint} at {hook} over {config.lm.tokens}"))
        for hook in hooks}
    return lockstep.LockstepSource.of(sources)
