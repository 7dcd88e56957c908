"""Fast by default on a GPU: what each `auto` setting of a recipe becomes on a machine (no torch).

| setting | auto on a CUDA GPU | auto on CPU |
|---|---|---|
| data.packing | on, for methods that can pack | off |
| model.attn_implementation | the fastest exact kernel (below) | transformers' default |
| training.gradient_checkpointing | on only when the run would not fit without it (below) | off |
| training.liger | on if liger-kernel is installed | off |
| training.tf32 | on for Ampere and newer | off |
| training.batch_size | the largest micro-batch that fits (model/size.py) | 4 |

Packed training is padding-free and exact: position ids restart at each example and each example
attends to itself only. The kernel, fastest first:

| kernel | layout | when |
|---|---|---|
| flash_attention_2 | one flat row per batch, cut by `cu_seqlens` | flash-attn is installed (GPU) |
| peftcli_varlen | one flat row per batch, cut by `cu_seqlens` | torch ships `varlen_attn` (*) |
| sdpa | rows of max_length, a block mask per row | older torch, pre-Ampere GPU, fp32 on a GPU |

(*) peftcli/training/attention.py: torch's flash kernel on an Ampere+ GPU in bf16/fp16; an exact
per-example sdpa elsewhere (CPU, where packing is only on when the recipe asks for it).

Gradient checkpointing (`auto`) stays off when the fit estimate without it, plus 15 % and 1 GiB,
fits in the GPU's free memory: off is ~35 % faster where memory allows. Prefix tuning never uses it.
With `batch_size: auto` that estimate is for a micro-batch of one example, and the batch is then
picked to fill the memory left (model/size.py: `plan_batch`; training/batch.py confirms it).

Every choice is recorded in metrics.json (`settings`) and report.md, `validate` prints it, and each
can be set explicitly in the recipe. The bench measures them on and off. This module decides from a
`Machine` description and never imports torch, so `validate` can show the choices (the training
package imports transformers); peftcli/training/settings.py probes the GPU with torch for training.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import asdict, dataclass

from peftcli.methods import Method, method_of
from peftcli.model.device import CpuFacts, torch_has_varlen
from peftcli.recipe import Recipe

VARLEN = "peftcli_varlen"  # torch's varlen kernel as registered by peftcli/training/attention.py

# Checkpointing stays off only when the estimate without it fits with this much room: the estimate is
# within ~10 % of measured peaks, and the allocator's fragmentation and the CUDA context come on top.
MARGIN = 0.15
RESERVE_GIB = 1.0
KERNELS = {
    "flash_attention_2": "flash-attn varlen (cu_seqlens)",
    VARLEN: "torch varlen_attn (cu_seqlens; per-example sdpa off a bf16/fp16 Ampere+ GPU)",
}


@dataclass(frozen=True)
class Machine:
    """What the settings depend on: found with torch when training, with nvidia-smi for `validate`."""

    cuda: bool
    capability: tuple[int, int] | None = None
    free_gib: float | None = None  # free GPU memory before the model loads; None = unknown
    torch_varlen: bool = True  # the installed torch ships torch.nn.attention.varlen
    cpu: CpuFacts | None = None  # None = unknown: torch keeps its default thread count
    # OpenMP's wait policy in the training process ("" = the runtime's default, spinning).
    omp_wait_policy: str = ""


@dataclass(frozen=True)
class Settings:
    attn_implementation: str | None  # None = transformers' default
    packing: bool
    gradient_checkpointing: bool
    liger: bool
    tf32: bool
    compile: bool
    # "varlen": the batch is one padding-free row cut by cu_seqlens; "rows": rows of max_length with a
    # block mask each; "padded": no packing, one example per row.
    packing_layout: str = "padded"
    checkpointing_reason: str = ""
    # Intra-op CPU threads torch gets (None: torch's default) and why; the OpenMP wait policy.
    cpu_threads: int | None = None
    cpu_threads_reason: str = ""
    omp_wait_policy: str = ""
    # Where the model's shape (config.json) came from, or why there is none (then no fit estimate).
    model_shape: str = ""
    # The micro-batch and accumulation trained with (training.batch_size: auto picks them), and why.
    batch_size: int = 1
    gradient_accumulation: int = 1
    batch_reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def attention(self) -> str:
        """The kernel in words, for `validate`, report.md and the packing note."""
        name = self.attn_implementation or "transformers' default (sdpa)"
        if self.packing_layout == "rows":
            return f"{name}, a block-diagonal mask per row built from the position ids"
        return KERNELS.get(self.attn_implementation or "", name)

    def lines(self) -> list[str]:
        """What `validate` prints about the resolved settings."""
        packing = {
            "varlen": "on, padding-free: each batch is one flat row cut at example boundaries",
            "rows": "on, rows of data.max_length (no varlen kernel here)",
            "padded": "off (each example padded to the longest in its batch)",
        }[self.packing_layout]
        return [
            f"attention: {self.attention}",
            f"packing: {packing}",
            f"gradient checkpointing: {'on' if self.gradient_checkpointing else 'off'} ({self.checkpointing_reason})",
            f"liger kernels: {'on' if self.liger else 'off'}, tf32: {'on' if self.tf32 else 'off'}, "
            f"compile: {'on' if self.compile else 'off'}",
            f"batch: {self.batch_size} x {self.gradient_accumulation} accumulation per device ({self.batch_reason})",
            f"cpu threads: {self.cpu_threads or 'default'} ({self.cpu_threads_reason}); "
            f"OpenMP wait policy: {self.omp_wait_policy or 'default (spinning)'}",
            f"model shape: {self.model_shape}"
            if self.shape_known
            else f"fit estimate: cannot estimate, the model's shape is {self.model_shape}",
        ]

    @property
    def shape_known(self) -> bool:
        return not self.model_shape.startswith(NO_SHAPE)


NO_SHAPE = "unknown: "


def cpu_threads(cpu: CpuFacts) -> tuple[int | None, str]:
    """Intra-op threads for CPU training: the cores this process may use (affinity, cgroup quota)
    less the share the load average says other work keeps busy, split among our processes. More
    threads than free cores make every step wait for the slowest, descheduled thread (measured:
    2 cores beside 4 busy processes, 76.9 s with torch's default against 5.2 s with one thread)."""
    if cpu.user_threads is not None:
        name, value = cpu.user_threads
        return None, f"{name}={value} set in the environment, kept"
    ours = cpu.affinity or cpu.cores
    why = [f"{ours} cores {'in the affinity mask' if cpu.affinity else 'on the machine'}"]
    if cpu.quota is not None and cpu.quota < ours:
        ours = max(1, math.floor(cpu.quota))
        why.append(f"a cgroup quota of {cpu.quota:g} CPUs")
    free = float(ours)
    if cpu.load is not None:
        # The load average counts runnable tasks over the whole machine: spread over all its cores,
        # that share of ours is busy with other work.
        busy = min(1.0, cpu.load / max(cpu.cores, 1))
        free = ours * (1 - busy)
        why.append(f"load average {cpu.load:.1f} on {cpu.cores} cores")
    threads = max(1, round(free / max(cpu.processes, 1)))
    if cpu.processes > 1:
        why.append(f"{cpu.processes} training processes")
    return threads, "auto: " + ", ".join(why)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def probe_without_torch(gpus: list | None = None) -> Machine:
    """The first GPU as nvidia-smi sees it (`gpus`: detect_gpus() already called), for `validate`,
    which must not import torch."""
    from peftcli.model.device import cpu_facts, detect_gpus

    policy = os.environ.get("OMP_WAIT_POLICY") or "PASSIVE"  # what `train` sets (model/device.py)
    gpus = detect_gpus() if gpus is None else gpus
    if not gpus:
        return Machine(cuda=False, torch_varlen=torch_has_varlen(), cpu=cpu_facts(), omp_wait_policy=policy)
    return Machine(True, gpus[0].capability, gpus[0].free_gib, torch_has_varlen(), omp_wait_policy=policy)


def _half_precision(recipe: Recipe, machine: Machine) -> bool:
    dtype = recipe.model.dtype
    ampere = bool(machine.capability and machine.capability[0] >= 8)
    return dtype in ("bfloat16", "float16") or (dtype == "auto" and ampere)


def _kernel(recipe: Recipe, machine: Machine, packing: bool, config: dict) -> tuple[str | None, str]:
    """(attn_implementation, packing layout) for `model.attn_implementation: auto`."""
    flash = machine.cuda and _installed("flash_attn")
    if not packing:
        return ("flash_attention_2" if flash else "sdpa") if machine.cuda else None, "padded"
    if flash:
        return "flash_attention_2", "varlen"
    # Soft-capped logits and attention dropout have no varlen kernel; their rows keep a mask instead.
    quirks = config.get("attn_logit_softcapping") or (config.get("attention_dropout") or 0) > 0
    kernel_fits = not machine.cuda or (
        bool(machine.capability and machine.capability[0] >= 8) and _half_precision(recipe, machine)
    )
    if machine.torch_varlen and kernel_fits and not quirks:
        return VARLEN, "varlen"
    return ("sdpa" if machine.cuda else None), "rows"


def _checkpointing(recipe: Recipe, machine: Machine, config: dict, method: Method) -> tuple[bool, str]:
    setting = recipe.training.gradient_checkpointing
    if isinstance(setting, bool):
        return setting, "set in the recipe"
    if not machine.cuda:
        return False, "auto: off on CPU"
    if not method.checkpointing:
        return False, f"auto: {method.name} does not support it"
    from peftcli.model.size import estimate

    try:
        need = estimate(recipe, config, checkpointing=False).total_gib if config else None
    except (KeyError, TypeError, ZeroDivisionError):
        need = None
    if need is None or machine.free_gib is None:
        return True, "auto: on, the memory need or the free GPU memory is unknown"
    budget = (machine.free_gib - RESERVE_GIB) / (1 + MARGIN)
    verdict = "would not fit" if need > budget else "fits"
    return need > budget, (
        f"auto: the fit estimate without it, {need:.1f} GiB, {verdict} in {machine.free_gib:.1f} GiB free "
        f"with a {MARGIN:.0%} + {RESERVE_GIB:g} GiB margin"
    )


def decide(recipe: Recipe, machine: Machine) -> Settings:
    """The settings `recipe` gets on `machine`."""
    from peftcli.model.checks import find_config
    from peftcli.model.size import plan_batch

    method = method_of(recipe.peft)
    t, d = recipe.training, recipe.data
    found = find_config(recipe.model)
    config = found.config
    packing = d.packing if isinstance(d.packing, bool) else bool(machine.cuda and method.packing)
    attn: str | None = recipe.model.attn_implementation
    if attn == "auto":
        attn, layout = _kernel(recipe, machine, packing, config)
    else:
        layout = ("varlen" if "flash" in str(attn) or attn == VARLEN else "rows") if packing else "padded"
    checkpointing, why = _checkpointing(recipe, machine, config, method)
    batch = plan_batch(recipe, config, machine.cuda, machine.free_gib, checkpointing, MARGIN, RESERVE_GIB)
    liger = t.liger if isinstance(t.liger, bool) else machine.cuda and _installed("liger_kernel")
    tf32 = t.tf32 if isinstance(t.tf32, bool) else bool(machine.capability and machine.capability[0] >= 8)
    if machine.cuda:
        threads, threads_why = None, "torch's default: training runs on the GPU"
    elif machine.cpu is None:
        threads, threads_why = None, "torch's default: the cores available are unknown"
    else:
        threads, threads_why = cpu_threads(machine.cpu)
    return Settings(
        attn,
        packing,
        checkpointing,
        liger,
        tf32,
        t.compile,
        layout,
        why,
        cpu_threads=threads,
        cpu_threads_reason=threads_why,
        omp_wait_policy=machine.omp_wait_policy,
        model_shape=f"from {found.source}" if config else NO_SHAPE + found.source,
        batch_size=batch.micro,
        gradient_accumulation=batch.accumulation,
        batch_reason=batch.reason,
    )
