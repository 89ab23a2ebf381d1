"""Scaling plots and fits from a sweep's results table: `python -m saejax.plots DIR`.

Reads the sweep's table (re-collected first from DIR's run folders when DIR/sweep.json is there,
so a running sweep shows its progress; `--nocollect`, or a path to a results.csv, plots the
table alone) and writes into DIR:

    plots/loss_vs_latents.{png,svg}     FVU against the number of latents, one curve per
                                        sparsity level, with L(N) = c + a N^-b fitted
    plots/sparsity_fidelity.{png,svg}   FVU against L0, one curve per dictionary size
    plots/dead_and_mmcs.{png,svg}       dead fraction (and MMCS, MCC, firing F1, with ground
                                        truth) against size
    plots/loss_vs_compute.{png,svg}     FVU against training FLOPs, with the compute frontier
    plots/evals.{png,svg}               the evaluations of `python -m saejax.evals` against size
                                        (only when some point has them)
    report.md                           the figures, the fitted constants with their standard
                                        errors, the points, and the interpretability score
                                        of the points people rated (analysis.review)

The figures are drawn by `figures.py` (its names re-exported here: `plots.plot_loss_vs_latents`,
`plots.FIGURES`, the fits' `plots.fit_power_law`); this module owns the report and the command.
Unfinished points (partial, failed) are drawn hollow from their last logged training metrics,
each title says how many points are finished, and fits use finished points only.
"""

from __future__ import annotations

import datetime
import os
from typing import Sequence

from absl import flags

from saejax import cli, paths, results
from saejax.analysis import ratings
# The figures and the fits, re-exported: plots.plot_loss_vs_latents, plots.fit_power_law keep
# working.
from saejax.figures import (  # noqa: F401
    EVAL_PANELS, EVAL_TABLE, FIGURES, GROUND_TRUTH_PANELS, _finished, plot_dead_and_mmcs,
    plot_evals, plot_loss_vs_compute, plot_loss_vs_latents, plot_sparsity_fidelity,
    short_level_name)
from saejax.fits import MIN_FIT_POINTS, PowerLawFit, compute_frontier, fit_power_law  # noqa: F401

PLOTS_DIR = "plots"
REPORT = "report.md"


# ------------------------------------------------------------------------------------------
# The report.
# ------------------------------------------------------------------------------------------
def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fit_row(label: str, fit: PowerLawFit) -> str:
    return (f"| {label} | {fit.n_points} | {fit.c:.4g} ± {fit.c_err:.2g} | "
            f"{fit.a:.4g} ± {fit.a_err:.2g} | **{fit.b:.3f} ± {fit.b_err:.3f}** | "
            f"{fit.rms_log_residual:.3f} |")


def _evals_section(rows: Sequence[dict]) -> list[str]:
    """The report's evaluations: the figure and a table of EVAL_TABLE's columns present."""
    columns = [c for c in EVAL_TABLE if any(r.get(c) is not None for r in rows)]
    header = [c[len(results.EVAL_COLUMN):] for c in columns]
    lines = ["", "## Evaluations", "", "![Evaluations against dictionary size](plots/evals.png)",
             "", "From `python -m saejax.evals` (each point's `analysis/evals/<eval>.json`, in "
             "SAEBench's layout; all of their metrics are columns `eval:<eval>/<metric>` of "
             f"`{results.TABLE}`).", "",
             "| point | " + " | ".join(header) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['name']} | "
                     + " | ".join(_number(r.get(c), ".4g") for c in columns) + " |")
    return lines


def write_report(workdir: str, rows: Sequence[dict] | None = None) -> str:
    """Draws every figure into workdir/plots/ and writes workdir/report.md; returns its path.
    Without `rows`, they come from `results.load_rows(workdir)`: re-collected from a sweep's
    run folders (the table rewritten), or read from a results.csv."""
    if rows is None:
        rows, workdir = results.load_rows(workdir)
    out_dir = paths.join(workdir, PLOTS_DIR)
    paths.makedirs(out_dir)
    size_fits = plot_loss_vs_latents(rows, out_dir)
    plot_sparsity_fidelity(rows, out_dir)
    plot_dead_and_mmcs(rows, out_dir)
    compute_fit = plot_loss_vs_compute(rows, out_dir)
    evaluated = plot_evals(rows, out_dir)

    done = [r for r in rows if _finished(r)]
    counts = {s: sum(r.get("status") == s for r in rows)
              for s in (results.DONE, results.PARTIAL, results.FAILED, results.PENDING)}
    state = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    fit_header = ["| sparsity level | points | c | a | b | rms log residual |",
                  "|---|---|---|---|---|---|"]
    lines = [
        f"# Scaling sweep: {os.path.basename(paths.absolute(workdir).rstrip('/'))}", "",
        f"{len(rows)} points: {state}. Table: `{results.TABLE}`; redraw with "
        f"`python -m saejax.plots {workdir}` "
        f"({datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}).",
    ]
    if len(done) < len(rows):
        lines += ["", "**Partial results**: unfinished points are drawn hollow from their last "
                      "logged training step; fits use finished points only."]
    lines += ["", "## Loss against dictionary size", "",
              "![Loss against dictionary size](plots/loss_vs_latents.png)", "",
              "L(N) = c + a N^-b (Gao et al. 2024) per sparsity level, fitted to the finished "
              "points by least squares on log FVU; ± one standard error (from the fit's "
              "Jacobian). N counts latents."]
    if size_fits:
        lines += ["", *fit_header, *(_fit_row(k, f) for k, f in size_fits.items())]
    else:
        lines += ["", f"(No fit: no sparsity level has {MIN_FIT_POINTS} finished sizes yet.)"]
    lines += ["", "## Sparsity-fidelity frontier", "",
              "![FVU against L0](plots/sparsity_fidelity.png)", "",
              "## Dead latents and feature recovery", "",
              "![Dead fraction and MMCS against dictionary size](plots/dead_and_mmcs.png)", "",
              "## Loss against training compute", "",
              "![FVU against training FLOPs](plots/loss_vs_compute.png)", ""]
    if compute_fit is not None:
        lines += ["L(C) = c + a C^-b fitted to the compute frontier (C in FLOPs):", "",
                  *fit_header, _fit_row("frontier", compute_fit), ""]
    lines += ["## Points", "",
              "| point | status | n_latents | sparsity level | FVU | L0 | dead | MMCS | "
              "train FLOPs | run wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r.get('status')} | {r['n_latents']} | "
            f"{r['sparsity_level']:.3g} | {_number(r.get('fvu'), '.4f')} | "
            f"{_number(r.get('l0'), '.2f')} | {_number(r.get('dead_fraction'), '.3f')} | "
            f"{_number(r.get('mmcs'), '.4f')} | {_number(r.get('train_flops'), '.3g')} | "
            f"{_number(r.get('wall_seconds'), '.0f')} |")
    lines += ["", "Run wall s: the wall time of the run that trained the point (shared by the "
                  "points of a group), compilation and evaluation included."]
    if evaluated:
        lines += _evals_section(rows)
    names = sorted({r["sparsity_level_name"] for r in rows})
    if names:
        lines += ["", "Sparsity level (held fixed along a curve of the first figure): "
                  + "; ".join(f"{short_level_name(n)} = {n}" for n in names)
                  + ". The L1 term of relu and gated is a mean over latents, so "
                    "l1_coefficient / expansion_factor is the coefficient that stays "
                    "comparable across dictionary sizes."]
    lines += ratings.sweep_report_lines(workdir, [r["name"] for r in rows])
    path = paths.join(workdir, REPORT)
    paths.write_text(path, "\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------
# Command line (saejax/cli.py).
# ------------------------------------------------------------------------------------------
def _define_flags() -> None:
    flags.DEFINE_bool("collect", True, "Re-collect the table from the sweep's run folders "
                      "first; --nocollect plots results.csv as it is.")


def main(argv: Sequence[str]) -> None:
    (path,) = cli.positional(argv, 1, "python -m saejax.plots DIR [--nocollect] (DIR: a "
                                      "sweep's workdir, or a results.csv)")
    rows, workdir = results.load_rows(path, collect_runs=flags.FLAGS.collect)
    print(f"Report: {write_report(workdir, rows)}")


if __name__ == "__main__":
    cli.run(main, _define_flags)
