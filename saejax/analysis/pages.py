"""HTML from the Jinja2 templates in `saejax/analysis/templates/` (package data): the shared
layout (`base.html`, with its style and scripts inline, so a page fetches nothing), the pages
(`index.html`, `latent.html`) and the partials they are built from (`partials/`: shaded context
tokens and their legend, the bar chart, the examples table, the promoted/suppressed tokens).

Autoescaping is on: token text such as `<|endoftext|>` or `a & b` is escaped wherever it goes.
Another page (the review's) extends `latent.html` or `index.html` and fills their blocks; it is
rendered with `render(name, **context)` like these.
"""

from __future__ import annotations

import functools

import jinja2

from saejax.analysis import charts
from saejax.analysis.dashboard_data import IndexView, LatentView
from saejax.analysis.token_text import visible


def _percent(x: float) -> str:
    return f"{100 * x:.3g}%" if x > 0 else "0%"


@functools.cache
def environment() -> jinja2.Environment:
    """The templates' environment: autoescaped, undefined names an error, with the filters the
    templates use (`number`, `percent`, `signed`, `px`, `visible`)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("saejax.analysis", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
        lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(
        number=charts.number, percent=_percent, signed=lambda x: f"{x:+.3g}",
        px=lambda x: f"{x:.1f}", visible=visible)
    return env


def render(name: str, **context) -> str:
    """The template `name` (a path under templates/) rendered with `context`."""
    return environment().get_template(name).render(**context)


def latent_page(view: LatentView) -> str:
    return render("latent.html", view=view)


def index_page(view: IndexView, review=None) -> str:
    """The index; `review` (a ratings.ReviewSummary) adds the score and labels of the ratings."""
    return render("index.html", view=view, review=review)
