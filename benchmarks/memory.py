"""The largest dictionary whose train step fits in one device's memory, from shapes alone.

    python benchmarks/memory.py                          # relu, batch 4096, d = 768, 2304, 4096
    python benchmarks/memory.py --architecture=topk --device_memory_gib=80 --model_sizes=1,8

For each d and each size of the mesh's model axis (1: the whole dictionary on one device; 8: the
dictionary split over 8), prints the largest expansion factor (a power of 2, every one up to
--max_expansion_factor tried: the bytes need not grow with it) whose step fits in
the per-device memory (default: what the device reports as its limit, else 80 GiB): params,
Adam's moments, the rest of the state and the batch are exact, the gradients and activations
estimated (`saejax.memory.memory_report`). Nothing is allocated and the mesh is abstract, so it
runs on a laptop for any device count. First it compiles one small step on this machine and
prints the report next to XLA's memory analysis of it, so the estimate is seen against the real
thing. The last line is one JSON object.

    python benchmarks/memory.py --lm                     # the language model, tensor parallel

prints instead, for Gemma 2 2B / 9B / 27B and Llama 3 8B / 70B (their config.json shapes; nothing
allocated), the smallest model-axis size whose harvest step (the forward to the last layer,
bfloat16) fits a 16 GB, 80 GB and 141 GB device (`saejax.memory.lm_memory_report`), after small
configs compiled here beside XLA's memory analysis (on 8 devices: XLA_FLAGS=
--xla_force_host_platform_device_count=8 on a CPU).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AbstractMesh, AxisType  # noqa: E402

from benchmarks import common  # noqa: E402
from saejax import memory, models, sharding  # noqa: E402

GIB = 2**30


def _config(args, *, d: int, expansion_factor: int, batch_size: int, data: int, model: int):
    flags = argparse.Namespace(**{**vars(args), "d": d, "expansion_factor": expansion_factor,
                                  "batch_size": batch_size, "mesh_model": model})
    config = common.config_from_flags(flags)
    config.mesh.data = data
    return config


def _abstract_mesh(data: int, model: int) -> AbstractMesh:
    return AbstractMesh((data, model), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 2)


def largest_fitting(fits, candidates) -> tuple[int | None, list]:
    """(the largest of `candidates` for which `fits` holds, None if none does; the smaller
    candidates that do not fit). Every candidate is tried: the bytes need not grow with the
    width. A TopK step (`sae.topk_decoder=auto`) decodes densely below `topk.SPARSE_RATIO`
    (k + k_aux) latents and sparsely above, and the sparse decoder's per-token gathered rows,
    (k + k_aux) d of them, can outweigh the dense decoder's [batch, n_latents] arrays (XLA's
    own buffer assignment holds them too: tests/test_memory.py), so a width that does not fit
    may be followed by one that does."""
    fitting = [c for c in candidates if fits(c)]
    best = max(fitting, default=None)
    return best, [c for c in candidates if best is not None and c < best and c not in fitting]


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


# ------------------------------------------------------------------------------------------
# The language model (--lm): the smallest model axis whose harvest step fits.
# ------------------------------------------------------------------------------------------
def _gemma2(hidden, inter, layers, heads, kv, head_dim, scalar):
    return models.GemmaConfig(vocab_size=256000, hidden_size=hidden, intermediate_size=inter,
                              num_hidden_layers=layers, num_attention_heads=heads,
                              num_key_value_heads=kv, head_dim=head_dim,
                              query_pre_attn_scalar=scalar, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0,
                              layer_windows=(4096, None) * (layers // 2))


def _llama3(hidden, inter, layers, heads):
    return models.LlamaConfig(vocab_size=128256, hidden_size=hidden, intermediate_size=inter,
                              num_hidden_layers=layers, num_attention_heads=heads,
                              num_key_value_heads=8, head_dim=128, max_position_embeddings=8192)


# config.json's shapes of each model (no weights).
LM_CONFIGS = {
    "gemma-2-2b": lambda: _gemma2(2304, 9216, 26, 8, 4, 256, 256),
    "gemma-2-9b": lambda: _gemma2(3584, 14336, 42, 16, 8, 256, 256),
    "gemma-2-27b": lambda: _gemma2(4608, 36864, 46, 32, 16, 128, 144),
    "llama-3-8b": lambda: _llama3(4096, 14336, 32, 32),
    "llama-3-70b": lambda: _llama3(8192, 28672, 80, 64),
}
DEVICE_GB = (16, 80, 141)


def lm_check(args) -> list[dict]:
    """Small configs compiled here: `lm_memory_report` beside XLA's memory analysis."""
    small = {"llama": _llama3(256, 1024, 4, 8).replace(vocab_size=4096, num_key_value_heads=2),
             "gemma": _gemma2(256, 1024, 4, 8, 4, 32, 32).replace(vocab_size=4096)}
    rows = []
    print(f"Check: the forward to the last layer, {args.lm_check_batch} x {args.lm_check_context}"
          f" tokens, float32, compiled on {common.machine()}; bytes per device")
    for name, lm_config in small.items():
        for data, model in ((8, 1), (2, 4), (1, 8)):
            mesh = sharding.make_mesh(argparse.Namespace(data=data, model=model))
            kwargs = dict(batch_sequences=args.lm_check_batch,
                          context_length=args.lm_check_context)
            report = memory.lm_memory_report(lm_config, mesh, **kwargs)
            hook = f"blocks.{lm_config.n_layers - 1}.hook_resid_post"
            xla = memory.compiled_memory(memory.compile_lm_forward(lm_config, mesh, hooks=[hook],
                                                                   **kwargs))
            ratio = report.total_bytes / xla["total_bytes"]
            print(f"  {name:6s} data={data} model={model}: lm_memory_report "
                  f"{memory.format_bytes(report.total_bytes):>10s}, XLA "
                  f"{memory.format_bytes(xla['total_bytes']):>10s}, ratio {ratio:.2f}")
            rows.append({"model": name, "mesh": {"data": data, "model": model},
                         "report": report.as_dict(), "xla": xla, "ratio": ratio})
    return rows


def lm_main(args) -> None:
    checked = lm_check(args) if jax.device_count() >= 8 else []
    kwargs = dict(batch_sequences=args.lm_batch_sequences, context_length=args.lm_context,
                  param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    print(f"\nSmallest model axis whose harvest step fits (the forward to the last layer, "
          f"{args.lm_batch_sequences} x {args.lm_context} tokens per data replica, bfloat16 "
          f"params and activations; params exact, activations estimated)")
    print(f"  {'model':12s} {'params':>10s} | " + " | ".join(f"{f'{gb} GB':>22s}"
                                                            for gb in DEVICE_GB))
    results = []
    for name, make in LM_CONFIGS.items():
        lm_config = make()
        reports = {}
        for model in (1, 2, 4, 8, 16, 32, 64):
            try:
                reports[model] = memory.lm_memory_report(lm_config, _abstract_mesh(1, model),
                                                         **kwargs)
            except sharding.ConfigError:  # the query heads do not divide this model axis
                continue
        cells = []
        for gb in DEVICE_GB:
            fitting = [m for m, r in reports.items() if r.total_bytes <= gb * 1e9]
            model = min(fitting) if fitting else None
            cells.append(f"{'none':>22s}" if model is None else
                         f"{f'model={model}':>10s} {memory.format_bytes(reports[model].total_bytes):>11s}")
            results.append({"model": name, "device_gb": gb, "model_axis": model,
                            **({} if model is None else reports[model].as_dict())})
        print(f"  {name:12s} {memory.format_bytes(reports[1].params_bytes):>10s} | "
              + " | ".join(cells))
    print(json.dumps({"benchmark": "lm_memory", "results": results, "check": checked,
                      "machine": common.machine()}))


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
    parser.add_argument("--check_d", type=int, default=128)
    parser.add_argument("--check_expansion_factor", type=int, default=16)
    parser.add_argument("--check_batch_size", type=int, default=1024)
    parser.add_argument("--lm", action="store_true",
                        help="the LM table instead: the smallest model axis whose harvest step "
                             "fits 16, 80 and 141 GB, for Gemma 2 and Llama 3")
    parser.add_argument("--lm_batch_sequences", type=int, default=8)
    parser.add_argument("--lm_context", type=int, default=1024)
    parser.add_argument("--lm_check_batch", type=int, default=8)
    parser.add_argument("--lm_check_context", type=int, default=128)
    args = parser.parse_args()
    if args.lm:
        lm_main(args)
        return
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
            factor, not_fitting = largest_fitting(fits, factors)
            if factor is None:
                cells.append(f"{'none fits':38s}")
                results.append({"d": d, "model": model, "expansion_factor": None})
                continue
            fitted = report(d, factor, model)
            more = ("+" if factor == factors[-1] else "") + ("*" if not_fitting else "")
            cells.append(f"{f'x{factor}{more}':7s} {factor * d:>11,d} latents "
                         f"{memory.format_bytes(fitted.total_bytes):>10s}")
            results.append({"d": d, "model": model, "expansion_factor": factor,
                            "n_latents": factor * d, "limit_reached": factor == factors[-1],
                            "smaller_not_fitting": not_fitting, **fitted.as_dict()})
        print(f"  {d:5d} | " + " | ".join(cells))
    print("  (per device: state and batch exact, gradients and activations estimated; "
          "+: the largest factor tried; *: some smaller factor does not fit, e.g. TopK's "
          "sparse decoder above its switch, which --topk_decoder=dense avoids)")
    print(json.dumps({"benchmark": "memory", "architecture": args.architecture,
                      "batch_size": args.batch_size, "mesh_data": args.mesh_data,
                      "budget_bytes": budget, "budget_source": budget_source,
                      "results": results, "check": checked, "machine": common.machine()}))


if __name__ == "__main__":
    main()
