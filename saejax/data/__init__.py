"""Where training activations come from, chosen by `config.data.source`.

A source yields batches already sharded on the mesh (`next_batch`), held-out batches
(`eval_batch`), and a JSON-able position (`state` / `restore`) saved with every checkpoint.
`synthetic` generates known ground truth; `store` and `npy` read activations from disk
(`data/store/`); `lm` runs the language model on the fly (`data/lm.py`).
"""

from saejax.data import lm
from saejax.data.store import ArraySource
from saejax.data.synthetic import SyntheticSource

SOURCES = ("synthetic", "store", "npy", "lm")


def make_source(config, *, mesh, rules):
    batch_size = int(config.train.batch_size)
    eval_batches = int(config.evals.eval_batches)
    if config.data.source == "synthetic":
        return SyntheticSource(config.data, batch_size=batch_size, mesh=mesh, rules=rules)
    if config.data.source == "lm":
        return lm.make_source(config, mesh=mesh, rules=rules, eval_batches=eval_batches)
    return ArraySource(config.data, batch_size=batch_size, mesh=mesh, rules=rules,
                       eval_batches=eval_batches)
