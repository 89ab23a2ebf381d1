"""The sweep runner: names, grouping, a tiny sweep end to end (table, per-point folders, plots),
rerunning skips finished points and resumes unfinished ones, partial tables; every file goes
through saejax.paths, so a sweep works in a bucket."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, toy_config
from saejax import paths, plots, sweep, train
from saejax.sharding import ConfigError


def _tiny_config(steps):
    return toy_config("smoke", **{"data.d": 16, "data.n_features": 32, "train.batch_size": 64,
                                  "train.steps": steps, "train.log_every": 5,
                                  "train.checkpoint_every": 10, "evals.eval_batches": 2})


TINY_SWEEP = [{"sae.expansion_factor": e, "sae.l1_coefficient": l1}
              for e in (1, 2) for l1 in (0.1, 0.3)]


def test_names_grouping_and_bad_sweeps():
    config = toy_config()
    points = sweep.expand(config, [
        {"sae.expansion_factor": 32, "sae.l1_coefficient": 3e-4},
        {"sae.expansion_factor": 32, "sae.l1_coefficient": 0.6},
        {"sae.expansion_factor": 8, "sae.l1_coefficient": 0.6},
        {"sae.architecture": "topk", "sae.expansion_factor": 8, "sae.k": 16},
        {"sae.architecture": "topk", "sae.expansion_factor": 8, "sae.k": 32}])
    assert [p.name for p in points] == ["x32_l1-3e-4", "x32_l1-0.6", "x8_l1-0.6",
                                        "topk_x8_k16", "topk_x8_k32"]
    assert points[0].config.sae.l1_coefficient == 3e-4 and config.sae.l1_coefficient == 0.6
    runs = sweep.plan(points, "gs://bucket/sweep")
    assert [(r.workdir, [p.name for p in r.points]) for r in runs] == [
        ("groups/x32_l1-3e-4+0.6", ["x32_l1-3e-4", "x32_l1-0.6"]),
        ("groups/x8_l1-0.6", ["x8_l1-0.6"]),
        ("topk_x8_k16", ["topk_x8_k16"]), ("topk_x8_k32", ["topk_x8_k32"])]
    assert tuple(runs[0].config.group.sparsity_coefficients) == (3e-4, 0.6)
    # A group trains its members in the points' own folders.
    assert tuple(runs[0].config.group.member_workdirs) == ("gs://bucket/sweep/x32_l1-3e-4",
                                                           "gs://bucket/sweep/x32_l1-0.6")
    assert not tuple(runs[2].config.group.sparsity_coefficients)
    assert not tuple(runs[2].config.group.member_workdirs)
    # What the table compares across sizes: L1 per unit of expansion for relu, k for topk.
    assert sweep.sparsity_level(points[1].config) == ("l1_coefficient / expansion_factor",
                                                      0.6 / 32)
    assert sweep.sparsity_level(points[3].config) == ("k", 16.0)

    with pytest.raises(ConfigError, match="sae.l1_coeficient.*not a config field"):
        sweep.expand(config, [{"sae.l1_coeficient": 0.1}])
    with pytest.raises(ConfigError, match="both named"):
        sweep.expand(config, [{"sae.k": 4}, {"sae.k": 4}])
    with pytest.raises(ConfigError, match="same SAE"):
        sweep.plan(sweep.expand(config, [{}, {"sae.l1_coefficient": 0.6}]), "/sweep")
    with pytest.raises(ConfigError, match="member_workdirs"):
        sweep.expand(config, [{"group.member_workdirs": ("/a",)}])
    with pytest.raises(ConfigError, match="matches no point"):
        sweep.run_sweep(config, [{"sae.k": 4}], "/nonexistent", only=["x64_*"], dry_run=True)


def test_experiment_sweeps_expand_and_validate():
    full = sweep.load_sweep(os.path.join(ROOT, "experiments/scaling.py"))
    local = sweep.load_sweep(os.path.join(ROOT, "experiments/scaling.py:runlocal"))
    toy = sweep.load_sweep(os.path.join(ROOT, "experiments/toy.py"))  # get_sweep() takes no arg
    assert len(full) == 64 and len(local) == 15 and len(toy) == 40
    from experiments import scaling  # pylint: disable=import-outside-toplevel
    for arg, points in (("runlocal", local), (None, full)):
        runs = sweep.plan(sweep.expand(scaling.get_config(arg), points), "/sweep")
        assert len(runs) == (5 if arg else 32)
    with pytest.raises(ValueError, match="unknown argument"):
        scaling.get_sweep("nope")


def test_tiny_sweep_end_to_end_rerun_resume_and_partial_plots(tmp_path, monkeypatch):
    workdir = str(tmp_path / "sweep")
    rows = sweep.run_sweep(_tiny_config(10), TINY_SWEEP, workdir)

    # The table: one row per point, config values and final metrics.
    table = sweep.read_table(os.path.join(workdir, "results.csv"))
    assert [r["name"] for r in table] == ["x1_l1-0.1", "x1_l1-0.3", "x2_l1-0.1", "x2_l1-0.3"]
    assert [r["name"] for r in rows] == [r["name"] for r in table]
    for row in table:
        assert row["status"] == "done" and row["step"] == 10 and row["tokens"] == 640
        assert row["n_latents"] == 16 * row["expansion_factor"]
        assert row["train_flops"] == row["flops_per_token"] * 640 > 0
        assert row["wall_seconds"] > 0 and row["group_size"] == 2
        for key in ("mse", "fvu", "l0", "dead_fraction", "mmcs"):
            assert isinstance(row[key], float), key
        # Each point has its own folder (not a link) laid out like a single run's workdir.
        point_dir = os.path.join(workdir, row["name"])
        assert os.path.isdir(point_dir) and not os.path.islink(point_dir)
        summary = json.loads(open(os.path.join(point_dir, "summary.json")).read())
        assert summary["fvu"] == pytest.approx(row["fvu"])
        assert summary["l1_coefficient"] == row["l1_coefficient"] == row["config:sae.l1_coefficient"]
        assert os.path.isdir(os.path.join(point_dir, "checkpoints"))
    assert table[2]["run_dir"] == "groups/x2_l1-0.1+0.3"
    assert not os.path.exists(os.path.join(workdir, "groups/x2_l1-0.1+0.3/members"))
    for name in plots.FIGURES:
        for ext in ("png", "svg"):
            path = os.path.join(workdir, "plots", f"{name}.{ext}")
            assert os.path.getsize(path) > 1000, path
        assert f"plots/{name}.png" in open(os.path.join(workdir, "report.md")).read()
    assert open(os.path.join(workdir, "plots", "loss_vs_latents.png"), "rb").read(4) == b"\x89PNG"

    # Running it again trains nothing.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished point was trained again")
    monkeypatch.setattr(train, "train_and_evaluate", no_training)
    assert [r["status"] for r in sweep.run_sweep(_tiny_config(10), TINY_SWEEP, workdir)] == \
        ["done"] * 4
    monkeypatch.undo()

    # More steps leave every point unfinished; resuming only x1 continues its group's run from
    # step 10 (no step is logged twice) and leaves x2 partial at step 10.
    calls = []
    real = train.train_and_evaluate
    monkeypatch.setattr(train, "train_and_evaluate",
                        lambda config, run_workdir: calls.append(run_workdir) or real(config, run_workdir))
    rows = sweep.run_sweep(_tiny_config(20), TINY_SWEEP, workdir, only=["x1_*"])
    assert calls == [os.path.join(workdir, "groups/x1_l1-0.1+0.3")]
    steps = [json.loads(line)["step"]
             for line in open(os.path.join(workdir, "x1_l1-0.3", "metrics.jsonl"))]
    assert steps == [5, 10, 15, 20]
    assert [(r["status"], r["step"]) for r in rows] == [("done", 20), ("done", 20),
                                                         ("partial", 10), ("partial", 10)]
    assert rows[2]["fvu"] is not None and rows[2]["train_flops"] > 0

    # The plots work from the partial table alone, mark it, and fit nothing yet.
    report = open(plots.write_report(workdir, sweep.read_table(
        os.path.join(workdir, "results.csv")))).read()
    assert "2 done, 2 partial" in report and "**Partial results**" in report

    # Changing what a finished point trained is refused rather than silently skipped.
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        changed = _tiny_config(20)
        changed.optim.learning_rate = 1e-3
        sweep.run_sweep(changed, TINY_SWEEP, workdir, only=["x1_*"], dry_run=True)


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    calls = []

    def nan_loss(config, run_workdir):
        calls.append(os.path.basename(run_workdir))
        raise FloatingPointError("Non-finite loss between step 1 and step 5")
    monkeypatch.setattr(train, "train_and_evaluate", nan_loss)
    workdir = str(tmp_path)
    rows = sweep.run_sweep(_tiny_config(10), TINY_SWEEP, workdir, report=False)
    assert calls == ["x1_l1-0.1+0.3", "x2_l1-0.1+0.3"]
    assert [r["status"] for r in rows] == ["failed"] * 4
    assert "Non-finite loss" in sweep.read_table(os.path.join(workdir, "results.csv"))[0]["error"]
    # The next attempt clears the error (here it trains nothing, so the points are pending).
    monkeypatch.setattr(train, "train_and_evaluate", lambda config, run_workdir: None)
    rows = sweep.run_sweep(_tiny_config(10), TINY_SWEEP, workdir, report=False)
    assert [r["status"] for r in rows] == ["pending"] * 4
    run_file = json.loads(open(os.path.join(workdir, "groups/x1_l1-0.1+0.3/sweep_run.json")).read())
    assert run_file["sessions"] == 2 and run_file["error"] is None


def test_cli_dry_run_lists_points_and_groups(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "saejax.sweep", "--config=experiments/scaling.py:runlocal",
         f"--workdir={tmp_path}", "--dry_run", "--only=x16_*,x1_l1-0.2",
         "--config.train.steps=10"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr
    assert "15 points, 4 selected, 0 finished; 2 runs to train:" in result.stdout
    assert "groups/x16_l1-3.2+6.4+12.8: x16_l1-3.2, x16_l1-6.4, x16_l1-12.8" in result.stdout
    assert os.listdir(tmp_path) == []


def test_sweep_in_a_bucket_goes_through_paths_only(tmp_path, monkeypatch):
    """Every path taken as remote (etils.epath also reads local folders): the sweep, its
    training runs, the table and the plots work without os.* file calls or symlinks."""
    monkeypatch.setattr(paths, "is_remote", lambda path: True)

    def refuse(*args, **kwargs):
        raise AssertionError("a local-only file operation on a remote path")
    monkeypatch.setattr(os, "symlink", refuse)
    monkeypatch.setattr(os, "replace", refuse)  # paths' local writes rename into place
    workdir = str(tmp_path / "sweep")
    rows = sweep.run_sweep(_tiny_config(5), TINY_SWEEP[:2], workdir)
    assert [(r["status"], r["step"], r["run_dir"]) for r in rows] == [
        ("done", 5, "groups/x1_l1-0.1+0.3")] * 2
    for name in ("x1_l1-0.1", "x1_l1-0.3"):
        assert sorted(os.listdir(os.path.join(workdir, name))) == [
            "checkpoints", "config.json", "metrics.jsonl", "summary.json", "sweep_run.json",
            "tensorboard"]  # each point's event files (saejax/tracking.py)
    monkeypatch.setattr(train, "train_and_evaluate", refuse)
    assert [r["status"] for r in sweep.run_sweep(_tiny_config(5), TINY_SWEEP[:2], workdir,
                                                 report=False)] == ["done"] * 2
    plots.write_report(workdir)  # re-collects, rewrites the table, redraws
    assert paths.read_bytes(os.path.join(workdir, "plots", "loss_vs_latents.png"))[:4] == \
        b"\x89PNG"
    assert "2 done" in paths.read_text(os.path.join(workdir, "report.md"))
    for root, dirs, files in os.walk(workdir):
        assert not any(os.path.islink(os.path.join(root, f)) for f in dirs + files)
