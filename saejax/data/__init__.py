"""Where training activations come from, chosen by `config.data.source`.

A source yields batches already sharded on the mesh (`next_batch`), held-out batches
(`eval_batch`), and a JSON-able position (`state` / `restore`) saved with every checkpoint.
"""

from saejax.data.synthetic import SyntheticSource

SOURCES = {"synthetic": SyntheticSource}


def make_source(config, *, mesh, rules):
    return SOURCES[config.data.source](config.data, batch_size=int(config.train.batch_size),
                                       mesh=mesh, rules=rules)
