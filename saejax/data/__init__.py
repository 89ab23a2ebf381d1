"""Where training activations come from, chosen by `config.data.source`.

A source yields batches already sharded on the mesh (`next_batch`), held-out batches
(`eval_batch`), and a JSON-able position (`state` / `restore`) saved with every checkpoint.
`synthetic` generates known ground truth (`synthetic_hierarchy`: parents and children,
`data/hierarchy.py`); `store` and `npy` read activations from disk
(`data/store/`); `lm` runs the language model on the fly (`data/lm.py`).

Every batch is a dict keyed by hook name, `{hook: [batch, d_hook]}` (one entry for a single
source); `hook_name` is the one place that decides the name: a store's harvest metadata hook,
`lm.hook` for the LM, and `DEFAULT_HOOK` for synthetic data and a user's .npy array.
`synthetic_transcoder` emits two entries in lockstep (`synthetic.TRANSCODER_HOOKS`),
`synthetic_crosscoder` one per layer (`layer_0`, ...), `synthetic_clt` each layer's MLP input
and output (`blocks.{l}.ln2.hook_normalized`, `blocks.{l}.hook_mlp_out`); a
`data.path` naming several stores of one harvest (comma-separated) reads them in lockstep
(`lockstep.py`), one entry per store's hook. The LM with several hooks comes with issue 16.
"""

from __future__ import annotations

from saejax.data import lm, lockstep
from saejax.data.hierarchy import SyntheticHierarchySource
from saejax.data.store import ArraySource
from saejax.data.synthetic import (TRANSCODER_HOOKS, SyntheticCLTSource,
                                   SyntheticCrosscoderSource, SyntheticSource,
                                   SyntheticTranscoderSource, clt_hooks, crosscoder_hooks)

SOURCES = ("synthetic", "store", "npy", "lm", "synthetic_transcoder", "synthetic_crosscoder",
           "synthetic_clt", "synthetic_hierarchy")
# The sources drawing data.features_per_sample of data.n_features known features.
SYNTHETIC_SOURCES = ("synthetic", "synthetic_transcoder", "synthetic_crosscoder",
                     "synthetic_clt")
# The sources whose batches hold several hooks, and those hooks.
MULTI_HOOK_SOURCES = {"synthetic_transcoder": TRANSCODER_HOOKS}
# The hook name of activations that come from no LM hook (synthetic ground truth, a .npy file).
DEFAULT_HOOK = "activations"


def batch_hooks(config) -> tuple[str, ...] | None:
    """The hooks of `config`'s batches when its source reads several (known before it is
    opened), else None: a single-hook source's one entry is `hook_name`."""
    if config.data.source in MULTI_HOOK_SOURCES:
        return MULTI_HOOK_SOURCES[config.data.source]
    if config.data.source == "synthetic_crosscoder":
        return crosscoder_hooks(config.data.n_layers)
    if config.data.source == "synthetic_clt":
        return clt_hooks(config.data.n_layers)
    if config.data.source == "store" and len(lockstep.split_paths(config.data.path)) > 1:
        return lockstep.store_hooks(config.data.path)
    if config.data.source == "lm" and len(lm.split_hooks(config.lm.hook)) > 1:
        return lm.split_hooks(config.lm.hook)
    return None


def config_hooks(config) -> tuple[str, ...]:
    """Every hook of `config`'s batches, known before the source is opened: `batch_hooks`,
    or the one `hook_name`."""
    return batch_hooks(config) or (hook_name(config),)


def hook_name(config, source=None) -> str:
    """The key of `config`'s source's activations in every batch."""
    if config.data.source == "lm":
        return str(config.lm.hook)
    if config.data.source == "store" and source is not None:
        metadata = getattr(getattr(source, "rows", None), "metadata", None) or {}
        return str(metadata.get("hook") or DEFAULT_HOOK)
    return DEFAULT_HOOK


def as_batch(batch) -> dict:
    """`batch` as `{hook: [batch, d]}`: a dict as it is, a bare array as `DEFAULT_HOOK`'s."""
    return batch if isinstance(batch, dict) else {DEFAULT_HOOK: batch}


class KeyedSource:
    """A source whose batches are `{hook: batch}`; everything else is the wrapped source's."""

    def __init__(self, source, hook: str):
        self.source = source
        self.hook = hook

    @property
    def widths(self) -> dict[str, int]:
        """{hook: d_hook} of every entry of a batch."""
        return {self.hook: int(self.source.d)}

    def next_batch(self) -> dict:
        return {self.hook: self.source.next_batch()}

    def eval_batch(self, index: int) -> dict:
        return {self.hook: self.source.eval_batch(index)}

    def __getattr__(self, name):
        if name == "source":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)


def make_source(config, *, mesh, rules):
    batch_size = int(config.train.batch_size)
    eval_batches = int(config.evals.eval_batches)
    if config.data.source == "synthetic_transcoder":  # keyed already: two hooks
        return SyntheticTranscoderSource(config.data, batch_size=batch_size, mesh=mesh,
                                         rules=rules)
    if config.data.source == "synthetic_crosscoder":  # keyed already: one hook per layer
        return SyntheticCrosscoderSource(config.data, batch_size=batch_size, mesh=mesh,
                                         rules=rules)
    if config.data.source == "synthetic_clt":  # keyed already: each layer's input and target
        return SyntheticCLTSource(config.data, batch_size=batch_size, mesh=mesh, rules=rules)
    if config.data.source == "store" and batch_hooks(config) is not None:  # several stores
        return lockstep.LockstepSource(config.data, batch_size=batch_size, mesh=mesh,
                                       rules=rules, eval_batches=eval_batches)
    if config.data.source == "synthetic":
        source = SyntheticSource(config.data, batch_size=batch_size, mesh=mesh, rules=rules)
    elif config.data.source == "synthetic_hierarchy":
        source = SyntheticHierarchySource(config.data, batch_size=batch_size, mesh=mesh,
                                          rules=rules)
    elif config.data.source == "lm":
        source = lm.make_source(config, mesh=mesh, rules=rules, eval_batches=eval_batches)
        if isinstance(source, lockstep.LockstepSource):  # keyed already: lm.hook names several
            return source
    else:
        source = ArraySource(config.data, batch_size=batch_size, mesh=mesh, rules=rules,
                             eval_batches=eval_batches)
    return KeyedSource(source, hook_name(config, source))
