"""The figures of a sweep's results table, each drawn into a folder as png and svg
(`FIGURES`, and `evals` when some point has evaluations): FVU against dictionary size with
L(N) = c + a N^-b fitted per sparsity level, the sparsity-fidelity frontier, dead fraction and
ground-truth recovery, the evaluations against size, and FVU against training compute with
its frontier's fit. Unfinished points are drawn hollow, fits use finished points only.
`plots.py` writes the report around them and is the command; it re-exports every name here.
"""

from __future__ import annotations

import io
from typing import Any, NamedTuple, Sequence

import matplotlib
from matplotlib import ticker
from matplotlib.figure import Figure
import numpy as np

from saejax import paths, results
from saejax.fits import MIN_FIT_POINTS, PowerLawFit, compute_frontier, fit_power_law

FIGURES = ("loss_vs_latents", "sparsity_fidelity", "dead_and_mmcs", "loss_vs_compute")


# ------------------------------------------------------------------------------------------
# The table's rows, as the plots see them.
# ------------------------------------------------------------------------------------------
class _Curve(NamedTuple):
    label: str
    color: Any
    marker: str
    rows: list[dict]


_MARKERS = "os^Dv<>P"  # one per architecture, in the order they appear


def _plotted(rows: Sequence[dict]) -> list[dict]:
    """Rows with metrics: finished points, and unfinished ones that logged a step."""
    return [r for r in rows if r.get("fvu") is not None and r.get("status") != results.PENDING]


def _finished(row: dict) -> bool:
    return row.get("status") == results.DONE


def _partial_note(rows: Sequence[dict]) -> str:
    done = sum(_finished(r) for r in rows)
    return "" if done == len(rows) else f" (partial: {done} of {len(rows)} points finished)"


def short_level_name(name: str) -> str:
    """'l1_coefficient / expansion_factor' -> 'l1/x', 'l0_coefficient' -> 'l0', 'k' -> 'k'."""
    return name.replace("_coefficient", "").replace(" / expansion_factor", "/x")


def _level_label(row: dict, several_architectures: bool) -> str:
    value = f"{short_level_name(row['sparsity_level_name'])} = {row['sparsity_level']:.3g}"
    return f"{row['architecture']}, {value}" if several_architectures else value


def _levels_title(rows: Sequence[dict]) -> str:
    """What the curves' sparsity levels are, for a legend title: 'l1/x = l1_coefficient /
    expansion_factor', or just 'sparsity level' when every level is named in full."""
    names = sorted({r["sparsity_level_name"] for r in rows})
    spelled = [f"{short_level_name(n)} = {n}" for n in names if short_level_name(n) != n]
    return "; ".join(spelled) if spelled else "sparsity level"


def _curves(rows: Sequence[dict], key: str) -> list[_Curve]:
    """Rows grouped into curves, by sparsity level ("level") or by dictionary size ("size"),
    and by architecture (one marker each)."""
    architectures = list(dict.fromkeys(r["architecture"] for r in rows))
    several = len(architectures) > 1
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        group = ((row["architecture"], row["sparsity_level_name"], row["sparsity_level"])
                 if key == "level" else (row["n_latents"], row["architecture"]))
        groups.setdefault(group, []).append(row)
    ordered = sorted(groups)
    colored = sorted({g[:-1] if key == "size" else g for g in ordered})
    cmap = matplotlib.colormaps["viridis" if key == "level" else "plasma"]
    curves = []
    for group in ordered:
        members = groups[group]
        i = colored.index(group[:-1] if key == "size" else group)
        color = cmap(0.9 * i / max(len(colored) - 1, 1))
        if key == "level":
            label = _level_label(members[0], several)
        else:
            label = f"{group[0]:,} latents" + (f" ({group[1]})" if several else "")
        marker = _MARKERS[architectures.index(members[0]["architecture"]) % len(_MARKERS)]
        curves.append(_Curve(label, color, marker, members))
    return curves


def _scatter(ax, xs, ys, rows, curve: _Curve, label=None):
    """A curve's points joined by a line: finished points filled, unfinished ones hollow."""
    done = np.array([_finished(r) for r in rows], bool)
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    ax.plot(xs, ys, "-", color=curve.color, lw=1.2, marker=curve.marker, markersize=5,
            markevery=[int(i) for i in np.flatnonzero(done)],
            label=label if label is not None else curve.label)
    ax.scatter(xs[~done], ys[~done], facecolors="none", edgecolors=curve.color,
               marker=curve.marker, s=28, zorder=3, linewidths=1.2)


def _latents_axis(ax) -> None:
    """Log2 axis of dictionary sizes, labelled 64, 128, ..., 1,024 rather than 2^6."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))


class _PlainLogFormatter(ticker.LogFormatter):
    """Labels the ticks matplotlib's log formatter would, as plain numbers: 0.2, not 2e-01."""

    def __call__(self, x, pos=None):
        return f"{x:g}" if super().__call__(x, pos) else ""


def _plain_log_axis(axis) -> None:
    axis.set_major_formatter(_PlainLogFormatter())
    axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _empty(ax, message="no results yet"):
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _save(fig: Figure, out_dir: str, name: str) -> list[str]:
    """Draws into memory and writes each file whole, so out_dir may be in a bucket."""
    written = []
    for ext, options in (("png", {"dpi": 150, "metadata": {"Software": None}}),
                         ("svg", {"metadata": {"Date": None}})):
        image = io.BytesIO()
        fig.savefig(image, format=ext, **options)
        written.append(paths.join(out_dir, f"{name}.{ext}"))
        paths.write_bytes(written[-1], image.getvalue())
    return written


def _partial_legend_note(ax, rows):
    if not all(_finished(r) for r in rows):
        ax.scatter([], [], facecolors="none", edgecolors="0.3", s=28,
                   label="hollow: unfinished (last logged step)")


def _finish(fig: Figure, ax, rows, plotted, out_dir: str, name: str, *, x: str, xlabel: str,
            title: str, legend_title: str) -> None:
    """The end of a one-panel figure of FVU (log y): the x axis ("latents": log2 sizes,
    "log", or "plain log": log with plain tick labels) and the legend when there are points,
    the labels, the title with what is unfinished, and the files."""
    if plotted:
        if x == "latents":
            _latents_axis(ax)
        else:
            ax.set_xscale("log")
        if x == "plain log":
            _plain_log_axis(ax.xaxis)
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis)
        _partial_legend_note(ax, plotted)
        ax.legend(fontsize=7.5, title=legend_title, title_fontsize=7.5)
    else:
        _empty(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("normalised MSE (FVU, fraction of variance unexplained)")
    ax.set_title(title + _partial_note(rows), fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    _save(fig, out_dir, name)


# ------------------------------------------------------------------------------------------
# The figures.
# ------------------------------------------------------------------------------------------
def plot_loss_vs_latents(rows: Sequence[dict], out_dir: str) -> dict[str, PowerLawFit]:
    """FVU against the number of latents, log-log, one curve per sparsity level, each with its
    fitted L(N) = c + a N^-b. Returns the fits by curve label."""
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    plotted = _plotted(rows)
    fits = {}
    for curve in _curves(plotted, "level"):
        members = sorted(curve.rows, key=lambda r: r["n_latents"])
        label = curve.label
        done = [r for r in members if _finished(r)]
        if len(done) >= MIN_FIT_POINTS:
            try:
                fit = fit_power_law([r["n_latents"] for r in done], [r["fvu"] for r in done])
            except ValueError:
                fit = None
            if fit is not None:
                fits[curve.label] = fit
                label += f": b = {fit.b:.2f} ± {fit.b_err:.2f}"
                grid = np.geomspace(min(r["n_latents"] for r in done),
                                    max(r["n_latents"] for r in done), 200)
                ax.plot(grid, fit(grid), "--", color=curve.color, lw=1.0)
        _scatter(ax, [r["n_latents"] for r in members], [r["fvu"] for r in members], members,
                 curve, label=label)
    _finish(fig, ax, rows, plotted, out_dir, "loss_vs_latents", x="latents",
            xlabel="number of latents N (dictionary size)",
            title="Loss against dictionary size",
            legend_title=_levels_title(plotted) + "\ndashed: L(N) = c + a N^-b")
    return fits


def plot_sparsity_fidelity(rows: Sequence[dict], out_dir: str) -> None:
    """FVU against L0, log-log, one curve per dictionary size: the sparsity-fidelity frontier."""
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    plotted = [r for r in _plotted(rows) if r.get("l0") is not None]
    for curve in _curves(plotted, "size"):
        members = sorted(curve.rows, key=lambda r: r["l0"])
        _scatter(ax, [r["l0"] for r in members], [r["fvu"] for r in members], members, curve)
    _finish(fig, ax, rows, plotted, out_dir, "sparsity_fidelity", x="plain log",
            xlabel="L0 (active latents per token)", title="Sparsity-fidelity frontier",
            legend_title="dictionary size")


# The ground-truth panels of dead_and_mmcs (those some row has): column, axis label.
GROUND_TRUTH_PANELS = (
    ("mmcs", "MMCS (mean over true features of the best cosine)"),
    ("mcc", "MCC (one-to-one Hungarian matching, |cosine|)"),
    ("classification/f1_score", "firing F1 against the best-matching feature"),
)
# The panels of evals.png and the columns of the report's evaluations table, where some row has
# them (`python -m saejax.evals`' results: "eval:<eval>/<metric>"); column, label.
EVAL_PANELS = (
    ("eval:core/ce_loss_score", "CE score (loss recovered)"),
    ("eval:core/kl_div_score", "KL score"),
    ("eval:core/explained_variance", "explained variance"),
    ("eval:core/cossim", "cosine of reconstruction to input"),
    ("eval:core/l2_ratio", "L2 ratio (reconstruction / input)"),
    ("eval:core/average_max_decoder_cosine_sim", "mean max decoder cosine to another latent"),
    ("eval:core/average_max_encoder_cosine_sim", "mean max encoder cosine to another latent"),
    ("eval:ground_truth/mcc", "MCC (ground truth)"),
)
EVAL_TABLE = (*(c for c, _ in EVAL_PANELS), "eval:core/l0", "eval:core/l1",
              "eval:core/frac_alive", "eval:ground_truth/uniqueness",
              "eval:ground_truth/f1_score")


def _metric_panels(panels: Sequence[tuple]) -> None:
    """Draws one panel per (axes, column, rows, ylabel): the column against dictionary size,
    one curve per sparsity level and architecture."""
    for ax, metric, metric_rows, ylabel in panels:
        for curve in _curves(metric_rows, "level"):
            members = sorted(curve.rows, key=lambda r: r["n_latents"])
            _scatter(ax, [r["n_latents"] for r in members], [r[metric] for r in members],
                     members, curve)
        if metric_rows:
            _latents_axis(ax)
            _partial_legend_note(ax, metric_rows)
            ax.legend(fontsize=7, title=_levels_title(metric_rows), title_fontsize=7)
        else:
            _empty(ax)
        ax.set_xlabel("number of latents N (dictionary size)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.25)


def plot_dead_and_mmcs(rows: Sequence[dict], out_dir: str) -> None:
    """Dead fraction, and when the data has known features MMCS, MCC and firing F1
    (GROUND_TRUTH_PANELS), against dictionary size."""
    plotted = _plotted(rows)
    recovered = [(metric, label, [r for r in plotted if r.get(metric) is not None])
                 for metric, label in GROUND_TRUTH_PANELS]
    recovered = [p for p in recovered if p[2]]
    fig = Figure(figsize=(6.5 + 4.5 * len(recovered), 4.6), layout="constrained")
    axes = fig.subplots(1, 1 + len(recovered), squeeze=False)[0]
    _metric_panels([(axes[0], "dead_fraction", plotted,
                          "dead fraction (latents silent over the dead window)"),
                         *((ax, m, r, label) for ax, (m, label, r) in zip(axes[1:], recovered))])
    n_features = {r.get("n_features") for r in plotted} - {None}
    if recovered and len(n_features) == 1:
        axes[1].axvline(n_features.pop(), color="0.3", ls=":", lw=1.2,
                        label="number of true features")
        axes[1].legend(fontsize=7, title=_levels_title(recovered[0][2]), title_fontsize=7)
    axes[0].set_ylim(bottom=0)
    fig.suptitle(("Dead latents and feature recovery" if recovered else "Dead latents")
                 + " against dictionary size" + _partial_note(rows), fontsize=10)
    _save(fig, out_dir, "dead_and_mmcs")


def plot_evals(rows: Sequence[dict], out_dir: str) -> bool:
    """The evaluations' metrics (EVAL_PANELS) against dictionary size, one panel each, into
    evals.png; nothing (False) when no row has any."""
    plotted = _plotted(rows)
    panels = [(m, label, [r for r in plotted if r.get(m) is not None]) for m, label in EVAL_PANELS]
    panels = [p for p in panels if p[2]]
    if not panels:
        return False
    ncols = min(len(panels), 3)
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.8 * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    _metric_panels([(ax, m, r, label) for ax, (m, label, r) in zip(axes, panels)])
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Evaluations (python -m saejax.evals) against dictionary size"
                 + _partial_note(rows), fontsize=10)
    _save(fig, out_dir, "evals")
    return True


def plot_loss_vs_compute(rows: Sequence[dict], out_dir: str) -> PowerLawFit | None:
    """FVU against training FLOPs, log-log, with the compute frontier (the best loss at each
    compute) and L(C) = c + a C^-b fitted to the frontier. Returns the fit."""
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    plotted = [r for r in _plotted(rows) if r.get("train_flops")]
    for curve in _curves(plotted, "level"):
        members = sorted(curve.rows, key=lambda r: r["train_flops"])
        done = np.array([_finished(r) for r in members], bool)
        xs = np.array([r["train_flops"] for r in members], float)
        ys = np.array([r["fvu"] for r in members], float)
        ax.scatter(xs[done], ys[done], color=curve.color, marker=curve.marker, s=28, zorder=3,
                   label=curve.label)
        ax.scatter(xs[~done], ys[~done], facecolors="none", edgecolors=curve.color,
                   marker=curve.marker, s=28, zorder=3)
    fit = None
    done_rows = [r for r in plotted if _finished(r)]
    if done_rows:
        flops = np.array([r["train_flops"] for r in done_rows], float)
        fvu = np.array([r["fvu"] for r in done_rows], float)
        frontier = compute_frontier(flops, fvu)
        ax.plot(flops[frontier], fvu[frontier], "-", color="black", lw=1.5,
                label="compute frontier (finished points)")
        if frontier.size >= MIN_FIT_POINTS:
            try:
                fit = fit_power_law(flops[frontier], fvu[frontier])
            except ValueError:
                fit = None
        if fit is not None:
            grid = np.geomspace(flops[frontier].min(), flops[frontier].max(), 200)
            ax.plot(grid, fit(grid), "--", color="black", lw=1.0,
                    label=f"frontier fit L(C) = c + a C^-b: b = {fit.b:.2f} ± {fit.b_err:.2f}")
    _finish(fig, ax, rows, plotted, out_dir, "loss_vs_compute", x="log",
            xlabel="training compute C (FLOPs)", title="Loss against training compute",
            legend_title=_levels_title(plotted))
    return fit
