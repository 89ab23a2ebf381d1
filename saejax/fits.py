"""Scaling-law fits of a sweep's results: L(N) = c + a N^-b (Gao et al. 2024) with standard
errors, by scipy's least squares, and the compute frontier. NumPy in, NumPy out."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from scipy import optimize

MIN_FIT_POINTS = 4  # three constants, and at least one residual for their uncertainty


class PowerLawFit(NamedTuple):
    """L(N) = c + a * N^(-b) (Gao et al. 2024), with one standard error on each constant."""

    c: float
    a: float
    b: float
    c_err: float
    a_err: float
    b_err: float
    n_points: int
    rms_log_residual: float  # root mean square of log(L) - log(fit)

    def __call__(self, n) -> np.ndarray:
        return self.c + self.a * np.power(np.asarray(n, float), -self.b)


def _start(t: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """(c, a, b) to start the fit from: for each b on a grid, (c, a) by linear least squares
    on the relative error (c + a u - L) / L, solved for every b at once from the 2x2 normal
    equations; the b with the smallest log residual."""
    b_grid = np.concatenate([np.linspace(0.005, 0.1, 20), np.linspace(0.1, 4.0, 400)])
    v = np.exp(-b_grid[:, None] * t[None, :]) / loss            # u / L, [grid, points]
    w = 1 / loss
    sww, swv, svv = np.sum(w * w), v @ w, np.sum(v * v, axis=1)
    sw, sv = np.sum(w), np.sum(v, axis=1)
    det = sww * svv - swv ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        c = (svv * sw - swv * sv) / det
        a = (sww * sv - swv * sw) / det
        a_only = sv / svv                                         # the fit with c = 0
        a = np.where(c < 0, a_only, a)
        c = np.maximum(c, 0.0)
        model = c[:, None] + a[:, None] * v * loss
        sse = np.sum((np.log(model) - np.log(loss)) ** 2, axis=1)
    sse = np.where((a > 0) & np.isfinite(sse), sse, np.inf)
    if not np.isfinite(sse.min()):
        raise ValueError("fit_power_law: the losses do not fall with n; no power law fits.")
    best = int(np.argmin(sse))
    return np.array([c[best], a[best], b_grid[best]])


def fit_power_law(n: Sequence[float], loss: Sequence[float]) -> PowerLawFit:
    """Least squares on log(loss) (the noise in a loss is relative), c >= 0, a > 0, by
    `scipy.optimize.curve_fit` (trust-region reflective, for the bounds). The standard errors
    come from its covariance, s^2 (J^T J)^-1 of the log residuals. N is scaled by its geometric
    mean while fitting, so the problem is well conditioned whether N counts latents (1e3) or
    FLOPs (1e15).
    """
    n, loss = np.asarray(n, np.float64), np.asarray(loss, np.float64)
    if n.shape != loss.shape or n.size < MIN_FIT_POINTS:
        raise ValueError(f"fit_power_law needs at least {MIN_FIT_POINTS} (n, loss) pairs, got "
                         f"{n.size}.")
    if np.any(n <= 0) or np.any(loss <= 0) or not np.all(np.isfinite(loss)):
        raise ValueError("fit_power_law needs positive n and positive, finite losses.")
    n0 = float(np.exp(np.mean(np.log(n))))
    t = np.log(n / n0)
    log_loss = np.log(loss)

    def log_model(t, c, a, b):
        return np.log(c + a * np.exp(-b * t))

    def jacobian(t, c, a, b):
        u = np.exp(-b * t)
        m = c + a * u
        return np.stack([1 / m, u / m, -a * u * t / m], axis=1)

    try:
        (c, a_scaled, b), covariance = optimize.curve_fit(
            log_model, t, log_loss, p0=_start(t, loss), jac=jacobian, method="trf",
            bounds=([0.0, 1e-300, -np.inf], [np.inf, np.inf, np.inf]), ftol=1e-14,
            xtol=1e-14, gtol=1e-14, max_nfev=10_000)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"fit_power_law: no power law fits ({e}).") from None
    sse = float(np.sum((log_model(t, c, a_scaled, b) - log_loss) ** 2))
    # Back to the unscaled a = a_scaled * n0^b, carrying b's uncertainty into a's.
    scale = n0 ** b
    to_raw = np.array([[1, 0, 0], [0, scale, a_scaled * scale * np.log(n0)], [0, 0, 1]])
    errors = np.sqrt(np.maximum(np.diag(to_raw @ covariance @ to_raw.T), 0.0))
    return PowerLawFit(c=float(c), a=float(a_scaled * scale), b=float(b),
                       c_err=float(errors[0]), a_err=float(errors[1]), b_err=float(errors[2]),
                       n_points=int(n.size), rms_log_residual=float(np.sqrt(sse / n.size)))


def compute_frontier(flops: Sequence[float], loss: Sequence[float]) -> np.ndarray:
    """Indices of the points no cheaper point beats: the lowest loss reached at each compute,
    in increasing compute."""
    order = np.argsort(np.asarray(flops, float), kind="stable")
    frontier, best = [], np.inf
    for i in order:
        if loss[i] < best:
            frontier.append(int(i))
            best = loss[i]
    return np.asarray(frontier, int)
