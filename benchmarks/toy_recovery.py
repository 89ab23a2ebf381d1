"""MMCS (ground-truth feature recovery) across dictionary sizes and L1 coefficients.

Trains the default toy recipe (experiments/toy.py) at each grid point and prints a markdown
table of MMCS (and FVU, L0, dead fraction) for benchmarks/RESULTS.md:

    python benchmarks/toy_recovery.py --workdir=/tmp/saejax/recovery \
        --expansion_factors=1,2,4 --l1_coefficients=0.2,0.4,0.6,1,2

Finished points are read back from their summary.json, so an interrupted grid resumes.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from experiments import toy  # noqa: E402
from saejax import train  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--expansion_factors", default="1,2,4")
    parser.add_argument("--l1_coefficients", default="0.2,0.4,0.6,1,2")
    parser.add_argument("--steps", type=int, default=None, help="default: the toy config's")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    rows = []
    for expansion in [int(e) for e in args.expansion_factors.split(",")]:
        for l1 in [float(a) for a in args.l1_coefficients.split(",")]:
            config = toy.get_config()
            config.sae.expansion_factor = expansion
            config.sae.l1_coefficient = l1
            if args.steps:
                config.train.steps = args.steps
            workdir = os.path.join(args.workdir, f"x{expansion}_l1-{l1:g}")
            t0 = time.time()
            summary = train.train_and_evaluate(config, workdir)
            summary["wall_s"] = time.time() - t0
            rows.append(summary)
            print(json.dumps({k: summary[k] for k in ("n_latents", "l1_coefficient", "mmcs",
                                                       "fvu", "l0", "dead_fraction", "step")}),
                  flush=True)
    print("\n| n_latents | l1_coefficient | MMCS | FVU | L0 | dead_fraction |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n_latents']} | {r['l1_coefficient']:g} | {r['mmcs']:.4f} | {r['fvu']:.4f} "
              f"| {r['l0']:.2f} | {r['dead_fraction']:.3f} |")


if __name__ == "__main__":
    main()
