"""`peftcli train --num-processes N`: run the same command once per device.

Plain data parallelism (DDP) is started here: N processes of `peftcli train` with the standard
torch.distributed environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), gloo on CPU and
NCCL on GPUs. This launcher forwards Ctrl-C/SIGTERM to every process, so they all stop after the
same step and save one checkpoint, and stops the others if one fails (instead of leaving them
waiting in a collective). With `--accelerate-config` (FSDP, DeepSpeed) `accelerate launch` starts
the processes instead. Inside, rank 0 alone writes the run directory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from peftcli.errors import UserError

GRACE_S = 60  # how long the others may take to stop after one process failed


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def accelerate_command(args: list[str], processes: int, config: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(processes),
        "--config_file",
        str(config),
        "-m",
        "peftcli",
        *args,
    ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_environments(processes: int, gpus: int) -> list[dict[str, str]]:
    """The environment of each process: its rank, and where the group meets."""
    if gpus and processes > gpus:
        raise UserError(f"--num-processes {processes}: this machine has {gpus} GPU(s)")
    shared = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(processes),
        "LOCAL_WORLD_SIZE": str(processes),
    }
    if not gpus and "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of oversubscribing them
        shared["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    return [{**os.environ, **shared, "RANK": str(rank), "LOCAL_RANK": str(rank)} for rank in range(processes)]


def spawn(args: list[str], processes: int, gpus: int) -> int:
    """Run `peftcli <args>` in `processes` processes; the exit code is rank 0's (or the first failure's)."""
    # Own sessions: a terminal's Ctrl-C reaches only this launcher, which forwards it once (a second
    # delivery would make the processes exit without saving).
    children = [
        subprocess.Popen([sys.executable, "-m", "peftcli", *args], env=env, start_new_session=True)
        for env in process_environments(processes, gpus)
    ]

    def forward(signum, frame):  # each child handles it: finish the step, save, exit 128+signum
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed_at = None
        while any(child.poll() is None for child in children):
            failure = next((c for c in children if c.poll() not in (None, 0)), None)
            if failure is not None and failed_at is None:
                failed_at = time.monotonic()
                forward(signal.SIGTERM, None)  # the others would wait forever in the next collective
            if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
                for child in children:
                    child.kill()
            time.sleep(0.2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    codes = [child.returncode for child in children]
    code = codes[0] if codes[0] != 0 else next((c for c in codes if c != 0), 0)
    return 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + signum


def relaunch(args: list[str], processes: int, config: Path | None) -> NoReturn:
    """Start the processes and exit with their result."""
    from peftcli.hardware import detect_gpus

    if config is not None:
        if not config.is_file():
            raise UserError(f"--accelerate-config {config}: no such file", hint="see recipes/accelerate/")
        command = accelerate_command(args, processes, config)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(command[0], command)  # accelerate forwards signals and sets up FSDP/DeepSpeed
    sys.exit(spawn(args, processes, len(detect_gpus())))
