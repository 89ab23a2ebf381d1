"""What the dashboard's pages show, assembled from the top activations: which latents, each
latent's page (`LatentView`: its figures, top contexts as shaded tokens, histogram, the output
tokens its decoder direction promotes and suppresses) and the index (`IndexView`). Plain data,
no HTML: `pages.py` renders it, and other pages (the review's) can render the same views."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saejax.analysis import charts, kinds, loading
from saejax.analysis.loading import AnalysisError, LoadedSAE
from saejax.analysis.token_text import TokenText
from saejax.analysis.top_results import TopActivations

N_PROMOTED = 10
SNIPPET_BEFORE, SNIPPET_AFTER = 6, 1   # the index's snippet of each latent's top example


# ------------------------------------------------------------------------------------------
# Which latents, and what their decoder directions promote.
# ------------------------------------------------------------------------------------------
def parse_latents(spec: str | Sequence[int] | None, n_latents: int) -> list[int]:
    """`all`, `N` (the first N latents: the order is arbitrary, so a fair sample), or a list of
    indices and ranges `3,17,40:48` (one latent: `5,` or `5:6`)."""
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "all")):
        return list(range(n_latents))
    if not isinstance(spec, str):
        chosen = [int(i) for i in spec]
    elif "," not in spec and ":" not in spec:
        try:
            count = int(spec)
        except ValueError:
            raise AnalysisError(f"--latents={spec!r}: use all, a count N, or indices and ranges "
                                "like 3,17,40:48.") from None
        if count <= 0:
            raise AnalysisError(f"--latents={count}: the count must be positive.")
        return list(range(min(count, n_latents)))
    else:
        chosen = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            try:
                if ":" in part:
                    lo, hi = part.split(":")
                    chosen.extend(range(int(lo or 0), int(hi) if hi else n_latents))
                else:
                    chosen.append(int(part))
            except ValueError:
                raise AnalysisError(f"--latents: {part!r} is not an index or a range "
                                    "a:b.") from None
    bad = [i for i in chosen if not 0 <= i < n_latents]
    if bad:
        raise AnalysisError(f"--latents: latent {bad[0]} is out of range: the SAE has latents "
                            f"0..{n_latents - 1}.")
    return sorted(set(chosen))


def promoted_tokens(loaded: LoadedSAE, unembedding: np.ndarray, latents: Sequence[int], *,
                    k: int = N_PROMOTED, block: int = 256):
    """For each latent, the k tokens whose logits its decoder direction raises most and the k it
    lowers most: d_i @ W_U, W_U [d, vocab], d_i the direction it writes in raw units
    (`kinds.logit_directions`: an SAE's or transcoder's W_dec[i] / input scale, a crosscoder's
    last hook's slice, a CLT latent's writes summed). This is the logit-lens approximation: the
    final LayerNorm (its centring and scale) is ignored.

    Returns (up_ids, up_values, down_ids, down_values), each [len(latents), k].
    """
    loading.check_width(loaded, unembedding.shape[0], "the model's unembedding",
                        "Pass the checkpoint the SAE was trained on (--checkpoint).")
    W_U = jnp.asarray(unembedding, jnp.float32)
    k = min(k, W_U.shape[1])

    @jax.jit
    def extremes(rows):
        logits = rows @ W_U
        up, up_ids = jax.lax.top_k(logits, k)
        down, down_ids = jax.lax.top_k(-logits, k)
        return up_ids, up, down_ids, -down

    latents = np.asarray(latents, np.int64)
    outs = []
    for start in range(0, len(latents), block):
        chunk = latents[start:start + block]
        directions = kinds.logit_directions(loaded, chunk)
        rows = np.zeros((block, directions.shape[1]), np.float32)  # one shape, one compile
        rows[:len(chunk)] = directions
        outs.append([np.asarray(a)[:len(chunk)] for a in extremes(rows)])
    if not outs:
        return tuple(np.zeros((0, k)) for _ in range(4))
    return tuple(np.concatenate(parts) for parts in zip(*outs))


# ------------------------------------------------------------------------------------------
# The views.
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Token:
    text: str
    activation: float
    shade: float        # 0..1: the activation over the page's shading scale, clipped
    is_example: bool    # the token this example is about (boxed on the page)


@dataclasses.dataclass
class Example:
    activation: float
    row: int            # in the store
    sequence: int
    position: int
    tokens: list[Token]


@dataclasses.dataclass
class LogitTokens:
    """The output tokens one unit of the latent raises and lowers most (logit change each)."""

    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]


@dataclasses.dataclass
class LatentView:
    latent: int
    previous: int | None            # the neighbouring pages, for the navigation links
    next: int | None
    density: float
    fired: int
    n_rows: int
    mean_activation: float
    max_activation: float           # also the shading scale of its contexts
    sae: str                        # which SAE, where it reads and over which store
    hook: str
    store: str
    examples: list[Example]
    histogram: charts.BarChart | None
    logit_tokens: LogitTokens | None
    where: str = ""                 # a CLT latent's layer and index within it
    logit_note: str = ""            # which direction the logit view reads


@dataclasses.dataclass
class IndexRow:
    rank: int
    latent: int
    density: float
    mean_activation: float
    max_activation: float
    snippet: list[Token]            # around its top example; empty if it never fired
    promotes: list[str]


@dataclasses.dataclass
class IndexView:
    sae: str
    hook: str
    store: str
    n_rows: int
    n_dead: int
    density_histogram: charts.BarChart
    rows: list[IndexRow]            # by density, densest first


def context_tokens(token_text: TokenText, token_ids: Sequence[int],
                   activations: Sequence[float], example_index: int,
                   scale: float) -> list[Token]:
    """A context window as tokens shaded by the latent's activation over `scale`."""
    return [Token(text=token_text(t), activation=float(a),
                  shade=0.0 if scale <= 0 else min(max(float(a) / scale, 0.0), 1.0),
                  is_example=j == example_index)
            for j, (t, a) in enumerate(zip(token_ids, activations))]


def _provenance(top: TopActivations, loaded: LoadedSAE) -> dict[str, str]:
    return {"sae": loading.describe(loaded), "hook": str(top.info.get("hook") or loaded.hook
                                                         or "?"),
            "store": str(top.info["store"])}


def latent_view(top: TopActivations, latent: int, *, loaded: LoadedSAE, token_text: TokenText,
                promoted: tuple | None = None, previous: int | None = None,
                next: int | None = None) -> LatentView:  # pylint: disable=redefined-builtin
    """One latent's page. `promoted`: its (up_ids, up, down_ids, down) from `promoted_tokens`;
    None when there is no unembedding to read them from."""
    peak = float(top.max_activation[latent])
    kind = kinds.kind_of(loaded)
    examples = [
        Example(activation=e["activation"], row=e["row"], sequence=e["sequence"],
                position=e["position"],
                tokens=context_tokens(token_text, e["context_token_ids"],
                                      e["context_activations"], e["token_index"], peak))
        for e in top.examples(latent)]
    logit_tokens = None
    if promoted is not None:
        up_ids, up, down_ids, down = promoted
        logit_tokens = LogitTokens(
            promoted=[(token_text(t), float(v)) for t, v in zip(up_ids, up)],
            suppressed=[(token_text(t), float(v)) for t, v in zip(down_ids, down)])
    return LatentView(
        latent=int(latent), previous=previous, next=next,
        density=float(top.density[latent]), fired=int(top.fired[latent]), n_rows=top.n_rows,
        mean_activation=float(top.mean_activation[latent]), max_activation=peak,
        **_provenance(top, loaded), examples=examples,
        histogram=charts.activation_histogram(top.histogram[latent],
                                              float(top.histogram_max[latent])),
        logit_tokens=logit_tokens, where=kinds.describe_latent(kind, latent),
        logit_note=kinds.logit_note(kind))


def index_view(top: TopActivations, latents: Sequence[int], *, loaded: LoadedSAE,
               token_text: TokenText, promotes: dict[int, list[str]] | None = None
               ) -> IndexView:
    """The index of `latents`, densest first; `promotes`: a few promoted tokens per latent."""
    latents = list(latents)
    density = top.density
    rows = []
    for rank, i in enumerate(sorted(latents, key=lambda i: (-density[i], i)), 1):
        snippet = []
        examples = top.examples(i)
        if examples:
            e = examples[0]
            lo = max(0, e["token_index"] - SNIPPET_BEFORE)
            hi = e["token_index"] + SNIPPET_AFTER + 1
            snippet = context_tokens(token_text, e["context_token_ids"][lo:hi],
                                     e["context_activations"][lo:hi], e["token_index"] - lo,
                                     float(top.max_activation[i]))
        rows.append(IndexRow(rank=rank, latent=i, density=float(density[i]),
                             mean_activation=float(top.mean_activation[i]),
                             max_activation=float(top.max_activation[i]), snippet=snippet,
                             promotes=(promotes or {}).get(i, [])))
    return IndexView(
        **_provenance(top, loaded), n_rows=top.n_rows,
        n_dead=int(np.sum(top.fired[latents] == 0)) if latents else 0,
        density_histogram=charts.density_histogram(density[latents] if latents
                                                   else np.zeros(0)),
        rows=rows)
