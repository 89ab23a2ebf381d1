"""Static HTML dashboards of a trained SAE's latents:

    python -m saejax.analysis.dashboard DIR [--latents=all|N|i,j,a:b] [--top_n=20]

DIR is a run's workdir (its config.json names the store, `data.path`, and the model,
`lm.checkpoint`) or a SAELens SAE directory (pass --store and --checkpoint, unless saejax
exported it and they are still where they were). A transcoder's latents are read from its input
hook's store, a crosscoder's from its hooks' stores and a CLT's from its layers' input stores
(`--store=a,b,...`, of one harvest); a CLT's pages are its flat index `layer * n + i`. The top
activations are computed in one pass over the store (`top_activations.py`) unless
`DIR/analysis/top_activations/` already holds them for the same SAE, store and settings. Writes
`DIR/dashboard/index.html` (latents sorted by density; the interpretability score and labels
of `DIR/analysis/ratings.jsonl` when people have rated latents with
`python -m saejax.analysis.review`) and one page per latent: its top contexts
with the activating token highlighted, its activation histogram, and the output tokens its
decoder direction promotes most through the unembedding. Pages are self-contained: no scripts,
styles or fonts are fetched from anywhere.

What the pages show is assembled in `dashboard_data.py` and rendered from the Jinja2 templates
in `templates/` by `pages.py`; this module reads the run, computes or reuses the top
activations and writes the files.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

from absl import flags, logging
import numpy as np

from saejax import cli, models
from saejax.analysis import (dashboard_data, kinds, loading, pages, ratings, stores,
                             top_activations)
from saejax.analysis.dashboard_data import N_PROMOTED, parse_latents, promoted_tokens
from saejax.analysis.loading import AnalysisError, LoadedSAE

__all__ = ["N_PROMOTED", "Prepared", "define_page_flags", "page_options", "parse_latents",
           "prepare", "promoted_tokens", "resolve_store", "run", "top_activations_for",
           "write_dashboard"]

_ANALYSIS = os.path.join("analysis", "top_activations")


# ------------------------------------------------------------------------------------------
# The pages.
# ------------------------------------------------------------------------------------------
def write_dashboard(top: top_activations.TopActivations, out_dir: str, *, loaded: LoadedSAE,
                    latents: Sequence[int] | None = None, tokenizer=None,
                    unembedding: np.ndarray | None = None) -> str:
    """Writes `out_dir/index.html` and `out_dir/latents/<i>.html`; returns the index's path."""
    if top.n_latents != loaded.n_latents:
        raise AnalysisError(f"the top activations hold {top.n_latents} latents but the SAE has "
                            f"{loaded.n_latents}; recompute them (--recompute).")
    latents = list(range(top.n_latents)) if latents is None else list(latents)
    token_text = top_activations.TokenText(tokenizer)
    promoted: dict[int, tuple] = {}
    if unembedding is not None and latents:
        up_ids, up, down_ids, down = promoted_tokens(loaded, unembedding, latents)
        promoted = {i: (up_ids[j], up[j], down_ids[j], down[j]) for j, i in enumerate(latents)}
    os.makedirs(os.path.join(out_dir, "latents"), exist_ok=True)
    for j, i in enumerate(latents):
        view = dashboard_data.latent_view(
            top, i, loaded=loaded, token_text=token_text, promoted=promoted.get(i),
            previous=latents[j - 1] if j > 0 else None,
            next=latents[j + 1] if j + 1 < len(latents) else None)
        with open(os.path.join(out_dir, "latents", f"{i}.html"), "w", encoding="utf-8") as f:
            f.write(pages.latent_page(view))
    promotes = ({i: [token_text(t) for t in p[0][:3]] for i, p in promoted.items()}
                if promoted else None)
    index = os.path.join(out_dir, "index.html")
    with open(index, "w", encoding="utf-8") as f:
        f.write(pages.index_page(dashboard_data.index_view(
            top, latents, loaded=loaded, token_text=token_text, promotes=promotes),
            review=ratings.summary_for(loaded.source)))
    return index


# ------------------------------------------------------------------------------------------
# From a run's directory to its dashboard.
# ------------------------------------------------------------------------------------------
def resolve_store(loaded: LoadedSAE, store: str | None) -> str:
    """The activation store(s) to read: `store`, else the one(s) the run trained on (a
    dictionary of several hooks: comma-separated, the hooks it reads picked by
    `stores.read_store_paths`)."""
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
    mesh = (top_activations.default_mesh(kinds.kind_of(loaded).per_layer, model=mesh_model)
            if mesh_model else None)
    top = top_activations.compute_top_activations(
        loaded, store, top_n=top_n, context_before=context_before, context_after=context_after,
        max_rows=max_rows, batch_sequences=batch_sequences, mesh=mesh)
    top_activations.write(top, results_dir, tokenizer=tokenizer)
    logging.info("Wrote the top activations to %s.", results_dir)
    return top


class Prepared(NamedTuple):
    """What the pages of a run are made from (the review's too): the SAE, the latents chosen,
    the activation store read, its top activations, the tokenizer and the unembedding (None
    without a model checkpoint)."""

    loaded: LoadedSAE
    latents: list[int]
    store: str
    top: top_activations.TopActivations
    tokenizer: object
    unembedding: np.ndarray | None


def prepare(path: str, *, latents: str | Sequence[int] | None = "all",
            top_n: int = top_activations.DEFAULT_TOP_N, store: str | None = None,
            checkpoint: str | None = None, step: int | None = None,
            max_rows: int | None = None, batch_sequences: int | None = None,
            mesh_model: int | None = None, recompute: bool = False,
            context_before: int = top_activations.CONTEXT_BEFORE,
            context_after: int = top_activations.CONTEXT_AFTER) -> Prepared:
    """Reads the SAE at `path`, its store and model, and computes (or reuses) the top
    activations in `path/analysis/top_activations/`."""
    loaded = loading.load_sae(path, step=step)
    chosen = parse_latents(latents, loaded.n_latents)
    store = resolve_store(loaded, store)
    opened = stores.open_read_stores(loaded, store)[0]
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
    return Prepared(loaded=loaded, latents=chosen, store=store, top=top, tokenizer=tokenizer,
                    unembedding=unembedding)


def run(path: str, *, out: str | None = None, **options) -> str:
    """What the CLI does (`options`: those of `prepare`); returns the path of the dashboard's
    index.html."""
    prepared = prepare(path, **options)
    out = out or os.path.join(prepared.loaded.source, "dashboard")
    return write_dashboard(prepared.top, out, loaded=prepared.loaded, latents=prepared.latents,
                           tokenizer=prepared.tokenizer, unembedding=prepared.unembedding)


# ------------------------------------------------------------------------------------------
# Command line (saejax/cli.py): flags defined only when this module runs as the program, so
# importing it as a library defines none and cannot clash with another tool's flags.
# ------------------------------------------------------------------------------------------
def define_page_flags() -> None:
    """The flags of what the pages are made from (`prepare`'s options); the review's too."""
    flags.DEFINE_string("latents", "all", "Pages for: all, N (the first N latents), or indices "
                        "and ranges such as 3,17,40:48.")
    flags.DEFINE_integer("top_n", top_activations.DEFAULT_TOP_N,
                         "Top activating tokens kept per latent.")
    flags.DEFINE_string("store", None, "Activation store to read (default: the run's "
                        "data.path).")
    flags.DEFINE_string("checkpoint", None, "Model checkpoint for the tokenizer and unembedding "
                        "(default: the run's lm.checkpoint, else the store's model).")
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
    cli.define_device_flags()


def page_options(values) -> dict:
    """`prepare`'s options from the parsed `define_page_flags`."""
    return dict(latents=values.latents, top_n=values.top_n, store=values.store,
                checkpoint=values.checkpoint, step=values.step,
                max_rows=values.max_rows or None,
                batch_sequences=values.batch_sequences or None,
                mesh_model=values.mesh_model or None, recompute=values.recompute,
                context_before=values.context_before, context_after=values.context_after)


def _define_flags() -> None:
    define_page_flags()
    flags.DEFINE_string("out", None, "Output directory (default: DIR/dashboard).")


def main(argv):
    (path,) = cli.positional(argv, 1, "python -m saejax.analysis.dashboard DIR [--latents=...] "
                                      "[--top_n=N] (DIR: a run's workdir or a SAELens SAE "
                                      "directory)")
    cli.setup_from_flags()
    index = run(path, out=flags.FLAGS.out, **page_options(flags.FLAGS))
    print(f"Dashboard: {index}")


if __name__ == "__main__":
    cli.run(main, _define_flags)
