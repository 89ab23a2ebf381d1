"""The launchers' commands and scripts, from --dry_run and the pure planning functions (no
gcloud or SLURM needed); the sbatch script is also syntax-checked and run with stub srun."""

import os
import shlex
import subprocess
import tarfile

import pytest

from launch import common, slurm, tpu

RUN = ["python", "-m", "saejax.main", "--config=experiments/toy.py",
       "--workdir=gs://bucket/runs/toy", "--config.sae.k=32"]


def tpu_plan(*flags, command=RUN):
    return tpu.plan(tpu.parse_args([*flags, "--", *command]))


def find(commands, *words):
    """The commands that contain all these words (e.g. "tpu-vm", "ssh")."""
    return [c for c in commands if all(w in c for w in words)]


def remote_command(ssh):
    (flag,) = [a for a in ssh if a.startswith("--command=")]
    return flag.split("=", 1)[1]


# Cloud TPU

def test_single_host_on_demand():
    commands = tpu_plan("--name=sae-1", "--zone=us-west4-a", "--accelerator=v5litepod-8")
    pack, create, scp, setup, run, delete = commands
    assert pack[:4] == ["python3", "-m", "launch.common", "pack"]
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "sae-1"]
    assert {"--zone=us-west4-a", "--accelerator-type=v5litepod-8",
            "--version=v2-alpha-tpuv5-lite"} <= set(create)
    assert not {"--spot", "--preemptible", "--reserved"} & set(create)
    assert scp[3:5] == ["tpu-vm", "scp"] and scp[5] == pack[4]
    assert "jax[tpu]" in remote_command(setup) and '-e ~/saejax"[gcs]"' in remote_command(setup)
    # One host: no jax.distributed; the command goes through unchanged.
    assert "SAEJAX_DISTRIBUTED" not in remote_command(run)
    assert remote_command(run).endswith("exec " + shlex.join(RUN))
    assert delete[3:6] == ["tpu-vm", "delete", "sae-1"] and "--quiet" in delete


@pytest.mark.parametrize("accelerator,image", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-16", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")])
def test_pod_slice_runs_everywhere_with_distributed(accelerator, image):
    commands = tpu_plan("--name=pod", "--zone=z", f"--accelerator={accelerator}")
    assert f"--version={image}" in find(commands, "create")[0]
    remote = find(commands, "scp") + find(commands, "ssh")
    assert len(remote) == 3 and all("--worker=all" in c for c in remote)
    run = remote_command(find(commands, "ssh")[-1])
    assert "export SAEJAX_DISTRIBUTED=1" in run


@pytest.mark.parametrize("accelerator,image", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_runtime_image_per_generation(accelerator, image):
    commands = tpu_plan("--name=a", "--zone=z", f"--accelerator={accelerator}")
    assert f"--version={image}" in find(commands, "create")[0]
    assert "SAEJAX_DISTRIBUTED" not in remote_command(find(commands, "ssh")[-1])


@pytest.mark.parametrize("flag", ["--spot", "--preemptible", "--reserved"])
def test_provisioning_model(flag):
    (create,) = find(tpu_plan("--name=a", "--zone=z", "--accelerator=v4-8", flag), "create")
    assert flag in create


def test_queued_resource_waits_and_deletes_with_its_tpu():
    commands = tpu_plan("--name=q", "--zone=us-central2-b", "--accelerator=v4-32", "--queued",
                        "--spot", "--project=proj")
    create, wait = commands[1:3]
    assert create[3:6] == ["queued-resources", "create", "q"]
    assert {"--node-id=q", "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
            "--spot"} <= set(create)
    assert wait[:2] == ["bash", "-c"] and "queued-resources describe q" in wait[2]
    assert "ACTIVE" in wait[2] and "FAILED" in wait[2]
    assert commands[-1][3:6] == ["queued-resources", "delete", "q"] and "--force" in commands[-1]
    assert all("--project=proj" in c for c in commands if c[0] == "gcloud")
    with pytest.raises(common.LaunchError, match="not --preemptible"):
        tpu_plan("--name=q", "--zone=z", "--accelerator=v4-8", "--queued", "--preemptible")


def test_keep_and_existing():
    kept = tpu_plan("--name=a", "--zone=z", "--accelerator=v4-8", "--keep")
    assert not find(kept, "delete")
    reused = tpu_plan("--name=a", "--zone=z", "--accelerator=v4-8", "--existing")
    assert not find(reused, "create") and find(reused, "delete")


def test_sweep_passes_through_quoted():
    sweep = ["python", "-m", "saejax.sweep", "--config=experiments/toy.py",
             "--workdir", "gs://b/sweep", "--config.group.sparsity_coefficients=(0.3, 0.6)"]
    commands = tpu_plan("--name=s", "--zone=z", "--accelerator=v5litepod-16", command=sweep)
    run = remote_command(find(commands, "ssh")[-1])
    assert shlex.split(run.split("exec ", 1)[1]) == sweep


def test_errors_before_anything_is_created():
    with pytest.raises(common.LaunchError, match="v4-N, v5litepod-N, v5p-N, v6e-N"):
        tpu_plan("--name=a", "--zone=z", "--accelerator=v5e-8")
    with pytest.raises(common.LaunchError, match="chips"):
        tpu_plan("--name=a", "--zone=z", "--accelerator=v5litepod-12")
    local = [a if not a.startswith("--workdir") else "--workdir=/tmp/run" for a in RUN]
    with pytest.raises(common.LaunchError, match="use a gs:// bucket so every host sees"):
        tpu_plan("--name=a", "--zone=z", "--accelerator=v4-32", command=local)
    with pytest.raises(common.LaunchError, match="deleted"):
        tpu_plan("--name=a", "--zone=z", "--accelerator=v4-8", command=local)
    assert tpu_plan("--name=a", "--zone=z", "--accelerator=v4-8", "--keep", command=local)
    with pytest.raises(common.LaunchError, match="no --workdir"):
        tpu_plan("--name=a", "--zone=z", "--accelerator=v4-8", command=RUN[:4])
    with pytest.raises(common.LaunchError, match="absolute path"):
        tpu_plan("--name=a", "--zone=z", "--accelerator=v4-8",
                 command=RUN[:3] + ["--config=/home/me/x.py", RUN[4]])
    with pytest.raises(common.LaunchError, match="lowercase"):
        tpu_plan("--name=My_TPU", "--zone=z", "--accelerator=v4-8")
    with pytest.raises(common.LaunchError, match="after `--`"):
        tpu.parse_args(["--name=a", "--zone=z", "--accelerator=v4-8"])


def test_dry_run_prints_a_runnable_script(capsys, tmp_path):
    assert tpu.main(["--name=d", "--zone=z", "--accelerator=v4-32", "--dry_run", "--", *RUN]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"cd {shlex.quote(common.REPO_ROOT)}"
    commands = [shlex.split(line) for line in lines[1:] if not line.startswith("#")]
    assert commands == tpu_plan("--name=d", "--zone=z", "--accelerator=v4-32")
    (tmp_path / "plan.sh").write_text("\n".join(lines) + "\n")
    subprocess.run(["bash", "-n", str(tmp_path / "plan.sh")], check=True)
    assert tpu.main(["--name=d", "--zone=z", "--accelerator=v9-8", "--", *RUN]) == 2


def test_pack_ships_the_working_tree(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name, text in {"a.py": "1", ".gitignore": "ignored/\n", "ignored/big.npy": "x",
                       "gone.py": "2", "new.py": "3"}.items():
        (repo / name).parent.mkdir(exist_ok=True)
        (repo / name).write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "a.py", ".gitignore", "gone.py"], cwd=repo, check=True)
    (repo / "gone.py").unlink()
    common.pack(str(tmp_path / "code.tar.gz"), root=str(repo))
    with tarfile.open(tmp_path / "code.tar.gz") as tar:
        assert sorted(tar.getnames()) == [".gitignore", "a.py", "new.py"]


# SLURM

def slurm_script(*flags, command=RUN):
    return slurm.script(slurm.parse_args(["--setup=", *flags, "--", *command]))


def test_slurm_one_process_per_gpu():
    text = slurm_script("--nodes=2", "--gpus_per_node=8", "--per=gpu", "--time=04:00:00",
                        "--partition=gpu", "--account=lab")
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --time=04:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab",
                 "export SAEJAX_DISTRIBUTED=1"]:
        assert line in text.splitlines()
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in text
    assert 'CUDA_VISIBLE_DEVICES="$SLURM_LOCALID" JAX_LOCAL_DEVICE_IDS=0' in text
    assert 'SAEJAX_PROCESS_ID="$SLURM_PROCID"' in text
    assert text.splitlines()[-1].strip() == shlex.join(RUN)
    assert "srun --kill-on-bad-exit=1 bash -c" in text


def test_slurm_one_process_per_node():
    text = slurm_script("--nodes=4", "--gpus_per_node=4", "--per=node")
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --gpus-per-node=4" in text
    assert "CUDA_VISIBLE_DEVICES" not in text and "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in text
    assert "--partition" not in text and "--account" not in text and "--time" not in text


@pytest.mark.parametrize("per", ["gpu", "node"])
def test_slurm_script_gives_each_task_its_rank(per, tmp_path):
    """The script under stub scontrol/srun (srun runs the task once per rank, in order)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a17\\ngpu-a18\\n'\n")
    (stubs / "srun").write_text(
        "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
        "for ((r = 0; r < SLURM_NTASKS; r++)); do\n"
        "  SLURM_PROCID=$r SLURM_LOCALID=$((r % SLURM_NTASKS_PER_NODE)) \"$@\" || exit\n"
        "done\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    text = slurm_script("--nodes=2", "--gpus_per_node=2", f"--per={per}", command=[
        "sh", "-c", 'echo "$SAEJAX_DISTRIBUTED $SAEJAX_COORDINATOR_ADDRESS '
                    '$SAEJAX_NUM_PROCESSES $SAEJAX_PROCESS_ID ${CUDA_VISIBLE_DEVICES:--} '
                    '$JAX_LOCAL_DEVICE_IDS"'])
    (tmp_path / "job.sbatch").write_text(text)
    subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)
    tasks = 4 if per == "gpu" else 2
    env = {"PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NTASKS": str(tasks), "SLURM_NTASKS_PER_NODE": str(tasks // 2)}
    out = subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert out[0] == f"saejax: {tasks} processes on 2 node(s), coordinator gpu-a17:24242"
    if per == "gpu":
        assert out[1:] == [f"1 gpu-a17:24242 4 {r} {r % 2} 0" for r in range(4)]
    else:
        assert out[1:] == [f"1 gpu-a17:24242 2 {r} - 0,1" for r in range(2)]


def test_slurm_dry_run_prints_script_and_sbatch(capsys):
    assert slurm.main(["--gpus_per_node=8", "--script=/tmp/x/job.sbatch", "--setup=",
                       "--dry_run", "--", *RUN]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash\n")
    assert out.rstrip().splitlines()[-1] == "sbatch /tmp/x/job.sbatch"
    assert slurm.main(["--gpus_per_node=0", "--dry_run", "--", *RUN]) == 2
