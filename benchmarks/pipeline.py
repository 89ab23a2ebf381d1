"""The real-activations pipeline's three rates in one run: harvest, store read, train step.

    python benchmarks/pipeline.py     # GPT-2 small shape, layer 8, 64 x 128 tokens; TopK k=32 x8
    python benchmarks/pipeline.py --expansion_factor=32 --sequences=256   # gpt2_small.py's SAE

1. Harvest: a GPT-2 of the given shape (random init: the rate does not depend on the weights),
   saved as a Hugging Face checkpoint, run by `saejax.harvest.harvest` over random token ids
   into a store at `blocks.{layer}.hook_resid_post` (blocks after it are not run). A first,
   one-batch harvest compiles the forward into JAX's persistent compilation cache (a temp dir),
   so the measured harvest's tokens/s excludes compilation; its FLOP/s counts 2 x the weights of
   the blocks run + 2 x blocks x context x d (causal attention) per token.
2. Store read: one pass of training batches through `ArraySource` (the trainer's reader:
   `BatchReader` with prefetch, gpt2_small.py's shuffle buffer, batches put on the device),
   from a cold page cache unless --warm; the harvested store when it holds --read_rows rows,
   else a store of --read_rows random rows of the same layout (benchmarks/store_read.py's writer).
3. Train step: gpt2_small.py's SAE (TopK, k=32, AuxK) at the store's width, here x8 by default
   (x32 is the experiment's; slow on a CPU), timed like benchmarks/train_step.py.

Then a table with the three rates, read/train and harvest/train, and a verdict; the last line is
one JSON object. Hardware: any. On 2 shared CPU cores (CPU-2, 2026-11-21) the default took
6 minutes of wall time under a load average of 8-11 (1m48s user + 25s system CPU, so
roughly 1-2 minutes on an idle machine: an estimate, not measured). Compare the ratios
within a run, not absolute rates across runs.
"""

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common, store_read  # noqa: E402
from experiments import gpt2_small  # noqa: E402
from saejax import harvest, models, sharding  # noqa: E402
from saejax.data import store  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = models.GPT2Config()
    config = gpt2_small.get_config()
    parser.add_argument("--n_layer", type=int, default=defaults.n_layer)
    parser.add_argument("--n_embd", type=int, default=defaults.n_embd)
    parser.add_argument("--n_head", type=int, default=defaults.n_head)
    parser.add_argument("--vocab_size", type=int, default=defaults.vocab_size)
    parser.add_argument("--layer", type=int, default=8, help="harvest blocks.LAYER.hook_resid_post")
    parser.add_argument("--sequences", type=int, default=64, help="sequences harvested (timed)")
    parser.add_argument("--context_length", type=int, default=config.lm.context_length)
    parser.add_argument("--batch_sequences", type=int, default=32,
                        help="sequences per forward pass (the harvest CLI's default)")
    parser.add_argument("--dtype", default="float32", choices=store.DTYPES, help="stored dtype")
    parser.add_argument("--chunk_rows", type=int, default=4096)
    parser.add_argument("--read_rows", type=int, default=524_288,
                        help="rows read; a harvest smaller than this is replaced, for reading, "
                        "by a store of this many random rows of the same layout")
    parser.add_argument("--warm", action="store_true", help="read from the page cache")
    parser.add_argument("--expansion_factor", type=int, default=8)
    parser.add_argument("--k", type=int, default=config.sae.k)
    parser.add_argument("--k_aux", type=int, default=config.sae.k_aux)
    parser.add_argument("--batch_size", type=int, default=config.train.batch_size)
    parser.add_argument("--iters", type=int, default=5, help="timed train steps (and matmuls)")
    parser.add_argument("--peak_size", type=int, default=4096,
                        help="the square matmul (n^3) also timed for the machine's peak")
    args = parser.parse_args(argv)
    if args.sequences % args.batch_sequences:
        parser.error(f"--sequences={args.sequences} must be a multiple of --batch_sequences="
                     f"{args.batch_sequences} (a last, smaller batch would compile again).")
    return args


def experiment_config(args):
    """gpt2_small.py's config at the benchmark's SAE shape."""
    config = gpt2_small.get_config()
    config.data.d = args.n_embd
    config.sae.expansion_factor = args.expansion_factor
    config.sae.k = args.k
    config.sae.k_aux = args.k_aux
    config.train.batch_size = args.batch_size
    return config


# ------------------------------------------------------------------------------------------
# Harvest.
# ------------------------------------------------------------------------------------------
def measure_harvest(args, workdir: str) -> dict:
    checkpoint, params_used = common.write_random_gpt2(
        workdir, vocab_size=args.vocab_size, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, n_positions=max(1024, args.context_length),
        used_layers=args.layer + 1)
    tokens = common.write_random_tokens(
        os.path.join(workdir, "tokens.npy"), sequences=args.sequences,
        context_length=args.context_length, vocab_size=args.vocab_size)

    hook = f"blocks.{args.layer}.hook_resid_post"
    kwargs = dict(hooks=[hook], context_length=args.context_length,
                  batch_sequences=args.batch_sequences, dtype=args.dtype,
                  chunk_rows=args.chunk_rows,
                  # Every token a row, so the rate counts the tokens the model ran on.
                  exclude_positions=(), exclude_token_ids="")
    warmup = harvest.harvest(checkpoint, tokens, os.path.join(workdir, "warmup"),
                             max_sequences=args.batch_sequences, **kwargs)
    result = harvest.harvest(checkpoint, tokens, os.path.join(workdir, "stores"), **kwargs)

    flops_per_token = (2 * params_used
                       + 2 * (args.layer + 1) * args.context_length * args.n_embd)
    return {"hook": hook, "store": result["stores"][hook], "tokens": result["tokens_written"],
            "seconds": result["seconds"], "tokens_per_s": result["tokens_per_s"],
            "first_batch_seconds_with_compile": warmup["seconds"],
            "params_used": params_used, "flops_per_token": flops_per_token,
            "flops_per_s": result["tokens_per_s"] * flops_per_token}


# ------------------------------------------------------------------------------------------
# Store read.
# ------------------------------------------------------------------------------------------
def measure_read(args, config, harvested: dict, workdir: str) -> dict:
    path, synthetic = harvested["store"], harvested["tokens"] < args.read_rows
    if synthetic:
        path = os.path.join(workdir, "read_store")
        rows = -(-args.read_rows // args.context_length) * args.context_length
        store_read.write(argparse.Namespace(
            rows=rows, d=args.n_embd, dtype=args.dtype, context_length=args.context_length,
            chunk_rows=args.chunk_rows, shard_rows=0, checksum=False,
            write_rows=args.batch_sequences * args.context_length), path)
    if not args.warm:
        store_read.evict(path)
    data = config.data
    data.path = path
    mesh = sharding.make_mesh(config.mesh)
    source = store.ArraySource(data, batch_size=args.batch_size, mesh=mesh,
                               rules=config.sharding_rules)
    batches = source.reader.train_rows // args.batch_size
    if batches < 2:
        raise SystemExit(f"the store read holds {source.reader.train_rows} rows, fewer than two "
                         f"batches of {args.batch_size}; raise --read_rows.")
    # Timed from the first batch: its window's latency is paid once per run, not per batch.
    jax.block_until_ready(source.next_batch())
    t0 = time.perf_counter()
    for _ in range(batches - 1):
        jax.block_until_ready(source.next_batch())
    seconds = time.perf_counter() - t0
    source.close()
    rows = (batches - 1) * args.batch_size
    itemsize = np.dtype(source.rows.dtype).itemsize
    return {"path": "random rows" if synthetic else "harvested", "rows": source.rows.n_rows,
            "batches": batches, "seconds": seconds, "tokens_per_s": rows / seconds,
            "gb_per_s": rows * args.n_embd * itemsize / seconds / 1e9,
            "shuffle_buffer_chunks": int(data.shuffle_buffer_chunks),
            "prefetch_windows": int(data.prefetch_windows)}


# ------------------------------------------------------------------------------------------
# Train step (common.time_train_step, as benchmarks/train_step.py).
# ------------------------------------------------------------------------------------------
def measure_train(args, config) -> dict:
    return common.time_train_step(config, d=args.n_embd, iters=args.iters)


# ------------------------------------------------------------------------------------------
# Main: the three rates, the machine's matmul rate, the table and the JSON line.
# ------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    config = experiment_config(args)
    workdir = tempfile.mkdtemp(prefix="saejax_pipeline_bench_")
    # The measured harvest builds its own jitted forward; the cache lets it reuse the warm-up's
    # compilation instead of compiling again inside the timed loop.
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    t_start = time.perf_counter()
    try:
        harvested = measure_harvest(args, workdir)
        read = measure_read(args, config, harvested, workdir)
        step = measure_train(args, config)
        forward_tokens = args.batch_sequences * args.context_length
        d, d_mlp, n = args.n_embd, 4 * args.n_embd, step["n_latents"]
        matmul = common.matmul_flops_per_s(
            shapes=((forward_tokens, d, 3 * d), (forward_tokens, d, d_mlp),
                    (forward_tokens, d_mlp, d), (args.batch_size, d, n),
                    (args.batch_size, n, d), (args.peak_size,) * 3), iters=args.iters)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    h, r, t = harvested["tokens_per_s"], read["tokens_per_s"], step["tokens_per_s"]
    # data.source=lm runs the forward on the same device as the step, so their times add.
    on_the_fly = 1 / (1 / h + 1 / t)
    result = {
        "benchmark": "pipeline", "date": datetime.date.today().isoformat(),
        "model": {"n_layer": args.n_layer, "n_embd": d, "n_head": args.n_head,
                  "vocab_size": args.vocab_size, "init": "random"},
        "hook": harvested["hook"], "sequences": args.sequences,
        "context_length": args.context_length, "batch_sequences": args.batch_sequences,
        "dtype": args.dtype, "chunk_rows": args.chunk_rows,
        "harvest_tokens": harvested["tokens"], "harvest_seconds": harvested["seconds"],
        "harvest_tokens_per_s": h,
        "harvest_first_batch_seconds_with_compile": harvested["first_batch_seconds_with_compile"],
        "harvest_params_used": harvested["params_used"],
        "harvest_flops_per_token": harvested["flops_per_token"],
        "harvest_flops_per_s": harvested["flops_per_s"],
        "harvest_fraction_of_matmul_peak": harvested["flops_per_s"] / matmul,
        "read_store": read["path"], "read_rows": read["rows"], "read_cold": not args.warm,
        "read_batches": read["batches"], "read_seconds": read["seconds"],
        "read_tokens_per_s": r, "read_gb_per_s": read["gb_per_s"],
        "read_shuffle_buffer_chunks": read["shuffle_buffer_chunks"],
        "read_prefetch_windows": read["prefetch_windows"],
        "train_architecture": step["architecture"], "train_k": args.k,
        "train_k_aux": args.k_aux, "train_expansion_factor": args.expansion_factor,
        "train_n_latents": n, "train_batch_size": args.batch_size,
        "train_seconds_per_step": step["seconds_per_step"], "train_tokens_per_s": t,
        "train_flops_per_token": step["flops_per_token"], "train_flops_per_s": step["flops_per_s"],
        "train_fraction_of_matmul_peak": step["flops_per_s"] / matmul,
        "matmul_flops_per_s": matmul,
        "read_over_train": r / t, "harvest_over_train": h / t,
        "on_the_fly_tokens_per_s": on_the_fly,
        "read_is_bottleneck": r < t, "harvest_keeps_up": h >= t,
        "peak_memory_bytes": common.peak_memory_bytes(),
        "wall_seconds": time.perf_counter() - t_start, "machine": common.machine(),
    }

    rows = [
        ("harvest (forward + store write)", f"{h:,.0f}",
         f"{harvested['flops_per_s'] / 1e9:.1f} GFLOP/s "
         f"({100 * result['harvest_fraction_of_matmul_peak']:.0f}% of matmul)"),
        (f"store read ({'cold' if not args.warm else 'warm'}, {read['path']})", f"{r:,.0f}",
         f"{read['gb_per_s']:.2f} GB/s"),
        (f"train step ({step['architecture']} k={args.k}, {n:,} latents, batch "
         f"{args.batch_size})", f"{t:,.0f}",
         f"{step['flops_per_s'] / 1e9:.1f} GFLOP/s "
         f"({100 * result['train_fraction_of_matmul_peak']:.0f}% of matmul)"),
    ]
    print(f"pipeline at {harvested['hook']} of a GPT-2 ({args.n_layer} layers, d={d}), "
          f"{harvested['tokens']:,} tokens harvested; matmul peak {matmul / 1e9:.1f} GFLOP/s; "
          f"peak memory {result['peak_memory_bytes'] / 2**20:.0f} MiB")
    width = max(len(row[0]) for row in rows)
    print(f"  {'stage':<{width}}  {'tokens/s':>12}  rate")
    for name, rate, extra in rows:
        print(f"  {name:<{width}}  {rate:>12}  {extra}")
    print(f"  read / train = {r / t:.2f}x, harvest / train = {h / t:.2f}x")
    print(f"verdict: reading {'IS' if r < t else 'is not'} the bottleneck ({r / t:.1f}x the step's "
          f"rate); harvesting on the fly (data.source=lm) {'would' if h >= t else 'would NOT'} "
          f"keep up ({h / t:.2f}x), and sharing the device with the step the pair would run at "
          f"about {on_the_fly:,.0f} tokens/s ({100 * on_the_fly / t:.0f}% of the step alone)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
