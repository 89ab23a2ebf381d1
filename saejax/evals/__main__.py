"""Runs the registered evaluations (saejax.evals.suite) on a run or on every finished point of
a sweep:

    python -m saejax.evals WORKDIR_OR_SWEEP [--evals=core,ground_truth] [--eval_batches=8]
        [--sequences=32] [--only='x32_*']

Each result is written in SAEBench's layout to `<run>/analysis/evals/<eval>.json`; on a sweep,
the results table (results.csv) gets their `<eval>/<metric>` columns and report.md a table and
plots of them (saejax.plots).
"""

from __future__ import annotations

import fnmatch

from absl import flags

from saejax import cli, paths, results
from saejax.evals import suite


def _define_flags() -> None:
    flags.DEFINE_list("evals", None, "Evaluations to run (default: every registered one that "
                      "runs by default; meta_sae, which trains, only when named).")
    flags.DEFINE_integer("eval_batches", 8, "Held-out batches of the run's source.")
    flags.DEFINE_integer("sequences", 32, "Held-out token sequences for the CE and KL scores.")
    flags.DEFINE_list("only", None, "On a sweep: the points whose names match these globs.")
    flags.DEFINE_string("texts", None, "sparse_probing: the folder of plays (default "
                        "$SAEJAX_ASSETS/shakespeare).")
    flags.DEFINE_integer("max_words", 4000, "absorption_first_letter: vocabulary words used.")
    flags.DEFINE_integer("icl_examples", 10, "absorption_first_letter: examples per prompt.")
    flags.DEFINE_integer("windows_per_work", 24, "sparse_probing: windows of 128 tokens a play.")
    flags.DEFINE_integer("meta_steps", 2000, "meta_sae: training steps of the meta-SAE.")


def run_sweep(workdir: str, names=None, options=None, only=None, log=print) -> list[dict]:
    """`suite.run` on every finished point of the sweep in `workdir` (those `only` matches),
    then the results table and report rewritten with the evaluations' columns."""
    from saejax import plots  # pylint: disable=import-outside-toplevel  (matplotlib)
    rows = results.collect(workdir)
    for row in rows:
        if only and not any(fnmatch.fnmatchcase(row["name"], p) for p in only):
            continue
        if row["status"] != results.DONE:
            log(f"{row['name']}: {row['status']}, not evaluated.")
            continue
        suite.run(paths.join(workdir, row["name"]), names, options, log=log)
    rows = results.collect(workdir)
    results.write_table(rows, paths.join(workdir, results.TABLE))
    plots.write_report(workdir, rows)
    return rows


def main(argv):
    (path,) = cli.positional(argv, 1, "python -m saejax.evals WORKDIR_OR_SWEEP "
                                      "[--evals=core,...]")
    cli.setup()
    values = flags.FLAGS
    options = {"eval_batches": values.eval_batches, "sequences": values.sequences,
               "texts": values.texts, "max_words": values.max_words,
               "icl_examples": values.icl_examples, "windows_per_work": values.windows_per_work,
               "meta_steps": values.meta_steps}
    if paths.exists(paths.join(path, results.MANIFEST)):
        run_sweep(path, values.evals, options, values.only)
    else:
        suite.run(path, values.evals, options)


if __name__ == "__main__":
    cli.run(main, _define_flags)
