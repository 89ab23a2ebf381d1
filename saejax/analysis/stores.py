"""The activation stores an analysis pass reads: one store that keeps token ids
(`open_store_with_tokens`), and for a dictionary that reads several hooks (a crosscoder's, a
CLT's layers) the stores of those hooks from one harvest, read in lockstep as
`saejax/data/lockstep.py` reads them for training (`open_read_stores`). `--store` names them
comma-separated; a run's `data.path` may name more (a transcoder's target too), from which the
hooks it reads are picked by each store's recorded hook.
"""

from __future__ import annotations

import os

from absl import logging
import numpy as np

from saejax.analysis import kinds
from saejax.analysis.loaded import AnalysisError, LoadedSAE, describe
from saejax.data import lockstep
from saejax.data import store as store_lib

_CHECKED_ROWS = 4096   # token ids compared between lockstep stores (a sample, as lockstep's)


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


def read_store_paths(loaded: LoadedSAE, store: str) -> list[str]:
    """The stores of the hooks `loaded` reads, in its order, from `store` (comma-separated):
    exactly one per read hook, or more among which each read hook's is found by its recorded
    hook. An AnalysisError names --store and the hooks wanted otherwise."""
    kind = kinds.kind_of(loaded)
    paths = lockstep.split_paths(store)
    if kind.name == "sae":
        if len(paths) != 1:
            raise AnalysisError(f"--store={store!r} names {len(paths)} stores; an SAE reads "
                                "one hook: pass its store alone.")
        return paths
    hooks = lockstep.store_hooks(store)
    wanted = ", ".join(kind.reads)
    fix = (f"{describe(loaded)} reads {len(kind.reads)} hook(s), {wanted}: pass --store with "
           f"their stores of one harvest, comma-separated in that order")
    if len(paths) == len(kind.reads):
        wrong = [(p, h, w) for p, h, w in zip(paths, hooks, kind.reads) if h != w
                 and os.path.isfile(os.path.join(p, "metadata.json"))]
        if wrong:
            path, hook, want = wrong[0]
            raise AnalysisError(f"--store: {path} holds {hook}, where {want} was expected; "
                                f"{fix}.")
        return paths
    by_hook = dict(zip(hooks, paths))
    missing = [h for h in kind.reads if h not in by_hook]
    if missing:
        raise AnalysisError(f"--store={store!r} names {len(paths)} store(s) ({', '.join(hooks)}"
                            f") without {', '.join(missing)}; {fix}.")
    return [by_hook[h] for h in kind.reads]


def open_read_stores(loaded: LoadedSAE, store: str) -> list:
    """The opened stores of `read_store_paths`, each checked to keep token ids and to be as
    wide as the hook it feeds, and all of one harvest (the same rows and tokens)."""
    opened = [open_store_with_tokens(p) for p in read_store_paths(loaded, store)]
    for one in opened:
        if int(one.d) != loaded.d:
            raise AnalysisError(f"{describe(loaded)} reads activations of width d={loaded.d}, "
                                f"but the activation store {one.path} has width {one.d}. Use "
                                f"the store of the hook this SAE was trained at (--store).")
    first = opened[0]
    n = min(first.n_rows, _CHECKED_ROWS)
    for other in opened[1:]:
        for what, a, b in (("committed rows", first.n_rows, other.n_rows),
                           ("context_length", first.context_length, other.context_length)):
            if a != b:
                raise AnalysisError(f"--store: {first.path} has {what} {a:,} but {other.path} "
                                    f"has {b:,}; stores read in lockstep must come from one "
                                    "harvest (`python -m saejax.harvest --hooks=a,b`).")
        if not np.array_equal(first.token_ids(0, n), other.token_ids(0, n)):
            raise AnalysisError(f"--store: {first.path} and {other.path} hold other tokens; "
                                "stores read in lockstep must come from one harvest "
                                "(`python -m saejax.harvest --hooks=a,b`).")
    return opened
