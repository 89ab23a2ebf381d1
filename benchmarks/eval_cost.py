"""What each part of the `core` evaluation (saejax/evals/core.py) costs on one run.

    python benchmarks/eval_cost.py WORKDIR [--eval_batches=8] [--sequences=32]

Times, in one process and in the order `python -m saejax.evals` runs them: loading the run,
reading the held-out batches, the SAE's forward and `reconstruction_sums` over them, the max
cosines of the encoder and decoder rows, and (with a language model) the CE and KL scores'
three forward passes. Compiles are included (each piece compiles once, as in a real call). The
last line is one JSON object of seconds.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from saejax import evals  # noqa: E402
from saejax.evals import core, suite  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--eval_batches", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=32)
    args = parser.parse_args()
    context = suite.Context(args.workdir, {"eval_batches": args.eval_batches,
                                           "sequences": args.sequences})
    seconds = {}

    def timed(name, fn):
        start = time.perf_counter()
        fn()
        seconds[name] = round(time.perf_counter() - start, 2)
        print(f"{name}: {seconds[name]:.1f} s", flush=True)

    timed("load", lambda: (context.loaded, context.config))
    timed("eval_batches", context.eval_batches)
    timed("forward_and_sums", lambda: core._sums(context))  # pylint: disable=protected-access
    encoder, decoder = core._weights(context.loaded.params)  # pylint: disable=protected-access
    timed("max_cosines", lambda: (evals.max_cosine_to_others(encoder).block_until_ready(),
                                  evals.max_cosine_to_others(decoder).block_until_ready()))
    if context.has_lm:
        timed("ce_and_kl", lambda: core._lm_categories(context))  # pylint: disable=protected-access
    print(json.dumps(seconds))


if __name__ == "__main__":
    main()
