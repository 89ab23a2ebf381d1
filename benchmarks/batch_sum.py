"""The per-latent sums over a batch that the train step takes: `jnp.sum(a, axis=0)` against
`evals.batch_sum` (a product with a ones vector), on one [batch, n_latents] array.

    python benchmarks/batch_sum.py                          # batch 4096, n_latents 8192 (x16)
    python benchmarks/batch_sum.py --n_latents=65536        # x128

The step sums three such arrays a step (the L1 term, the encoder bias's gradient, the firing
counts); prints milliseconds and the bandwidth each achieves reading the array once, then one
JSON line.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from saejax import evals  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=4096)
    parser.add_argument("--n_latents", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    a = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), (args.batch_size, args.n_latents)))
    cases = {
        "jnp.sum(a, axis=0)": lambda a: jnp.sum(a, axis=0),
        "evals.batch_sum(a)": evals.batch_sum,
        "jnp.sum(a != 0, axis=0) (as float32)":
            lambda a: jnp.sum((a != 0).astype(jnp.float32), axis=0),
        "evals.fire_counts(a)": evals.fire_counts,
    }
    result = {"benchmark": "batch_sum", "batch_size": args.batch_size,
              "n_latents": args.n_latents, "machine": common.machine()}
    for name, fn in cases.items():
        seconds = common.time_fn(jax.jit(fn), a, iters=args.iters)
        result[name] = seconds
        print(f"{name:40s} {seconds * 1e3:8.2f} ms  {a.nbytes / seconds / 1e9:6.1f} GB/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
