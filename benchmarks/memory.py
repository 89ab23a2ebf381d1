"""The largest dictionary whose train step fits in one device's memory, from shapes alone.

    python benchmarks/memory.py                          # relu, batch 4096, d = 768, 2304, 4096
    python benchmarks/memory.py --architecture=topk --device_memory_gib=80 --model_sizes=1,8

For each d and each size of the mesh's model axis (1: the whole dictionary on one device; 8: the
dictionary split over 8), prints the largest expansion factor (a power of 2) whose step fits in
the per-device memory (default: what the device reports as its limit, else 80 GiB): params,
Adam's moments, the rest of the state and the batch are exact, the gradients and activations
estimated (`saejax.memory.memory_report`). Nothing is allocated and the mesh is abstract, so it
runs on a laptop for any device count. First it compiles one small step on this machine and
prints the report next to XLA's memory analysis of it, so the estimate is seen against the real
thing. The last line is one JSON object.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from jax.sharding import AbstractMesh, AxisType  # noqa: E402

from benchmarks import common  # noqa: E402
from saejax import memory, sharding  # noqa: E402

GIB = 2**30


def _config(args, *, d: int, expansion_factor: int, batch_size: int, data: int, model: int):
    flags = argparse.Namespace(**{**vars(args), "d": d, "expansion_factor": expansion_factor,
                                  "batch_size": batch_size, "mesh_model": model})
    config = common.config_from_flags(flags)
    config.mesh.data = data
    return config


def _abstract_mesh(data: int, model: int) -> AbstractMesh:
    return AbstractMesh((data, model), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 2)


def largest_fitting(fits, candidates):
    """The largest of increasing `candidates` for which `fits` holds, assuming that once one
    does not fit no larger one does; None if the first does not."""
    best = None
    for candidate in candidates:
        if not fits(candidate):
            break
        best = candidate
    return best


def _budget(args) -> tuple[int, str]:
    if args.device_memory_gib:
        return int(args.device_memory_gib * GIB), "--device_memory_gib"
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit:
        return int(limit), f"{jax.devices()[0].device_kind} bytes_limit"
    return 80 * GIB, "the device reports no limit; set --device_memory_gib"


def check(args) -> dict:
    """One small step compiled here: the report beside XLA's memory analysis."""
    model = max(m for m in (1, 2, 4, 8) if jax.device_count() % m == 0)
    data = jax.device_count() // model
    config = _config(args, d=args.check_d, expansion_factor=args.check_expansion_factor,
                     batch_size=args.check_batch_size, data=data, model=model)
    mesh = sharding.make_mesh(config.mesh)
    report = memory.memory_report(config, mesh, d=args.check_d)
    _, compiled = memory.compile_train_step(config, mesh, d=args.check_d)
    xla = memory.compiled_memory(compiled)
    rows = [("arguments (state + batch)", report.state_bytes + report.batch_bytes,
             xla["argument_bytes"]),
            ("temporaries (gradients + activations)", report.temporary_bytes, xla["temp_bytes"]),
            ("total", report.total_bytes, xla["total_bytes"])]
    print(f"Check: {args.architecture} d={args.check_d} x{args.check_expansion_factor} "
          f"batch {args.check_batch_size}, compiled on {common.machine()}, "
          f"mesh data={data} x model={model}; bytes per device")
    print(f"  {'':38s} {'memory_report':>14s} {'XLA':>14s} {'ratio':>6s}")
    for name, estimate, measured in rows:
        print(f"  {name:38s} {memory.format_bytes(estimate):>14s} "
              f"{memory.format_bytes(measured):>14s} {estimate / measured:6.2f}")
    result = {"d": args.check_d, "expansion_factor": args.check_expansion_factor,
              "batch_size": args.check_batch_size, "mesh": dict(mesh.shape),
              "report": report.as_dict(), "xla": xla}
    if model > 1:
        found = memory.collectives(compiled.as_text(), mesh)
        over_model = [c for c in found if "model" in c.mesh_axes]
        largest = max(over_model, key=lambda c: c.bytes)
        print(f"  communication over the model axis: {len(over_model)} collectives, "
              f"{memory.format_bytes(sum(c.bytes for c in over_model))} per step, the largest "
              f"{largest.shapes} ({memory.format_bytes(largest.bytes)}); params per device "
              f"{memory.format_bytes(report.params_bytes)}")
        result["model_axis_collective_bytes"] = sum(c.bytes for c in over_model)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="relu")
    parser.add_argument("--batch_size", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--topk_decoder", default="auto", choices=("auto", "sparse", "dense"))
    parser.add_argument("--compute_dtype", default="float32", choices=("float32",),
                        help="the report counts float32 activations")
    parser.add_argument("--ds", default="768,2304,4096", help="activation widths d")
    parser.add_argument("--model_sizes", default="1,8",
                        help="sizes of the mesh's model axis (1: no split)")
    parser.add_argument("--mesh_data", type=int, default=1,
                        help="size of the data axis (the batch per device is batch / data)")
    parser.add_argument("--max_expansion_factor", type=int, default=4096)
    parser.add_argument("--device_memory_gib", type=float, default=None,
                        help="per-device memory; default: the device's bytes_limit, else 80")
    parser.add_argument("--check_d", type=int, default=256)
    parser.add_argument("--check_expansion_factor", type=int, default=16)
    parser.add_argument("--check_batch_size", type=int, default=1024)
    args = parser.parse_args()
    budget, budget_source = _budget(args)
    ds = [int(v) for v in args.ds.split(",")]
    model_sizes = [int(v) for v in args.model_sizes.split(",")]
    factors = [2**i for i in range(args.max_expansion_factor.bit_length())
               if 2**i <= args.max_expansion_factor]

    checked = check(args)

    def report(d, factor, model):
        config = _config(args, d=d, expansion_factor=factor, batch_size=args.batch_size,
                         data=args.mesh_data, model=model)
        return memory.memory_report(config, _abstract_mesh(args.mesh_data, model), d=d)

    print(f"\nLargest expansion factor that fits: {args.architecture}, batch {args.batch_size} "
          f"({args.batch_size // args.mesh_data} rows per device), f32, Adam; "
          f"{memory.format_bytes(budget)} per device ({budget_source})")
    print(f"  {'d':>5s} | " + " | ".join(f"{f'model={m}':38s}" for m in model_sizes))
    results = []
    for d in ds:
        cells = []
        for model in model_sizes:
            fits = lambda f, d=d, model=model: report(d, f, model).total_bytes <= budget
            factor = largest_fitting(fits, factors)
            if factor is None:
                cells.append(f"{'none fits':38s}")
                results.append({"d": d, "model": model, "expansion_factor": None})
                continue
            fitted = report(d, factor, model)
            more = "+" if factor == factors[-1] else ""
            cells.append(f"{f'x{factor}{more}':7s} {factor * d:>11,d} latents "
                         f"{memory.format_bytes(fitted.total_bytes):>10s}")
            results.append({"d": d, "model": model, "expansion_factor": factor,
                            "n_latents": factor * d, "limit_reached": bool(more),
                            **fitted.as_dict()})
        print(f"  {d:5d} | " + " | ".join(cells))
    print("  (per device: state and batch exact, gradients and activations estimated; "
          "+: the largest factor tried)")
    print(json.dumps({"benchmark": "memory", "architecture": args.architecture,
                      "batch_size": args.batch_size, "mesh_data": args.mesh_data,
                      "budget_bytes": budget, "budget_source": budget_source,
                      "results": results, "check": checked, "machine": common.machine()}))


if __name__ == "__main__":
    main()
