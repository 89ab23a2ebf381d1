"""Harvest speed: saejax's forward against transformers' on the same model, tokens and CPU.

    python benchmarks/harvest.py                  # the real SmolLM2-135M, layer 15, Shakespeare
    python benchmarks/harvest.py --checkpoint=DIR --layer=9 --batch_sequences=16

Both run the blocks up to the hook and no further: saejax the harvest's own jitted forward
(`models.make_forward(..., stop_at_layer=layer + 1)`, what `saejax.harvest` calls), transformers
its `model.model` with the `layers` list cut after the hook's layer, under torch.no_grad, both
in float32 on the same batch of token ids, timed alternately (one saejax call, one transformers
call, ...) so that other jobs on a shared machine slow both alike; the medians are reported.
Beside them, the store write rate: the saejax activations written into an activation store
(`ActivationStoreWriter.write`, one batch per write, as the harvest loop writes them).

The checkpoint defaults to $SAEJAX_ASSETS/smollm2 (`python -m saejax.models.fetch --out=DIR`),
the text to the first plays of $SAEJAX_ASSETS/shakespeare, each play one document;
`--text=random` uses uniformly random token ids instead (the rate does not depend on them).
FLOP/s counts 2 x the weights of the blocks run + 2 x blocks x context x (heads x head_dim)
per token (causal attention), against the measured matmul rate of the MLP's shape and a square
matmul. Prints the rates, their ratio and peak memory (the process's: both models are loaded);
the last line is one JSON object.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from saejax import models  # noqa: E402
from saejax.data import store  # noqa: E402

ASSETS = os.environ.get("SAEJAX_ASSETS", "")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=os.path.join(ASSETS, "smollm2"),
                        help="Hugging Face directory (default $SAEJAX_ASSETS/smollm2)")
    parser.add_argument("--text", default=os.path.join(ASSETS, "shakespeare"),
                        help="a .txt file, a folder of .txt files (one document each), or "
                        "'random' for random token ids")
    parser.add_argument("--layer", type=int, default=15, help="harvest blocks.LAYER."
                        "hook_resid_post")
    parser.add_argument("--context_length", type=int, default=128)
    parser.add_argument("--batch_sequences", type=int, default=8, help="sequences per forward")
    parser.add_argument("--iters", type=int, default=5, help="timed forwards of each")
    parser.add_argument("--peak_size", type=int, default=2048,
                        help="the square matmul (n^3) also timed for the machine's peak")
    return parser.parse_args(argv)


def token_batch(args, config) -> np.ndarray:
    """[batch_sequences, context_length] token ids: the first windows of the text."""
    n = args.batch_sequences
    if args.text == "random":
        return np.random.default_rng(0).integers(0, config.vocab_size, (n, args.context_length),
                                                 dtype=np.int32)
    if os.path.isdir(args.text):
        files = sorted(os.path.join(args.text, f) for f in os.listdir(args.text)
                       if f.endswith(".txt"))
    else:
        files = [args.text]
    documents = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            documents.append(f.read())
        if sum(len(d) for d in documents) > 8 * n * args.context_length:  # > 2 chars a token
            break
    tokenizer = models.load_tokenizer(args.checkpoint)
    bos = config.bos_token_id
    sequences = models.tokenize_texts(tokenizer, documents, args.context_length,
                                      bos_token_id=bos if bos is not None else None)
    if len(sequences) < n:
        raise SystemExit(f"--text={args.text!r} gives {len(sequences)} sequences of "
                         f"{args.context_length} tokens; --batch_sequences={n} needs more.")
    return sequences[:n]


def transformers_forward(checkpoint: str, layer: int):
    """transformers' model with its layer list cut after `layer`: fn(ids) -> that layer's
    output (before the final norm's output is read: the norm is run, one elementwise op)."""
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32).eval()
    body = model.base_model
    body.layers = body.layers[:layer + 1]
    body.config.num_hidden_layers = layer + 1
    if getattr(body.config, "layer_types", None):
        body.config.layer_types = body.config.layer_types[:layer + 1]

    def run(ids):
        with torch.no_grad():
            return body(input_ids=torch.from_numpy(ids).long(), use_cache=False)

    return run


def timed_alternately(fns: dict, iters: int) -> dict:
    """Median seconds of each fn(), calling them in turn `iters` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def write_rate(acts: np.ndarray, tokens: np.ndarray, context_length: int, iters: int) -> float:
    """Tokens/s of writing `acts` [rows, d] into a fresh store, one write per batch."""
    rows, d = acts.shape
    with tempfile.TemporaryDirectory() as tmp:
        writer = store.ActivationStoreWriter.create_or_open(
            os.path.join(tmp, "store"), d=d, dtype="float32", context_length=context_length,
            n_tokens=rows * (iters + 1), chunk_rows=rows, metadata={"hook": "benchmark"})
        writer.write(0, acts, tokens)  # opening the files is not the rate
        t0 = time.perf_counter()
        for i in range(1, iters + 1):
            writer.write(i * rows, acts, tokens)
        return rows * iters / (time.perf_counter() - t0)


def main(argv=None):
    args = parse_args(argv)
    config, params = models.load(args.checkpoint)
    hook = f"blocks.{args.layer}.hook_resid_post"
    models.check_hook(config, hook, f"--layer={args.layer}: {hook} is not a hook of "
                      f"{args.checkpoint}", SystemExit)
    tokens = token_batch(args, config)
    n_tokens = tokens.size

    forward = models.make_forward(config, hooks=(hook,), stop_at_layer=args.layer + 1)
    reference = transformers_forward(args.checkpoint, args.layer)
    seconds = timed_alternately({
        "saejax": lambda: jax.block_until_ready(forward(params, tokens)),
        "transformers": lambda: reference(tokens)}, args.iters)
    acts = np.asarray(forward(params, tokens)[1][hook]).reshape(n_tokens, config.d_model)
    write_tokens_per_s = write_rate(acts, tokens.reshape(-1), args.context_length, args.iters)

    params_used = sum(int(x[:args.layer + 1].size) for x in jax.tree.leaves(params["blocks"]))
    q = params["blocks"].get("attn", {}).get("q")  # [layers, d, heads, head_dim]
    heads_dim = q.shape[2] * q.shape[3] if q is not None and q.ndim == 4 else config.d_model
    flops_per_token = 2 * params_used + 2 * (args.layer + 1) * args.context_length * heads_dim
    mlp = getattr(config, "intermediate_size", 4 * config.d_model)
    matmul = common.matmul_flops_per_s(shapes=((n_tokens, config.d_model, mlp),
                                               (args.peak_size,) * 3), iters=args.iters)
    rates = {name: n_tokens / s for name, s in seconds.items()}
    ratio = rates["saejax"] / rates["transformers"]
    result = {
        "benchmark": "harvest", "checkpoint": os.path.abspath(args.checkpoint),
        "model_type": config.model_type, "hook": hook, "text": args.text,
        "context_length": args.context_length, "batch_sequences": args.batch_sequences,
        "saejax_tokens_per_s": rates["saejax"],
        "transformers_tokens_per_s": rates["transformers"], "ratio": ratio,
        "store_write_tokens_per_s": write_tokens_per_s, "params_used": params_used,
        "flops_per_token": flops_per_token,
        "saejax_flops_per_s": rates["saejax"] * flops_per_token,
        "transformers_flops_per_s": rates["transformers"] * flops_per_token,
        "matmul_flops_per_s": matmul, "peak_memory_bytes": common.peak_memory_bytes(),
        "machine": common.machine(),
    }
    print(f"{config.model_type} {hook}, {args.batch_sequences} x {args.context_length} tokens:")
    for name in ("saejax", "transformers"):
        f = result[f"{name}_flops_per_s"]
        print(f"  {name:>12}: {rates[name]:,.0f} tokens/s, {f / 1e9:.1f} GFLOP/s "
              f"({100 * f / matmul:.0f}% of the {matmul / 1e9:.1f} GFLOP/s matmul peak)")
    print(f"  saejax / transformers: {ratio:.2f}x; store write {write_tokens_per_s:,.0f} "
          f"tokens/s; peak memory {result['peak_memory_bytes'] / 2**20:.0f} MiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
