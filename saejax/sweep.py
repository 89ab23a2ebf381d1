"""Sweeps: expands an experiment's `get_sweep()`, trains every point, collects a results table.

    python -m saejax.sweep --config=experiments/scaling.py:runlocal --workdir=DIR

A sweep is a list of override dicts (`{"sae.expansion_factor": 32, "sae.l1_coefficient": 3e-4}`)
applied to the experiment's config (after any `--config.x=y`, which applies to every point).
Points that differ only in the architecture's sparsity coefficient have the same shape and train
together, as one group (`group.sparsity_coefficients`: several SAEs in one jitted step on the
same batches); a point of an architecture without one (TopK's k) trains as its own run. Running
the command again skips finished points and resumes the others; `--only='x32_*'` picks points
by name, `--dry_run` prints the points and runs without training. This module owns grouping the
points into runs, training them and the command; expanding `get_sweep()` into points is
`sweep_points.py`'s (re-exported here).

What the sweep writes in DIR, a local folder or a bucket (gs://...; every file goes through
saejax/paths.py, so there are no symlinks):

    sweep.json          the points: name, overrides and the config values the table reports
    <point name>/       one point, laid out like a single run's workdir (config.json,
                        checkpoints/, metrics.jsonl, summary.json), also when the point trains
                        in a group: the group writes its members there (group.member_workdirs)
    groups/<group>/     a group's own workdir (its stacked checkpoints and summary), named by
                        shape and coefficients (x32_l1-0.1+0.3+1)
    results.csv         one row per point: its config values, status and final metrics,
                        rewritten after every run (saejax/results.py)
    report.md, plots/   the scaling plots and fits (saejax/plots.py), drawn when the sweep ends;
                        `python -m saejax.plots DIR` draws them from the runs so far

Every point's folder, and every group's, also holds `sweep_run.json`: the folder of the run
that trains the point (`run_dir`: the point's own, or groups/<group>), that run's points, its
wall time summed over sessions (compilation, data and evaluation included; a SIGKILLed session
is not counted) and the error that stopped it, if any.
"""

from __future__ import annotations

import fnmatch
import sys
import time
from typing import Any, NamedTuple, Sequence

from absl import flags, logging
import jax
import ml_collections
from ml_collections import config_flags

from saejax import cli, paths, plots, results, sae, train, validation
from saejax import workdir as workdirs
from saejax.errors import ConfigError
# The results table's names, re-exported: sweep.collect, sweep.DONE, ... keep working.
from saejax.results import (DONE, FAILED, MANIFEST, METRICS, PARTIAL, PENDING, RUN_FILE,  # noqa: F401
                            TABLE, collect, format_rows, read_table, write_table)
# Expanding the sweep into points, re-exported: sweep.expand, sweep.load_sweep keep working.
from saejax.sweep_points import (Point, apply_overrides, describe, expand,  # noqa: F401
                                 load_sweep, sparsity_level)
from saejax.workdir import format_value, run_name  # noqa: F401

GROUPS_DIR = "groups"


class Run(NamedTuple):
    """One call of `train.train_and_evaluate`: one point, or a group of points of one shape."""

    workdir: str                 # relative to the sweep's workdir: a point name or groups/...
    config: ml_collections.ConfigDict  # a group's puts its members in their point folders
    points: tuple[Point, ...]


# ------------------------------------------------------------------------------------------
# The state of a point on disk, and grouping the unfinished ones into runs.
# ------------------------------------------------------------------------------------------
def _run_record(workdir: str, run: Run) -> dict:
    """The run's sweep_run.json so far (wall time and sessions add up over sessions)."""
    record = (workdirs.read_json(paths.join(workdir, run.workdir, RUN_FILE))
              or {"wall_seconds": 0.0, "sessions": 0, "error": None})
    record.update(run_dir=run.workdir, points=[p.name for p in run.points])
    return record


def _warn_if_moved(workdir: str, run: Run) -> None:
    """A point trained part way in one group and now planned in another (other points
    selected or added) continues from the new group's checkpoints, or from scratch; the first
    group keeps its own."""
    for point in run.points:
        before = (workdirs.read_json(paths.join(workdir, point.name, RUN_FILE)) or {}).get("run_dir")
        if before in (None, run.workdir):
            continue
        last = workdirs.last_record(paths.join(workdir, point.name, "metrics.jsonl"))
        if last:
            logging.warning("%s trained to step %s in %s and now trains in %s, from that "
                            "run's own checkpoint or from scratch; select the points of %s to "
                            "resume it there instead.", point.name, last.get("step"), before,
                            run.workdir, before)


def _write_run_record(workdir: str, run: Run, record: dict) -> None:
    """Into the run's folder and each of its points' folders, where `collect` reads it."""
    for folder in dict.fromkeys([run.workdir, *(p.name for p in run.points)]):
        workdirs.write_json(paths.join(workdir, folder, RUN_FILE), record)


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
    member_names = [workdirs.member_name(coefficient, v) for v in values]
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
    return Run(f"{GROUPS_DIR}/{shape}{workdirs.name_part(key, tuple(values))}", config, points)


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
            plots.write_report(workdir, rows)
    return rows


def _plan_text(points, selected, finished, runs) -> str:
    lines = [f"{len(points)} points, {len(selected)} selected, {len(finished)} finished; "
             f"{len(runs)} runs to train:"]
    for run in runs:
        lines.append(f"  {run.workdir}: " + ", ".join(p.name for p in run.points))
    if finished:
        lines.append("  finished, skipped: " + ", ".join(finished))
    return "\n".join(lines)


def _train(workdir: str, run: Run) -> None:
    """Trains one run; a NaN is recorded in its sweep_run.json, not raised."""
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
    # A folder holding a run of another config is refused before anything trains (a finished
    # point is only skipped, and a run only resumed, if its config is the same).
    for point in selected:
        workdirs.check_resumable(paths.join(workdir, point.name), point.config)
        if results.finished_summary(workdir, point.name, int(point.config.train.steps)):
            finished[point.name] = point
    runs = plan([p for p in selected if p.name not in finished], workdir)
    for run in runs:  # a config that cannot work stops the sweep before anything trains
        validation.validate(run.config, jax.device_count())
        workdirs.check_resumable(paths.join(workdir, run.workdir), run.config)

    if jax.process_index() == 0:
        print(_plan_text(points, selected, finished, runs), flush=True)
    if dry_run:
        return []

    if jax.process_index() == 0:
        paths.makedirs(workdir)
        workdirs.write_json(paths.join(workdir, MANIFEST),
                            {"points": [describe(p) for p in points]})
        for run in runs:  # every point's row names its run from the start
            for folder in dict.fromkeys([run.workdir, *(p.name for p in run.points)]):
                paths.makedirs(paths.join(workdir, folder))
            _warn_if_moved(workdir, run)
            _write_run_record(workdir, run, _run_record(workdir, run))
    _write_outputs(workdir)
    for i, run in enumerate(runs):
        logging.info("Sweep run %d of %d: %s (%s).", i + 1, len(runs), run.workdir,
                     ", ".join(p.name for p in run.points))
        _train(workdir, run)
        _write_outputs(workdir)

    rows = _write_outputs(workdir, report)
    if jax.process_index() == 0:
        print(format_rows(rows), flush=True)
    return rows


# ------------------------------------------------------------------------------------------
# Command line (saejax/cli.py): flags defined only when this module runs as the program, so
# importing it defines none.
# ------------------------------------------------------------------------------------------
# Exit code when the sweep ran but some points failed (NaN); errors that stop it exit with 2.
FAILED_POINTS_EXIT_CODE = 1


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
    cli.define_device_flags(join_cluster=True)
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    cli.positional(argv, 0, "python -m saejax.sweep --config=FILE.py[:arg] --workdir=DIR")
    cli.setup_from_flags()
    values = flags.FLAGS
    sweep = load_sweep(config_flags.get_config_filename(values["config"]))
    rows = run_sweep(values.config, sweep, values.workdir, only=values.only or (),
                     dry_run=values.dry_run, report=values.report)
    table = paths.join(values.workdir, TABLE)
    failed = [r["name"] for r in rows if r["status"] == FAILED]
    if failed:
        print(f"error: {len(failed)} points failed ({', '.join(failed)}); see the 'error' "
              f"column of {table}. Running the command again retries them from their last "
              f"good checkpoint.", file=sys.stderr)
        sys.exit(FAILED_POINTS_EXIT_CODE)
    if rows and jax.process_index() == 0:
        print(f"Table: {table}" + (f"\nReport: {paths.join(values.workdir, 'report.md')}"
                                   if values.report else ""))


if __name__ == "__main__":
    cli.run(main, _define_flags)
