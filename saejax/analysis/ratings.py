"""People's ratings of latents (`python -m saejax.analysis.review`): the file they are kept in,
`<workdir>/analysis/ratings.jsonl` (appended, one JSON object a line, never rewritten), and
what the pages and the report show of them: the interpretability score (its one definition is
`saejax.evals.interpretability`), who rated how many, and each item's labels.

A line: {"rater", "time" (UTC, ISO 8601), "item" ("latent-17", or "control-s0-3": control 3
of seed 0), "kind" ("latent" | "control"), "latent" or "control" (its index), "rating"
("interpretable" | "partly" | "not"), "label" (free text), "blind", "sae", "step"}.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading

from saejax.evals.interpretability import (CONTROL, RATINGS, InterpretabilityScore,
                                           interpretability_score, latest_ratings)

RATINGS_FILE = os.path.join("analysis", "ratings.jsonl")
_APPEND_LOCK = threading.Lock()  # the review server's threads append whole lines


def ratings_path(workdir: str) -> str:
    return os.path.join(workdir, RATINGS_FILE)


def read(path: str) -> list[dict]:
    """The records of a ratings file ([] when there is none; a line cut short is skipped)."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def append(path: str, record: dict) -> None:
    """Appends one record as a line, flushed to disk before returning."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with _APPEND_LOCK, open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


@dataclasses.dataclass
class LabelRow:
    """One rated item: what it is, how it was rated, and the labels people gave it."""

    item: str                     # "latent-17", "control-s0-3"
    title: str                    # "latent 17", "control 3 (seed 0)"
    kind: str
    latent: int | None
    counts: dict[str, int]        # rating -> raters
    labels: list[tuple[str, str]]  # (label, rater)


@dataclasses.dataclass
class ReviewSummary:
    score: InterpretabilityScore
    rows: list[LabelRow]          # the latents first (by index), then the controls
    n_records: int
    n_blind: int                  # of the counted ratings, those given blind
    ratings_file: str


def _title(record: dict) -> str:
    if record.get("kind") == CONTROL:
        return f"control {record.get('control')} (seed {record.get('control_seed')})"
    return f"latent {record.get('latent')}"


def summarize(records: list[dict], ratings_file: str) -> ReviewSummary:
    """The score and each item's ratings and labels (named raters' latest ratings)."""
    latest = latest_ratings(records)
    rows: dict[str, LabelRow] = {}
    for (rater, item), record in latest.items():
        row = rows.setdefault(item, LabelRow(
            item=item, title=_title(record), kind=record.get("kind", "latent"),
            latent=record.get("latent"), counts={r: 0 for r in RATINGS}, labels=[]))
        row.counts[record["rating"]] += 1
        if str(record.get("label") or "").strip():
            row.labels.append((str(record["label"]).strip(), rater))
    ordered = sorted(rows.values(), key=lambda r: (r.kind == CONTROL, r.latent or 0, r.item))
    return ReviewSummary(score=interpretability_score(records), rows=ordered,
                         n_records=len(records),
                         n_blind=sum(bool(r.get("blind")) for r in latest.values()),
                         ratings_file=ratings_file)


def summary_for(workdir: str) -> ReviewSummary | None:
    """The summary of `workdir`'s ratings, or None when nobody has rated anything there."""
    path = ratings_path(workdir)
    records = read(path)
    return summarize(records, path) if records else None


def _percent(fraction) -> str:
    return "-" if fraction != fraction else f"{100 * fraction:.1f}%"


def report_lines(summary: ReviewSummary) -> list[str]:
    """The score and the labels as Markdown (the review's report, `analysis/review.md`)."""
    score = summary.score
    lines = ["## Interpretability (human validation)", ""]
    for name, part in (("latents", score.latents), ("random-direction controls",
                                                    score.controls)):
        lines.append(f"- {name}: {part.interpretable} of {part.rated} rated interpretable "
                     f"({_percent(part.fraction)}, 95% Wilson interval "
                     f"{_percent(part.low)} to {_percent(part.high)}); {part.partly} partly.")
    raters = ", ".join(f"{name} {n}" for name, n in score.raters.items()) or "nobody yet"
    lines += [f"- Rated by: {raters} ({summary.n_blind} of the counted ratings blind"
              + (f"; {score.unnamed} without a rater's name, not counted" if score.unnamed
                 else "") + ").",
              f"- From `{summary.ratings_file}`.", "",
              "| item | interpretable | partly | not | labels |", "|---|---|---|---|---|"]
    for row in summary.rows:
        labels = "; ".join(f"{label} ({rater})" for label, rater in row.labels)
        labels = labels.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {row.title} | {row.counts['interpretable']} | {row.counts['partly']} "
                     f"| {row.counts['not']} | {labels} |")
    return lines


def sweep_report_lines(workdir: str, names) -> list[str]:
    """The sweep report's section: the score of each point (a folder `workdir/<name>`) people
    have rated; [] when none has been."""
    scored = [(name, summary_for(os.path.join(workdir, name))) for name in names]
    scored = [(name, summary) for name, summary in scored if summary is not None]
    if not scored:
        return []
    lines = ["", "## Interpretability (human validation)", "",
             "Rated with `python -m saejax.analysis.review <point>`; each point's labels are in "
             "its `analysis/review.md`.", "",
             "| point | latents interpretable | 95% interval | controls interpretable | "
             "95% interval | raters |", "|---|---|---|---|---|---|"]
    for name, summary in scored:
        latents, controls = summary.score.latents, summary.score.controls
        raters = ", ".join(f"{r} {n}" for r, n in summary.score.raters.items())
        lines.append(
            f"| {name} | {latents.interpretable}/{latents.rated} ({_percent(latents.fraction)}) "
            f"| {_percent(latents.low)} to {_percent(latents.high)} | "
            f"{controls.interpretable}/{controls.rated} ({_percent(controls.fraction)}) | "
            f"{_percent(controls.low)} to {_percent(controls.high)} | {raters} |")
    return lines + [""]
