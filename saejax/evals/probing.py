"""Linear probes and the scores every probing evaluation shares: a logistic regression fitted
in JAX (the objective of scikit-learn's `LogisticRegression`, L2 with `C`, unpenalised
intercept), the k latents whose mean differs most between the classes (SAEBench's selection
for sparse probing), SAEBench's balanced one-vs-rest sets, and the binary F1 and accuracy.

Used by sparse probing (`sparse_probing.py`), feature absorption (`first_letter.py`) and concept
coverage (`kpis.py`); each score is defined here once.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class LinearProbe(NamedTuple):
    """`logits = x @ weight.T + bias`: weight [d] (or [n_probes, d]), bias [] (or
    [n_probes])."""

    weight: jax.Array
    bias: jax.Array

    def logits(self, x) -> jax.Array:
        return jnp.asarray(x, jnp.float32) @ self.weight.T + self.bias


def fit_logistic(x, y, *, c: float = 1.0, balanced: bool = False,
                 max_iter: int = 500, tol: float = 1e-5, solver: str = "auto") -> LinearProbe:
    """A binary logistic regression: minimises `0.5 |w|^2 + c * sum_i s_i logloss_i` over
    (w, b), as scikit-learn's `LogisticRegression(C=c)` does (`balanced`: sample weights
    `n / (2 n_class)`, its `class_weight="balanced"`), with L-BFGS until the gradient's norm is
    below `tol` or `max_iter` steps, or (`solver="newton"`, the default up to
    `NEWTON_MAX_D` features: fast to compile, exact in a few steps) `NEWTON_STEPS` Newton
    steps.

    Args:
      x: `[n, d]` inputs. y: `[n]` labels in {0, 1}.
    """
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    if x.ndim != 2 or y.shape != x.shape[:1]:
        raise ValueError(f"fit_logistic: x must be [n, d] and y [n]; got {x.shape} and "
                         f"{y.shape}.")
    probes = fit_logistic_many(x[None], y[None], c=c, balanced=balanced, max_iter=max_iter,
                               tol=tol, solver=solver)
    return LinearProbe(probes.weight[0], probes.bias[0])


def fit_logistic_many(x, y, *, c: float = 1.0, balanced: bool = False,
                      max_iter: int = 500, tol: float = 1e-5, solver: str = "auto",
                      rows=None) -> LinearProbe:
    """`fit_logistic` of p problems at once (one compiled solve): x `[p, n, d]` (or `[n, d]`
    shared by all), y `[p, n]`, `rows` `[p, n]` bool the rows each problem has (default all;
    problems of different sizes padded to one shape); weight `[p, d]`, bias `[p]`."""
    y = jnp.asarray(y, jnp.float32)
    x = jnp.broadcast_to(jnp.asarray(x, jnp.float32), y.shape + (jnp.shape(x)[-1],))
    rows = jnp.ones_like(y) if rows is None else jnp.asarray(rows, jnp.float32)
    n = jnp.sum(rows, axis=1, keepdims=True)
    positives = jnp.sum(y * rows, axis=1, keepdims=True)
    weights = jnp.where(y > 0, n / (2 * jnp.maximum(positives, 1)),
                        n / (2 * jnp.maximum(n - positives, 1)))
    weights = rows * (weights if balanced else 1.0)
    if solver == "auto":
        solver = "newton" if x.shape[-1] <= NEWTON_MAX_D else "lbfgs"
    if solver == "newton":
        weight, bias = _newton(x, y, weights, jnp.float32(c))
    elif solver == "lbfgs":
        weight, bias = _lbfgs(x, y, weights, jnp.float32(c), max_iter, jnp.float32(tol))
    else:
        raise ValueError(f"solver={solver!r}: use 'auto', 'newton' or 'lbfgs'.")
    return LinearProbe(weight, bias)


NEWTON_MAX_D = 256  # features up to which "auto" solves by Newton's method
NEWTON_STEPS = 30


@jax.jit
def _newton(x, y, sample_weights, c):
    def one(x, y, s):
        n, d = x.shape
        xb = jnp.concatenate([x, jnp.ones((n, 1), x.dtype)], axis=1)
        penalty = jnp.append(jnp.ones(d), 0.0)            # the intercept is not penalised
        def step(_, w):
            p = jax.nn.sigmoid(xb @ w)
            grad = penalty * w + c * xb.T @ (s * (p - y))
            hessian = (jnp.diag(penalty + 1e-8)
                       + c * (xb.T * (s * p * (1 - p))) @ xb)
            return w - jnp.linalg.solve(hessian, grad)
        w = jax.lax.fori_loop(0, NEWTON_STEPS, step, jnp.zeros(d + 1, x.dtype))
        return w[:-1], w[-1]
    return jax.vmap(one)(x, y, sample_weights)


@functools.partial(jax.jit, static_argnums=(4,))
def _lbfgs(x, y, sample_weights, c, max_iter, tol):
    solve = lambda x, y, s: _lbfgs_one(x, y, s, c, max_iter, tol)
    return jax.vmap(solve)(x, y, sample_weights)


def _lbfgs_one(x, y, sample_weights, c, max_iter, tol):
    def objective(params):
        w, b = params
        z = x @ w + b
        return 0.5 * jnp.sum(w * w) + c * jnp.sum(sample_weights * (jax.nn.softplus(z) - y * z))

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)
    params = (jnp.zeros(x.shape[1], jnp.float32), jnp.zeros((), jnp.float32))

    def step(carry):
        params, state, i, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                       value_fn=objective)
        params = optax.apply_updates(params, updates)
        return params, state, i + 1, optax.tree.norm(grad)

    def running(carry):
        _, _, i, grad_norm = carry
        return (i < max_iter) & (grad_norm > tol)

    carry = (params, solver.init(params), jnp.int32(0), jnp.float32(jnp.inf))
    params, *_ = jax.lax.while_loop(running, step, carry)
    return params


def top_k_mean_difference(x, y, k: int) -> np.ndarray:
    """The k columns of `x` whose means over the positives and the negatives differ most (in
    absolute value), largest first: SAEBench's feature selection for sparse probing."""
    x, y = np.asarray(x, np.float32), np.asarray(y).astype(bool)
    if k > x.shape[1]:
        raise ValueError(f"k={k} is more than the {x.shape[1]} features to choose from.")
    difference = np.abs(x[y].mean(axis=0) - x[~y].mean(axis=0))
    return np.argsort(-difference, kind="stable")[:k]


def balanced_one_vs_rest(labels, positive, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """SAEBench's binary set for class `positive`: every positive row and as many negative
    rows, drawn evenly from each other class; returns (row indices, binary labels), shuffled."""
    labels = np.asarray(labels)
    positives = np.flatnonzero(labels == positive)
    others = [c for c in np.unique(labels) if c != positive]
    per_class = -(-len(positives) // max(len(others), 1))
    negatives = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                for c in others] or [np.zeros(0, np.int64)])
    negatives = rng.permutation(negatives)[:len(positives)]
    rows = np.concatenate([positives, negatives])
    binary = np.concatenate([np.ones(len(positives), bool), np.zeros(len(negatives), bool)])
    order = rng.permutation(len(rows))
    return rows[order], binary[order]


def accuracy(logits, y) -> float:
    """Fraction of rows where `logits > 0` agrees with the binary label."""
    return float(np.mean((np.asarray(logits) > 0) == np.asarray(y).astype(bool)))


def f1_scores(predicted, actual) -> np.ndarray:
    """Binary F1 of every predictor against every label, `2 tp / (2 tp + fp + fn)` (0 where
    neither predicts nor holds anything).

    Args:
      predicted: `[rows, n_predictors]` bool (a latent firing, a probe's positive logit).
      actual: `[rows, n_labels]` bool.
    Returns: `[n_predictors, n_labels]`.
    """
    predicted = np.asarray(predicted, np.float32)
    actual = np.asarray(actual, np.float32)
    tp = predicted.T @ actual
    denominator = predicted.sum(axis=0)[:, None] + actual.sum(axis=0)[None, :]
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def f1(predicted, actual) -> float:
    """Binary F1 of one predictor `[rows]` against one label `[rows]` (`f1_scores`)."""
    return float(f1_scores(np.asarray(predicted)[:, None], np.asarray(actual)[:, None])[0, 0])
