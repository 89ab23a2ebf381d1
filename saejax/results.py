"""A sweep's results table: what each point's folder says about it (status, config values,
final or last logged metrics), gathered into `results.csv`, and read back. The sweep runner
writes it; the plots and the report read it and nothing else of the sweep.

The files of a sweep's workdir that the table is built from:

    sweep.json          the points: name, overrides and the config values the table reports
    <point>/summary.json, metrics.jsonl, sweep_run.json   a point's folder (as a run's workdir)
    <point>/analysis/evals/<eval>.json   what `python -m saejax.evals` wrote (SAEBench's layout)
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Sequence

from saejax import paths, workdir as workdirs

MANIFEST = "sweep.json"
TABLE = "results.csv"
RUN_FILE = "sweep_run.json"
EVALS_DIR = "analysis/evals"  # in a run's workdir: one JSON per evaluation (saejax.evals.suite)

# Final metrics copied from each point's summary.json, in this order (those a run reports).
METRICS = ("mse", "fvu", "l0", "dead_fraction", "mmcs", "mcc", "uniqueness",
           "classification/precision", "classification/recall", "classification/f1_score",
           "absorption", "loss_recovered", "kl_score", "ce_clean", "ce_sae", "ce_zero_ablation",
           "kl_sae", "kl_zero_ablation")
# The columns of `python -m saejax.evals`' results: "eval:<eval>/<metric>" (eval_metrics).
EVAL_COLUMN = "eval:"
# Metrics per hook of a dictionary that reconstructs several (`fvu/<hook>`, saejax.step).
PER_HOOK = "fvu/"
# A point's status in the table: finished; trained part way (metrics from its last log line);
# stopped by an error (NaN); not started.
DONE, PARTIAL, FAILED, PENDING = "done", "partial", "failed", "pending"
STATUSES = (DONE, PARTIAL, FAILED, PENDING)


def finished_summary(workdir: str, name: str, steps: int) -> dict | None:
    """The summary of point `name` if it trained all `steps`, else None."""
    summary = workdirs.read_json(paths.join(workdir, name, "summary.json"))
    return summary if summary and summary.get("step", -1) >= steps else None


def eval_metrics(workdir: str) -> dict[str, Any]:
    """`{"eval:<eval>/<metric>": value}` of every evaluation result in `WORKDIR/analysis/evals/`
    (SAEBench's layout: `eval_result_metrics` is `{category: {metric: value}}`, and metric
    names are unique within an eval)."""
    folder = paths.join(workdir, EVALS_DIR)
    flat: dict[str, Any] = {}
    if not paths.isdir(folder):
        return flat
    for file in sorted(paths.listdir(folder)):
        if file.endswith(".json"):
            result = workdirs.read_json(paths.join(folder, file)) or {}
            name = result.get("eval_type_id", file[:-len(".json")])
            for metrics in (result.get("eval_result_metrics") or {}).values():
                flat.update({f"{EVAL_COLUMN}{name}/{k}": v for k, v in (metrics or {}).items()
                             if v is None or isinstance(v, (int, float))})
    return flat


def _train_seconds(summary: dict) -> float | None:
    # Runs before train_seconds was summed over sessions recorded only their last session's.
    seconds = summary.get("train_seconds")
    return summary.get("train_seconds_this_session") if seconds is None else seconds


def _row(workdir: str, entry: dict) -> dict[str, Any]:
    name = entry["name"]
    row = {k: v for k, v in entry.items() if k != "overrides"}
    row.update({f"config:{k}": v for k, v in entry["overrides"].items()})
    run_file = workdirs.read_json(paths.join(workdir, name, RUN_FILE)) or {}
    summary = finished_summary(workdir, name, entry["steps"])
    record = None if summary else workdirs.last_record(paths.join(workdir, name,
                                                                  "metrics.jsonl"))
    if summary:
        status, source = DONE, summary
    elif run_file.get("error"):
        status, source = FAILED, record or {}
    elif record:
        status, source = PARTIAL, record
    else:
        status, source = PENDING, {}
    row["status"] = status
    row["step"] = source.get("step")
    row["tokens"] = source.get("tokens")
    row.update({k: source[k] for k in METRICS if source.get(k) is not None})
    row.update({k: v for k, v in source.items() if k.startswith(PER_HOOK)})
    if summary:
        row["train_flops"] = summary.get("train_flops")
        row["train_seconds"] = _train_seconds(summary)
    elif row["tokens"] is not None:
        row["train_flops"] = entry["flops_per_token"] * row["tokens"]
        row["train_seconds"] = source.get("train_seconds")
    if run_file:
        row["wall_seconds"] = run_file.get("wall_seconds")
        row["group_size"] = len(run_file.get("points", ()))
    row["run_dir"] = run_file.get("run_dir", name)
    row.update(eval_metrics(paths.join(workdir, name)))
    if status == FAILED:
        row["error"] = run_file["error"]
    return row


def collect(workdir: str) -> list[dict[str, Any]]:
    """One row per point of DIR/sweep.json: config values, status and metrics (final ones from
    summary.json, or a partial point's last logged training metrics)."""
    manifest = workdirs.read_json(paths.join(workdir, MANIFEST))
    if manifest is None:
        raise FileNotFoundError(f"{workdir} holds no {MANIFEST}; is it a sweep's workdir?")
    return [_row(workdir, entry) for entry in manifest["points"]]


_LEADING_COLUMNS = ("name", "status", "architecture", "shape", "d", "n_latents", "expansion_factor",
                    "sparsity_level_name", "sparsity_level", "l1_coefficient", "l0_coefficient",
                    "k", "n_features", "step", "steps", "batch_size", "tokens", *METRICS,
                    "flops_per_token", "train_flops", "train_seconds", "wall_seconds",
                    "group_size", "run_dir")


def write_table(rows: Sequence[dict], path: str) -> None:
    """Writes rows as CSV (atomically): the usual columns first, then any others."""
    columns = [c for c in _LEADING_COLUMNS if any(c in r for r in rows)]
    columns += [c for r in rows for c in r if c not in columns]
    columns = list(dict.fromkeys(columns))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    paths.write_text(path, text.getvalue())


def _parse(text: str) -> Any:
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_table(path: str) -> list[dict[str, Any]]:
    """The rows of a results.csv, numbers parsed, empty cells as None."""
    text = io.StringIO(paths.read_text(path), newline="")
    return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(text)]


def load_rows(path: str, *, collect_runs: bool = True) -> tuple[list[dict], str]:
    """The table's rows and the folder it belongs to, from a sweep's workdir (re-collected
    from its run folders, and the table rewritten, when `collect_runs` and sweep.json is
    there) or from a results.csv."""
    path = paths.absolute(path)
    if paths.exists(path) and not paths.isdir(path):
        return read_table(path), os.path.dirname(path)  # a string operation: gs:// too
    if collect_runs and paths.exists(paths.join(path, MANIFEST)):
        rows = collect(path)
        write_table(rows, paths.join(path, TABLE))
        return rows, path
    table = paths.join(path, TABLE)
    if not paths.exists(table):
        raise FileNotFoundError(f"{path} holds neither {TABLE} nor {MANIFEST}; give a "
                                f"sweep's workdir or a results table.")
    return read_table(table), path


def format_rows(rows: Sequence[dict]) -> str:
    """A short text table of the points: status and the main metrics."""
    def number(value, spec):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
            else format(value, spec)
    width = max([len(r["name"]) for r in rows] + [5])
    lines = [f"{'point':<{width}}  {'status':<7}  {'n_latents':>9}  {'FVU':>7}  {'L0':>7}  "
             f"{'dead':>5}  {'MMCS':>6}  {'FLOPs':>8}"]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  {r['status']:<7}  {r['n_latents']:>9}  "
                     f"{number(r.get('fvu'), '7.4f')}  {number(r.get('l0'), '7.2f')}  "
                     f"{number(r.get('dead_fraction'), '5.3f')}  "
                     f"{number(r.get('mmcs'), '6.4f')}  {number(r.get('train_flops'), '8.2e')}")
    return "\n".join(lines)
