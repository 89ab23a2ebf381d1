"""Static HTML dashboards of a trained SAE's latents:

    python -m saejax.analysis.dashboard DIR [--latents=all|N|i,j,a:b] [--top_n=20]

DIR is a run's workdir (its config.json names the store, `data.path`, and the model,
`lm.checkpoint`) or a SAELens SAE directory (pass --store and --checkpoint, unless saejax
exported it and they are still where they were). The top
activations are computed in one pass over the store (`top_activations.py`) unless
`DIR/analysis/top_activations/` already holds them for the same SAE, store and settings. Writes
`DIR/dashboard/index.html` (latents sorted by density) and one page per latent: its top contexts
with the activating token highlighted, its activation histogram, and the output tokens its
decoder direction promotes most through the unembedding. Pages are self-contained: no scripts,
styles or fonts are fetched from anywhere.
"""

from __future__ import annotations

import html
import math
import os
import sys
from typing import Sequence

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from saejax import cli, models
from saejax.analysis import loading, top_activations
from saejax.analysis.loading import AnalysisError, LoadedSAE
from saejax.sharding import ConfigError

N_PROMOTED = 10
_ANALYSIS = os.path.join("analysis", "top_activations")


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
        raise AnalysisError(f"latent {bad[0]} is out of range: the SAE has latents "
                            f"0..{n_latents - 1}.")
    return sorted(set(chosen))


def promoted_tokens(loaded: LoadedSAE, unembedding: np.ndarray, latents: Sequence[int], *,
                    k: int = N_PROMOTED, block: int = 256):
    """For each latent, the k tokens whose logits its decoder direction raises most and the k it
    lowers most: (W_dec[i] / input_scale) @ W_U, W_U [d, vocab]. This is the logit-lens
    approximation: the final LayerNorm (its centring and scale) is ignored.

    Returns (up_ids, up_values, down_ids, down_values), each [len(latents), k].
    """
    loading.check_width(loaded, unembedding.shape[0], "the model's unembedding",
                        "Pass the checkpoint the SAE was trained on (--checkpoint).")
    directions = loaded.decoder_directions()
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
        rows = np.zeros((block, directions.shape[1]), np.float32)  # one shape, one compile
        rows[:len(chunk)] = directions[chunk]
        outs.append([np.asarray(a)[:len(chunk)] for a in extremes(rows)])
    if not outs:
        return tuple(np.zeros((0, k)) for _ in range(4))
    return tuple(np.concatenate(parts) for parts in zip(*outs))


# ------------------------------------------------------------------------------------------
# HTML.
# ------------------------------------------------------------------------------------------
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1100px;
padding:0 16px;color:#1d1d1f;background:#fff}
h1{font-size:26px;margin:8px 0}h2{font-size:18px;margin:24px 0 8px}
a{color:#0b57d0;text-decoration:none}a:hover{text-decoration:underline}
.meta{color:#555;margin:4px 0}.note{color:#777;font-size:13px}
nav{font-size:14px}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e4e4e4;vertical-align:top}
th{background:#f6f6f6;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.ctx{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;
line-height:1.9}
.tok{white-space:pre;border-radius:2px;padding:1px 0;border-right:1px solid #eee}
.tok.top{outline:2px solid #c2410c;font-weight:600}
ol.examples{padding-left:28px}ol.examples li{margin:2px 0}
.act{display:inline-block;min-width:64px;color:#555;font-size:12px;
font-variant-numeric:tabular-nums}
.where{color:#999;font-size:11px;margin-left:8px}
.cols{display:flex;gap:32px;flex-wrap:wrap}.cols>div{flex:1;min-width:280px}
input#filter{font-size:14px;padding:4px 8px;width:320px;margin:8px 0}
.up{color:#15803d}.down{color:#b91c1c}
"""

SCRIPT = """
(function(){
  var input=document.getElementById('filter');
  var rows=document.querySelectorAll('#latents tbody tr');
  input.addEventListener('input',function(){
    var q=input.value.toLowerCase();
    var shown=0;
    rows.forEach(function(r){
      var hit=!q||r.textContent.toLowerCase().indexOf(q)>=0;
      r.style.display=hit?'':'none';if(hit)shown++;
    });
    document.getElementById('shown').textContent=shown;
  });
  document.body.setAttribute('data-ready','1');
})();
"""


def _esc(text: str) -> str:
    return html.escape(text.replace("\n", "\u21b5").replace("\t", "\u21e5"), quote=True)


def _page(title: str, body: str, script: str = "") -> str:
    script = f"<script>{script}</script>" if script else ""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{STYLE}</style></head>\n"
            f"<body>\n{body}\n{script}</body></html>\n")


def _fmt(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def _percent(x: float) -> str:
    return f"{100 * x:.3g}%" if x > 0 else "0%"


def context_html(tokens: Sequence[str], activations: Sequence[float], token_index: int,
                 scale: float) -> str:
    """A context as token spans shaded by the latent's activation; the example's token boxed."""
    spans = []
    for j, (text, a) in enumerate(zip(tokens, activations)):
        alpha = 0.0 if scale <= 0 else min(max(a / scale, 0.0), 1.0)
        style = f' style="background:rgba(249,115,22,{alpha:.2f})"' if alpha > 0 else ""
        cls = "tok top" if j == token_index else "tok"
        spans.append(f'<span class="{cls}"{style} title="{_fmt(a)}">{_esc(text)}</span>')
    return "".join(spans)


def histogram_svg(counts: np.ndarray, upper: float, *, width: int = 640,
                  height: int = 180) -> str:
    """Inline SVG bars of a latent's activation histogram: equal bins over [0, upper)."""
    counts = np.asarray(counts)
    nonzero = np.flatnonzero(counts)
    if not len(nonzero) or upper <= 0:
        return '<p class="note">This latent never fired on the tokens read.</p>'
    shown = counts[:int(nonzero[-1]) + 1]
    bin_width = upper / len(counts)
    left, bottom, top, right = 48, 34, 12, 12
    plot_w, plot_h = width - left - right, height - top - bottom
    bar_w = plot_w / len(shown)
    peak = max(int(shown.max()), 1)
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             'role="img" aria-label="activation histogram">',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
             'stroke="#999"/>',
             f'<text x="{left - 6}" y="{top + 10}" font-size="11" text-anchor="end" '
             f'fill="#555">{peak}</text>',
             f'<text x="{left - 6}" y="{top + plot_h}" font-size="11" text-anchor="end" '
             'fill="#555">0</text>']
    for j, count in enumerate(shown):
        h = plot_h * count / peak
        label = f"[{_fmt(j * bin_width)}, {_fmt((j + 1) * bin_width)}): {int(count)}"
        parts.append(f'<rect x="{left + j * bar_w:.1f}" y="{top + plot_h - h:.1f}" '
                     f'width="{max(bar_w - 1, 1):.1f}" height="{h:.1f}" fill="#f97316">'
                     f"<title>{_esc(label)}</title></rect>")
    span = len(shown) * bin_width
    step = 10 ** math.floor(math.log10(span / 2))   # 2 to 10 ticks
    if span / step > 10:
        step *= 2
    for tick in np.arange(0, span * (1 + 1e-9), step):
        x = left + plot_w * tick / span
        parts.append(f'<line x1="{x:.1f}" y1="{top + plot_h}" x2="{x:.1f}" '
                     f'y2="{top + plot_h + 4}" stroke="#999"/>'
                     f'<text x="{x:.1f}" y="{top + plot_h + 16}" font-size="11" '
                     f'text-anchor="middle" fill="#555">{_fmt(float(tick))}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 2}" font-size="11" '
                 'text-anchor="middle" fill="#555">activation</text></svg>')
    return "".join(parts)


def _token_cell(ids, values, token_text, cls) -> str:
    return "".join(f'<tr><td class="ctx"><span class="tok">{_esc(token_text(t))}</span></td>'
                   f'<td class="num {cls}">{v:+.3g}</td></tr>' for t, v in zip(ids, values))


def latent_page(top: top_activations.TopActivations, latent: int, *, loaded: LoadedSAE,
                token_text, promoted: tuple | None, neighbours: tuple[int | None, int | None]
                ) -> str:
    density = float(top.density[latent])
    mean, peak = float(top.mean_activation[latent]), float(top.max_activation[latent])
    info = top.info
    prev_link = (f'<a href="{neighbours[0]}.html">&larr; latent {neighbours[0]}</a> · '
                 if neighbours[0] is not None else "")
    next_link = (f' · <a href="{neighbours[1]}.html">latent {neighbours[1]} &rarr;</a>'
                 if neighbours[1] is not None else "")
    body = [f'<nav>{prev_link}<a href="../index.html">all latents</a>{next_link}</nav>',
            f"<h1>Latent {latent}</h1>",
            f'<p class="meta">Fires on {_percent(density)} of {top.n_rows:,} tokens '
            f"({int(top.fired[latent]):,}) · mean activation when firing {_fmt(mean)} · "
            f"max {_fmt(peak)}</p>",
            f'<p class="note">{_esc(loading.describe(loaded))}, read at '
            f"{_esc(str(info.get('hook') or loaded.hook or '?'))} over {_esc(info['store'])}"
            "</p>",
            "<h2>Top activations</h2>"]
    examples = top.examples(latent)
    if examples:
        body.append('<ol class="examples">')
        for e in examples:
            texts = [token_text(t) for t in e["context_token_ids"]]
            context = context_html(texts, e["context_activations"], e["token_index"], peak)
            body.append(
                f'<li><span class="act">{_fmt(e["activation"])}</span>'
                f'<span class="ctx">{context}</span><span class="where">row {e["row"]} · '
                f'sequence {e["sequence"]}, position {e["position"]}</span></li>')
        body.append("</ol>")
    else:
        body.append('<p class="note">No token activated this latent.</p>')
    body.append("<h2>Activation histogram</h2>")
    body.append(histogram_svg(top.histogram[latent], float(top.histogram_max[latent])))
    body.append("<h2>Output tokens the decoder direction promotes</h2>")
    if promoted is None:
        body.append('<p class="note">No model checkpoint to read the unembedding from; pass '
                    "--checkpoint.</p>")
    else:
        up_ids, up, down_ids, down = promoted
        body.append('<p class="note">Logit change per unit of activation, W_dec[i] &middot; '
                    "W_U through the tied unembedding, ignoring the final LayerNorm (the "
                    "logit-lens approximation).</p>")
        body.append('<div class="cols"><div><table><thead><tr><th>promoted</th><th></th></tr>'
                    f"</thead><tbody>{_token_cell(up_ids, up, token_text, 'up')}</tbody></table>"
                    '</div><div><table><thead><tr><th>suppressed</th><th></th></tr></thead>'
                    f"<tbody>{_token_cell(down_ids, down, token_text, 'down')}</tbody></table>"
                    "</div></div>")
    return _page(f"Latent {latent} · saejax dashboard", "\n".join(body))


def density_histogram_svg(density: np.ndarray, *, width: int = 640, height: int = 150) -> str:
    """Latents per half-decade of log10 density; never-firing latents in their own bar."""
    edges = np.arange(-8.0, 0.01, 0.5)
    log_density = np.log10(np.maximum(density, 1e-30))
    dead = int(np.sum(density == 0))
    counts = np.histogram(log_density[density > 0], bins=edges)[0] if np.any(density > 0) \
        else np.zeros(len(edges) - 1, np.int64)
    bars = [("dead", dead)] + [(f"1e{e:g}", int(c)) for e, c in zip(edges[:-1], counts)]
    left, bottom, top = 40, 34, 12
    plot_w, plot_h = width - left - 12, height - top - bottom
    bar_w = plot_w / len(bars)
    peak = max(max(c for _, c in bars), 1)
    parts = [f'<svg width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="density histogram">']
    for j, (label, count) in enumerate(bars):
        h = plot_h * count / peak
        x = left + j * bar_w
        fill = "#9ca3af" if label == "dead" else "#3b82f6"
        parts.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w - 1:.1f}" '
                     f'height="{h:.1f}" fill="{fill}"><title>{label}: {count}</title></rect>')
        if j % 2 == 0:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 14}" font-size="10" '
                         f'text-anchor="middle" fill="#555">{label}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" font-size="11" '
                 'text-anchor="middle" fill="#555">latents per log10 density</text></svg>')
    return "".join(parts)


def index_page(top: top_activations.TopActivations, latents: Sequence[int], *,
               loaded: LoadedSAE, token_text, promoted: dict[int, list[str]] | None) -> str:
    density = top.density
    order = sorted(latents, key=lambda i: (-density[i], i))
    dead = int(np.sum(top.fired[list(latents)] == 0)) if len(latents) else 0
    info = top.info
    rows = []
    for rank, i in enumerate(order, 1):
        examples = top.examples(i)
        snippet = ""
        if examples:
            e = examples[0]
            lo = max(0, e["token_index"] - 6)
            texts = [token_text(t) for t in e["context_token_ids"][lo:e["token_index"] + 2]]
            snippet = context_html(texts, e["context_activations"][lo:e["token_index"] + 2],
                                   e["token_index"] - lo, float(top.max_activation[i]))
        tokens = " ".join(f'<span class="tok">{_esc(t)}</span>'
                          for t in (promoted or {}).get(i, []))
        rows.append(f'<tr><td class="num">{rank}</td><td><a href="latents/{i}.html">{i}</a></td>'
                    f'<td class="num">{_percent(float(density[i]))}</td>'
                    f'<td class="num">{_fmt(float(top.mean_activation[i]))}</td>'
                    f'<td class="num">{_fmt(float(top.max_activation[i]))}</td>'
                    f'<td class="ctx">{snippet}</td><td class="ctx">{tokens}</td></tr>')
    body = [
        "<h1>SAE latents</h1>",
        f'<p class="meta">{_esc(loading.describe(loaded))}</p>',
        f'<p class="meta">Read at {_esc(str(info.get("hook") or loaded.hook or "?"))} over '
        f"{top.n_rows:,} tokens of {_esc(info['store'])}; {len(latents):,} latents shown, "
        f"{dead:,} of them never fired.</p>",
        density_histogram_svg(density[list(latents)] if len(latents) else np.zeros(0)),
        '<p><input id="filter" type="search" placeholder="filter: latent, token text..." '
        'aria-label="filter latents"> <span class="note"><span id="shown">'
        f"{len(latents)}</span> shown, sorted by density</span></p>",
        '<table id="latents"><thead><tr><th>#</th><th>latent</th><th>density</th>'
        "<th>mean act.</th><th>max act.</th><th>top activation</th><th>promotes</th></tr>"
        "</thead><tbody>", *rows, "</tbody></table>"]
    return _page("SAE latents · saejax dashboard", "\n".join(body), SCRIPT)


def write_dashboard(top: top_activations.TopActivations, out_dir: str, *, loaded: LoadedSAE,
                    latents: Sequence[int] | None = None, tokenizer=None,
                    unembedding: np.ndarray | None = None) -> str:
    """Writes `out_dir/index.html` and `out_dir/latents/<i>.html`; returns the index's path."""
    if top.n_latents != loaded.n_latents:
        raise AnalysisError(f"the top activations hold {top.n_latents} latents but the SAE has "
                            f"{loaded.n_latents}; recompute them (--recompute).")
    latents = list(range(top.n_latents)) if latents is None else list(latents)
    token_text = top_activations.TokenText(tokenizer)
    promoted_by_latent: dict[int, tuple] = {}
    if unembedding is not None and latents:
        up_ids, up, down_ids, down = promoted_tokens(loaded, unembedding, latents)
        for j, i in enumerate(latents):
            promoted_by_latent[i] = (up_ids[j], up[j], down_ids[j], down[j])
    os.makedirs(os.path.join(out_dir, "latents"), exist_ok=True)
    for j, i in enumerate(latents):
        neighbours = (latents[j - 1] if j > 0 else None,
                      latents[j + 1] if j + 1 < len(latents) else None)
        page = latent_page(top, i, loaded=loaded, token_text=token_text,
                           promoted=promoted_by_latent.get(i), neighbours=neighbours)
        with open(os.path.join(out_dir, "latents", f"{i}.html"), "w", encoding="utf-8") as f:
            f.write(page)
    summary = ({i: [token_text(t) for t in p[0][:3]] for i, p in promoted_by_latent.items()}
               if promoted_by_latent else None)
    index = os.path.join(out_dir, "index.html")
    with open(index, "w", encoding="utf-8") as f:
        f.write(index_page(top, latents, loaded=loaded, token_text=token_text,
                           promoted=summary))
    return index


# ------------------------------------------------------------------------------------------
# From a run's directory to its dashboard.
# ------------------------------------------------------------------------------------------
def resolve_store(loaded: LoadedSAE, store: str | None) -> str:
    """The activation store to read: `store`, else the one the run trained on."""
    if store:
        return store
    fix = ("harvest one with `python -m saejax.harvest --checkpoint=DIR --tokens=FILE "
           "--out=STORES --hooks=<hook>` and pass --store=STORES/<hook>")
    if loaded.store:
        return loaded.store  # a .npy fails with its own message: no token ids
    if loaded.data_source == "synthetic":
        raise AnalysisError(f"{loaded.source} trained on synthetic activations, which have no "
                            f"text to show; top contexts need an activation store: {fix}.")
    if loaded.data_source == "lm":
        raise AnalysisError(f"{loaded.source} ran the model on the fly (data.source=lm), so there "
                            f"is no store of its activations; {fix}.")
    raise AnalysisError(f"{loaded.source} does not name an activation store; {fix}.")


def top_activations_for(loaded: LoadedSAE, store: str, *, results_dir: str, top_n: int,
                        context_before: int, context_after: int, max_rows: int | None,
                        batch_sequences: int | None, mesh_model: int | None,
                        recompute: bool, tokenizer=None) -> top_activations.TopActivations:
    """The top activations in `results_dir`, computed (and written there) unless already there
    for this SAE, store and settings."""
    wanted = top_activations.planned_fingerprint(
        loaded, store, top_n=top_n, context_before=context_before,
        context_after=context_after, max_rows=max_rows)
    if not recompute and top_activations.matches(results_dir, wanted):
        logging.info("Reusing the top activations in %s.", results_dir)
        return top_activations.read(results_dir)
    mesh = (top_activations.default_mesh(loaded.n_latents, model=mesh_model)
            if mesh_model else None)
    top = top_activations.compute_top_activations(
        loaded, store, top_n=top_n, context_before=context_before, context_after=context_after,
        max_rows=max_rows, batch_sequences=batch_sequences, mesh=mesh)
    top_activations.write(top, results_dir, tokenizer=tokenizer)
    logging.info("Wrote the top activations to %s.", results_dir)
    return top


def run(path: str, *, latents: str | Sequence[int] | None = "all",
        top_n: int = top_activations.DEFAULT_TOP_N, store: str | None = None,
        checkpoint: str | None = None, out: str | None = None, step: int | None = None,
        max_rows: int | None = None, batch_sequences: int | None = None,
        mesh_model: int | None = None, recompute: bool = False,
        context_before: int = top_activations.CONTEXT_BEFORE,
        context_after: int = top_activations.CONTEXT_AFTER) -> str:
    """What the CLI does; returns the path of the dashboard's index.html."""
    loaded = loading.load_sae(path, step=step)
    chosen = parse_latents(latents, loaded.n_latents)
    store = resolve_store(loaded, store)
    opened = top_activations.open_store_with_tokens(store)
    checkpoint = checkpoint or loaded.lm_checkpoint or opened.metadata.get("model")
    if checkpoint and not os.path.isdir(checkpoint):
        logging.warning("The model checkpoint %s is not there: no token text or promoted "
                        "tokens (pass --checkpoint).", checkpoint)
        checkpoint = None
    tokenizer = loading.load_tokenizer(loaded, checkpoint)
    top = top_activations_for(
        loaded, store, results_dir=os.path.join(loaded.source, _ANALYSIS), top_n=top_n,
        context_before=context_before, context_after=context_after, max_rows=max_rows,
        batch_sequences=batch_sequences, mesh_model=mesh_model, recompute=recompute,
        tokenizer=tokenizer)
    unembedding = None
    if checkpoint:
        model_config, params = models.load(checkpoint)
        loading.check_width(loaded, model_config.d_model, f"the model at {checkpoint}",
                            "Pass the checkpoint the SAE was trained on (--checkpoint).")
        unembedding = np.asarray(models.unembedding(params, model_config), np.float32)
    out = out or os.path.join(loaded.source, "dashboard")
    return write_dashboard(top, out, loaded=loaded, latents=chosen, tokenizer=tokenizer,
                           unembedding=unembedding)


# ------------------------------------------------------------------------------------------
# CLI.
# ------------------------------------------------------------------------------------------
def _define_flags() -> None:
    """The CLI's flags, defined only when this module runs as a program: importing it as a
    library defines none, so it cannot clash with another tool's flags."""
    flags.DEFINE_string("latents", "all", "Pages for: all, N (the first N latents), or indices "
                        "and ranges such as 3,17,40:48.")
    flags.DEFINE_integer("top_n", top_activations.DEFAULT_TOP_N,
                         "Top activating tokens kept per latent.")
    flags.DEFINE_string("store", None, "Activation store to read (default: the run's "
                        "data.path).")
    flags.DEFINE_string("checkpoint", None, "Model checkpoint for the tokenizer and unembedding "
                        "(default: the run's lm.checkpoint, else the store's model).")
    flags.DEFINE_string("out", None, "Output directory (default: DIR/dashboard).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_integer("max_rows", 0, "Read at most this many store rows (0: all).")
    flags.DEFINE_integer("batch_sequences", 0, "Sequences per step (0: about 4096 tokens).")
    flags.DEFINE_integer("mesh_model", 0, "Devices the dictionary is split over (0: as many as "
                         "divide it).")
    flags.DEFINE_bool("recompute", False, "Recompute the top activations even if "
                      "DIR/analysis/top_activations matches.")
    flags.DEFINE_integer("context_before", top_activations.CONTEXT_BEFORE,
                         "Context tokens kept before each example.")
    flags.DEFINE_integer("context_after", top_activations.CONTEXT_AFTER,
                         "Context tokens kept after each example.")
    flags.DEFINE_integer("num_cpu_devices", None, "On CPU, simulate N devices.")


def main(argv):
    if len(argv) != 2:
        sys.exit("usage: python -m saejax.analysis.dashboard DIR [--latents=...] [--top_n=N] "
                 "(DIR: a run's workdir or a SAELens SAE directory)")
    FLAGS = flags.FLAGS
    cli.setup(num_cpu_devices=FLAGS.num_cpu_devices)
    try:
        index = run(argv[1], latents=FLAGS.latents, top_n=FLAGS.top_n, store=FLAGS.store,
                    checkpoint=FLAGS.checkpoint, out=FLAGS.out, step=FLAGS.step,
                    max_rows=FLAGS.max_rows or None, batch_sequences=FLAGS.batch_sequences or None,
                    mesh_model=FLAGS.mesh_model or None, recompute=FLAGS.recompute,
                    context_before=FLAGS.context_before, context_after=FLAGS.context_after)
    except (ConfigError, FileNotFoundError) as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    print(f"Dashboard: {index}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
