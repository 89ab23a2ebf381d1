"""Matryoshka BatchTopK against BatchTopK on the synthetic hierarchy: absorption and MMCS.

    python benchmarks/matryoshka_absorption.py --workdir=/tmp/saejax/absorption

Trains experiments/matryoshka.py's two variants (`matryoshka`, `batchtopk`) for each seed
(`seed` and `data.seed` both set to it: another initialisation and another hierarchy), then
measures on held-out batches the absorption (`saejax.evals.absorption`: among rows where a
parent and one of its children are active, the fraction where the parent's latent is silent
while the child's fires) and the MMCS of the true directions. Prints a JSON line per run and a
markdown table for benchmarks/RESULTS.md; the last line is a JSON summary with each seed's
margin (BatchTopK's absorption minus Matryoshka's). Finished runs are read back, so an
interrupted table resumes. `--tiny` runs the `,tiny` variants (seconds; what the tests run),
`--random` the `,random` ones (the recipe's random unit directions instead of orthonormal).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from experiments import matryoshka  # noqa: E402
from saejax import configs, data, evals, sharding, train  # noqa: E402
from saejax.analysis import loading  # noqa: E402


def config_for(variant: str, seed: int, *, tiny: bool = False, random: bool = False,
               overrides: dict | None = None):
    """experiments/matryoshka.py's `variant` (`,tiny`, `,random`) with its seeds set to
    `seed`."""
    config = matryoshka.get_config(variant + (",tiny" if tiny else "")
                                   + (",random" if random else ""))
    return configs.apply_overrides(config, {"seed": seed, "data.seed": seed,
                                            **(overrides or {})})


def run(variant: str, seed: int, workdir: str, *, tiny: bool = False, random: bool = False,
        overrides: dict | None = None) -> dict:
    """Trains (or resumes) one variant at one seed in `workdir`; its summary with the held-out
    `absorption` and `mmcs` on the hierarchy."""
    config = config_for(variant, seed, tiny=tiny, random=random, overrides=overrides)
    summary = train.train_and_evaluate(config, workdir)
    return {**summary, **measure(config, workdir), "variant": variant, "seed": seed}


def measure(config, workdir: str) -> dict:
    """`absorption` and `mmcs` of the SAE trained in `workdir` with `config`, on held-out
    batches of its hierarchy."""
    loaded = loading.load_sae(workdir)
    mesh = sharding.make_mesh(config.mesh)
    with sharding.activate(mesh, config.sharding_rules):
        source = data.make_source(config, mesh=mesh, rules=config.sharding_rules)
        return evals.hierarchy_metrics(
            lambda batch: loaded.encode(batch[data.DEFAULT_HOOK]),
            loaded.params["W_dec"], source, int(config.evals.eval_batches))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--random", action="store_true",
                        help="the ,random variants: random unit directions, not orthonormal")
    parser.add_argument("--steps", type=int, default=None, help="default: the config's")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    overrides = {"train.steps": args.steps} if args.steps else {}
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for variant in matryoshka.VARIANTS:
            result = run(variant, seed, os.path.join(args.workdir, f"{variant}-{seed}"),
                         tiny=args.tiny, random=args.random, overrides=overrides)
            results.append(result)
            print(json.dumps({k: result[k] for k in ("variant", "seed", "absorption", "mmcs",
                                                     "fvu", "l0", "dead_fraction")}), flush=True)
    print("\n| variant | seed | absorption | MMCS | FVU | L0 | dead_fraction |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['seed']} | {r['absorption']:.4f} | {r['mmcs']:.4f} "
              f"| {r['fvu']:.4f} | {r['l0']:.2f} | {r['dead_fraction']:.3f} |")
    by = {(r["variant"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    margins = [by["batchtopk", s]["absorption"] - by["matryoshka", s]["absorption"]
               for s in seeds]
    print(json.dumps({"seeds": seeds, "margins": margins, "min_margin": min(margins)}))


if __name__ == "__main__":
    main()
