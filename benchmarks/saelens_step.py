"""SAELens' training step, timed: the peer side of benchmarks/peers.py.

Runs inside the SAELens virtual environment (bash benchmarks/setup_saelens.sh), never saejax's:
it imports only torch, sae_lens, numpy and the standard library.

    benchmarks/.venv-saelens/bin/python benchmarks/saelens_step.py --architecture=topk \
        --d=512 --expansion_factor=128 --batch_size=4096 --k=32 --data=acts.npy

`--architecture` is SAELens' name (standard, topk, jumprelu, batchtopk, gated, ...: its
training registry; benchmarks/peers.py maps saejax's names to these). It builds that training
SAE from SAELens' registry, with the flags its config has (`--k`, `--l1_coefficient`; the
others' defaults), and SAELens' own SAETrainer, and times `SAETrainer.step` on batches of
`--data` (a float32 .npy [rows, d], cut into batches of --batch_size rows, all loaded before
timing). That is what
`SAETrainer.fit` does per step less its logging, evals and checkpoints: the training forward
pass (encode, decode, MSE + the architecture's auxiliary loss), the firing statistics for dead
latents, backward, gradient-norm clipping, Adam, the learning-rate and coefficient schedulers.
Prints one JSON line (tokens_per_s, seconds_per_step, sae_lens and torch versions).
"""

import argparse
import importlib.metadata
import json
import os
import time

import numpy as np
import torch

from sae_lens import SAETrainer
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, get_sae_training_class
from sae_lens.util import filter_valid_dataclass_fields


def make_sae(args, n_latents: int):
    """SAELens' training SAE `--architecture` with every other field at SAELens' default.

    The standard SAE is ReLU with an L1 penalty on f_i * ||W_dec,i||. TopK keeps SAELens'
    dense activations (use_sparse_activations=False), so the decoder multiplies the whole
    [batch, n_latents] matrix (its sparse option fails in backward on CPU in sae-lens 6.54 with
    torch 2.13: aten::view has no SparseCPU kernel).
    """
    sae_class, config_class = get_sae_training_class(args.architecture)
    fields = {"d_in": args.d, "d_sae": n_latents, "dtype": "float32", "device": "cpu",
              "k": args.k, "l1_coefficient": args.l1_coefficient}
    return sae_class(config_class(**filter_valid_dataclass_fields(fields, config_class)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="standard",
                        choices=sorted(SAE_TRAINING_CLASS_REGISTRY))
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--expansion_factor", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--l1_coefficient", type=float, default=1.0,
                        help="SAELens' l1_coefficient, for the architectures with one (its "
                        "loss sums the MSE over d)")
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--data", required=True, help="float32 .npy of activations [rows, d]")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    data = np.load(args.data)
    if data.ndim != 2 or data.shape[1] != args.d or data.shape[0] < args.batch_size:
        raise SystemExit(f"saelens_step.py: {args.data} has shape {data.shape}; need "
                         f"[rows >= {args.batch_size}, {args.d}].")
    n_batches = data.shape[0] // args.batch_size
    batches = [torch.from_numpy(np.ascontiguousarray(
        data[i * args.batch_size:(i + 1) * args.batch_size], dtype=np.float32))
        for i in range(n_batches)]

    n_latents = args.d * args.expansion_factor
    sae = make_sae(args, n_latents)
    steps = args.warmup + args.iters
    trainer = SAETrainer(
        cfg=SAETrainerConfig(total_training_samples=steps * args.batch_size,
                             train_batch_size_samples=args.batch_size, lr=args.learning_rate,
                             lr_end=args.learning_rate / 10, device="cpu"),
        sae=sae, data_provider=iter(()))

    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        trainer.step(batches[i % n_batches])  # synchronous on CPU
        trainer.n_training_steps += 1
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    print(json.dumps({
        "framework": "sae_lens", "architecture": args.architecture, "d": args.d,
        "n_latents": n_latents, "batch_size": args.batch_size, "k": args.k,
        "seconds_per_step": seconds, "tokens_per_s": args.batch_size / seconds,
        "sae_lens": importlib.metadata.version("sae-lens"), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
