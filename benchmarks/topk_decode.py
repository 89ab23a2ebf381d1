"""TopK's sparse decoder against its dense decoder, measured in one run.

    python benchmarks/topk_decode.py      # d=512, x128 (65,536 latents), k=32, batch 4096, f32

For each decoder, the train step's tokens/s on a fresh state (no dead latent, AuxK skipped) and
with `--dead_fraction` of the latents dead (AuxK's k_aux latents decoded every step, as in a
long run), the sparse/dense speed-up of each, and the largest relative difference between the
params the two decoders give after `--parity_steps` steps from the same init and batches. FLOP/s
are each step's own FLOPs per token (10 d n dense; 2 d n + 12 d (k + k_aux) sparse) against the
measured f32 matmul rate. The last line is one JSON object.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402


def parity(config, d: int, steps: int) -> float:
    """Largest relative (whole-tensor) params difference, sparse vs dense, after `steps`."""
    params = []
    for decoder in ("sparse", "dense"):
        config.sae.topk_decoder = decoder
        with common.trainer_on_mesh(config, d=d) as (trainer, batch_sharding):
            state = trainer.init(jax.random.PRNGKey(0))
            for step in range(steps):
                batch = jax.random.normal(jax.random.PRNGKey(step), (config.train.batch_size, d))
                state, _ = trainer.train_step(state, jax.device_put(batch, batch_sharding))
            params.append(jax.tree.map(np.asarray, state["params"]))
    return max(float(np.linalg.norm(params[0][k] - params[1][k]) / np.linalg.norm(params[1][k]))
               for k in params[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_shape_flags(parser, d=512, expansion_factor=128, batch_size=4096)
    parser.add_argument("--dead_fraction", type=float, default=0.1)
    parser.add_argument("--parity_steps", type=int, default=3)
    parser.set_defaults(architecture="topk", iters=3)
    args = parser.parse_args()
    config = common.config_from_flags(args)

    runs = {}
    for dead_fraction in (0.0, args.dead_fraction):
        for decoder in ("sparse", "dense"):
            config.sae.topk_decoder = decoder
            step = common.time_train_step(config, d=args.d, iters=args.iters,
                                          dead_fraction=dead_fraction)
            name = f"{decoder}, dead {dead_fraction:g}"
            runs[name] = step
            print(f"  {name:20s} {step['seconds_per_step']:7.2f} s/step "
                  f"{step['tokens_per_s']:8,.0f} tokens/s {step['flops_per_s'] / 1e9:6.1f} "
                  f"GFLOP/s", flush=True)
    matmul = common.matmul_flops_per_s(shapes=((args.peak_size,) * 3,))
    speedups = {f"dead {f:g}": runs[f"dense, dead {f:g}"]["seconds_per_step"]
                / runs[f"sparse, dead {f:g}"]["seconds_per_step"]
                for f in (0.0, args.dead_fraction)}
    difference = parity(config, args.d, args.parity_steps)
    result = {"benchmark": "topk_decode", "d": args.d, "n_latents": runs[name]["n_latents"],
              "k": args.k, "k_aux": int(config.sae.k_aux), "batch_size": args.batch_size,
              "runs": runs, "speedups": speedups, "matmul_flops_per_s": matmul,
              "params_relative_difference": difference,
              "peak_memory_bytes": common.peak_memory_bytes(), "machine": common.machine()}
    print(f"TopK d={args.d} n_latents={result['n_latents']} k={args.k} batch "
          f"{args.batch_size}: sparse decoder "
          + ", ".join(f"{v:.2f}x the dense one ({k})" for k, v in speedups.items())
          + f"; matmul peak {matmul / 1e9:.1f} GFLOP/s; params after {args.parity_steps} steps "
          f"differ by {difference:.1e} (relative); peak memory "
          f"{result['peak_memory_bytes'] / 2**20:,.0f} MiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
