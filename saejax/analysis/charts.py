"""Bar charts as geometry for inline SVG: where each bar, tick and label goes, in pixels, so a
template (`templates/partials/chart.html`) only draws them. The dashboard's activation and
density histograms are built here; a page that shows another histogram builds a `BarChart`."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

ACTIVATION_COLOUR = "#f97316"   # the colour of the token shading, so the two read together
DENSITY_COLOUR = "#3b82f6"
DEAD_COLOUR = "#9ca3af"


@dataclasses.dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    fill: str
    tooltip: str                 # shown on hover
    label: str | None = None     # printed above the bar


@dataclasses.dataclass
class Tick:
    position: float              # x for the x axis, y for the y axis, in pixels
    label: str


@dataclasses.dataclass
class BarChart:
    width: int
    height: int
    left: float                  # the plot area: [left, left + plot_width] x [top, bottom]
    top: float
    plot_width: float
    plot_height: float
    bars: list[Bar]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    x_label: str
    y_label: str
    description: str             # for screen readers

    @property
    def bottom(self) -> float:
        return self.top + self.plot_height


def number(x: float) -> str:
    """A short label for a value: 3 significant digits, exponent notation outside [1e-3, 1e4)."""
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def nice_step(span: float, max_ticks: int = 6, *, integer: bool = False) -> float:
    """The smallest 1, 2 or 5 times a power of ten that cuts `span` into at most `max_ticks`."""
    if span <= 0:
        return 1.0
    exponent = math.floor(math.log10(span / max_ticks))
    for mantissa in (1, 2, 5, 10):
        step = mantissa * 10.0 ** exponent
        if span / step <= max_ticks:
            break
    return max(step, 1.0) if integer else step


def _count_axis(peak: int, top: float, plot_height: float) -> tuple[int, list[Tick]]:
    """A count axis from 0 to `peak` rounded up to a whole tick: (its top value, its ticks)."""
    step = int(nice_step(max(peak, 1), 4, integer=True))
    ceiling = -(-max(peak, 1) // step) * step
    return ceiling, [Tick(top + plot_height * (1 - v / ceiling), f"{v:,}")
                     for v in range(0, ceiling + 1, step)]


def activation_histogram(counts: Sequence[int], upper: float, *, width: int = 720,
                         height: int = 230) -> BarChart | None:
    """A latent's histogram of activations where it fires: `counts` in equal bins over
    [0, upper), drawn up to the last non-empty bin. None if it never fired."""
    counts = np.asarray(counts)
    nonzero = np.flatnonzero(counts)
    if not len(nonzero) or upper <= 0:
        return None
    shown = counts[:int(nonzero[-1]) + 1]
    bin_width = upper / len(counts)
    left, top, right, bottom = 64, 14, 16, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    bar_w = plot_w / len(shown)
    ceiling, y_ticks = _count_axis(int(shown.max()), top, plot_h)
    bars = []
    for j, count in enumerate(shown):
        h = plot_h * count / ceiling
        bars.append(Bar(x=left + j * bar_w, y=top + plot_h - h, width=max(bar_w - 1, 1),
                        height=h, fill=ACTIVATION_COLOUR,
                        tooltip=f"activation in [{number(j * bin_width)}, "
                                f"{number((j + 1) * bin_width)}): {int(count):,} tokens"))
    span = len(shown) * bin_width
    step = nice_step(span)
    x_ticks = [Tick(left + plot_w * t / span, number(float(t)))
               for t in np.arange(0, span * (1 + 1e-9), step)]
    return BarChart(width=width, height=height, left=left, top=top, plot_width=plot_w,
                    plot_height=plot_h, bars=bars, x_ticks=x_ticks, y_ticks=y_ticks,
                    x_label=f"activation when firing (bins of {number(bin_width)})",
                    y_label="tokens",
                    description=f"histogram of activations over {int(counts.sum()):,} tokens")


def density_histogram(density: np.ndarray, *, width: int = 720, height: int = 210) -> BarChart:
    """How many latents fire at each density, in half-decades of log10 density from 1e-8 to 1
    (rarer ones in the first); latents that never fired in a bar of their own."""
    density = np.asarray(density, np.float64)
    edges = np.arange(-8.0, 0.01, 0.5)
    alive = density[density > 0]
    log_density = np.clip(np.log10(alive), edges[0], edges[-1]) if len(alive) else alive
    counts = np.histogram(log_density, bins=edges)[0]
    dead = int(np.sum(density == 0))
    left, top, right, bottom = 64, 18, 16, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / (len(counts) + 1.5)   # the dead bar, a gap of half a bar, the densities
    ceiling, y_ticks = _count_axis(max(dead, int(counts.max())), top, plot_h)

    def bar(x, count, fill, tooltip):
        h = plot_h * count / ceiling
        return Bar(x=x, y=top + plot_h - h, width=slot - 2, height=h, fill=fill,
                   tooltip=tooltip, label=f"{count:,}" if count else None)

    bars = [bar(left, dead, DEAD_COLOUR, f"never fired: {dead:,} latents")]
    start = left + 1.5 * slot
    for j, count in enumerate(counts):
        lo, hi = edges[j], edges[j + 1]
        bars.append(bar(start + j * slot, int(count), DENSITY_COLOUR,
                        f"density in [{10 ** lo:.2g}, {10 ** hi:.2g}): {int(count):,} latents"))
    x_ticks = [Tick(left + (slot - 2) / 2, "never")]
    x_ticks += [Tick(start + 2 * j * slot, "1" if e == 0 else f"1e{e:g}")
                for j, e in enumerate(edges[::2])]
    return BarChart(width=width, height=height, left=left, top=top, plot_width=plot_w,
                    plot_height=plot_h, bars=bars, x_ticks=x_ticks, y_ticks=y_ticks,
                    x_label="density: fraction of tokens a latent fires on (log scale)",
                    y_label="latents",
                    description=f"histogram of the density of {len(density):,} latents")
