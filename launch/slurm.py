"""Runs saejax on a SLURM GPU cluster: writes an sbatch script and submits it.

    python -m launch.slurm --nodes=2 --gpus_per_node=8 --per=gpu --time=04:00:00 -- \
        python -m saejax.main --config=experiments/gpt2_small.py --workdir=/shared/runs/gpt2

--per=gpu starts one JAX process per GPU (CUDA_VISIBLE_DEVICES from SLURM_LOCALID); --per=node
one per node, with all its GPUs. Every process gets SAEJAX_DISTRIBUTED=1 and the coordinator
address (the job's first host), process count and process id (launch/common.py lists the
variables). --dry_run prints the script and the sbatch command instead of submitting.
"""

import argparse
import os
import shlex
import subprocess
import sys
import tempfile

from launch import common
from launch.common import LaunchError


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags before `--`; the command after it lands in `args.command`."""
    launcher_argv, command = common.split_command(argv)
    parser = argparse.ArgumentParser(
        prog="python -m launch.slurm",
        description="Run a saejax command on a SLURM GPU cluster. "
                    "Usage: python -m launch.slurm FLAGS -- python -m saejax.main ...")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus_per_node", type=int, required=True)
    parser.add_argument("--per", choices=("gpu", "node"), default="gpu",
                        help="One JAX process per GPU (default) or per node.")
    parser.add_argument("--time", help="Time limit, e.g. 04:00:00 (default: the partition's).")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--cpus_per_task", type=int,
                        help="CPU cores per process (SLURM's default is 1).")
    parser.add_argument("--name", default="saejax", help="Job name.")
    parser.add_argument("--log_dir", default="slurm-logs",
                        help="Where the job's log goes (relative to the checkout's root).")
    parser.add_argument("--script", help="Where to write the sbatch script (default: a temp "
                                         "file).")
    parser.add_argument("--setup", action="append",
                        help="A shell line run before the command on every node, e.g. "
                             "'module load cuda' (repeatable). Default: activate the virtual "
                             "environment this launcher runs in, if any. --setup= for none.")
    parser.add_argument("--sbatch", action="append", default=[],
                        help="Another sbatch option, e.g. --sbatch=--mem=0 (repeatable).")
    parser.add_argument("--port", type=int,
                        help="Coordinator port (default: 20000 + job id mod 20000).")
    parser.add_argument("--dry_run", action="store_true",
                        help="Print the script and the sbatch command; submit nothing.")
    args = parser.parse_args(launcher_argv)
    args.command = command
    return args


def _validate(args: argparse.Namespace) -> None:
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise LaunchError("--nodes and --gpus_per_node must be at least 1")
    common.check_config_path(args.command)


def _setup_lines(args: argparse.Namespace) -> list[str]:
    if args.setup is None:
        venv = os.environ.get("VIRTUAL_ENV")
        return [f"source {shlex.quote(os.path.join(venv, 'bin', 'activate'))}"] if venv else []
    return [line for line in args.setup if line]


def script(args: argparse.Namespace) -> str:
    """The sbatch script: pure text, from the flags and the command."""
    _validate(args)
    tasks_per_node = args.gpus_per_node if args.per == "gpu" else 1
    log_dir = os.path.join(common.REPO_ROOT, args.log_dir)
    options = [f"--job-name={args.name}", f"--nodes={args.nodes}",
               f"--ntasks-per-node={tasks_per_node}", f"--gpus-per-node={args.gpus_per_node}"]
    options += [f"--{name}={value}" for name, value in (
        ("cpus-per-task", args.cpus_per_task), ("time", args.time),
        ("partition", args.partition), ("account", args.account)) if value]
    options += [f"--output={os.path.join(log_dir, '%x-%j.out')}",
                f"--chdir={common.REPO_ROOT}", *args.sbatch]

    port = str(args.port) if args.port else "$((20000 + SLURM_JOB_ID % 20000))"
    if args.per == "gpu":
        # One GPU per process. JAX's own SLURM detection would also pick device
        # SLURM_LOCALID, which no longer exists once CUDA_VISIBLE_DEVICES shows one GPU:
        # the process's only device is 0.
        devices = ['CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"', "JAX_LOCAL_DEVICE_IDS=0"]
        layout = f"one process per GPU, {args.gpus_per_node} per node"
    else:
        # Every GPU of the node; without this JAX's SLURM detection keeps only device 0.
        devices = ["JAX_LOCAL_DEVICE_IDS=" + ",".join(map(str, range(args.gpus_per_node)))]
        layout = f"one process per node with its {args.gpus_per_node} GPUs"
    srun = ["srun", "--kill-on-bad-exit=1"]
    if args.cpus_per_task:   # srun does not take it from sbatch on every SLURM version
        srun.append(f"--cpus-per-task={args.cpus_per_task}")
    task = ('export SAEJAX_NUM_PROCESSES="$SLURM_NTASKS" SAEJAX_PROCESS_ID="$SLURM_PROCID" '
            + " ".join(devices) + '; exec "$@"')

    lines = ["#!/bin/bash",
             "# Written by `python -m launch.slurm` (saejax). Submit it with: sbatch THIS_FILE",
             *(f"#SBATCH {option}" for option in options),
             "set -euo pipefail",
             *_setup_lines(args),
             "",
             f"# {args.nodes} node(s), {layout}. Process 0's host coordinates.",
             "export SAEJAX_DISTRIBUTED=1",
             'export SAEJAX_COORDINATOR_ADDRESS="$(scontrol show hostnames '
             f'"$SLURM_JOB_NODELIST" | head -n 1):{port}"',
             'echo "saejax: $SLURM_NTASKS processes on $SLURM_JOB_NUM_NODES node(s), '
             'coordinator $SAEJAX_COORDINATOR_ADDRESS"',
             "",
             "# SLURM_PROCID and SLURM_LOCALID are per task, so each task reads its own.",
             f"{shlex.join(srun)} bash -c {shlex.quote(task)} saejax-task \\",
             f"    {common.shell_line(args.command)}",
             ""]
    return "\n".join(lines)


def script_path(args: argparse.Namespace) -> str:
    return args.script or os.path.join(tempfile.gettempdir(), f"saejax-{args.name}.sbatch")


def sbatch_command(args: argparse.Namespace) -> list[str]:
    return ["sbatch", script_path(args)]


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
        text = script(args)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = common.flag_value(args.command, "workdir") or ""
    if args.nodes > 1 and workdir and not workdir.startswith("gs://"):
        print(f"note: every node must see --workdir={workdir} (a shared filesystem) or use a "
              "gs:// bucket", file=sys.stderr)
    if args.dry_run:
        print(text)
        print(common.shell_line(sbatch_command(args)))
        return 0
    path = script_path(args)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    # SLURM does not create the log's directory; a job whose log cannot be opened just fails.
    os.makedirs(os.path.join(common.REPO_ROOT, args.log_dir), exist_ok=True)
    try:
        common.run(sbatch_command(args))
    except FileNotFoundError:
        print(f"error: no sbatch here; the script is {path}: submit it from a login node",
              file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"error: sbatch failed (exit status {e.returncode}); the script is {path}",
              file=sys.stderr)
        return 1
    print(f"Log: {os.path.join(common.REPO_ROOT, args.log_dir, args.name)}-<job id>.out")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
