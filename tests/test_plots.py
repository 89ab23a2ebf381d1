"""Scaling-law fits recover known constants; the plots and report come from a table alone,
partial or not."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from saejax import plots, results as sweep


@pytest.mark.parametrize("c, a, b", [(0.02, 3.0, 0.6), (0.0, 5.0, 0.4), (0.1, 50.0, 1.0)])
def test_fit_recovers_known_constants_from_noisy_power_law(c, a, b):
    n = 256 * 2.0 ** np.arange(10)
    rng = np.random.default_rng(0)
    loss = (c + a * n ** -b) * np.exp(0.02 * rng.standard_normal(n.size))  # 2% noise
    fit = plots.fit_power_law(n, loss)
    assert fit.n_points == 10
    assert abs(fit.b - b) < max(3 * fit.b_err, 1e-3) and abs(fit.b - b) < 0.1 * b
    assert abs(fit.c - c) < max(3 * fit.c_err, 2e-3)
    assert abs(np.log(fit.a / a)) < 3 * fit.a_err / fit.a + 1e-3
    assert fit.rms_log_residual == pytest.approx(0.02, rel=0.5)
    # Exact data: exact constants, whatever the scale of N (latents or FLOPs).
    exact = plots.fit_power_law(n * 1e9, c + a * (n * 1e9) ** -b)
    np.testing.assert_allclose([exact.c, exact.a, exact.b], [c, a, b], rtol=1e-4, atol=1e-7)


def test_fit_standard_errors_are_calibrated():
    """Over many noisy draws the true exponent lies within 2 standard errors ~95% of the time."""
    rng = np.random.default_rng(1)
    n = 1024 * 2.0 ** np.arange(8)
    inside = []
    for _ in range(200):
        loss = (0.03 + 2.0 * n ** -0.5) * np.exp(0.03 * rng.standard_normal(n.size))
        fit = plots.fit_power_law(n, loss)
        inside.append(abs(fit.b - 0.5) < 2 * fit.b_err)
    assert 0.85 < np.mean(inside) <= 1.0


def test_fit_rejects_too_few_or_bad_points():
    with pytest.raises(ValueError, match="at least 4"):
        plots.fit_power_law([1, 2, 3], [3, 2, 1])
    with pytest.raises(ValueError, match="positive"):
        plots.fit_power_law([1, 2, 3, 4], [1, 0, 1, 1])


def test_compute_frontier():
    flops = [4, 1, 2, 8, 3]
    loss = [0.3, 0.9, 0.5, 0.1, 0.6]
    assert plots.compute_frontier(flops, loss).tolist() == [1, 2, 0, 3]


def _row(name, n_latents, level, status, **metrics):
    row = {"name": name, "status": status, "architecture": "relu", "d": 64,
           "n_latents": n_latents, "expansion_factor": n_latents // 64,
           "sparsity_level_name": "l1_coefficient / expansion_factor", "sparsity_level": level,
           "n_features": 128, "steps": 100, "flops_per_token": 10 * 64 * n_latents}
    if status != sweep.PENDING:
        fvu = 0.02 + 0.5 * level * n_latents ** -0.5
        row.update(fvu=fvu, mse=fvu / 64, l0=2 / level, dead_fraction=0.01 * n_latents / 64,
                   mmcs=min(1.0, n_latents / 128), train_flops=row["flops_per_token"] * 1e5,
                   step=100 if status == sweep.DONE else 40)
    return row


def test_plots_and_report_from_a_partial_table_alone(tmp_path):
    rows = [_row(f"x{e}_l{level}", 64 * e, level, sweep.DONE)
            for e in (1, 2, 4, 8, 16) for level in (0.5, 1.0)]
    rows += [_row("x32_l0.5", 64 * 32, 0.5, sweep.PARTIAL),
             _row("x32_l1", 64 * 32, 1.0, sweep.PENDING)]
    table = tmp_path / "results.csv"
    sweep.write_table(rows, str(table))

    # The README's command, given the table itself: no run folders needed.
    out = subprocess.run([sys.executable, "-m", "saejax.plots", str(table)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "XLA_FLAGS": ""})
    assert out.returncode == 0, out.stderr
    assert f"Report: {tmp_path / 'report.md'}" in out.stdout
    for name in plots.FIGURES:
        for ext in ("png", "svg"):
            assert (tmp_path / "plots" / f"{name}.{ext}").stat().st_size > 1000
    report = (tmp_path / "report.md").read_text()
    assert "10 done, 1 partial, 1 pending" in report and "**Partial results**" in report
    # Each L1 level has 5 finished sizes: both get a fitted exponent; the data has b = 0.5.
    fits = plots.plot_loss_vs_latents(sweep.read_table(str(table)), str(tmp_path / "plots"))
    assert len(fits) == 2
    for fit in fits.values():
        assert fit.b == pytest.approx(0.5, abs=1e-3) and fit.n_points == 5
    assert "| l1/x = 0.5 | 5 |" in report and "0.500 ± " in report
    assert "![Loss against dictionary size](plots/loss_vs_latents.png)" in report


def test_empty_table_still_draws(tmp_path):
    plots.write_report(str(tmp_path), [_row("x1_l1", 64, 1.0, sweep.PENDING)])
    assert (tmp_path / "plots" / "loss_vs_latents.png").exists()
    assert "1 pending" in (tmp_path / "report.md").read_text()
