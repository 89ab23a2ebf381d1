"""saejax's train step against SAELens' on the same shapes, data and machine (CPU).

    bash benchmarks/setup_saelens.sh            # once: SAELens in its own venv, never saejax's
    python benchmarks/peers.py                   # relu, topk x expansion 16, 128; d=512, batch 4096
    python benchmarks/peers.py --architectures=topk --expansion_factors=128 --iters=5

Other flags go to saejax's side as in the step benchmarks (common.add_shape_flags).

Both sides train an f32 SAE with Adam on the same batches (a fixed-seed normal array written
to a .npy that both read), never at the same time: first SAELens' `SAETrainer.step`
(benchmarks/saelens_step.py, torch on every core) in the SAELens venv through a subprocess for
every case, then saejax's sharded train step here. Run it on an otherwise idle machine. The
work per step is matched: same batch, d and n_latents; ReLU's L1 on f_i * ||W_dec,i|| with
SAELens' coefficient set to saejax's x d / n_latents (SAELens sums the MSE over d and the L1
over latents, saejax takes means), TopK with the same k. Each side also does its own extras:
saejax its decoder-norm projection, AuxK and metrics; SAELens its firing statistics and
gradient clipping (its AuxK runs only once latents are dead, which they are not here). Prints
a table of tokens/s and the ratio against the issue's targets (3x for dense steps, 10x for
TopK at expansion 128); the last line is one JSON object.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

# SAELens' side runs torch on CPU: compare like with like.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCHMARKS))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

DEFAULT_VENV = os.path.join(BENCHMARKS, ".venv-saelens")
SETUP_COMMAND = "bash benchmarks/setup_saelens.sh"
# The issue's targets (saejax tokens/s over SAELens'); every other case is a dense step.
TARGETS = {("topk", 128): 10.0}
DENSE_TARGET = 3.0


def saelens_python(venv: str) -> str:
    """The SAELens venv's interpreter, or a SystemExit naming the setup command."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        raise SystemExit(f"peers.py: no SAELens virtual environment at {venv}. Create it with "
                         f"`{SETUP_COMMAND} {venv}` (a separate venv with torch and sae-lens; "
                         "they are never dependencies of saejax), or pass --saelens_venv.")
    return python


def write_data(path: str, *, rows: int, d: int, seed: int = 0) -> np.ndarray:
    """The activations both sides train on: a fixed-seed normal float32 array [rows, d]."""
    data = np.random.default_rng(seed).standard_normal((rows, d), dtype=np.float32)
    np.save(path, data)
    return data


def case_config(args, architecture: str, expansion_factor: int, saejax_flags=()):
    """The toy experiment config at the case's shapes, through the step benchmarks' own flags
    (common.add_shape_flags, whose defaults apply; `saejax_flags` overrides them)."""
    parser = argparse.ArgumentParser(prog="peers.py (saejax flags)")
    common.add_shape_flags(parser, d=args.d, expansion_factor=expansion_factor,
                           batch_size=args.batch_size)
    return common.config_from_flags(parser.parse_args(
        [f"--architecture={architecture}", f"--k={args.k}", f"--mesh_model={args.mesh_model}",
         *saejax_flags]))


def time_saejax_step(config, data: np.ndarray, *, iters: int) -> dict:
    """common.time_train_step on `data`'s batches (in order, cycled) instead of a random one."""
    from saejax import sharding, train  # pylint: disable=import-outside-toplevel
    batch_size, d = int(config.train.batch_size), data.shape[1]
    mesh = sharding.make_mesh(config.mesh)
    with sharding.activate(mesh, config.sharding_rules):
        batch_sharding = jax.sharding.NamedSharding(
            mesh, sharding.logical_to_spec(("batch", "embed"), config.sharding_rules))
        trainer = train.make_trainer(config, mesh, d=d, batch_sharding=batch_sharding)
        batches = [jax.device_put(data[i:i + batch_size], batch_sharding)
                   for i in range(0, data.shape[0] - batch_size + 1, batch_size)]
        holder = {"state": trainer.init(jax.random.PRNGKey(0)), "step": 0}

        def run():  # time_fn's warm-up calls compile it
            batch = batches[holder["step"] % len(batches)]
            holder["state"], metrics = trainer.train_step(holder["state"], batch)
            holder["step"] += 1
            return metrics

        seconds = common.time_fn(run, iters=iters)
    return {"n_latents": trainer.n_latents, "seconds_per_step": seconds,
            "tokens_per_s": batch_size / seconds, "flops_per_token": trainer.flops_per_token}


def saelens_architecture(config) -> str:
    """SAELens' name for the config's architecture (relu: standard): the first SAELens
    architecture its conversion reads (`sae.base.SaeLens.imports`)."""
    from saejax import sae  # pylint: disable=import-outside-toplevel
    architecture = sae.get(config.sae.architecture)
    if not (architecture.saelens and architecture.saelens.imports):
        raise SystemExit(f"peers.py: SAELens has no {architecture.name!r} SAE to time; choose "
                         "an architecture with a SAELens counterpart.")
    return architecture.saelens.imports[0]


def time_saelens_step(python: str, config, data_path: str, *, iters: int) -> dict:
    """benchmarks/saelens_step.py in the SAELens venv, with `config`'s work per step."""
    d, n_latents = int(config.data.d), int(config.data.d) * int(config.sae.expansion_factor)
    command = [
        python, os.path.join(BENCHMARKS, "saelens_step.py"),
        f"--architecture={saelens_architecture(config)}", f"--d={d}",
        f"--expansion_factor={config.sae.expansion_factor}",
        f"--batch_size={config.train.batch_size}", f"--k={config.sae.k}",
        # saejax: mean MSE over elements + c * mean over tokens and latents; SAELens: MSE
        # summed over d + l1 * L1 summed over latents. Same objective up to a factor of d.
        f"--l1_coefficient={float(config.sae.l1_coefficient) * d / n_latents}",
        f"--learning_rate={float(config.optim.learning_rate)}",
        f"--iters={iters}", f"--data={data_path}"]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"peers.py: SAELens' step failed (exit {out.returncode}):\n"
                         f"{' '.join(command)}\n{out.stderr[-3000:]}\nIf sae_lens is missing "
                         f"or broken, rerun `{SETUP_COMMAND}`.")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", default="relu,topk")
    parser.add_argument("--expansion_factors", default="16,128")
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--mesh_model", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batches", type=int, default=2,
                        help="distinct batches in the shared data, cycled through")
    parser.add_argument("--saelens_venv", default=DEFAULT_VENV)
    # Any other flag is one of the step benchmarks' (common.add_shape_flags) for saejax's side.
    args, saejax_flags = parser.parse_known_args(argv)
    python = saelens_python(args.saelens_venv)
    cases = [(architecture, int(expansion))
             for architecture in args.architectures.split(",")
             for expansion in args.expansion_factors.split(",")]
    configs = [case_config(args, *case, saejax_flags) for case in cases]  # flag errors first

    # SAELens first, while this process holds no JAX buffers: at x128 either side's step
    # needs several GiB, and the two never run at once.
    theirs, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "activations.npy")
        data = write_data(data_path, rows=args.batches * args.batch_size, d=args.d)
        for (architecture, expansion), config in zip(cases, configs):
            theirs.append(time_saelens_step(python, config, data_path, iters=args.iters))
            print(f"SAELens {architecture} x{expansion}: "
                  f"{theirs[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    for (architecture, expansion), config, peer in zip(cases, configs, theirs):
        ours = time_saejax_step(config, data, iters=args.iters)
        print(f"saejax {architecture} x{expansion}: {ours['tokens_per_s']:,.0f} tokens/s",
              flush=True)
        ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
        target = TARGETS.get((architecture, expansion), DENSE_TARGET)
        results.append({
            "architecture": architecture, "expansion_factor": expansion,
            "n_latents": ours["n_latents"], "saejax_tokens_per_s": ours["tokens_per_s"],
            "saelens_tokens_per_s": peer["tokens_per_s"], "ratio": ratio,
            "target": target, "met": ratio >= target})
    versions = {"sae_lens": theirs[0]["sae_lens"], "torch": theirs[0]["torch"]}

    print(f"\nd={args.d}, batch {args.batch_size}, k={args.k}, f32, Adam; {common.machine()}; "
          f"sae-lens {versions['sae_lens']}, torch {versions['torch']}")
    print(f"{'case':<12}{'saejax tok/s':>15}{'SAELens tok/s':>15}{'ratio':>9}{'target':>9}")
    for r in results:
        print(f"{r['architecture'] + ' x' + str(r['expansion_factor']):<12}"
              f"{r['saejax_tokens_per_s']:>15,.0f}{r['saelens_tokens_per_s']:>15,.0f}"
              f"{r['ratio']:>8.2f}x{r['target']:>7.0f}x {'met' if r['met'] else 'MISSED'}")
    print(json.dumps({"benchmark": "peers", "d": args.d, "batch_size": args.batch_size,
                      "k": args.k, "iters": args.iters, "saejax_flags": saejax_flags,
                      "machine": common.machine(),
                      **versions, "cases": results}))
    return results


if __name__ == "__main__":
    main()
