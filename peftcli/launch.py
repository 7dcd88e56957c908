"""`peftcli train --num-processes N`: run the same command once per device.

Plain data parallelism (DDP) is started here: N processes of `peftcli train` with the standard
torch.distributed environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), gloo on CPU and
NCCL on GPUs. This launcher turns Ctrl-C/SIGTERM into one stop request to every process, so they
all stop after the same step and save one checkpoint, and stops the others if one fails (instead
of leaving them waiting in a collective). With `--accelerate-config` (FSDP, DeepSpeed) `accelerate launch` starts
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

STOP_SIGNAL = signal.SIGUSR1  # "stop after this step and save", from this launcher to its processes
FAILURE_GRACE_S = 10  # after one process fails, the others may end on their own (same error) first
GRACE_S = 60  # then how long they may take to stop before they are killed


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def rank_prefix() -> str:
    """ "rank 1: " in a multi-process run, "" otherwise (for messages a single rank prints)."""
    return f"rank {os.environ.get('RANK', '0')}: " if world_size() > 1 else ""


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


def visible_gpus(detected: int) -> int:
    """GPUs this launch may use: CUDA_VISIBLE_DEVICES narrows what nvidia-smi reports ("" = none)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return detected
    return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])


def process_environments(processes: int, gpus: int) -> list[dict[str, str]]:
    """The environment of each process: its rank, and where the group meets."""
    if gpus and processes > gpus:
        raise UserError(f"--num-processes {processes}: this machine has {gpus} usable GPU(s)")
    shared = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(processes),
        "LOCAL_WORLD_SIZE": str(processes),
    }
    if not gpus and "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of oversubscribing them
        shared["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    return [{**os.environ, **shared, "RANK": str(rank), "LOCAL_RANK": str(rank)} for rank in range(processes)]


def _die_with_parent() -> None:
    """Linux: a process started in its own session gets SIGTERM if the launcher itself dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the launcher's own handlers still cover Ctrl-C
        pass


def _shell_code(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N


def spawn(args: list[str], processes: int, gpus: int) -> int:
    """Run `peftcli <args>` in `processes` processes.

    Signals: the first SIGINT/SIGTERM the launcher gets becomes STOP_SIGNAL to every process (each
    finishes the step, they agree on it, save one checkpoint and exit); a second one kills them at
    once. The processes run in their own sessions, so a terminal's Ctrl-C reaches them only through
    here; a scheduler that signals every process of the job (Slurm, systemd) also reaches them
    directly, and that and STOP_SIGNAL are one stop request to them.
    Exit code: 128 + the launcher's signal after a stop; else the first failure's (a failing process
    gets the others stopped after a grace period, instead of leaving them waiting in a collective)."""
    environments = process_environments(processes, gpus)
    children: list[subprocess.Popen] = []
    received: list[int] = []

    def send(signum: int) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    def on_signal(signum, frame):
        received.append(signum)
        send(STOP_SIGNAL if len(received) == 1 else signal.SIGKILL)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for env in environments:
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "peftcli", *args],
                    env=env,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            )
        failure, failed_at, stopped_at = None, None, None
        while any(child.poll() is None for child in children):
            now = time.monotonic()
            if failure is None and not received:
                failed = next((c for c in children if c.poll() not in (None, 0)), None)
                if failed is not None:
                    failure, failed_at = failed.returncode, now
            if failed_at is not None and stopped_at is None and now - failed_at > FAILURE_GRACE_S:
                send(STOP_SIGNAL)  # the others would otherwise wait forever in the next collective
                stopped_at = now
            if stopped_at is not None and now - stopped_at > GRACE_S:
                send(signal.SIGKILL)
            time.sleep(0.2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        return 128 + received[0]
    if failure is not None:
        return _shell_code(failure)
    return _shell_code(next((c.returncode for c in children if c.returncode), 0))


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
    sys.exit(spawn(args, processes, visible_gpus(len(detect_gpus()))))
