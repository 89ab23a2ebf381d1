"""Starts N processes on this machine that form one JAX cluster (CPU devices, gloo
collectives), the way a pod slice or a GPU cluster runs saejax, for trying and testing
multi-process runs:

    python -m launch.local --processes=2 --devices_per_process=4 -- \\
        python -m saejax.main --config=experiments/toy.py:smoke --workdir=/tmp/run

Each process gets SAEJAX_DISTRIBUTED=1, the coordinator address (a free local port), the
process count and its id, and `--num_cpu_devices`; their output is prefixed with the process
id. SIGTERM or Ctrl-C to the launcher is passed to every process (each saves and exits, as on
a preempted VM); the launcher exits with the first non-zero exit code.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(process_id: int, processes: int, port: int, base=None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update(SAEJAX_DISTRIBUTED="1", SAEJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               SAEJAX_NUM_PROCESSES=str(processes), SAEJAX_PROCESS_ID=str(process_id),
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    # The fake-device count is --num_cpu_devices; an inherited XLA flag would override it.
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags
                                if not f.startswith("--xla_force_host_platform_device_count"))
    return env


def launch(command: list[str], *, processes: int, devices_per_process: int,
           env=None, cwd=None) -> list[subprocess.Popen]:
    """Starts the processes (not waiting); `command` gets `--num_cpu_devices`."""
    port = free_port()
    command = [*command, f"--num_cpu_devices={devices_per_process}"]
    return [subprocess.Popen(command, env=process_env(i, processes, port, env), cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(processes)]


def _stream(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- python -m saejax.main ... (or saejax.sweep)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- python -m saejax.main --config=...")
    procs = launch(command, processes=args.processes,
                   devices_per_process=args.devices_per_process)

    def forward(signum, frame):
        del frame
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    threads = [threading.Thread(target=_stream, args=(p, f"[{i}] "), daemon=True)
               for i, p in enumerate(procs)]
    for thread in threads:
        thread.start()
    codes = [proc.wait() for proc in procs]
    for thread in threads:
        thread.join()
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())
