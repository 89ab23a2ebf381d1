"""`python -m saejax.harvest` on two processes of one JAX cluster (launch/local.py) writes, row
for row, the stores one process writes; one process killed mid-harvest stops the other within
30 s with a message, and the same command (or one process) then finishes the stores, with no row
lost or twice."""

import json
import os
import shutil
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
import tiny_lm
from launch import local
from saejax import harvest
from saejax.data import store
from saejax.data.store import parts

HOOKS = ("blocks.0.hook_resid_mid", "blocks.1.hook_resid_post")
FLAGS = {"context_length": tiny_lm.CONTEXT, "batch_sequences": 4, "max_sequences": 96,
         "chunk_rows": 64}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny GPT-2 (untrained: the rows need not mean anything here) and the stores one
    process harvests from it."""
    directory = str(tmp_path_factory.mktemp("tiny_lm"))
    checkpoint, text, _ = tiny_lm.make_tiny_lm(directory, steps=0, n_documents=200)
    reference = os.path.join(directory, "single")
    harvest.harvest(checkpoint, text, reference, hooks=HOOKS, **FLAGS)
    return checkpoint, text, reference


def _launch(tiny, out, **env):
    checkpoint, text, _ = tiny
    command = [sys.executable, "-m", "saejax.harvest", f"--checkpoint={checkpoint}",
               f"--tokens={text}", f"--out={out}", f"--hooks={','.join(HOOKS)}",
               *(f"--{k}={v}" for k, v in FLAGS.items())]
    return local.launch(command, processes=2, devices_per_process=1, cwd=ROOT,
                        env={**os.environ, **env})


def _assert_same_stores(path, reference):
    for hook in HOOKS:
        ours, theirs = (store.open_store(os.path.join(p, hook)) for p in (path, reference))
        n = theirs.n_rows
        assert ours.n_rows == n == theirs.n_tokens and n > 10 * FLAGS["chunk_rows"]
        np.testing.assert_array_equal(ours.read(0, n).result(), theirs.read(0, n).result())
        for name in ("token_ids", "positions", "documents"):
            np.testing.assert_array_equal(getattr(ours, name)(0, n), getattr(theirs, name)(0, n),
                                          err_msg=name)
        drop = lambda meta: {k: v for k, v in meta.items() if k != "created_time"}
        assert drop(ours.metadata) == drop(theirs.metadata)
        progress = json.loads(open(os.path.join(path, hook, "progress.json")).read())
        assert progress["committed_rows"] == n and progress["complete"]
        assert not os.path.exists(os.path.join(path, hook, "parts"))  # folded away


def test_two_processes_harvest_the_stores_of_one(tiny, tmp_path):
    procs = _launch(tiny, tmp_path / "multi")
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "Harvested" in outputs[0] and "Harvested" not in outputs[1]  # one voice
    assert "x 2 process(es)" in outputs[0]
    _assert_same_stores(tmp_path / "multi", tiny[2])


def test_a_killed_process_stops_the_other_and_the_same_command_finishes(tiny, tmp_path):
    out = tmp_path / "killed"
    # Process 1 SIGKILLs itself after writing two parts; heartbeats are missed after 5 s.
    procs = _launch(tiny, out, **{parts.KILL_ENV: "1:2", "SAEJAX_HEARTBEAT_TIMEOUT_S": "5"})
    procs[1].communicate(timeout=240)
    killed_at = time.time()
    assert procs[1].returncode == -9
    survivor = procs[0].communicate(timeout=60)[0]
    assert time.time() - killed_at < 30, survivor
    # Stopped at a barrier (saejax's line) or while working (JAX's coordination service's).
    assert procs[0].returncode != 0, survivor
    assert "another process stopped" in survivor or "another task died" in survivor, survivor
    for hook in HOOKS:
        # A reader of the half-written store sees only a committed prefix of rows.
        partial = store.open_store(str(out / hook), allow_partial=True)
        assert partial.n_rows < partial.n_tokens
        assert len(store_parts := os.listdir(out / hook / "parts")) >= 1, store_parts

    # One process finishes a copy: the parts are shared out afresh for another process count.
    shutil.copytree(out, tmp_path / "one")
    checkpoint, text, reference = tiny
    result = harvest.harvest(checkpoint, text, str(tmp_path / "one"), hooks=HOOKS, **FLAGS)
    assert result["tokens_skipped"] > 0 and result["tokens_written"] > 0  # only what was missing
    _assert_same_stores(tmp_path / "one", reference)

    procs = _launch(tiny, out)  # the same command
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "Resuming the harvest" in outputs[0]
    _assert_same_stores(out, tiny[2])
