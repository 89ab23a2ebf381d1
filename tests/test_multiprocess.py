"""Two processes x 4 CPU devices form one JAX cluster (launch/local.py) and train one sharded
SAE; the result equals the single-process 8-device run, and a SIGTERM to one host stops every
host at the same step with a checkpoint, from which the relaunched run resumes."""

import signal
import sys
import time

import numpy as np

from conftest import ROOT, toy_config
from launch import local
from saejax import train

FLAGS = {"data.d": 32, "data.n_features": 48, "train.batch_size": 64, "train.steps": 60,
         "train.checkpoint_every": 10, "train.log_every": 10, "sae.architecture": "topk",
         "sae.k": 4, "mesh.model": 2}


def _launch(workdir):
    command = [sys.executable, "-m", "saejax.main", "--config=experiments/toy.py",
               f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in FLAGS.items())]
    return local.launch(command, processes=2, devices_per_process=4, cwd=ROOT)


def _wait(procs, timeout=300):
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outputs


def test_two_processes_train_like_one_and_resume_after_sigterm_to_one_host(tmp_path):
    reference = tmp_path / "single"
    train.train_and_evaluate(toy_config(None, **FLAGS), str(reference))

    workdir = tmp_path / "multi"
    procs = _launch(workdir)
    deadline = time.time() + 240
    while not (workdir / "checkpoints" / "10").exists():
        assert all(p.poll() is None for p in procs), _wait(procs)[1]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # only one host is preempted
    codes, outputs = _wait(procs)
    assert codes == [train.SIGTERM_EXIT_CODE] * 2, outputs
    stopped = {int(out.split("saved a checkpoint at step ")[1].split()[0]) for out in outputs}
    assert len(stopped) == 1, outputs  # both hosts stopped at the same step
    step = stopped.pop()
    assert 10 <= step < 60 and (workdir / "checkpoints" / str(step)).is_dir()
    assert step % 10 == 0  # the hosts agree on SIGTERM every train.preemption_check_every
    assert not (workdir / "summary.json").exists()

    codes, outputs = _wait(_launch(workdir))
    assert codes == [0, 0], outputs
    assert f"Resuming at step {step}" in outputs[0]
    assert "Recovered the true features" in outputs[0]
    assert "Recovered the true features" not in outputs[1]  # only process 0 reports
    multi, single = train.load_params(str(workdir)), train.load_params(str(reference))
    for name in single:
        np.testing.assert_allclose(multi[name], single[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
