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
LAUNCHED = "PEFTCLI_LAUNCHED"  # set in the processes spawn() starts
INTERRUPTED_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # a process that stopped as asked
FAILURE_GRACE_S = 10.0  # after one process fails, the others may end on their own (same error) first
GRACE_S = 60.0  # then how long they may take to stop before they are killed

_stop_requested = False


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
    """GPUs this launch may use: CUDA_VISIBLE_DEVICES narrows what nvidia-smi reports ("" = none).
    CUDA ignores the list from its first invalid entry on ("-1" is the usual way to hide all)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return detected
    count = 0
    for entry in visible.split(","):
        if not entry.strip() or entry.strip().startswith("-"):
            break
        count += 1
    return min(detected, count)


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
    return [
        {**os.environ, **shared, LAUNCHED: "1", "RANK": str(rank), "LOCAL_RANK": str(rank)} for rank in range(processes)
    ]


def install_stop_recorder() -> None:
    """In a process spawn() started: record the launcher's stop request whenever it comes (while
    loading, before training; while saving, after it) instead of dying of it. Training turns a
    recorded request into "stop after this step" (signals.GracefulStop)."""
    if os.environ.get(LAUNCHED) != "1":
        return
    signal.signal(STOP_SIGNAL, _record_stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {STOP_SIGNAL})  # blocked by spawn() until now: delivered here


def _record_stop(signum, frame) -> None:
    global _stop_requested
    _stop_requested = True


def stop_requested() -> bool:
    """Whether the launcher asked this process to stop (outside training so far)."""
    return _stop_requested


def _prepare_child() -> None:
    """Runs in each process between fork and exec. The stop signal is blocked (it stays pending)
    until install_stop_recorder has a handler for it: until then its default action would kill the
    process. And, on Linux, a process in its own session gets SIGTERM if the launcher itself dies."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {STOP_SIGNAL})
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the launcher's own handlers still cover Ctrl-C
        pass


def _shell_code(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N


def spawn(command: list[str], processes: int, gpus: int) -> int:
    """Run `command` (peftcli) in `processes` processes and return the exit code for all of them.

    Signals: the first SIGINT/SIGTERM the launcher gets becomes STOP_SIGNAL to every process (each
    finishes the step, they agree on it, save one checkpoint and exit); a second one kills them at
    once. The processes run in their own sessions, so a terminal's Ctrl-C reaches them only through
    here; a scheduler that signals every process of the job (Slurm, systemd) also reaches them
    directly, and that and STOP_SIGNAL are one stop request to them.
    A process that fails (any exit but 0, or an interrupted exit after a stop request) gets the
    others stopped after FAILURE_GRACE_S and killed GRACE_S later, instead of leaving them waiting
    in a collective. Exit code: the first failure's; else 0 if all finished; else 128 + the signal."""
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

    def failed(code: int | None) -> bool:
        return code not in (None, 0) and not (received and code in INTERRUPTED_CODES)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for env in environments:
            children.append(subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_prepare_child))
        failure, failed_at, stopped_at, killed = None, None, None, False
        while any(child.poll() is None for child in children):
            now = time.monotonic()
            if failure is None and len(received) < 2:
                first = next((c for c in children if failed(c.poll())), None)
                if first is not None:
                    failure, failed_at = first.returncode, now
            if failed_at is not None and stopped_at is None and now - failed_at > FAILURE_GRACE_S:
                send(STOP_SIGNAL)  # the others would otherwise wait forever in the next collective
                stopped_at = now
            if stopped_at is not None and not killed and now - stopped_at > GRACE_S:
                send(signal.SIGKILL)
                killed = True
            time.sleep(0.1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if failure is None and len(received) < 2:  # one may have failed in the last poll interval
        failure = next((c.returncode for c in children if failed(c.returncode)), None)
    codes = [c.returncode for c in children]
    if failure is not None:
        return _shell_code(failure)
    if len(received) >= 2:
        return 128 + received[0]  # killed on the second signal
    if all(code == 0 for code in codes):
        return 0  # finished (a stop request during the last step or the final save lets it finish)
    return 128 + received[0] if received else _shell_code(next(c for c in codes if c))


def relaunch(args: list[str], processes: int, config: Path | None) -> NoReturn:
    """Start the processes and exit with their result."""
    from peftcli.model.device import detect_gpus

    if config is not None:
        if not config.is_file():
            raise UserError(f"--accelerate-config {config}: no such file", hint="see recipes/accelerate/")
        command = accelerate_command(args, processes, config)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(command[0], command)  # accelerate forwards signals and sets up FSDP/DeepSpeed
    command = [sys.executable, "-m", "peftcli", *args]
    sys.exit(spawn(command, processes, visible_gpus(len(detect_gpus()))))
