"""SAE architectures by name. Each module defines one `ARCHITECTURE` (see `base.Architecture`)."""

from saejax.sae import relu, topk
from saejax.sae.base import Architecture

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (relu.ARCHITECTURE,
                                                              topk.ARCHITECTURE)}


def get(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"sae.architecture={name!r} is not known; choose one of "
                       f"{sorted(ARCHITECTURES)}.") from None
