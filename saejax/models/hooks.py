"""Hook names: `blocks.{layer}.{hook}` with TransformerLens's per-block names, and the one check
of a hook name against a model that every caller (forward, harvest, the `lm` source, analysis)
goes through, so the message and the list of valid names are the same everywhere."""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

_NAME = re.compile(r"blocks\.(\d+)\.([\w.]+)")


def hook_names(config) -> list[str]:
    """Every hook of `config`'s model, in the order the forward pass reaches them."""
    return [f"blocks.{i}.{hook}" for i in range(config.n_layers) for hook in config.block_hooks]


def hook_layer(name: str) -> int:
    """The block index of a hook name: `hook_layer("blocks.6.hook_resid_post") == 6`."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a hook name; hook names look like "
                         f"'blocks.<layer>.<hook>', e.g. 'blocks.6.hook_resid_post'.")
    return int(match.group(1))


def hook_error(config, name: str) -> str | None:
    """Why `name` is not a hook of `config`'s model (None when it is one)."""
    match = _NAME.fullmatch(str(name))
    if match is None:
        return (f"{name!r} is not a hook name; hook names look like 'blocks.<layer>.<hook>' with "
                f"<hook> one of {list(config.block_hooks)}.")
    layer, hook = int(match.group(1)), match.group(2)
    if hook not in config.block_hooks:
        return (f"{name!r}: this {config.model_type} model has no {hook!r}; its blocks have "
                f"{list(config.block_hooks)}.")
    if layer >= config.n_layers:
        return (f"{name!r}: this {config.model_type} model ({config.n_layers} layers) has "
                f"blocks.0 .. blocks.{config.n_layers - 1}.")
    return None


def check_hook(config, name: str, what: str = "hook", error=ValueError) -> str:
    """`name`, or `error` naming `what` (a flag or config field) and the fix."""
    message = hook_error(config, name)
    if message is not None:
        raise error(f"{what}: {message}")
    return name


def check_hooks(config, hooks: Sequence[str], interventions: Mapping[str, Any],
                stop_at_layer: int | None) -> None:
    """The hooks and interventions of one forward pass exist and are reached."""
    for kind, names in (("hooks", hooks), ("interventions", interventions)):
        for name in names:
            check_hook(config, name, f"unknown hook name in {kind}")
    if stop_at_layer is None:
        return
    if not 1 <= stop_at_layer <= config.n_layers:
        raise ValueError(f"stop_at_layer={stop_at_layer} must lie in [1, {config.n_layers}]: "
                         f"the forward pass runs blocks 0 .. stop_at_layer - 1.")
    late = [n for n in (*hooks, *interventions) if hook_layer(n) >= stop_at_layer]
    if late:
        raise ValueError(f"{late} lie at or after stop_at_layer={stop_at_layer} and would never be "
                         f"reached; raise stop_at_layer to {max(map(hook_layer, late)) + 1}.")
