"""The --num-processes launcher's contract, with stand-in processes instead of training: how stop
requests reach them (also before they are ready for one), what happens when one fails, and the exit
code the launcher reports. The real two-process training run is in test_performance.py."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from peftcli.training import launch

# A stand-in for `peftcli train`: records stop requests the way peftcli does, then acts on argv.
CHILD = """
import os, sys, time
from peftcli.training import launch
time.sleep(float(sys.argv[2]))  # "loading": a stop request sent now must wait, not kill
launch.install_stop_recorder()
rank, plan = int(os.environ["RANK"]), sys.argv[1]
import signal
record = signal.getsignal(signal.SIGUSR1)
def count(signum, frame):  # one line per stop request this process receives
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"requests-{rank}"), "a") as log:
        log.write("SIGUSR1\\n")
    record(signum, frame)
signal.signal(signal.SIGUSR1, count)
if plan == "fail" and rank == 1:
    sys.exit(3)
deadline = time.time() + 30
while time.time() < deadline:
    if launch.stop_requested():
        time.sleep(0.5)  # a duplicate request would arrive meanwhile
        sys.exit(0 if plan == "finish" else 143)  # finished the last step / stopped after a step
    time.sleep(0.02)
sys.exit(9)
"""

STUBBORN = """
import os, signal, sys, time
signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a process that hangs (say, in a collective)
if os.environ["RANK"] == "1":
    sys.exit(3)
time.sleep(30)
"""


def _spawn(tmp_path, script: str, *argv: str, signal_after: float | None = None) -> tuple[int, float]:
    path = tmp_path / "child.py"
    path.write_text(script)
    if signal_after is not None:  # as a user's Ctrl-C / a scheduler's SIGTERM to the launcher
        threading.Timer(signal_after, os.kill, (os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    code = launch.spawn([sys.executable, str(path), *argv], 2, gpus=0)
    return code, time.monotonic() - started


@pytest.mark.parametrize(("plan", "expected"), [("stop", 143), ("finish", 0)])
@pytest.mark.slow
def test_a_stop_request_reaches_every_process_once(tmp_path, plan, expected):
    """143 when the processes stopped as asked; 0 when the request came as they were finishing."""
    code, took = _spawn(tmp_path, CHILD, plan, "0", signal_after=1.0)
    assert code == expected and took < 10
    assert [(tmp_path / f"requests-{rank}").read_text() for rank in (0, 1)] == ["SIGUSR1\n"] * 2


@pytest.mark.slow
def test_a_stop_request_during_startup_is_kept_until_the_process_can_act_on_it(tmp_path):
    # The request arrives while the processes are still "loading" (no handler yet). Were it not held
    # back, SIGUSR1's default action would kill them (exit -10), which the launcher reports as 138.
    code, _ = _spawn(tmp_path, CHILD, "finish", "2", signal_after=0.5)
    assert code == 0


@pytest.mark.slow
def test_a_failing_process_stops_the_others_and_its_code_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "FAILURE_GRACE_S", 0.5)
    code, took = _spawn(tmp_path, CHILD, "fail", "0")
    assert code == 3 and took < 10  # rank 0 would otherwise wait 30 s (exit 9)


@pytest.mark.slow
def test_a_process_that_ignores_the_stop_is_killed_after_the_grace_period(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "FAILURE_GRACE_S", 0.2)
    monkeypatch.setattr(launch, "GRACE_S", 1.0)
    code, took = _spawn(tmp_path, STUBBORN)
    assert code == 3 and took < 10


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")  # a job given 2 of the machine's 8 GPUs
    assert launch.visible_gpus(8) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # more than the machine has
    assert launch.visible_gpus(2) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,-1,2")  # CUDA stops reading at an invalid entry
    assert launch.visible_gpus(8) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launch.visible_gpus(8) == 0
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert launch.visible_gpus(8) == 8


@pytest.mark.parametrize("order", ["launcher first", "scheduler first"])
def test_a_scheduler_signal_and_the_launchers_request_are_one_request(order, monkeypatch):
    """Slurm/systemd may signal every process of the job as well as the launcher: the process gets
    SIGTERM directly and SIGUSR1 from the launcher, in either order. Neither may kill it."""
    from peftcli.training.signals import GracefulStop

    signals = [launch.STOP_SIGNAL, signal.SIGTERM]
    if order == "scheduler first":
        signals.reverse()
    with GracefulStop() as stop:
        for signum in signals:
            os.kill(os.getpid(), signum)
            time.sleep(0.05)  # delivered to the handler between bytecodes
        assert stop.requested and stop.signum == signal.SIGTERM
    # After training, a late request is recorded instead of killing the process.
    monkeypatch.setenv(launch.LAUNCHED, "1")
    monkeypatch.setattr(launch, "_stop_requested", False)
    previous = signal.getsignal(launch.STOP_SIGNAL)
    try:
        launch.install_stop_recorder()
        os.kill(os.getpid(), launch.STOP_SIGNAL)
        time.sleep(0.05)
        assert launch.stop_requested()
        with GracefulStop() as stop:  # a request recorded while loading: stop after the first step
            assert stop.requested
    finally:
        signal.signal(launch.STOP_SIGNAL, previous)
