"""The SAELens peer benchmark: a clear error without its venv, and its saejax side and
plumbing at a tiny shape, with a stand-in for SAELens' step (sae_lens is not installed here)."""

import json
import os
import stat
import sys

import pytest

from benchmarks import peers

TINY = ["--d=32", "--expansion_factors=2", "--batch_size=64", "--k=4", "--iters=2"]


def test_missing_saelens_venv_names_the_setup_command(tmp_path):
    with pytest.raises(SystemExit, match="bash benchmarks/setup_saelens.sh"):
        peers.main([*TINY, f"--saelens_venv={tmp_path / 'missing'}"])


def test_peers_times_saejax_and_compares_with_the_saelens_step(tmp_path, capsys):
    # A stand-in for the venv's python: answers as saelens_step.py does, and records its flags.
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "python"
    fake.write_text(f"#!{sys.executable}\n"
                    "import json, sys\n"
                    "flags = dict(a.lstrip('-').split('=', 1) for a in sys.argv[2:])\n"
                    "print(json.dumps({'tokens_per_s': 1000.0, 'sae_lens': 'stand-in', "
                    "'torch': 'none', 'flags': flags}))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)

    results = peers.main([*TINY, f"--saelens_venv={tmp_path}"])

    assert [(r["architecture"], r["expansion_factor"]) for r in results] == [
        ("relu", 2), ("topk", 2)]
    for r in results:
        assert r["n_latents"] == 64 and r["saejax_tokens_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["saejax_tokens_per_s"] / 1000.0)
        assert r["target"] == peers.DENSE_TARGET
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["benchmark"] == "peers" and summary["sae_lens"] == "stand-in"
    assert len(summary["cases"]) == 2


def test_saelens_gets_the_same_work_per_step(tmp_path, monkeypatch):
    # relu is SAELens' standard SAE; the L1 coefficient is saejax's x d / n_latents (SAELens
    # sums where saejax averages).
    captured = {}

    def fake_run(command, **kwargs):
        del kwargs
        captured["flags"] = dict(a.lstrip("-").split("=", 1) for a in command[2:])
        return type("Out", (), {"returncode": 0, "stderr": "",
                                "stdout": json.dumps({"tokens_per_s": 1.0})})()

    args = peers.argparse.Namespace(d=32, batch_size=64, k=4, mesh_model=1)
    config = peers.case_config(args, "relu", 4)
    monkeypatch.setattr(peers.subprocess, "run", fake_run)
    peers.time_saelens_step("python", config, os.fspath(tmp_path / "a.npy"), iters=3)
    flags = captured["flags"]
    assert (flags["architecture"], flags["d"], flags["expansion_factor"], flags["batch_size"],
            flags["k"], flags["iters"]) == ("standard", "32", "4", "64", "4", "3")
    assert float(flags["l1_coefficient"]) == pytest.approx(
        float(config.sae.l1_coefficient) * 32 / 128)
    assert float(flags["learning_rate"]) == float(config.optim.learning_rate)
