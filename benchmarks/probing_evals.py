"""The probing evaluations (absorption, sparse probing, meta-SAE, KPIs) on real SAEs, with the
cost of each: runs `saejax.evals.suite` on each workdir in one process (the model-side work
shared) and prints one markdown row per SAE and the seconds of every eval.

    SAEJAX_ASSETS=/work/assets/real python benchmarks/probing_evals.py RUN [RUN ...] \
        [--max_words=1000] [--icl_examples=2] [--windows_per_work=8] [--meta_steps=1000]

The defaults are sized for a shared 2-core CPU; SAEBench's own are --max_words=0 (every
word), --icl_examples=10 and 24 windows a work. Figures: benchmarks/RESULTS.md, "Probing
evaluations".
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from saejax.evals import probing_suite, suite  # noqa: E402

EVALS = ("absorption_first_letter", "sparse_probing", "meta_sae", "kpis")
COLUMNS = (("absorption_first_letter", "mean", "mean_absorption_fraction_score"),
           ("absorption_first_letter", "mean", "mean_full_absorption_score"),
           ("absorption_first_letter", "mean", "mean_num_split_features"),
           ("sparse_probing", "llm", "llm_test_accuracy"),
           ("sparse_probing", "sae", "sae_test_accuracy"),
           ("sparse_probing", "sae", "sae_top_1_test_accuracy"),
           ("sparse_probing", "sae", "sae_top_2_test_accuracy"),
           ("sparse_probing", "sae", "sae_top_5_test_accuracy"),
           ("meta_sae", "meta_sae", "meta_fvu"), ("meta_sae", "meta_sae", "meta_l0"),
           ("meta_sae", "meta_sae", "decomposed_fraction"),
           ("kpis", "sparsity", "sparsity_ratio"), ("kpis", "sparsity", "alive_fraction"),
           ("kpis", "coverage", "first_letter_coverage"), ("kpis", "coverage", "genre_coverage"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--max_words", type=int, default=1000)
    parser.add_argument("--icl_examples", type=int, default=2)
    parser.add_argument("--windows_per_work", type=int, default=8)
    parser.add_argument("--meta_steps", type=int, default=1000)
    parser.add_argument("--texts", default=None)
    args = parser.parse_args()
    options = {k: getattr(args, k) for k in ("max_words", "icl_examples", "windows_per_work",
                                             "meta_steps", "texts")}
    print("| run | " + " | ".join(metric for *_, metric in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    costs = {}
    for run in args.runs:
        out = suite.run(run, EVALS, options, log=lambda *_: None)
        row = [f"{out[e]['eval_result_metrics'][c][m]:.3f}" for e, c, m in COLUMNS]
        print(f"| {os.path.basename(run.rstrip('/'))} | " + " | ".join(row) + " |", flush=True)
        costs[run] = {e: round(out[e]["saejax"]["seconds"], 1) for e in EVALS}
    print(json.dumps({"eval_seconds": costs,
                      "model_side_seconds": {k: round(v, 1) for k, v in
                                             probing_suite.shared_seconds().items()}}))


if __name__ == "__main__":
    main()
