"""A synthetic hierarchy of features (`data.source="synthetic_hierarchy"`): parents and their
children, where a child fires only with its parent, the ground truth on which plain SAEs absorb
a parent into its children (Chanin et al. 2024, "A is for Absorption"; the toy models of
Bussmann et al. 2025 and Nabeshima 2024).

`data.hierarchy_parents` parent features, each with `data.hierarchy_children` children; all
have random unit directions in `data.d` dimensions (parents first, then each parent's children
in turn). Each parent fires independently; when it fires, one of its children, chosen
uniformly, fires with it with probability `data.hierarchy_child_probability`. Parent
probabilities are set so that a sample has `data.features_per_sample` active features on
average. Every active feature has magnitude U[1 - s, 1 + s) with s =
`data.hierarchy_magnitude_spread`. x = codes @ features, no noise.

An SAE that absorbs learns, for each child, a latent pointing at parent + child that fires in
the parent's place; the parent's own latent then stays silent whenever a child is active.
`saejax.evals.absorption` measures that with the `parents` this source exposes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from saejax.data.synthetic import SyntheticSource
from saejax.errors import ConfigError


class Hierarchy(NamedTuple):
    features: np.ndarray   # [n_features, d] unit rows: parents, then each parent's children
    parents: np.ndarray    # [n_features] int32: a child's parent (a row index), -1 for a parent


def n_features(data_config) -> int:
    return int(data_config.hierarchy_parents) * (1 + int(data_config.hierarchy_children))


def parent_probability(data_config) -> float:
    """Each parent's firing probability: features_per_sample = parents x p x (1 + q)."""
    q = float(data_config.hierarchy_child_probability)
    return float(data_config.features_per_sample) / (int(data_config.hierarchy_parents) * (1 + q))


def validate(data_config) -> None:
    """ConfigError naming the `data.hierarchy_*` field that cannot work."""
    for field in ("hierarchy_parents", "hierarchy_children"):
        value = data_config[field]
        if not (int(value) == value and value >= 1):
            raise ConfigError(f"data.{field}={value!r} must be a positive integer.")
    q = data_config.hierarchy_child_probability
    if not 0 < q <= 1:
        raise ConfigError(f"data.hierarchy_child_probability={q!r} must be in (0, 1]: the "
                          f"probability that a firing parent has one child firing with it.")
    spread = data_config.hierarchy_magnitude_spread
    if not 0 <= spread < 1:
        raise ConfigError(f"data.hierarchy_magnitude_spread={spread!r} must be in [0, 1): "
                          f"magnitudes are U[1 - spread, 1 + spread).")
    if data_config.get("hierarchy_orthogonal", False) and n_features(data_config) > int(
            data_config.d):
        raise ConfigError(f"data.hierarchy_orthogonal=True needs data.d={data_config.d} >= "
                          f"the {n_features(data_config)} features (data.hierarchy_parents x "
                          f"(1 + data.hierarchy_children)); raise data.d or set it False.")
    most = int(data_config.hierarchy_parents) * (1 + q)
    if not 0 < data_config.features_per_sample <= most:
        raise ConfigError(
            f"data.features_per_sample={data_config.features_per_sample} must be in (0, "
            f"{most:g}] (data.hierarchy_parents x (1 + data.hierarchy_child_probability): every "
            f"parent firing); lower it or add parents.")


def make_hierarchy(*, seed: int, d: int, n_parents: int, n_children: int,
                   orthogonal: bool = False) -> Hierarchy:
    rng = np.random.default_rng(seed)
    total = n_parents * (1 + n_children)
    features = rng.standard_normal((total, d))
    if orthogonal:  # the rows of a random orthonormal frame
        features = np.linalg.qr(features.T)[0].T
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    parents = np.concatenate([np.full((n_parents,), -1),
                              np.repeat(np.arange(n_parents), n_children)])
    return Hierarchy(features.astype(np.float32), parents.astype(np.int32))


def sample(features: jax.Array, key: jax.Array, batch_size: int, *, n_parents: int,
           n_children: int, parent_probability: float, child_probability: float,
           magnitude_spread: float) -> tuple[jax.Array, jax.Array]:
    """One batch: activations `[batch, d]` and their true codes `[batch, n_features]`."""
    k_parent, k_child, k_which, k_magnitude = jax.random.split(key, 4)
    parent_on = jax.random.uniform(k_parent, (batch_size, n_parents)) < parent_probability
    child_on = parent_on & (jax.random.uniform(k_child, (batch_size, n_parents))
                            < child_probability)
    which = jax.random.randint(k_which, (batch_size, n_parents), 0, n_children)
    children = jax.nn.one_hot(which, n_children, dtype=jnp.bool_) & child_on[..., None]
    active = jnp.concatenate([parent_on, children.reshape(batch_size, -1)], axis=-1)
    magnitude = jax.random.uniform(k_magnitude, active.shape, minval=1.0 - magnitude_spread,
                                   maxval=1.0 + magnitude_spread)
    codes = jnp.where(active, magnitude, 0.0)
    return codes @ features, codes


class SyntheticHierarchySource(SyntheticSource):
    """Batches `{activations: codes @ features}` of the hierarchy; `true_features` are every
    feature's direction, `parents` each feature's parent (-1 for a parent)."""

    def __init__(self, data_config, *, batch_size: int, mesh, rules):
        validate(data_config)
        super().__init__(data_config, batch_size=batch_size, mesh=mesh, rules=rules)
        self.parents = self.ground_truth.parents

    def _make_ground_truth(self, data_config) -> Hierarchy:
        return make_hierarchy(seed=int(data_config.seed), d=self.d,
                              n_parents=int(data_config.hierarchy_parents),
                              n_children=int(data_config.hierarchy_children),
                              orthogonal=bool(data_config.get("hierarchy_orthogonal", False)))

    def _sample(self, ground_truth, key):
        c = self.config
        return sample(ground_truth[0], key, self.batch_size,
                      n_parents=int(c.hierarchy_parents), n_children=int(c.hierarchy_children),
                      parent_probability=parent_probability(c),
                      child_probability=float(c.hierarchy_child_probability),
                      magnitude_spread=float(c.hierarchy_magnitude_spread))
