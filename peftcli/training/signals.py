"""Graceful interruption: on SIGINT/SIGTERM finish the current optimizer step, save a checkpoint,
and stop; a second signal exits at once (the previous checkpoint is complete, being atomic).

Pre-empted cloud jobs get SIGTERM and a grace period; Ctrl-C is SIGINT. Either way, the run ends
with a checkpoint of the last completed step, `metrics.json`/`report.md` marked interrupted, and
exit code 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from transformers import TrainerCallback

HANDLED = (signal.SIGINT, signal.SIGTERM)


class GracefulStop(TrainerCallback):
    """Installs the signal handlers while training runs, and turns a signal into save + stop."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _request(self, signum: int, what: str, again: str) -> None:
        from peftcli.model.device import is_main_process

        self.signum = signum
        if is_main_process():
            print(
                f"\n{what}: finishing the current step and saving a checkpoint ({again} to exit at once; "
                "the last checkpoint is kept)",
                file=sys.stderr,
                flush=True,
            )

    def _handle(self, signum, frame):
        """SIGINT/SIGTERM sent to this process."""
        if self.signum is None:
            self._request(signum, f"{signal.Signals(signum).name} received", "send it again")
        # The next one, of either kind, takes the default action: the process exits immediately.
        for handled in HANDLED:
            signal.signal(handled, signal.SIG_DFL)

    def _handle_launcher(self, signum, frame):
        """The launcher's stop request (launch.py). A scheduler that signals every process of the job
        reaches this one directly as well, before or after it: the two are one request, so this
        one never makes the next direct signal fatal."""
        if self.signum is None:
            self._request(signal.SIGTERM, "stop requested", "press Ctrl-C again")

    def __enter__(self) -> GracefulStop:
        from peftcli.training.launch import STOP_SIGNAL, stop_requested

        for signum in HANDLED:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._previous[STOP_SIGNAL] = signal.signal(STOP_SIGNAL, self._handle_launcher)
        if stop_requested():  # the request came while the model was loading: stop after the first step
            self._handle_launcher(STOP_SIGNAL, None)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested
        if args.world_size > 1:
            # Processes may see the signal at different steps; all must stop at the same one, or the
            # others would wait forever in the next gradient all-reduce.
            requested = any_process(requested)
        if requested:
            control.should_save = True
            control.should_training_stop = True
            if self.signum is None:
                self.signum = signal.SIGTERM  # another process was signalled
        return control


def any_process(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    from peftcli.model.device import local_device

    value = torch.tensor([1.0 if flag else 0.0], device=local_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
