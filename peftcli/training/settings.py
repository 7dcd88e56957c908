"""The `auto` settings for this training process: model/speed.py decides them (without torch, so
`validate` shows the same choices); this probes the GPU the process trains on, with torch, and
registers the attention kernel chosen, since the model is loaded with its name next, and gives
torch the CPU thread count chosen from the cores this process really has (model/speed.py)."""

from __future__ import annotations

import os

from peftcli.model.device import cpu_facts, torch_has_varlen
from peftcli.model.speed import VARLEN, Machine, Settings, decide
from peftcli.recipe import Recipe

__all__ = ["Machine", "Settings", "probe", "resolve"]


def probe() -> Machine:
    """This process's GPU, with torch (the training stage imports it anyway), and its CPU."""
    import torch

    # torch read it when it loaded its OpenMP runtime; `peftcli train` sets it before that.
    policy = os.environ.get("OMP_WAIT_POLICY", "")
    if not torch.cuda.is_available():
        return Machine(cuda=False, torch_varlen=torch_has_varlen(), cpu=cpu_facts(), omp_wait_policy=policy)
    from peftcli.model.device import local_device

    device = local_device()
    free, _ = torch.cuda.mem_get_info(device)
    capability = torch.cuda.get_device_capability(device)
    return Machine(True, capability, free / 2**30, torch_has_varlen(), omp_wait_policy=policy)


def resolve(
    recipe: Recipe,
    cuda: bool | None = None,
    capability: tuple[int, int] | None = None,
    free_gib: float | None = None,
    torch_varlen: bool | None = None,
) -> Settings:
    """The settings for this process. Without `cuda` it probes the machine (training) and registers
    the attention kernel it chose; with it, it describes that machine (tests, the bench)."""
    probed = cuda is None
    if cuda is None:
        machine = probe()
    else:
        varlen = torch_has_varlen() if torch_varlen is None else torch_varlen
        machine = Machine(cuda, capability, free_gib, varlen)
    settings = decide(recipe, machine)
    if probed and settings.attn_implementation == VARLEN:
        from peftcli.model.attention import register

        register()
    if probed and settings.cpu_threads is not None:
        import torch

        torch.set_num_threads(settings.cpu_threads)
    return settings
