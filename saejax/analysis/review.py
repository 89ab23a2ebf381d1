"""Human validation of an SAE's latents, in the browser:

    python -m saejax.analysis.review WORKDIR [--blind] [--sample=24] [--controls=8] [--port=8000]

serves the dashboard's latent pages on localhost (`review_server.py`) with a rating panel on
each: interpretable / partly / not and a free-text label, by click or keyboard. The rater's
name is asked once (the browser keeps it); every rating is appended to
`WORKDIR/analysis/ratings.jsonl` (`ratings.py`) with who, when and which latent, so a restarted
review goes on where it was, and `WORKDIR/analysis/review.md` is rewritten with the score.

Blind (`--blind`), the pages are a random sample of the latents that fired (`--sample`) mixed
with `--controls` random unit directions, shuffled (`--seed`), numbered, with neither ids nor
densities shown. A control's page is made exactly as a latent's: the top activations of the
projection of the same activations (centred by the SAE's decoder bias) on the direction,
through the same pass (`top_activations.py`, computed once into
`WORKDIR/analysis/controls/`), so the fraction of controls rated interpretable is what chance
gives. The score (`saejax.evals.interpretability`) counts only ratings with a rater's name.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Sequence

from absl import flags, logging
import numpy as np

from saejax import cli, sae
from saejax.analysis import (dashboard, dashboard_data, kinds, pages, ratings, review_server,
                             stores)
from saejax.analysis.loading import AnalysisError, LoadedSAE, sae_config_for
from saejax.analysis.token_text import TokenText
from saejax.evals.interpretability import CONTROL, LATENT, RATINGS, latest_ratings

CONTROLS_DIR = os.path.join("analysis", "controls")
REPORT_FILE = os.path.join("analysis", "review.md")
MAX_LABEL, MAX_RATER = 500, 100   # characters


# ------------------------------------------------------------------------------------------
# Random-direction controls.
# ------------------------------------------------------------------------------------------
def control_sae(loaded: LoadedSAE, n: int, seed: int) -> LoadedSAE:
    """`n` random unit directions as a ReLU "SAE" reading what `loaded` reads (the first hook
    it reads: a transcoder's input, a crosscoder's first hook, a CLT's first layer's input):
    control j's activation on x is relu((x * scale - b_dec) . u_j), its decoder row u_j, so
    its page is made by the same pass and templates as a latent's."""
    if n < 1:
        raise AnalysisError(f"--controls={n}: a blind review needs at least one control.")
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(loaded.d, n))
    directions = (directions / np.linalg.norm(directions, axis=0)).astype(np.float32)
    b_dec = np.asarray(loaded.params.get("b_dec", np.zeros(loaded.d)), np.float32)
    if b_dec.shape != (loaded.d,):
        b_dec = np.zeros(loaded.d, np.float32)
    params = {"W_enc": directions, "b_enc": np.zeros(n, np.float32),
              "W_dec": np.ascontiguousarray(directions.T), "b_dec": b_dec}
    hook = kinds.kind_of(loaded).reads[0]
    return loaded._replace(
        params=params, input_scale=loaded.scale_of(hook), hook=hook,
        architecture=sae.get("relu"), sae_config=sae_config_for("relu"),
        source=os.path.join(loaded.source, CONTROLS_DIR, f"seed-{seed}_n-{n}"), step=seed,
        kind="controls")


# ------------------------------------------------------------------------------------------
# The pages of a review.
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Item:
    """A page to rate: one of the SAE's latents or a control, and how its URL names it
    (`token`: the latent's id, open; the page's number, blind)."""

    key: str        # as ratings.jsonl records it: latent-17, control-s0-3
    kind: str       # LATENT or CONTROL
    index: int      # the latent's (or the control's) index
    token: str
    url: str


@dataclasses.dataclass
class PageContext:
    """What review_latent.html adds to a latent's view."""

    title: str
    token: str
    blind: bool
    previous: str | None
    next: str | None


@dataclasses.dataclass
class BlindIndex:
    n_items: int
    seed: int
    report: str


def _items(top, latents: Sequence[int], *, blind: bool, sample: int, n_controls: int,
           seed: int) -> list[Item]:
    if not blind:
        return [Item(f"latent-{i}", LATENT, i, str(i), f"/latents/{i}.html") for i in latents]
    rng = np.random.default_rng(seed)
    alive = [i for i in latents if top.fired[i] > 0]
    if not alive:
        raise AnalysisError("none of the latents chosen fired on the tokens read; a blind "
                            "review needs latents with top activations (--latents).")
    if 0 < sample < len(alive):
        alive = sorted(rng.choice(alive, size=sample, replace=False).tolist())
    kinds = [(LATENT, i) for i in alive] + [(CONTROL, j) for j in range(n_controls)]
    order = rng.permutation(len(kinds))
    items = []
    for number, k in enumerate(order, 1):
        kind, index = kinds[k]
        key = f"latent-{index}" if kind == LATENT else f"control-s{seed}-{index}"
        items.append(Item(key, kind, int(index), str(number), f"/items/{number}.html"))
    return items


class Review:
    """A review of one SAE: its pages, rendered on request, and the ratings given on them."""

    def __init__(self, prepared: dashboard.Prepared, *, blind: bool, items: list[Item],
                 seed: int, controls: tuple | None = None):
        self.prepared, self.blind, self.items, self.seed = prepared, blind, items, seed
        self.loaded = prepared.loaded
        self.controls = controls  # (control LoadedSAE, its TopActivations), blind only
        self.by_token = {item.token: item for item in items}
        self.ratings_file = ratings.ratings_path(self.loaded.source)
        self.report_file = os.path.join(self.loaded.source, REPORT_FILE)
        self._token_text = TokenText(prepared.tokenizer)
        self._promoted: dict[str, tuple] = {}

    # Pages ---------------------------------------------------------------------------------
    def _source(self, item: Item):
        return self.controls if item.kind == CONTROL else (self.loaded, self.prepared.top)

    def _promoted_of(self, item: Item):
        if self.prepared.unembedding is None:
            return None
        if item.key not in self._promoted:
            loaded, _ = self._source(item)
            arrays = dashboard_data.promoted_tokens(loaded, self.prepared.unembedding,
                                                    [item.index])
            self._promoted[item.key] = tuple(a[0] for a in arrays)
        return self._promoted[item.key]

    def page_html(self, token: str) -> str | None:
        """The page of the item `token` names, with its rating panel; None if there is none."""
        item = self.by_token.get(token)
        if item is None:
            return None
        at = self.items.index(item)
        loaded, top = self._source(item)
        view = dashboard_data.latent_view(top, item.index, loaded=loaded,
                                          token_text=self._token_text,
                                          promoted=self._promoted_of(item))
        title = (f"Page {item.token} of {len(self.items)}" if self.blind
                 else f"Latent {item.index}")
        page = PageContext(title=title, token=item.token, blind=self.blind,
                           previous=self.items[at - 1].url if at > 0 else None,
                           next=self.items[at + 1].url if at + 1 < len(self.items) else None)
        return pages.render("review_latent.html", view=view, page=page)

    def index_html(self) -> str:
        """Blind: the numbered pages, no score. Open: the dashboard's index with the score
        and labels."""
        if self.blind:
            return pages.render("review_index.html", page=BlindIndex(
                n_items=len(self.items), seed=self.seed, report=self.report_file))
        view = dashboard_data.index_view(self.prepared.top, [i.index for i in self.items],
                                         loaded=self.loaded, token_text=self._token_text)
        return pages.index_page(view, review=self.summary())

    # Ratings -------------------------------------------------------------------------------
    def summary(self) -> ratings.ReviewSummary:
        return ratings.summarize(ratings.read(self.ratings_file), self.ratings_file)

    def rate(self, body: dict) -> dict:
        """Appends the rating `body` ({item: a page's token, rating, label, rater}) to
        ratings.jsonl and rewrites the report; a ValueError names what is wrong with it."""
        item = self.by_token.get(str(body.get("item")))
        if item is None:
            raise ValueError(f"item {body.get('item')!r} is not a page of this review.")
        rating = body.get("rating")
        if rating not in RATINGS:
            raise ValueError(f"rating {rating!r}: choose one of {', '.join(RATINGS)}.")
        label, rater = str(body.get("label") or "").strip(), str(body.get("rater") or "").strip()
        if len(label) > MAX_LABEL or len(rater) > MAX_RATER:
            raise ValueError(f"a label is at most {MAX_LABEL} characters, a name {MAX_RATER}.")
        record = {"rater": rater, "time": datetime.datetime.now(datetime.timezone.utc)
                  .isoformat(timespec="seconds"), "item": item.key, "kind": item.kind,
                  item.kind: item.index, "rating": rating, "label": label, "blind": self.blind,
                  "sae": self.loaded.source, "step": self.loaded.step}
        if item.kind == CONTROL:
            record["control_seed"] = self.seed
        ratings.append(self.ratings_file, record)
        self.write_report()
        return {"ok": True, "item": item.token, "rating": rating}

    def ratings_by(self, rater: str) -> dict[tuple[str, str], dict]:
        latest = latest_ratings(ratings.read(self.ratings_file))
        return {key: record for key, record in latest.items() if key[0] == rater.strip()}

    def rating_of(self, token: str, rater: str) -> dict:
        """The rater's latest rating of the page `token` ({} when they have not rated it)."""
        item = self.by_token.get(token)
        record = self.ratings_by(rater).get((rater.strip(), item.key)) if item else None
        return {"rating": record["rating"], "label": record.get("label", "")} if record else {}

    def ratings_of(self, rater: str) -> dict[str, str]:
        """{page token: the rater's latest rating} over this review's pages."""
        by_key = {key: record["rating"] for (_, key), record in self.ratings_by(rater).items()}
        return {item.token: by_key[item.key] for item in self.items if item.key in by_key}

    def write_report(self) -> str:
        lines = [f"# Review of {self.loaded.source}", ""]
        lines += ratings.report_lines(self.summary())
        os.makedirs(os.path.dirname(self.report_file), exist_ok=True)
        with open(self.report_file, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        return self.report_file


def open_review(path: str, *, blind: bool = False, sample: int = 24, controls: int = 8,
                seed: int = 0, **options) -> Review:
    """The review of the SAE at `path` (`options`: `dashboard.prepare`'s), its top activations
    computed or reused, and blind, its controls' too."""
    prepared = dashboard.prepare(path, **options)
    items = _items(prepared.top, prepared.latents, blind=blind, sample=sample,
                   n_controls=controls, seed=seed)
    control = None
    if blind:
        control_loaded = control_sae(prepared.loaded, controls, seed)
        info = prepared.top.info
        control_top = dashboard.top_activations_for(
            control_loaded, stores.read_store_paths(prepared.loaded, prepared.store)[0],
            results_dir=os.path.join(control_loaded.source, "top_activations"),
            top_n=int(info["top_n"]), context_before=int(info["context_before"]),
            context_after=int(info["context_after"]), max_rows=options.get("max_rows"),
            batch_sequences=options.get("batch_sequences"), mesh_model=None,
            recompute=bool(options.get("recompute")), tokenizer=prepared.tokenizer)
        control = (control_loaded, control_top)
    review = Review(prepared, blind=blind, items=items, seed=seed, controls=control)
    review.write_report()
    return review


# ------------------------------------------------------------------------------------------
# Command line (saejax/cli.py).
# ------------------------------------------------------------------------------------------
def _define_flags() -> None:
    dashboard.define_page_flags()
    flags.DEFINE_bool("blind", False, "Hide latent ids and densities and mix in random-direction "
                      "controls.")
    flags.DEFINE_integer("sample", 24, "Blind: latents drawn at random from those that fired "
                         "(0: all of them).")
    flags.DEFINE_integer("controls", 8, "Blind: random-direction controls mixed in.")
    flags.DEFINE_integer("seed", 0, "Blind: the seed of the sample, the controls and the order.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to serve on (localhost only by default).")
    flags.DEFINE_integer("port", 8000, "Port to serve on (0: any free one).")
    flags.DEFINE_bool("serve", True, "Serve the pages; --noserve only writes the report.")


def main(argv):
    (path,) = cli.positional(argv, 1, "python -m saejax.analysis.review DIR [--blind] "
                                      "[--port=8000] (DIR: a run's workdir or a SAELens SAE "
                                      "directory)")
    cli.setup_from_flags()
    values = flags.FLAGS
    review = open_review(path, blind=values.blind, sample=values.sample,
                         controls=values.controls, seed=values.seed,
                         **dashboard.page_options(values))
    print(f"Report: {review.report_file}")
    if not values.serve:
        return
    try:
        server = review_server.make_server(review, values.host, values.port)
    except OSError as e:  # the port is taken, or the address is not this machine's
        raise AnalysisError(f"cannot serve on {values.host}:{values.port} ({e.strerror}); "
                            "choose another --port (0: any free one) or --host.") from None
    print(f"Review: http://{values.host}:{server.server_address[1]}/ (Ctrl-C stops; ratings "
          f"go to {review.ratings_file})", flush=True)
    logging.info("Serving %d pages.", len(review.items))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    cli.run(main, _define_flags)
