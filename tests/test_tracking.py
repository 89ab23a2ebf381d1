"""The mirrors of metrics.jsonl: TensorBoard event files read back with TensorBoard's own event
reader hold the same scalars, the density histogram and the final evaluations (also after a
resume, which purges the steps trained again), and W&B gets the same records (a stand-in
module: wandb is an optional extra) or a clear error when it is asked for and missing."""

import json
import os
import sys
import types

import numpy as np
import pytest

from conftest import toy_config
from saejax import evals, tracking, train, validation
from saejax.errors import ConfigError

# The density window fills twice in 20 steps of 256 tokens: the histogram is logged.
SHORT = {"train.steps": 20, "evals.density_window_tokens": 2048}


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _events(workdir):
    from tensorboard.backend.event_processing import event_accumulator  # test extra
    accumulator = event_accumulator.EventAccumulator(
        os.path.join(workdir, "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


class _FakeWandb(types.ModuleType):
    """What saejax calls of wandb, recording the calls."""

    def __init__(self):
        super().__init__("wandb")
        self.runs = []

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, logged=[], summary={}, finished=False)
        run.log = lambda values, step: run.logged.append((step, values))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run

    class Histogram:
        def __init__(self, np_histogram):
            self.counts, self.edges = np_histogram


def test_tensorboard_and_wandb_get_the_metrics_the_histogram_and_the_summary(tmp_path,
                                                                              monkeypatch):
    """Ten steps with TensorBoard, then resumed to twenty with W&B asked for as well."""
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(toy_config(**{**SHORT, "train.steps": 10}), workdir)
    asked = {"logging.wandb_project": "saejax-test", "logging.wandb_mode": "offline"}
    config = toy_config(**SHORT, **asked)
    summary = train.train_and_evaluate(config, workdir)
    records = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == [5, 10, 15, 20]

    events = _events(workdir)
    for name in ("loss", "mse", "fvu", "l0", "dead_fraction", "mmcs", "tokens_per_s",
                 "train_seconds"):
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        expected = [(r["step"], r[name]) for r in records if r[name] is not None]
        assert [s for s, _ in logged] == [s for s, _ in expected], name  # each step once
        np.testing.assert_allclose([v for _, v in logged], [v for _, v in expected],
                                   rtol=1e-6, err_msg=name)
    assert "log_density_histogram" not in events.Tags()["scalars"]
    histograms = events.Histograms("log_density_histogram")
    with_density = [r for r in records if sum(r["log_density_histogram"])]
    assert [h.step for h in histograms] == [r["step"] for r in with_density] and histograms
    for h, r in zip(histograms, with_density):
        value = h.histogram_value
        np.testing.assert_array_equal(value.bucket, r["log_density_histogram"])
        assert list(value.bucket_limit) == [*evals.LOG_DENSITY_EDGES, 0.5]
        assert value.num == 1024  # every latent of the toy SAE
    for name in ("mse", "fvu", "l0", "mmcs", "train_seconds"):  # each session's final evals
        first, final = events.Scalars(f"summary/{name}")
        assert (first.step, final.step) == (10, 20)
        assert final.value == pytest.approx(summary[name], rel=1e-6)

    (run,) = fake.runs
    assert run.kwargs["project"] == "saejax-test" and run.kwargs["mode"] == "offline"
    assert run.kwargs["resume"] == "allow" and run.finished
    assert run.kwargs["config"]["sae"]["expansion_factor"] == 4
    assert [s for s, _ in run.logged] == [15, 20]
    for (_, values), record in zip(run.logged, records[2:]):
        assert values["l0"] == pytest.approx(record["l0"])
        np.testing.assert_array_equal(values["log_density_histogram"].counts,
                                      record["log_density_histogram"])
    assert run.summary["summary/fvu"] == pytest.approx(summary["fvu"])
    # A resumed run logs on into the same W&B run (its id kept in the workdir).
    tracking.WandB(config, workdir, "run").close()
    assert fake.runs[1].kwargs["id"] == run.kwargs["id"]
    off = toy_config(**{"logging.tensorboard": False})
    assert tracking.open_mirrors(off, str(tmp_path / "other"), 0) == []


def test_wandb_asked_for_but_missing_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"logging.wandb_project='p' asks for Weights & "
                                          r"Biases, but wandb is not installed: pip install"):
        validation.validate(toy_config(**{"logging.wandb_project": "p"}), 8)
    with pytest.raises(ConfigError, match=r"logging.wandb_mode='offlne' is not known"):
        validation.validate(toy_config(**{"logging.wandb_mode": "offlne"}), 8)


def test_scalars_are_the_finite_numbers_of_a_record():
    assert tracking.scalars({"step": 3, "loss": 1.5, "l0": 2, "mmcs": None, "x": float("nan"),
                             "log_density_histogram": [1, 2], "architecture": "topk",
                             "ok": True}) == {"loss": 1.5, "l0": 2.0}


def test_only_process_zero_opens_the_mirrors(tmp_path, monkeypatch):
    from saejax import workdir  # pylint: disable=import-outside-toplevel
    opened = []
    monkeypatch.setattr(workdir.jax, "process_index", lambda: 1)
    log = workdir.MetricsLog(str(tmp_path / "metrics.jsonl"), 0,
                             open_mirrors=lambda: opened.append(1) or [])
    log.write({"step": 1, "loss": 1.0})
    log.close({"step": 1})
    assert opened == [] and not (tmp_path / "metrics.jsonl").exists()
    monkeypatch.setattr(workdir.jax, "process_index", lambda: 0)
    workdir.MetricsLog(str(tmp_path / "metrics.jsonl"), 0,
                       open_mirrors=lambda: opened.append(1) or []).close()
    assert opened == [1]
