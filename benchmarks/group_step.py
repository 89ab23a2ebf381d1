"""One vmapped step for a group of G SAEs against G separate steps, measured in one run.

    python benchmarks/group_step.py --group_size=4 --d=256 --expansion_factor=4 --batch_size=1024

Two measurements: the step alone on a fixed batch, and the step with its input (the synthetic
generator producing each batch), which a group produces once for all members while G separate
runs produce it G times. Prints times per step, the speed-up, SAE-tokens/s and peak memory; the
last line is one JSON object.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import common  # noqa: E402
from saejax import data, sae, sharding, train  # noqa: E402


def _step_seconds(config, iters):
    """(seconds per step on a fixed batch, seconds per step generating its batch)."""
    mesh = sharding.make_mesh(config.mesh)
    with sharding.activate(mesh, config.sharding_rules):
        source = data.make_source(config, mesh=mesh, rules=config.sharding_rules)
        trainer = train.make_trainer(config, mesh, d=source.d, batch_sharding=source.sharding)
        fixed = source.next_batch()
        holder = {"state": trainer.init(jax.random.PRNGKey(0))}

        def run(batch_fn):
            holder["state"], metrics = trainer.train_step(holder["state"], batch_fn())
            return metrics

        return (common.time_fn(run, lambda: fixed, iters=iters),
                common.time_fn(run, source.next_batch, iters=iters))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group_size", type=int, default=4)
    common.add_shape_flags(parser, d=256, expansion_factor=4, batch_size=1024)
    args = parser.parse_args()
    config = common.config_from_flags(args)

    solo, solo_with_input = _step_seconds(config, args.iters)
    config.group.sparsity_coefficients = tuple(0.3 * 2**i for i in range(args.group_size))
    group, group_with_input = _step_seconds(config, args.iters)

    g = args.group_size
    flops_per_token = sae.get(args.architecture).flops_per_token(
        args.d, args.d * args.expansion_factor, config.sae)
    matmul = common.matmul_flops_per_s(shapes=((args.peak_size,) * 3,))
    result = {
        "benchmark": "group_step", "architecture": args.architecture, "group_size": g,
        "d": args.d, "n_latents": args.d * args.expansion_factor,
        "batch_size": args.batch_size,
        "solo_seconds_per_step": solo, "group_seconds_per_step": group,
        "speedup_step_only": g * solo / group,
        "solo_seconds_per_step_with_input": solo_with_input,
        "group_seconds_per_step_with_input": group_with_input,
        "speedup_with_input": g * solo_with_input / group_with_input,
        "tokens_per_s": g * args.batch_size / group_with_input,  # SAE-tokens
        "flops_per_s": g * args.batch_size * flops_per_token / group,
        "matmul_flops_per_s": matmul,
        "peak_memory_bytes": common.peak_memory_bytes(), "machine": common.machine(),
    }
    print(f"group of {g} {args.architecture} SAEs (d={args.d}, n_latents="
          f"{result['n_latents']}, batch {args.batch_size}):")
    print(f"  step only:  group {group * 1e3:.1f} ms vs {g} separate {g * solo * 1e3:.1f} ms "
          f"-> {result['speedup_step_only']:.2f}x")
    print(f"  with input: group {group_with_input * 1e3:.1f} ms vs {g} separate "
          f"{g * solo_with_input * 1e3:.1f} ms -> {result['speedup_with_input']:.2f}x")
    print(f"  {result['tokens_per_s']:,.0f} SAE-tokens/s, group step at "
          f"{result['flops_per_s'] / 1e9:.1f} GFLOP/s of {matmul / 1e9:.1f} measured matmul "
          f"peak, peak memory {result['peak_memory_bytes'] / 2**20:.0f} MiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
