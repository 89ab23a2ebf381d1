"""Runs saejax on a Cloud TPU VM or pod slice with one command, and deletes the TPU afterwards.

    python -m launch.tpu --name=sae-1 --zone=us-west4-a --accelerator=v5litepod-16 --spot -- \
        python -m saejax.main --config=experiments/toy.py --workdir=gs://BUCKET/toy

Steps (print them with --dry_run): create the TPU (or a queued resource, then wait for it),
pack this checkout as it is (edits included), copy it to every worker, install it there with
jax[tpu] in a virtual environment, run the command on every worker at once (with
SAEJAX_DISTRIBUTED=1 on a multi-host slice) with the output streamed here, then delete the TPU,
also after a failure or Ctrl-C, unless --keep. Rerunning the same command after a preemption
resumes the run from its gs:// workdir.
"""

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile

from launch import common
from launch.common import LaunchError

# The runtime image for JAX per TPU generation: cloud.google.com/tpu/docs/runtimes.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",   # v5e
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",             # Trillium
}
# The number in an accelerator type counts TensorCores on v4 and v5p (2 per chip, 4 chips on a
# host) and chips on v5e and v6e (8 on a single-host VM): in every generation here, a type
# above 8 is a slice of several hosts (TPU VMs), which must all run the same program.
_SINGLE_HOST_MAX = 8
_CHIP_COUNTS = (1, 4, 8, 16, 32, 64, 128, 256)   # the v5e and v6e slice shapes

_REMOTE_DIR = "~/saejax"
_REMOTE_VENV = "~/saejax-venv"
_REMOTE_ARCHIVE = "saejax.tar.gz"   # in the remote home directory
# Current jax (0.10) needs Python >= 3.11, newer than Ubuntu 22.04's 3.10 on the TPU images, so
# the environment gets its own Python from uv (uv itself comes from PyPI).
_PYTHON_VERSION = "3.12"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags before `--`; the command after it lands in `args.command`."""
    launcher_argv, command = common.split_command(argv)
    parser = argparse.ArgumentParser(
        prog="python -m launch.tpu",
        description="Run a saejax command on a Cloud TPU VM or pod slice. "
                    "Usage: python -m launch.tpu FLAGS -- python -m saejax.main ...")
    parser.add_argument("--name", required=True, help="TPU (and queued resource) name.")
    parser.add_argument("--zone", required=True, help="e.g. us-central2-b, us-west4-a.")
    parser.add_argument("--accelerator", required=True,
                        help="Accelerator type: v4-N, v5litepod-N, v5p-N or v6e-N.")
    parser.add_argument("--project", help="Google Cloud project (default: gcloud's).")
    parser.add_argument("--runtime_version",
                        help="TPU software version (default: the one for the generation).")
    provisioning = parser.add_mutually_exclusive_group()
    provisioning.add_argument("--spot", action="store_true",
                              help="Spot capacity: cheaper, may be preempted.")
    provisioning.add_argument("--preemptible", action="store_true",
                              help="Preemptible (older than spot; not with --queued).")
    provisioning.add_argument("--reserved", action="store_true",
                              help="Use the project's reservation.")
    parser.add_argument("--queued", action="store_true",
                        help="Ask through a queued resource and wait until it is granted.")
    parser.add_argument("--existing", action="store_true",
                        help="The TPU exists already (e.g. an earlier --keep): do not create it.")
    parser.add_argument("--keep", action="store_true",
                        help="Do not delete the TPU at the end.")
    parser.add_argument("--dry_run", action="store_true",
                        help="Print the commands, one per line, and run nothing.")
    args = parser.parse_args(launcher_argv)
    args.command = command
    return args


def is_multi_host(accelerator: str) -> bool:
    """True for a multi-host slice; a clear error for a type this launcher does not know."""
    match = re.fullmatch(r"(v4|v5litepod|v5p|v6e)-(\d+)", accelerator)
    supported = ", ".join(f"{g}-N" for g in RUNTIME_VERSIONS)
    if not match:
        raise LaunchError(f"unknown accelerator type {accelerator!r}; supported: {supported} "
                          "(e.g. v4-8, v4-32, v5litepod-8, v5litepod-16, v5p-8, v6e-8)")
    generation, size = match.group(1), int(match.group(2))
    if generation in ("v5litepod", "v6e") and size not in _CHIP_COUNTS:
        raise LaunchError(f"{accelerator}: {generation} slices have "
                          f"{', '.join(map(str, _CHIP_COUNTS))} chips")
    if generation in ("v4", "v5p") and (size < 8 or size % 8):
        raise LaunchError(f"{accelerator}: {generation} sizes count TensorCores, a multiple "
                          "of 8 (v4-8, v4-16, v4-32, ...)")
    return size > _SINGLE_HOST_MAX


def _validate(args: argparse.Namespace) -> bool:
    """Checks what would otherwise fail after the TPU is paid for; returns multi_host."""
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", args.name):
        raise LaunchError(f"--name={args.name!r}: use lowercase letters, digits and hyphens, "
                          "starting with a letter")
    multi_host = is_multi_host(args.accelerator)
    if args.queued and args.preemptible:
        raise LaunchError("a queued resource is --spot, --reserved or on-demand, not "
                          "--preemptible")
    common.check_config_path(args.command)
    workdir = common.flag_value(args.command, "workdir")
    if not workdir:
        raise LaunchError("the command has no --workdir: give --workdir=gs://BUCKET/PATH so "
                          "the results outlive the TPU")
    if not workdir.startswith("gs://"):
        if multi_host:
            raise LaunchError(f"--workdir={workdir} is local, but {args.accelerator} has "
                              "several hosts: use a gs:// bucket so every host sees the same "
                              "workdir")
        if not args.keep:
            raise LaunchError(f"--workdir={workdir} is on the TPU VM's disk, which is deleted "
                              "with the TPU at the end: use a gs:// bucket (or --keep)")
    return multi_host


def _gcloud(args: argparse.Namespace, *words: str) -> list[str]:
    command = ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}"]
    if args.project:
        command.append(f"--project={args.project}")
    return command


def archive_path(args: argparse.Namespace) -> str:
    return os.path.join(tempfile.gettempdir(), f"saejax-{args.name}.tar.gz")


def create_commands(args: argparse.Namespace) -> list[list[str]]:
    """Create the TPU (a queued resource: ask, then wait until it is ACTIVE)."""
    if args.existing:
        return []
    version = args.runtime_version or RUNTIME_VERSIONS[args.accelerator.split("-")[0]]
    if args.queued:
        create = _gcloud(args, "queued-resources", "create", args.name) + [
            f"--node-id={args.name}", f"--accelerator-type={args.accelerator}",
            f"--runtime-version={version}"]
    else:
        create = _gcloud(args, "tpu-vm", "create", args.name) + [
            f"--accelerator-type={args.accelerator}", f"--version={version}"]
    create += [flag for flag, on in (("--spot", args.spot), ("--preemptible", args.preemptible),
                                     ("--reserved", args.reserved)) if on]
    if not args.queued:
        return [create]
    describe = shlex.join(_gcloud(args, "queued-resources", "describe", args.name)
                          + ["--format=value(state.state)"])
    wait = ("last=; while true; do "
            f"state=$({describe}); "
            '[ "$state" != "$last" ] && echo "queued resource state: $state"; last=$state; '
            'case "$state" in ACTIVE) break;; FAILED|SUSPENDED) exit 1;; esac; '
            "sleep 30; done")
    return [create, ["bash", "-c", wait]]


def pack_command(args: argparse.Namespace) -> list[str]:
    """This checkout as it is now (uncommitted edits included), packed before paying for a TPU."""
    return ["python3", "-m", "launch.common", "pack", archive_path(args)]


def run_commands(args: argparse.Namespace, multi_host: bool) -> list[list[str]]:
    """Copy the code to every worker, install it, run the command on every worker at once
    (its output streamed here)."""
    setup = (
        "set -euo pipefail; "
        f"rm -rf {_REMOTE_DIR} && mkdir -p {_REMOTE_DIR} && "
        f"tar -xzf ~/{_REMOTE_ARCHIVE} -C {_REMOTE_DIR}; "
        f"if [ ! -x {_REMOTE_VENV}/bin/python ]; then "
        "python3 -m pip install --user --quiet uv 2>/dev/null || "
        "python3 -m pip install --user --quiet --break-system-packages uv; "
        f"~/.local/bin/uv venv --seed --python {_PYTHON_VERSION} {_REMOTE_VENV}; fi; "
        f"~/.local/bin/uv pip install --python {_REMOTE_VENV}/bin/python --quiet "
        # [gcs]: the workdir and stores are gs:// paths (saejax/paths.py).
        f'"jax[tpu]" -e {_REMOTE_DIR}"[gcs]"')
    env = "export SAEJAX_DISTRIBUTED=1 && " if multi_host else ""
    run = (f"cd {_REMOTE_DIR} && . {_REMOTE_VENV}/bin/activate && {env}"
           f"exec {common.shell_line(args.command)}")
    return [
        _gcloud(args, "tpu-vm", "scp", archive_path(args), f"{args.name}:{_REMOTE_ARCHIVE}")
        + ["--worker=all"],
        _gcloud(args, "tpu-vm", "ssh", args.name) + ["--worker=all", f"--command={setup}"],
        _gcloud(args, "tpu-vm", "ssh", args.name) + ["--worker=all", f"--command={run}"],
    ]


def delete_command(args: argparse.Namespace) -> list[str]:
    if args.queued:   # --force deletes the TPU with its queued resource
        return _gcloud(args, "queued-resources", "delete", args.name) + ["--force", "--quiet"]
    return _gcloud(args, "tpu-vm", "delete", args.name) + ["--quiet"]


def plan(args: argparse.Namespace) -> list[list[str]]:
    """Every command the launch runs, in order; the delete (unless --keep) runs last, always."""
    multi_host = _validate(args)
    return ([pack_command(args)] + create_commands(args) + run_commands(args, multi_host)
            + ([] if args.keep else [delete_command(args)]))


def _interrupt(signum, frame):
    del signum, frame
    raise KeyboardInterrupt   # SIGTERM (a killed launcher) cleans up as Ctrl-C does


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
        multi_host = _validate(args)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    create, work, delete = (create_commands(args), run_commands(args, multi_host),
                            delete_command(args))
    if args.dry_run:
        print(f"cd {shlex.quote(common.REPO_ROOT)}")
        for command in [pack_command(args)] + create + work:
            print(common.shell_line(command))
        if not args.keep:
            print("# then, also after a failure or Ctrl-C:")
            print(common.shell_line(delete))
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        common.run(pack_command(args))
    except (subprocess.CalledProcessError, KeyboardInterrupt):
        print("error: could not pack the checkout; nothing was created", file=sys.stderr)
        return 1
    created = args.existing
    try:
        for command in create:
            try:
                common.run(command)
            except KeyboardInterrupt:
                created = True   # interrupted mid-create, the TPU may exist anyway
                raise
            # Only now: a create that fails (say the name is another TPU's) deletes nothing.
            created = True
        for command in work:
            common.run(command)
        print(f"Done on {args.name}: {common.shell_line(args.command)}")
        return 0
    except subprocess.CalledProcessError as e:
        print(f"error: exit status {e.returncode} from {common.shell_line(e.cmd)}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    finally:
        if created and not args.keep:
            print(f"Deleting {args.name} (--keep would keep it).", flush=True)
            try:
                common.run(delete)
            except (subprocess.CalledProcessError, KeyboardInterrupt):
                print(f"error: {args.name} may still exist (and cost money); delete it with: "
                      f"{common.shell_line(delete)}", file=sys.stderr)
        elif created:
            print(f"Kept {args.name}: run again with --existing to reuse it; delete it with: "
                  f"{common.shell_line(delete)}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
