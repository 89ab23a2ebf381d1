"""Shared measurements for benchmarks: the machine's matmul rate, timing, peak memory; a
random-init GPT-2 checkpoint and random token ids for the benchmarks that run a language model."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np


def time_fn(fn, *args, warmup: int = 2, iters: int = 10) -> float:
    # Each call is waited for: on CPU with several devices, overlapping programs with
    # collectives can deadlock (see saejax/loop.py), and the median of waited calls is what we
    # report.
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


def add_shape_flags(parser, *, d: int, expansion_factor: int, batch_size: int) -> None:
    """The flags every step benchmark takes: architecture, shapes, k, model axis, iterations."""
    parser.add_argument("--architecture", default="relu")
    parser.add_argument("--d", type=int, default=d)
    parser.add_argument("--expansion_factor", type=int, default=expansion_factor)
    parser.add_argument("--batch_size", type=int, default=batch_size)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--topk_decoder", default="auto", choices=("auto", "sparse", "dense"),
                        help="sae.topk_decoder: decode only the k selected latents, or densely")
    parser.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"),
                        help="train.compute_dtype; the matmul peak is measured in it too")
    parser.add_argument("--matryoshka_widths", default="",
                        help="sae.matryoshka_widths, comma-separated (64,256 or 0.0625,0.25)")
    parser.add_argument("--shape", default="single_hook",
                        choices=("single_hook", "transcoder", "crosscoder", "clt"),
                        help="sae.shape; transcoder, crosscoder and clt read synthetic hooks")
    parser.add_argument("--n_layers", type=int, default=3,
                        help="a crosscoder's hooks, a CLT's layers")
    parser.add_argument("--skip_connection", action="store_true",
                        help="sae.skip_connection: a transcoder's linear skip W_skip")
    parser.add_argument("--mesh_model", type=int, default=1)
    parser.add_argument("--mesh_layer", type=int, default=1,
                        help="mesh.layer: a CLT's layers split over a third mesh axis")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--peak_size", type=int, default=4096,
                        help="the square matmul (n^3) also timed for the machine's peak")


def config_from_flags(args):
    """The toy experiment config at the benchmark's shapes (synthetic data, no downloads)."""
    from experiments import toy  # pylint: disable=import-outside-toplevel
    config = toy.get_config()
    config.data.d = args.d
    config.sae.architecture = args.architecture
    config.sae.expansion_factor = args.expansion_factor
    config.sae.k = args.k
    config.sae.topk_decoder = args.topk_decoder
    config.train.compute_dtype = args.compute_dtype
    config.train.batch_size = args.batch_size
    config.mesh.model = args.mesh_model
    widths = getattr(args, "matryoshka_widths", "")
    config.sae.matryoshka_widths = tuple(float(w) if "." in w else int(w)
                                         for w in widths.split(",") if w)
    shape = getattr(args, "shape", "single_hook")
    if shape == "transcoder":
        from saejax.data import synthetic  # pylint: disable=import-outside-toplevel
        config.data.source, config.sae.shape = "synthetic_transcoder", "transcoder"
        config.sae.input_hook, config.sae.target_hook = synthetic.TRANSCODER_HOOKS
        config.sae.skip_connection = bool(getattr(args, "skip_connection", False))
    elif shape == "crosscoder":
        from saejax.data import synthetic  # pylint: disable=import-outside-toplevel
        config.data.source, config.sae.shape = "synthetic_crosscoder", "crosscoder"
        config.data.n_layers = args.n_layers
        config.sae.hooks = ",".join(synthetic.crosscoder_hooks(args.n_layers))
    elif shape == "clt":
        config.data.source, config.sae.shape = "synthetic_clt", "clt"
        config.data.n_layers = args.n_layers
        config.sae.layers = f"0-{args.n_layers - 1}"
    mesh_layer = getattr(args, "mesh_layer", 1)
    if mesh_layer > 1:  # the layer axis over its own mesh axis, the latents over `model`
        config.mesh.layer = mesh_layer
        config.sharding_rules = (("batch", "data"), ("layer", "layer"), ("latent", "model"),
                                 ("embed", None), ("group", None))
    return config


@contextlib.contextmanager
def trainer_on_mesh(config, *, d: int):
    """(trainer, batch sharding) of `config` on its mesh of all devices, with the mesh and
    rules active (the sharded top-k reads them while tracing): what a step benchmark runs."""
    from saejax import sharding, train  # pylint: disable=import-outside-toplevel
    mesh = sharding.make_mesh(config.mesh)
    with sharding.activate(mesh, config.sharding_rules):
        batch_sharding = jax.sharding.NamedSharding(
            mesh, sharding.logical_to_spec(("batch", "embed"), config.sharding_rules))
        yield train.make_trainer(config, mesh, d=d, batch_sharding=batch_sharding), batch_sharding


def time_train_step(config, *, d: int, iters: int = 10, dead_fraction: float = 0.0) -> dict:
    """Median seconds per sharded train step of `config` on a random batch (compilation
    excluded), with the trainer's FLOPs per token: what every step benchmark reports.

    `dead_fraction` of the latents start dead (silent far beyond the dead window), so the
    steps run the dead-latent terms (AuxK) as a long run does; a fresh state has none."""
    batch_size = int(config.train.batch_size)
    with trainer_on_mesh(config, d=d) as (trainer, batch_sharding):
        from saejax import data  # pylint: disable=import-outside-toplevel
        hooks = data.config_hooks(config)
        batch = {hook: jax.device_put(jax.random.normal(jax.random.PRNGKey(i), (batch_size, d)),
                                      batch_sharding) for i, hook in enumerate(hooks)}
        state = trainer.init(jax.random.PRNGKey(0))
        if dead_fraction:
            silent = state["tokens_since_fired"]
            dead = jnp.arange(silent.shape[-1]) < dead_fraction * silent.shape[-1]
            state["tokens_since_fired"] = jax.device_put(jnp.where(dead, 2**30, silent),
                                                         silent.sharding)
        holder = {"state": state}

        def run():  # time_fn's warm-up calls compile it
            holder["state"], metrics = trainer.train_step(holder["state"], batch)
            return metrics

        seconds = time_fn(run, iters=iters)
    tokens_per_s = batch_size / seconds
    return {"architecture": config.sae.architecture, "n_latents": trainer.n_latents,
            "mesh": dict(batch_sharding.mesh.shape), "seconds_per_step": seconds, "tokens_per_s": tokens_per_s,
            "flops_per_token": trainer.flops_per_token,
            "flops_per_s": tokens_per_s * trainer.flops_per_token}


def write_random_gpt2(directory: str, *, vocab_size: int, n_embd: int, n_layer: int,
                      n_head: int, n_positions: int, used_layers: int) -> tuple[str, int]:
    """A GPT-2 of this shape (random init: a forward's speed does not depend on the weights)
    saved as a Hugging Face checkpoint at DIRECTORY/model; returns (the checkpoint directory,
    the parameters of blocks 0 .. used_layers - 1: those a forward stopping there multiplies)."""
    from saejax import models  # pylint: disable=import-outside-toplevel
    model_config = models.GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer,
                                     n_head=n_head, n_positions=n_positions)
    params = models.init_params(jax.random.PRNGKey(0), model_config)
    checkpoint = models.save_pretrained(os.path.join(directory, "model"), model_config, params)
    # Block params are stacked over layers: each leaf's first axis is the layer.
    params_used = sum(int(x[:used_layers].size) for x in jax.tree.leaves(params["blocks"]))
    return checkpoint, params_used


def write_random_tokens(path: str, *, sequences: int, context_length: int,
                        vocab_size: int) -> str:
    """`sequences` x `context_length` uniformly random token ids (seed 0), saved as a .npy."""
    np.save(path, np.random.default_rng(0).integers(
        0, vocab_size, (sequences, context_length), dtype=np.int32))
    return path
