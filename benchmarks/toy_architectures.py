"""Every architecture on the toy ground-truth recipe: MMCS, FVU, L0 and dead fraction.

    python benchmarks/toy_architectures.py --workdir=/tmp/saejax/architectures

Runs experiments/toy.py (n_latents = 1024, 4000 steps) once per architecture; the coefficient
architectures (relu, gated, jumprelu) train a group over their sparsity coefficient in one
vmapped run. Prints one markdown row per SAE for benchmarks/RESULTS.md. Finished runs are read
back, so an interrupted table resumes.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from experiments import toy  # noqa: E402
from saejax import configs, train  # noqa: E402

RUNS = {
    "relu": {"group.sparsity_coefficients": (0.3, 0.6, 1.2)},
    "topk": {"sae.k": 8},
    "batchtopk": {"sae.k": 8},
    "jumprelu": {"group.sparsity_coefficients": (1e-4, 1e-3)},
    "gated": {"group.sparsity_coefficients": (0.6,)},
    "switch": {"sae.k": 8, "sae.switch_experts": 4},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--architectures", default=",".join(RUNS))
    parser.add_argument("--steps", type=int, default=None, help="default: the toy config's")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    rows = []
    for name in args.architectures.split(","):
        config = toy.get_config()
        config.sae.architecture = name
        config = configs.apply_overrides(config, RUNS[name])
        if args.steps:
            config.train.steps = args.steps
        summary = train.train_and_evaluate(config, os.path.join(args.workdir, name))
        for member, result in summary.get("members", {"": summary}).items():
            setting = member or (f"k-{result['k']}" + (
                f", {config.sae.switch_experts} experts" if name == "switch" else ""))
            rows.append((name, setting, result))
            print(name, setting, {k: round(result[k], 4) for k in ("mmcs", "fvu", "l0",
                                                                    "dead_fraction")},
                  flush=True)
    print("\n| architecture | setting | MMCS | FVU | L0 | dead_fraction |")
    print("|---|---|---|---|---|---|")
    for name, setting, r in rows:
        print(f"| {name} | {setting} | {r['mmcs']:.4f} | {r['fvu']:.4f} | {r['l0']:.2f} "
              f"| {r['dead_fraction']:.3f} |")


if __name__ == "__main__":
    main()
