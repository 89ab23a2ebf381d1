"""A sweep's points: the override dicts of an experiment's `get_sweep()` (`load_sweep`), the
`Point` each makes of the config (`expand`, named by its overrides), the setting that holds
sparsity fixed across dictionary sizes (`sparsity_level`) and the config values the results
table reports of a point before it trains (`describe`). Training them is `sweep.py`'s, which
re-exports every name here.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from typing import Any, NamedTuple, Sequence

import ml_collections

from saejax import configs, sae, validation
from saejax.errors import ConfigError
from saejax.workdir import run_name


class Point(NamedTuple):
    """One setting of the sweep: its readable name, overrides and resolved config."""

    name: str
    overrides: dict[str, Any]
    config: ml_collections.ConfigDict


def load_sweep(config_file: str) -> list[dict[str, Any]]:
    """The override dicts of `path.py[:arg]`'s `get_sweep(arg)` (or `get_sweep()`)."""
    path, _, arg = config_file.partition(":")
    spec = importlib.util.spec_from_file_location("saejax_sweep_config", path)
    if spec is None or not os.path.exists(path):
        raise ConfigError(f"--config={config_file}: no config file at {path!r}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"{path} has no get_sweep(); declare the sweep next to its config "
                          f"as a function returning a list of override dicts.")
    takes_arg = bool(inspect.signature(module.get_sweep).parameters)
    if arg and not takes_arg:
        raise ConfigError(f"{path}: get_sweep() takes no argument, so {arg!r} cannot shrink "
                          f"the sweep; add `get_sweep(arg=None)`.")
    return list(module.get_sweep(arg or None) if takes_arg else module.get_sweep())


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with a sweep point's dotted-key overrides (configs.apply_overrides)."""
    return configs.apply_overrides(config, overrides, source="The sweep")


def expand(config: ml_collections.ConfigDict, sweep: Sequence[dict[str, Any]]) -> list[Point]:
    """The sweep's points: `config` with each override dict applied, named by its overrides."""
    if (tuple(config.group.sparsity_coefficients) or tuple(config.group.member_workdirs)
            or str(config.group.hooks)):
        raise ConfigError("A sweep groups its points itself: leave group.sparsity_coefficients, "
                          "group.hooks and group.member_workdirs empty and sweep the sparsity "
                          "coefficient instead (a hook group is one run: python -m "
                          "saejax.main with group.hooks).")
    points, seen = [], {}
    for overrides in sweep:
        overrides = dict(overrides)
        if ({"group.sparsity_coefficients", "group.member_workdirs", "group.hooks"}
                & set(overrides)):
            raise ConfigError("A sweep point may not set group.sparsity_coefficients, "
                              "group.hooks or group.member_workdirs; the sweep groups points "
                              "that differ only in that coefficient.")
        name = run_name(overrides)
        if name in seen:
            raise ConfigError(f"Two sweep points are both named {name!r} ({seen[name]} and "
                              f"{overrides}); each point needs distinct overrides.")
        seen[name] = overrides
        points.append(Point(name, overrides, apply_overrides(config, overrides)))
    return points


def sparsity_level(config) -> tuple[str, float]:
    """The setting that holds sparsity fixed across dictionary sizes, and its name.

    The architecture's `level_field` (TopK's k) when it has no sparsity coefficient; the
    coefficient divided by the expansion factor when its sparsity term is a mean over latents
    (relu's and gated's L1: the penalty per latent falls as 1/n_latents, so coefficient /
    expansion_factor stays comparable across dictionary sizes); otherwise the coefficient.
    """
    architecture = sae.get(config.sae.architecture)
    name = architecture.sparsity_coefficient
    if name is None:
        return architecture.level_field, float(config.sae[architecture.level_field])
    value = float(config.sae[name])
    if architecture.sparsity_mean_over_latents:
        return f"{name} / expansion_factor", value / float(config.sae.expansion_factor)
    return name, value


def describe(point: Point) -> dict[str, Any]:
    """The config values of a point that the results table reports (known before training)."""
    config = point.config
    architecture = sae.from_config(config.sae)
    d, n_latents = int(config.data.d), validation.n_latents(config)
    level_name, level = sparsity_level(config)
    row = {"name": point.name, "architecture": architecture.name,
           "shape": architecture.shape.name, "d": d,
           "n_latents": n_latents, "expansion_factor": int(config.sae.expansion_factor),
           "sparsity_level_name": level_name, "sparsity_level": level}
    if architecture.sparsity_coefficient:
        row[architecture.sparsity_coefficient] = float(config.sae[architecture.sparsity_coefficient])
    elif architecture.level_field:
        row[architecture.level_field] = config.sae[architecture.level_field]
    row.update({
        "n_features": (int(config.data.n_features) if config.data.source == "synthetic"
                       else None),
        "steps": int(config.train.steps),
        "batch_size": int(config.train.batch_size),
        # The architecture as trained (its shape and Matryoshka prefixes change the count).
        "flops_per_token": int(sae.from_config(config.sae).flops_per_token(d, n_latents,
                                                                           config.sae)),
        "overrides": point.overrides,
    })
    return row
