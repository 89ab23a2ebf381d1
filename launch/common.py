"""What the launchers share: the command after `--`, its flags, running commands, and packing
the checkout for a remote machine (`python3 -m launch.common pack OUT.tar.gz`).

The environment variables a launcher sets for saejax (read by saejax/main.py):
  SAEJAX_DISTRIBUTED=1          call jax.distributed.initialize() before anything else
  SAEJAX_COORDINATOR_ADDRESS    host:port of process 0   } each passed on when set, None
  SAEJAX_NUM_PROCESSES          total processes          } otherwise (JAX detects them on
  SAEJAX_PROCESS_ID             this process, 0-based    } Cloud TPU and under SLURM)
  SAEJAX_HEARTBEAT_TIMEOUT_S    (optional, none set it) seconds a process may be silent
                                before it counts as dead and JAX stops the others; 20
"""

import os
import shlex
import subprocess
import sys
import tarfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LaunchError(ValueError):
    """A launch that cannot work, reported before anything is created or submitted."""


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """Splits `[launcher flags] -- command ...` into the two parts."""
    if "--" not in argv:
        raise LaunchError("give the command to run after `--`, e.g. "
                          "`-- python -m saejax.main --config=experiments/toy.py --workdir=...`")
    i = argv.index("--")
    command = argv[i + 1:]
    if not command:
        raise LaunchError("nothing after `--`: give the command to run")
    return argv[:i], command


def flag_value(command: list[str], name: str) -> str | None:
    """The value of `--name=V` or `--name V` in a command (absl accepts both), else None."""
    for i, arg in enumerate(command):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(command):
            return command[i + 1]
    return None


def check_config_path(command: list[str]) -> None:
    """The command runs from the root of a copy of this checkout: its config must be inside."""
    config = flag_value(command, "config")
    if config and os.path.isabs(config.split(":", 1)[0]):
        raise LaunchError(f"--config={config} is an absolute path; the command runs from the "
                          "checkout's root on another machine, so give a path inside the "
                          "checkout, relative to its root (e.g. experiments/toy.py)")


def shell_line(command: list[str]) -> str:
    return shlex.join(command)


def run(command: list[str]) -> None:
    """Runs one command from the checkout's root, its output streamed; raises if it fails."""
    print(f"+ {shell_line(command)}", flush=True)
    subprocess.run(command, cwd=REPO_ROOT, check=True)


def checkout_files(root: str = REPO_ROOT) -> list[str]:
    """Tracked and untracked-but-not-ignored files: what `git status` would ship, edits included."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise LaunchError(f"cannot list the files of {root} with git ({e}); "
                          "launch from a git checkout of saejax") from e
    names = [n for n in listing.decode().split("\0") if n]
    # A tracked file deleted in the working tree is still listed; the copy should not have it.
    return sorted(n for n in names if os.path.isfile(os.path.join(root, n)))


def pack(out: str, root: str = REPO_ROOT) -> None:
    """Writes the checkout as it is now (uncommitted edits included) to a .tar.gz."""
    files = checkout_files(root)
    with tarfile.open(out, "w:gz") as tar:
        for name in files:
            tar.add(os.path.join(root, name), arcname=name, recursive=False)
    size_mb = os.path.getsize(out) / 2**20
    print(f"Packed {len(files)} files of {root} into {out} ({size_mb:.1f} MiB).")
    if size_mb > 100:
        print("warning: that is large for code; data belongs in a gs:// bucket, or add it "
              "to .gitignore so it is not copied", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "pack":
        sys.exit("usage: python3 -m launch.common pack OUT.tar.gz")
    pack(sys.argv[2])
