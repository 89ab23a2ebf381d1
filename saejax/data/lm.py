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

from typing import NamedTuple

import os

import jax
import jax.numpy as jnp
import numpy as np

from saejax import models
from saejax.data import store
from saejax.errors import ConfigError


class LanguageModel(NamedTuple):
    config: models.base.LMConfig  # any family's config
    params: dict
    hook: str
    layer: int


def from_checkpoint(path: str, hook: str, *, what: str = "lm.hook", error=ConfigError
                    ) -> LanguageModel:
    """The model at `path` (any family, `models.load`) with `hook` checked to be one of its
    hook points; `what` names the setting in the error."""
    loaded = models.load(path)
    models.check_hook(loaded.config, hook, f"{what}={hook!r} is not a hook point of {path}",
                      error)
    return LanguageModel(loaded.config, loaded.params, hook, models.hook_layer(hook))


def load(lm_config, *, d: int | None = None) -> LanguageModel:
    """The checkpoint at `lm.checkpoint`, checked against `lm.hook` and the SAE width `d`."""
    path = str(lm_config.checkpoint)
    model = from_checkpoint(path, str(lm_config.hook))
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


def activations_fn(model: LanguageModel):
    """`(params, tokens [b, s]) -> activations [b, s, d]` at the hook, jitted, running only the
    layers up to the hook."""
    forward = models.make_forward(model.config, hooks=(model.hook,), stop_at_layer=model.layer + 1)
    return jax.jit(lambda params, tokens: forward(params, tokens)[1][model.hook])


class LMRows:
    """Activations at the hook computed on demand: the LM run on the fly as a `store.Rows`
    source (`data.source="lm"`), so shuffling, held-out rows, resuming and prefetching are the
    activation store's. The rows are the tokens `keep` (bool [n, context]; default all) selects,
    in order: the rows `python -m saejax.harvest` writes with the same exclusion. A chunk is
    about one forward batch of `lm.batch_sequences` sequences."""

    def __init__(self, model: LanguageModel, tokens: np.ndarray, *, batch_sequences: int,
                 name: str, keep: np.ndarray | None = None):
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
        self._activations = activations_fn(model)

    def read(self, start: int, stop: int, out: np.ndarray | None = None):
        n = self.batch_sequences
        first = int(np.searchsorted(self.row_starts, start, "right")) - 1
        last = int(np.searchsorted(self.row_starts, stop, "left"))
        pieces = [np.zeros((0, self.d), np.float32)]
        for s in range(first, last, n):
            batch = self.tokens[s:min(s + n, last)]
            # Always a full forward batch (padded by repeating), so one program serves all.
            padded = np.concatenate([batch, np.repeat(batch[-1:], n - len(batch), 0)])
            acts = np.asarray(self._activations(self._params, padded))[:len(batch)]
            pieces.append(acts[self.keep[s:s + len(batch)]])
        offset = int(self.row_starts[first])
        rows = np.concatenate(pieces)[start - offset:stop - offset]
        if out is not None:
            np.copyto(out, rows)
            rows = out
        return store.Done(rows)


def make_source(config, *, mesh, rules, eval_batches: int):
    """The trainer's source for `data.source="lm"`: the store's shuffled reader over `LMRows`,
    leaving out the sequences the loss-recovered evaluation holds out and the tokens
    `lm.exclude_positions` / `lm.exclude_token_ids` name."""
    model = load(config.lm, d=int(config.data.d))
    seqs, _ = split(config.lm, model, int(config.evals.loss_recovered_sequences))
    rows = LMRows(model, seqs, batch_sequences=int(config.lm.batch_sequences),
                  name=f"{config.lm.checkpoint} at {model.hook} over {config.lm.tokens}",
                  keep=keep_mask(seqs, *exclusion(config.lm, model)))
    return store.ArraySource(config.data, batch_size=int(config.train.batch_size), mesh=mesh,
                             rules=rules, eval_batches=eval_batches, rows=rows)
