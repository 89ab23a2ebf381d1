"""Write and read throughput of the activation store (saejax/data/store/).

    python benchmarks/store_read.py                          # 500k rows x d=768 float32 (1.5 GB)
    python benchmarks/store_read.py --rows=2000000 --dtype=bfloat16 --shard_rows=65536
    python benchmarks/store_read.py --path=/big/disk/bench   # a store on another disk (kept)

Writes a store in chunk-aligned batches (tokens/s written), evicts its files from the page cache
(unless --warm), then streams one pass of shuffled training batches through `ArraySource` onto
one device, with prefetching on and then off: GB/s (as stored) and rows/s, timed from the first
batch (its window's latency is the same either way). Then, with a simulated training step of
--step_ms after each batch, the fraction of the time the loop waited for data, prefetching on
and off. The last line is one JSON object.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from saejax import configs, sharding  # noqa: E402
from saejax.data import store  # noqa: E402


def evict(path: str) -> None:
    """Drops the store's files from the page cache, so reads come from the disk."""
    for directory, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def write(args, path: str) -> float:
    """Seconds to write the whole store."""
    writer = store.ActivationStoreWriter.create_or_open(
        path, d=args.d, dtype=args.dtype, context_length=args.context_length,
        n_tokens=args.rows, chunk_rows=args.chunk_rows, shard_rows=args.shard_rows or None,
        checksum=args.checksum, metadata={"model": "benchmark", "hook": "random"})
    if writer.complete:
        return float("nan")
    block = np.random.default_rng(0).standard_normal((args.write_rows, args.d), np.float32)
    token_ids = np.arange(args.write_rows, dtype=np.int32)
    t0 = time.perf_counter()
    for start in range(writer.committed_rows, args.rows, args.write_rows):
        n = min(args.write_rows, args.rows - start)
        writer.write(start, block[:n], token_ids[:n])
    return time.perf_counter() - t0


def read(args, path: str, *, prefetch_windows: int, step_seconds: float) -> dict:
    if not args.warm:
        evict(path)
    config = configs.base_config().data
    config.update({"source": "store", "path": path, "d": args.d, "seed": 0,
                   "shuffle_buffer_chunks": args.shuffle_buffer_chunks, "eval_tokens": 0,
                   "prefetch_windows": prefetch_windows})
    mesh = jax.make_mesh((1, 1), sharding.MESH_AXES, devices=jax.devices()[:1])
    source = store.ArraySource(config, batch_size=args.batch_size, mesh=mesh,
                               rules=sharding.DEFAULT_RULES)
    batches = args.batches or source.reader.train_rows // args.batch_size
    jax.block_until_ready(source.next_batch())
    waited = 0.0
    t0 = time.perf_counter()
    for _ in range(batches - 1):
        t = time.perf_counter()
        jax.block_until_ready(source.next_batch())
        waited += time.perf_counter() - t
        if step_seconds:
            time.sleep(step_seconds)
    seconds = time.perf_counter() - t0
    source.close()
    rows = (batches - 1) * args.batch_size
    itemsize = np.dtype(source.rows.dtype).itemsize
    return {"batches": batches, "seconds": seconds, "rows_per_s": rows / seconds,
            "gb_per_s": rows * args.d * itemsize / seconds / 1e9,
            "wait_fraction": waited / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--dtype", default="float32", choices=store.DTYPES)
    parser.add_argument("--context_length", type=int, default=1024)
    parser.add_argument("--chunk_rows", type=int, default=4096)
    parser.add_argument("--shard_rows", type=int, default=0, help="0: no sharding codec")
    parser.add_argument("--checksum", action="store_true", help="crc32c on every chunk")
    parser.add_argument("--write_rows", type=int, default=32 * 1024,
                        help="rows per write (the harvest batch: 32 sequences of 1024)")
    parser.add_argument("--batch_size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=0, help="0: one pass over the store")
    parser.add_argument("--shuffle_buffer_chunks", type=int, default=16)
    parser.add_argument("--prefetch_windows", type=int, default=2)
    parser.add_argument("--step_ms", type=float, default=50.0,
                        help="simulated train step after each batch (0: skip this part)")
    parser.add_argument("--warm", action="store_true", help="read from the page cache")
    parser.add_argument("--path", default="", help="store directory (default: a temp dir, "
                        "deleted afterwards)")
    args = parser.parse_args()
    args.rows = args.rows // args.context_length * args.context_length or args.context_length

    path = args.path or tempfile.mkdtemp(prefix="saejax_store_bench_")
    try:
        write_seconds = write(args, os.path.join(path, "store"))
        on = read(args, os.path.join(path, "store"), prefetch_windows=args.prefetch_windows,
                  step_seconds=0.0)
        off = read(args, os.path.join(path, "store"), prefetch_windows=0, step_seconds=0.0)
        stepped = [read(args, os.path.join(path, "store"), prefetch_windows=windows,
                        step_seconds=args.step_ms / 1e3)
                   for windows in (args.prefetch_windows, 0)] if args.step_ms else None
    finally:
        if not args.path:
            shutil.rmtree(path, ignore_errors=True)

    itemsize = 2 if args.dtype == "bfloat16" else 4
    store_gb = args.rows * args.d * itemsize / 1e9
    result = {
        "benchmark": "store_read", "rows": args.rows, "d": args.d, "dtype": args.dtype,
        "chunk_rows": args.chunk_rows, "shard_rows": args.shard_rows or None,
        "checksum": args.checksum,
        "batch_size": args.batch_size, "shuffle_buffer_chunks": args.shuffle_buffer_chunks,
        "prefetch_windows": args.prefetch_windows, "cold": not args.warm, "store_gb": store_gb,
        "write_tokens_per_s": args.rows / write_seconds,
        "write_gb_per_s": store_gb / write_seconds,
        "read_rows_per_s": on["rows_per_s"], "read_gb_per_s": on["gb_per_s"],
        "read_batches": on["batches"],
        "read_rows_per_s_no_prefetch": off["rows_per_s"],
        "read_gb_per_s_no_prefetch": off["gb_per_s"],
        "machine": common.machine(),
    }
    if stepped:
        result.update(step_ms=args.step_ms, wait_fraction_with_step=stepped[0]["wait_fraction"],
                      wait_fraction_with_step_no_prefetch=stepped[1]["wait_fraction"])
    print(f"store {args.rows:,} x {args.d} {args.dtype} ({store_gb:.2f} GB, chunks of "
          f"{args.chunk_rows} rows): write {result['write_tokens_per_s']:,.0f} tokens/s "
          f"({result['write_gb_per_s']:.2f} GB/s); read at batch {args.batch_size} "
          f"({'cold' if not args.warm else 'warm'} cache) {on['rows_per_s']:,.0f} rows/s "
          f"({on['gb_per_s']:.2f} GB/s) with prefetch, {off['rows_per_s']:,.0f} rows/s "
          f"({off['gb_per_s']:.2f} GB/s) without"
          + (f"; with a {args.step_ms:g} ms step the loop waits for data "
             f"{100 * stepped[0]['wait_fraction']:.1f}% of the time with prefetch, "
             f"{100 * stepped[1]['wait_fraction']:.1f}% without" if stepped else ""))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
