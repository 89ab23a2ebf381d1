"""Results do not move under refactoring: the params of every architecture and variant after a
few steps equal, to float rounding, what the code before the structure refactor produced
(tests/fixtures/legacy/, written by tests/fixtures/make_legacy.py), and a workdir written by that
code resumes and loads."""

import json
import os
import shutil

import jax
import jaxlib
import numpy as np
import pytest

from legacy_cases import CASES, WORKDIR_CASE, config_for
from saejax import sae, train

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "legacy")


def _reference():
    with np.load(os.path.join(FIXTURE, "params.npz")) as f:
        return {k: f[k] for k in f.files}


def _same_build_and_host() -> bool:
    """Whether this is the XLA build and the host the fixtures were written with: XLA's CPU
    backend compiles for the host's instruction set, so the same program on another CPU may
    round a few ops differently (seen: up to 4 ulp in the params after the cases' steps). The
    fixtures record the host only since that was seen; without it, no bitwise claim."""
    with open(os.path.join(FIXTURE, "versions.json")) as f:
        versions = json.load(f)
    return ((versions["jax"], versions["jaxlib"]) == (jax.__version__, jaxlib.__version__)
            and versions.get("host") == _host())


def _host() -> str:
    """The CPU model and the instruction-set flags XLA compiles for (/proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                        if ":" in line)
    except OSError:
        return ""
    return " ".join(info.get(k, "").strip() for k in ("model name", "flags"))


def _legacy_member_name(member_dir: str) -> str:
    """The name the code before the refactor gave a group member's folder (and the fixture's
    keys): <coefficient>-<value>, l1_coefficient-0.3; members are now named as sweep points."""
    with open(os.path.join(member_dir, "config.json")) as f:
        config = json.load(f)
    coefficient = sae.get(config["sae"]["architecture"]).sparsity_coefficient
    return f"{coefficient}-{config['sae'][coefficient]:g}"


def _assert_equal(actual, expected, what):
    if _same_build_and_host():  # the same XLA compiles the same program to the same bits
        np.testing.assert_array_equal(actual, expected, err_msg=what)
    else:  # another XLA may fuse differently; the numbers must still agree to rounding
        np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-6, err_msg=what)


@pytest.mark.parametrize("name", sorted(CASES))
def test_params_equal_the_code_before_the_refactor(name, tmp_path):
    reference = {k[len(name) + 1:]: v for k, v in _reference().items()
                 if k.startswith(name + "/")}
    assert reference, f"no fixture arrays for {name}"
    workdir = str(tmp_path / name)
    train.train_and_evaluate(config_for(name), workdir)
    actual = dict(train.load_params(workdir))
    members = os.path.join(workdir, "members")
    if os.path.isdir(members):
        for member in sorted(os.listdir(members)):
            member_dir = os.path.join(members, member)
            for key, value in train.load_params(member_dir).items():
                actual[f"members/{_legacy_member_name(member_dir)}/{key}"] = value
    assert sorted(actual) == sorted(reference)
    for key, expected in reference.items():
        _assert_equal(actual[key], expected, f"{name}/{key}")


def test_an_old_workdir_loads_and_resumes(tmp_path):
    workdir = str(tmp_path / "old")
    shutil.copytree(os.path.join(FIXTURE, "workdir"), workdir)
    reference = {k[len(WORKDIR_CASE) + 1:]: v for k, v in _reference().items()
                 if k.startswith(WORKDIR_CASE + "/")}
    loaded = train.load_params(workdir)
    assert sorted(loaded) == sorted(reference)
    for key, expected in reference.items():
        _assert_equal(loaded[key], expected, key)
    # More steps is a change a run may resume with; it carries on from the old step 6.
    summary = train.train_and_evaluate(config_for(WORKDIR_CASE, **{"train.steps": 9}), workdir)
    assert summary["step"] == 9
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [3, 6, 9]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int)[-1] == "9"


def test_an_old_lm_workdir_keeps_every_position_and_token():
    """A workdir written before the attention-sink exclusion existed resumes as it trained
    (no position or token excluded); a new one excludes position 0 and special tokens."""
    from saejax import configs, workdir
    import tempfile
    old = tempfile.mkdtemp()
    shutil.copy(os.path.join(FIXTURE, "workdir", "config.json"), old)
    config = config_for(WORKDIR_CASE, **{"train.steps": 9})
    workdir.write_config(config, old)
    assert tuple(config.lm.exclude_positions) == () and config.lm.exclude_token_ids == ""
    with open(os.path.join(old, "config.json")) as f:
        assert json.load(f)["lm"]["exclude_positions"] == []
    # The sweep checks a point's folder the same way before it trains there.
    point = tempfile.mkdtemp()
    shutil.copy(os.path.join(FIXTURE, "workdir", "config.json"), point)
    swept = config_for(WORKDIR_CASE)
    workdir.check_resumable(point, swept)
    assert tuple(swept.lm.exclude_positions) == () and swept.lm.exclude_token_ids == ""
    fresh = config_for(WORKDIR_CASE)
    workdir.write_config(fresh, tempfile.mkdtemp())
    assert tuple(fresh.lm.exclude_positions) == configs.base_config().lm.exclude_positions
