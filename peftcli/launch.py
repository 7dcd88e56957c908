"""`peftcli train --num-processes N`: run the same command once per device.

On GPUs the processes are started by `accelerate launch` (DDP by default; FSDP or DeepSpeed with an
accelerate config file, see recipes/accelerate/). On CPU, where accelerate wants MPI, they are
started by `torch.distributed.run` with the gloo backend. Inside, every process trains its shard
of each batch; rank 0 alone writes the run directory, and token counts and peak memory are
aggregated across ranks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

from peftcli.errors import UserError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def launcher_command(args: list[str], processes: int, config: Path | None, gpus: int) -> list[str]:
    """The command that starts `peftcli <args>` in `processes` processes."""
    if config is not None or gpus:
        if gpus and processes > gpus:
            raise UserError(f"--num-processes {processes}: this machine has {gpus} GPU(s)")
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
        launch += ["--config_file", str(config)] if config else ["--multi_gpu", "--num_machines", "1"]
        return [*launch, "-m", "peftcli", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        "-m",
        "peftcli",
        *args,
    ]


def relaunch(args: list[str], processes: int, config: Path | None) -> NoReturn:
    """Replace this process by the launcher (signals then reach every training process)."""
    from peftcli.hardware import detect_gpus

    if config is not None and not config.is_file():
        raise UserError(f"--accelerate-config {config}: no such file", hint="see recipes/accelerate/")
    command = launcher_command(args, processes, config, len(detect_gpus()))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
