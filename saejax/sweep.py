"""Sweeps: expands an experiment's `get_sweep()`, trains every point, collects a results table.

    python -m saejax.sweep --config=experiments/scaling.py:runlocal --workdir=DIR

A sweep is a list of override dicts (`{"sae.expansion_factor": 32, "sae.l1_coefficient": 3e-4}`)
applied to the experiment's config (after any `--config.x=y`, which applies to every point).
Points that differ only in the architecture's sparsity coefficient have the same shape and train
together, as one group (`group.sparsity_coefficients`: several SAEs in one jitted step on the
same batches); a point of an architecture without one (TopK's k) trains as its own run. Running
the command again skips finished points and resumes the others; `--only='x32_*'` picks points
by name, `--dry_run` prints the points and runs without training.

What the sweep writes in DIR, a local folder or a bucket (gs://...; every file goes through
saejax/paths.py, so there are no symlinks):

    sweep.json          the points: name, overrides and the config values the table reports
    <point name>/       one point, laid out like a single run's workdir (config.json,
                        checkpoints/, metrics.jsonl, summary.json), also when the point trains
                        in a group: the group writes its members there (group.member_workdirs)
    groups/<group>/     a group's own workdir (its stacked checkpoints and summary), named by
                        shape and coefficients (x32_l1-0.1+0.3+1)
    results.csv         one row per point: its config values, status and final metrics,
                        rewritten after every run
    report.md, plots/   the scaling plots and fits (saejax/plots.py), drawn when the sweep ends;
                        `python -m saejax.plots DIR` draws them from the runs so far

Every point's folder, and every group's, also holds `sweep_run.json`: the folder of the run
that trains the point (`run_dir`: the point's own, or groups/<group>), that run's points, its
wall time summed over sessions (compilation, data and evaluation included; a SIGKILLed session
is not counted) and the error that stopped it, if any.
"""

from __future__ import annotations

import csv
import fnmatch
import importlib.util
import inspect
import io
import json
import math
import os
import sys
import time
from typing import Any, NamedTuple, Sequence

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags

from saejax import cli, paths, sae, train, validation
from saejax.sharding import ConfigError

FLAGS = flags.FLAGS

MANIFEST = "sweep.json"
TABLE = "results.csv"
RUN_FILE = "sweep_run.json"
GROUPS_DIR = "groups"

# Final metrics copied from each point's summary.json, in this order (those a run reports).
METRICS = ("mse", "fvu", "l0", "dead_fraction", "mmcs", "loss_recovered", "ce_clean", "ce_sae",
           "ce_zero_ablation", "kl_sae", "kl_zero_ablation")
# A point's status in the table: finished; trained part way (metrics from its last log line);
# stopped by an error (NaN); not started.
DONE, PARTIAL, FAILED, PENDING = "done", "partial", "failed", "pending"

# Short forms of common override keys in run names: x32_l1-3e-4, topk_x8_k16.
_ABBREVIATIONS = {"sae.expansion_factor": "x", "sae.l1_coefficient": "l1-",
                  "sae.l0_coefficient": "l0-", "sae.k": "k", "sae.architecture": "",
                  "data.d": "d", "train.steps": "steps-", "optim.learning_rate": "lr-"}


class Point(NamedTuple):
    """One setting of the sweep: its readable name, overrides and resolved config."""

    name: str
    overrides: dict[str, Any]
    config: ml_collections.ConfigDict


class Run(NamedTuple):
    """One call of `train.train_and_evaluate`: one point, or a group of points of one shape."""

    workdir: str                 # relative to the sweep's workdir: a point name or groups/...
    config: ml_collections.ConfigDict  # a group's puts its members in their point folders
    points: tuple[Point, ...]


# ------------------------------------------------------------------------------------------
# Expanding a sweep into points.
# ------------------------------------------------------------------------------------------
def load_sweep(config_file: str) -> list[dict[str, Any]]:
    """The override dicts of `path.py[:arg]`'s `get_sweep(arg)` (or `get_sweep()`)."""
    path, _, arg = config_file.partition(":")
    spec = importlib.util.spec_from_file_location("saejax_sweep_config", path)
    if spec is None or not os.path.exists(path):
        raise ConfigError(f"--config={config_file}: no config file at {path!r}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"{path} has no get_sweep(); declare the sweep next to its config "
                          f"as a function returning a list of override dicts.")
    takes_arg = bool(inspect.signature(module.get_sweep).parameters)
    if arg and not takes_arg:
        raise ConfigError(f"{path}: get_sweep() takes no argument, so {arg!r} cannot shrink "
                          f"the sweep; add `get_sweep(arg=None)`.")
    return list(module.get_sweep(arg or None) if takes_arg else module.get_sweep())


def format_value(value: Any) -> str:
    """A config value as it appears in a run name: 3e-4, 0.6, 32, topk."""
    if isinstance(value, float):
        plain = f"{value:g}"
        mantissa, _, exponent = f"{value:.6e}".partition("e")
        short = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return short if len(short) < len(plain) else plain
    if isinstance(value, (tuple, list)):
        return "+".join(format_value(v) for v in value)
    text = str(value)
    return "".join(c if c.isalnum() or c in ".+-" else "-" for c in text)


def _name_part(key: str, value: Any) -> str:
    prefix = _ABBREVIATIONS.get(key, key.rsplit(".", 1)[-1] + "-")
    return prefix + format_value(value)


def run_name(overrides: dict[str, Any]) -> str:
    """A point's folder name from its overrides, in their order: x32_l1-3e-4."""
    return "_".join(_name_part(k, v) for k, v in overrides.items()) or "base"


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted-key overrides; a key that is not a field is an error."""
    config = config.copy_and_resolve_references()
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for name in path:
            node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ConfigError(f"The sweep sets {key!r}, which is not a config field "
                              f"(saejax/configs.py lists them all).")
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"The sweep sets {key}={value!r}: {e}") from None
    return config


def expand(config: ml_collections.ConfigDict, sweep: Sequence[dict[str, Any]]) -> list[Point]:
    """The sweep's points: `config` with each override dict applied, named by its overrides."""
    if tuple(config.group.sparsity_coefficients) or tuple(config.group.member_workdirs):
        raise ConfigError("A sweep groups its points itself: leave group.sparsity_coefficients "
                          "and group.member_workdirs empty and sweep the sparsity coefficient "
                          "instead.")
    points, seen = [], {}
    for overrides in sweep:
        overrides = dict(overrides)
        if {"group.sparsity_coefficients", "group.member_workdirs"} & set(overrides):
            raise ConfigError("A sweep point may not set group.sparsity_coefficients or "
                              "group.member_workdirs; the sweep groups points that differ only "
                              "in that coefficient.")
        name = run_name(overrides)
        if name in seen:
            raise ConfigError(f"Two sweep points are both named {name!r} ({seen[name]} and "
                              f"{overrides}); each point needs distinct overrides.")
        seen[name] = overrides
        points.append(Point(name, overrides, apply_overrides(config, overrides)))
    return points


def sparsity_level(config) -> tuple[str, float]:
    """The setting that holds sparsity fixed across dictionary sizes, and its name.

    The architecture's `level_field` (TopK's k) when it has no sparsity coefficient; the
    coefficient divided by the expansion factor when its sparsity term is a mean over latents
    (relu's and gated's L1: the penalty per latent falls as 1/n_latents, so coefficient /
    expansion_factor stays comparable across dictionary sizes); otherwise the coefficient.
    """
    architecture = sae.get(config.sae.architecture)
    name = architecture.sparsity_coefficient
    if name is None:
        return architecture.level_field, float(config.sae[architecture.level_field])
    value = float(config.sae[name])
    if architecture.sparsity_mean_over_latents:
        return f"{name} / expansion_factor", value / float(config.sae.expansion_factor)
    return name, value


def describe(point: Point) -> dict[str, Any]:
    """The config values of a point that the results table reports (known before training)."""
    config = point.config
    architecture = sae.get(config.sae.architecture)
    d, n_latents = int(config.data.d), validation.n_latents(config)
    level_name, level = sparsity_level(config)
    row = {"name": point.name, "architecture": architecture.name, "d": d,
           "n_latents": n_latents, "expansion_factor": int(config.sae.expansion_factor),
           "sparsity_level_name": level_name, "sparsity_level": level}
    if architecture.sparsity_coefficient:
        row[architecture.sparsity_coefficient] = float(config.sae[architecture.sparsity_coefficient])
    elif architecture.level_field:
        row[architecture.level_field] = config.sae[architecture.level_field]
    row.update({
        "n_features": (int(config.data.n_features) if config.data.source == "synthetic"
                       else None),
        "steps": int(config.train.steps),
        "batch_size": int(config.train.batch_size),
        "flops_per_token": int(architecture.flops_per_token(d, n_latents, config.sae)),
        "overrides": point.overrides,
    })
    return row


# ------------------------------------------------------------------------------------------
# The state of a point on disk, and grouping the unfinished ones into runs.
# ------------------------------------------------------------------------------------------
def _read_json(path: str) -> Any:
    try:
        return paths.read_json(path)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: str, value: Any) -> None:
    paths.write_json(path, value, indent=2)


def _last_record(path: str) -> dict | None:
    """The last complete line of a metrics.jsonl (a running trainer may be mid-line)."""
    try:
        lines = paths.read_text(path).splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def _finished(workdir: str, name: str, steps: int) -> dict | None:
    summary = _read_json(paths.join(workdir, name, "summary.json"))
    return summary if summary and summary.get("step", -1) >= steps else None


def _check_same_config(folder: str, config: ml_collections.ConfigDict) -> None:
    """Refuses, before anything trains, a point or run folder that holds a run of another
    config (a finished point is only skipped, and a run only resumed, if it is the same)."""
    stored = _read_json(paths.join(folder, "config.json"))
    if stored is None:
        return
    changed, old, new = train.config_changes(stored, json.loads(config.to_json_best_effort()))
    if changed:
        raise ConfigError(
            f"{folder} was trained with another config: "
            + ", ".join(f"{k}={old.get(k)!r} there, {new.get(k)!r} now" for k in changed)
            + ". Use a new --workdir, or pass the original values.")


def _run_record(workdir: str, run: Run) -> dict:
    """The run's sweep_run.json so far (wall time and sessions add up over sessions)."""
    record = (_read_json(paths.join(workdir, run.workdir, RUN_FILE))
              or {"wall_seconds": 0.0, "sessions": 0, "error": None})
    record.update(run_dir=run.workdir, points=[p.name for p in run.points])
    return record


def _warn_if_moved(workdir: str, run: Run) -> None:
    """A point trained part way in one group and now planned in another (other points
    selected or added) continues from the new group's checkpoints, or from scratch; the first
    group keeps its own."""
    for point in run.points:
        before = (_read_json(paths.join(workdir, point.name, RUN_FILE)) or {}).get("run_dir")
        if before in (None, run.workdir):
            continue
        last = _last_record(paths.join(workdir, point.name, "metrics.jsonl"))
        if last:
            logging.warning("%s trained to step %s in %s and now trains in %s, from that "
                            "run's own checkpoint or from scratch; select the points of %s to "
                            "resume it there instead.", point.name, last.get("step"), before,
                            run.workdir, before)


def _write_run_record(workdir: str, run: Run, record: dict) -> None:
    """Into the run's folder and each of its points' folders, where `collect` reads it."""
    for folder in dict.fromkeys([run.workdir, *(p.name for p in run.points)]):
        _write_json(paths.join(workdir, folder, RUN_FILE), record)


def _group_key(point: Point) -> str | None:
    """Points with equal keys have the same shape; None for an architecture without a
    sparsity coefficient (TopK's k changes the computation, not a weight)."""
    coefficient = sae.get(point.config.sae.architecture).sparsity_coefficient
    if coefficient is None:
        return None
    config = point.config.copy_and_resolve_references()
    config.sae[coefficient] = 0.0
    return config.to_json_best_effort(sort_keys=True)


def plan(points: Sequence[Point], workdir: str) -> list[Run]:
    """The runs that train `points` in the sweep's `workdir`: one group per shape, one run per
    ungroupable point.

    Every point of a groupable architecture trains in a group (of one, if it is alone) that
    writes it into its own folder, so where a point lives does not depend on which other
    points are still to train.
    """
    runs, groups = [], {}
    for point in points:
        key = _group_key(point)
        if key is None:
            runs.append([point])
        elif key in groups:
            groups[key].append(point)
        else:
            groups[key] = [point]
            runs.append(groups[key])
    runs = [_make_run(tuple(members), workdir) for members in runs]
    folders = [run.workdir for run in runs]
    if len(set(folders)) < len(folders):
        raise ConfigError(f"Two runs of the sweep would share a folder ({folders}); give the "
                          f"points overrides whose values differ in their names.")
    return runs


def _make_run(points: tuple[Point, ...], workdir: str) -> Run:
    first = points[0]
    coefficient = sae.get(first.config.sae.architecture).sparsity_coefficient
    if coefficient is None:
        return Run(first.name, first.config, points)
    values = [float(p.config.sae[coefficient]) for p in points]
    member_names = [f"{v:g}" for v in values]
    if len(set(member_names)) < len(values):
        twins = [p.name for p, m in zip(points, member_names) if member_names.count(m) > 1]
        raise ConfigError(f"Sweep points {twins} train the same SAE (equal configs); remove "
                          f"the duplicates.")
    key = f"sae.{coefficient}"
    shape = run_name({k: v for k, v in first.overrides.items() if k != key})
    shape = "" if shape == "base" else shape + "_"
    config = first.config.copy_and_resolve_references()
    config.group.sparsity_coefficients = tuple(values)
    # Absolute, as a run's workdir: the group's config.json says where its members are.
    config.group.member_workdirs = tuple(paths.join(paths.absolute(workdir), p.name)
                                         for p in points)
    config.sae[coefficient] = values[0]
    return Run(f"{GROUPS_DIR}/{shape}{_name_part(key, tuple(values))}", config, points)


# ------------------------------------------------------------------------------------------
# The results table.
# ------------------------------------------------------------------------------------------
def collect(workdir: str) -> list[dict[str, Any]]:
    """One row per point of DIR/sweep.json: config values, status and metrics (final ones from
    summary.json, or a partial point's last logged training metrics)."""
    manifest = _read_json(paths.join(workdir, MANIFEST))
    if manifest is None:
        raise FileNotFoundError(f"{workdir} holds no {MANIFEST}; is it a sweep's workdir?")
    rows = []
    for entry in manifest["points"]:
        name = entry["name"]
        row = {k: v for k, v in entry.items() if k != "overrides"}
        row.update({f"config:{k}": v for k, v in entry["overrides"].items()})
        run_file = _read_json(paths.join(workdir, name, RUN_FILE)) or {}
        summary = _finished(workdir, name, entry["steps"])
        record = None if summary else _last_record(paths.join(workdir, name, "metrics.jsonl"))
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
        if summary:
            row["train_flops"] = summary.get("train_flops")
            row["train_seconds"] = summary.get("train_seconds_this_session")
        elif row["tokens"] is not None:
            row["train_flops"] = entry["flops_per_token"] * row["tokens"]
        if run_file:
            row["wall_seconds"] = run_file.get("wall_seconds")
            row["group_size"] = len(run_file.get("points", ()))
        row["run_dir"] = run_file.get("run_dir", name)
        if status == FAILED:
            row["error"] = run_file["error"]
        rows.append(row)
    return rows


_LEADING_COLUMNS = ("name", "status", "architecture", "d", "n_latents", "expansion_factor",
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


# ------------------------------------------------------------------------------------------
# run_sweep
# ------------------------------------------------------------------------------------------
def _select(points: list[Point], only: Sequence[str]) -> list[Point]:
    if not only:
        return points
    for pattern in only:
        if not any(fnmatch.fnmatchcase(p.name, pattern) for p in points):
            raise ConfigError(f"--only={pattern!r} matches no point; the points are "
                              f"{[p.name for p in points]}.")
    return [p for p in points if any(fnmatch.fnmatchcase(p.name, pat) for pat in only)]


def _write_outputs(workdir: str, report: bool = False) -> list[dict]:
    rows = collect(workdir)
    if jax.process_index() == 0:
        write_table(rows, paths.join(workdir, TABLE))
        if report:
            from saejax import plots  # pylint: disable=import-outside-toplevel
            plots.write_report(workdir, rows)
    return rows


def run_sweep(config: ml_collections.ConfigDict, sweep: Sequence[dict[str, Any]], workdir: str,
              *, only: Sequence[str] = (), dry_run: bool = False,
              report: bool = True) -> list[dict[str, Any]]:
    """Trains every unfinished point of `sweep` (override dicts on `config`) under `workdir`.

    Points matching none of the `only` patterns (fnmatch, on run names) are left alone.
    Returns the results table's rows (one per point). A run whose loss turns NaN is recorded
    as failed and the sweep goes on; SIGTERM stops the sweep (train.Preempted) after the
    run's checkpoint. `dry_run` prints the plan and writes nothing.
    """
    workdir = paths.absolute(workdir)
    points = expand(config, sweep)
    selected = _select(points, only)
    finished = {}
    for point in selected:
        _check_same_config(paths.join(workdir, point.name), point.config)
        if _finished(workdir, point.name, int(point.config.train.steps)):
            finished[point.name] = point
    runs = plan([p for p in selected if p.name not in finished], workdir)
    for run in runs:  # a config that cannot work stops the sweep before anything trains
        validation.validate(run.config, jax.device_count())
        _check_same_config(paths.join(workdir, run.workdir), run.config)

    lines = [f"{len(points)} points, {len(selected)} selected, {len(finished)} finished; "
             f"{len(runs)} runs to train:"]
    for run in runs:
        lines.append(f"  {run.workdir}: " + ", ".join(p.name for p in run.points))
    if finished:
        lines.append("  finished, skipped: " + ", ".join(finished))
    if jax.process_index() == 0:
        print("\n".join(lines), flush=True)
    if dry_run:
        return []

    if jax.process_index() == 0:
        paths.makedirs(workdir)
        _write_json(paths.join(workdir, MANIFEST), {"points": [describe(p) for p in points]})
        for run in runs:  # every point's row names its run from the start
            for folder in dict.fromkeys([run.workdir, *(p.name for p in run.points)]):
                paths.makedirs(paths.join(workdir, folder))
            _warn_if_moved(workdir, run)
            _write_run_record(workdir, run, _run_record(workdir, run))
    _write_outputs(workdir)

    for i, run in enumerate(runs):
        logging.info("Sweep run %d of %d: %s (%s).", i + 1, len(runs), run.workdir,
                     ", ".join(p.name for p in run.points))
        record = dict(_run_record(workdir, run), error=None)
        start = time.perf_counter()
        try:
            train.train_and_evaluate(run.config, paths.join(workdir, run.workdir))
        except FloatingPointError as e:
            logging.error("%s failed: %s", run.workdir, e)
            record["error"] = str(e)
        finally:
            record["wall_seconds"] += time.perf_counter() - start
            record["sessions"] += 1
            if jax.process_index() == 0:
                _write_run_record(workdir, run, record)
        _write_outputs(workdir)

    rows = _write_outputs(workdir, report)
    if jax.process_index() == 0:
        print(format_rows(rows), flush=True)
    return rows


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


# ------------------------------------------------------------------------------------------
# Command line: flags and a call into run_sweep, as saejax/main.py. The flags are defined only
# when this module runs as the program, so importing it (tests, plots) defines none.
# ------------------------------------------------------------------------------------------
def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Experiment config file with get_sweep(): "
                                    "path.py[:arg], arg passed to get_config and get_sweep.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "The sweep's directory: one folder per point, the "
                        "results table and the report.")
    flags.DEFINE_list("only", None, "Train only the points whose names match one of these "
                      "fnmatch patterns, e.g. 'x32_*,x64_l1-*'.")
    flags.DEFINE_bool("dry_run", False, "Print the points, the runs that would train them "
                      "and which are finished; train nothing.")
    flags.DEFINE_bool("report", True, "Draw report.md and plots/ when the sweep ends.")
    flags.DEFINE_integer("num_cpu_devices", None, "On CPU, simulate this many devices.")
    flags.DEFINE_bool("distributed", False, "Join a multi-process JAX cluster (see "
                      "saejax/distributed.py).")
    flags.mark_flags_as_required(["config", "workdir"])


def _main(argv):
    del argv
    cli.setup(num_cpu_devices=FLAGS.num_cpu_devices, join_cluster=FLAGS.distributed)
    try:
        sweep = load_sweep(config_flags.get_config_filename(FLAGS["config"]))
        rows = run_sweep(FLAGS.config, sweep, FLAGS.workdir, only=FLAGS.only or (),
                         dry_run=FLAGS.dry_run, report=FLAGS.report)
    except train.Preempted as e:
        logging.warning("%s", e)
        sys.exit(train.SIGTERM_EXIT_CODE)
    except ConfigError as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    failed = [r["name"] for r in rows if r["status"] == FAILED]
    if failed:
        sys.exit(f"error: {len(failed)} points failed ({', '.join(failed)}); see the 'error' "
                 f"column of {paths.join(FLAGS.workdir, TABLE)}. Running the command "
                 f"again retries them from their last good checkpoint.")
    if rows and jax.process_index() == 0:
        print(f"Table: {paths.join(FLAGS.workdir, TABLE)}"
              + (f"\nReport: {paths.join(FLAGS.workdir, 'report.md')}" if FLAGS.report
                 else ""))


if __name__ == "__main__":
    _define_flags()
    app.run(_main)
