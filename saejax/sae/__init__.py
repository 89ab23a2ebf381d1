"""SAE architectures by name. Each built-in module defines one sparsity `MECHANISM`
(`base.Mechanism`), registered composed with the single-hook shape under its name
(`sae.architecture=topk`); `from_config` composes the named one with the shape `sae.shape`
picks (`shapes.py`: a transcoder) and the nested prefixes `sae.matryoshka_widths` adds
(`matryoshka.py`), so a (mechanism, shape) pair has no file of its own.
`register` adds another architecture (a file of its own, or a test's) without any other file
knowing it."""

from __future__ import annotations

from saejax.errors import ConfigError
# crosscoder.py and clt.py register their shapes with `shapes` when imported.
from saejax.sae import (base, batchtopk, clt, crosscoder, gated, jumprelu,  # noqa: F401
                        matryoshka, relu, shapes, switch, topk)
from saejax.sae.base import Architecture, ConfigField, Mechanism, compose

ARCHITECTURES: dict[str, Architecture] = {}


def register(architecture: Architecture, *, replace: bool = False) -> Architecture:
    """Adds `architecture` to the registry under its name (`sae.architecture=<name>`).

    Its config fields join `config.sae` in every `configs.base_config()` built afterwards; a
    field another architecture declares too must have the same default. With `replace`, an
    architecture of the same name is replaced (a test's variant of a built-in one).
    """
    if architecture.name in ARCHITECTURES and not replace:
        raise ValueError(f"an architecture named {architecture.name!r} is already registered; "
                         "pass replace=True to replace it.")
    if not (architecture.sparsity_coefficient or architecture.level_field):
        raise ValueError(f"architecture {architecture.name!r} names neither a "
                         "sparsity_coefficient nor a level_field: one sets its sparsity.")
    for name, field in architecture.config_fields.items():
        for other in ARCHITECTURES.values():
            theirs = other.config_fields.get(name)
            if other.name != architecture.name and theirs is not None and (
                    theirs.default != field.default):
                raise ValueError(f"sae.{name}: {architecture.name!r} declares default "
                                 f"{field.default!r}, {other.name!r} {theirs.default!r}; a "
                                 "shared field has one default.")
    ARCHITECTURES[architecture.name] = architecture
    return architecture


def unregister(name: str) -> None:
    """Removes an architecture `register` added (a test cleaning up after itself)."""
    ARCHITECTURES.pop(name, None)


for _module in (relu, topk, batchtopk, jumprelu, gated, switch):
    register(compose(_module.MECHANISM, shapes.SINGLE_HOOK))


def get(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"sae.architecture={name!r} is not known; choose one of "
                       f"{sorted(ARCHITECTURES)}.") from None


def from_config(sae_config) -> Architecture:
    """The architecture `sae.architecture` names with the shape `sae.shape` picks: the
    registered one itself for the default `single_hook`, else its mechanism composed with the
    shape. ConfigError when either is unknown or the pair cannot be composed. With
    `sae.matryoshka_widths`, the shape is wrapped in those nested prefixes."""
    try:
        architecture = get(sae_config.architecture)
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    widths = tuple(sae_config.get(matryoshka.FIELD, ()) or ())
    if (sae_config.get("shape", shapes.SINGLE_HOOK.name) == shapes.SINGLE_HOOK.name
            and not widths):
        return architecture  # as registered (an architecture written whole keeps its shape)
    shape = shapes.from_config(sae_config)
    if architecture.mechanism is None:
        what = (f"sae.{matryoshka.FIELD}={widths}" if widths else f"sae.shape={shape.name!r}")
        raise ConfigError(f"sae.architecture={architecture.name!r} is written for the "
                          f"{architecture.shape.name} shape only (no mechanism to compose with "
                          f"{what}).")
    if widths:
        weights = tuple(sae_config.get(matryoshka.WEIGHTS, ()) or ())
        return matryoshka.compose(architecture.mechanism,
                                  matryoshka.Matryoshka(shape, widths, weights=weights))
    return compose(architecture.mechanism, shape)


def config_fields() -> dict[str, ConfigField]:
    """Every registered architecture's `config.sae` fields, each once."""
    fields: dict[str, ConfigField] = {}
    for architecture in ARCHITECTURES.values():
        for name, field in architecture.config_fields.items():
            fields.setdefault(name, field)
    return fields


def owners(field: str) -> list[str]:
    """The registered architectures that read `sae.<field>`."""
    return [a.name for a in ARCHITECTURES.values() if field in a.config_fields]


def saelens_importer(saelens_architecture: str) -> Architecture | None:
    """The registered architecture that reads SAELens' `saelens_architecture`, if any."""
    for architecture in ARCHITECTURES.values():
        if architecture.saelens and saelens_architecture in architecture.saelens.imports:
            return architecture
    return None
