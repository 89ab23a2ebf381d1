"""SAE architectures by name. Each module defines one `ARCHITECTURE` (see `base.Architecture`)."""

from saejax.sae import batchtopk, gated, jumprelu, relu, switch, topk
from saejax.sae.base import Architecture

ARCHITECTURES: dict[str, Architecture] = {
    m.ARCHITECTURE.name: m.ARCHITECTURE for m in (relu, topk, batchtopk, jumprelu, gated, switch)}


def get(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"sae.architecture={name!r} is not known; choose one of "
                       f"{sorted(ARCHITECTURES)}.") from None
