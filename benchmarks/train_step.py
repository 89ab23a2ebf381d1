"""Throughput of the sharded train step against the machine's measured matmul rate.

    python benchmarks/train_step.py                       # d=512, x16, batch 4096, ReLU/L1, f32
    python benchmarks/train_step.py --architecture=topk --k=32
    python benchmarks/train_step.py --architecture=topk --expansion_factor=128 --topk_decoder=dense
    python benchmarks/train_step.py --compute_dtype=bfloat16 --d=4096 --expansion_factor=32  # GPU
    python benchmarks/train_step.py --architecture=batchtopk --matryoshka_widths=0.0625,0.25
    python benchmarks/train_step.py --shape=crosscoder --n_layers=3   # or --shape=transcoder
    python benchmarks/train_step.py --shape=clt --n_layers=4 --architecture=topk --memory
    python benchmarks/train_step.py --shape=clt --n_layers=4 --mesh_layer=2 --mesh_model=2 --memory
    python benchmarks/train_step.py --shape=clt --n_layers=4 --architecture=topk --d=576 \
        --expansion_factor=4 --batch_size=1024 --k_aux=288 --compare_decoders --dead_fraction=0.1

Prints tokens/s, achieved FLOP/s (the architecture's FLOPs per token, 10 * d * n_latents for a
dense step) against the measured matmul rate of the same shapes in the same dtype, and peak memory; the last
line of each run is one JSON object (tokens_per_s, flops_per_s, matmul_flops_per_s, ...). A
CLT's FLOPs are its own (`CrossLayerTranscoder.flops_per_token`: L encoders, the full L x L
masked decoder; with the sparse decoder `sparse_flops_per_token`: the selection's encoders,
then k + k_aux latents a layer, each its encoder column and its rows of the L (L + 1) / 2
unmasked blocks). `--compare_decoders` runs TopK with the dense decoder, then the sparse; with
`--memory` the step's bytes per device from the memory model (`saejax.memory.memory_report`)
are printed beside XLA's memory analysis of the compiled step.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_shape_flags(parser, d=512, expansion_factor=16, batch_size=4096)
    parser.add_argument("--memory", action="store_true",
                        help="also the memory model's bytes per device against XLA's")
    parser.add_argument("--compare_decoders", action="store_true",
                        help="TopK: one run with the dense decoder, one with the sparse")
    parser.add_argument("--dead_fraction", type=float, default=0.0,
                        help="latents dead from the start, so the steps run AuxK as a long "
                             "run's do")
    parser.add_argument("--k_aux", type=int, default=0,
                        help="sae.k_aux (0: the toy config's); AuxK's dead latents a layer")
    args = parser.parse_args()
    decoders = ("dense", "sparse") if args.compare_decoders else (args.topk_decoder,)
    for decoder in decoders:
        args.topk_decoder = decoder
        print(json.dumps(_measure(args)))


def _measure(args) -> dict:
    """One step's throughput, FLOP rate against the matmul peak and memory; printed."""
    config = common.config_from_flags(args)
    if args.k_aux:
        config.sae.k_aux = args.k_aux
    n_latents = args.d * args.expansion_factor
    step = common.time_train_step(config, d=args.d, iters=args.iters,
                                  dead_fraction=args.dead_fraction)
    memory_check = _memory_check(config, args.d) if args.memory else {}
    seconds = step["seconds_per_step"]

    width = args.d * (args.n_layers if args.shape == "crosscoder" else 1)  # the hooks side by side
    matmul = common.matmul_flops_per_s(
        shapes=((args.batch_size, width, n_latents), (args.batch_size, n_latents, width),
                (args.peak_size,) * 3), dtype=jnp.dtype(args.compute_dtype))
    tokens_per_s, flops_per_s = step["tokens_per_s"], step["flops_per_s"]
    result = {
        "benchmark": "train_step", "architecture": args.architecture, "d": args.d,
        "n_latents": n_latents, "batch_size": args.batch_size, "mesh": step["mesh"],
        "compute_dtype": args.compute_dtype, "topk_decoder": args.topk_decoder,
        "matryoshka_widths": list(config.sae.matryoshka_widths), "shape": args.shape,
        "n_layers": args.n_layers, "k": args.k, "k_aux": int(config.sae.k_aux),
        "dead_fraction": args.dead_fraction,
        "seconds_per_step": seconds, "tokens_per_s": tokens_per_s, "flops_per_s": flops_per_s,
        "matmul_flops_per_s": matmul, "fraction_of_matmul_peak": flops_per_s / matmul,
        "peak_memory_bytes": common.peak_memory_bytes(), "machine": common.machine(),
        "flops_per_token": step["flops_per_token"], **memory_check,
    }
    print(f"{args.architecture} ({args.shape}, {args.topk_decoder} decoder) d={args.d} "
          f"n_latents={n_latents} batch={args.batch_size}: "
          f"{tokens_per_s:,.0f} tokens/s, {step['flops_per_token'] / 1e6:.2f} MFLOP/token, "
          f"{flops_per_s / 1e9:.1f} GFLOP/s achieved vs "
          f"{matmul / 1e9:.1f} GFLOP/s measured matmul peak "
          f"({100 * flops_per_s / matmul:.0f}%), peak memory "
          f"{result['peak_memory_bytes'] / 2**20:.0f} MiB")
    if memory_check:
        print(f"memory model {memory_check['memory_model_bytes'] / 2**20:.1f} MiB per device vs "
              f"XLA {memory_check['xla_bytes'] / 2**20:.1f} MiB (ratio "
              f"{memory_check['memory_model_bytes'] / memory_check['xla_bytes']:.2f})")
    return result


def _memory_check(config, d: int) -> dict:
    """The memory model's bytes per device of the step against XLA's compiled analysis."""
    from saejax import memory, sharding  # pylint: disable=import-outside-toplevel
    mesh = sharding.make_mesh(config.mesh)
    _, compiled = memory.compile_train_step(config, mesh, d=d)
    report, xla = memory.memory_report(config, mesh, d=d), memory.compiled_memory(compiled)
    return {"memory_model_bytes": report.total_bytes, "xla_bytes": xla["total_bytes"],
            "memory_model": report.as_dict(), "xla_memory": xla}


if __name__ == "__main__":
    main()
