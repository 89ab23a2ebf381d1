"""Shared measurements for benchmarks: the machine's matmul rate, timing, peak memory."""

from __future__ import annotations

import platform
import resource
import time

import jax
import jax.numpy as jnp


def time_fn(fn, *args, warmup: int = 2, iters: int = 10) -> float:
    # Each call is waited for: on CPU with several devices, overlapping programs with
    # collectives can deadlock (see train.py), and the median of waited calls is what we report.
    """Median seconds per call of an already-jitted `fn(*args)`."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_flops_per_s(shapes=((4096, 4096, 4096),), dtype=jnp.float32, iters: int = 10) -> float:
    """The best measured rate of plain `a @ b` over `shapes` [(m, k, n)]: the machine's peak."""
    best = 0.0
    for m, k, n in shapes:
        a = jax.random.normal(jax.random.PRNGKey(0), (m, k), dtype)
        b = jax.random.normal(jax.random.PRNGKey(1), (k, n), dtype)
        seconds = time_fn(jax.jit(jnp.matmul), a, b, iters=iters)
        best = max(best, 2 * m * k * n / seconds)
    return best


def peak_memory_bytes() -> int:
    """Peak device memory where the backend reports it, else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> str:
    device = jax.devices()[0]
    return (f"{jax.device_count()} x {device.device_kind} ({jax.default_backend()}), "
            f"{platform.processor() or platform.machine()}, jax {jax.__version__}")
