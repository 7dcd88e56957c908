"""What the machine can do: the GPU (found without importing torch, for `validate`), its bf16 peak,
and the model FLOPs utilisation (MFU) a run achieved.

FLOPs per trained token follow the usual convention: 6N for a full fine-tune (forward 2N, backward
4N) and 4N for PEFT methods (the frozen base still back-propagates activations, 2N, but computes no
weight gradients), with N the parameters that take part in matrix multiplies (everything but the
input embedding). Attention's own FLOPs are left out, as in most published MFU figures.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets. Matched by
# substring against the CUDA device name, most specific first. T4/V100 have no bf16: fp16 figures.
PEAK_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
    ("V100", 125.0),
    ("T4", 65.0),
)


def peak_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    free_gib: float | None = None
    capability: tuple[int, int] | None = None  # CUDA compute capability, e.g. (9, 0)


def _query(fields: str) -> str | None:
    try:
        return subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def detect_gpus() -> list[Gpu]:
    """The machine's NVIDIA GPUs via nvidia-smi (no torch import, so `validate` stays instant)."""
    if shutil.which("nvidia-smi") is None:
        return []
    # Drivers before 510 do not know compute_cap: ask again without it.
    out = _query("name,memory.total,memory.free,compute_cap") or _query("name,memory.total,memory.free")
    gpus = []
    for line in (out or "").strip().splitlines():
        name, *numbers = (part.strip() for part in line.split(","))
        try:
            total, free = float(numbers[0]) / 1024, float(numbers[1]) / 1024
            major, _, minor = numbers[2].partition(".") if len(numbers) > 2 else ("", "", "")
            capability = (int(major), int(minor or 0)) if major.isdigit() else None
        except (ValueError, IndexError):
            continue
        gpus.append(Gpu(name, total, free, capability))
    return gpus


def torch_has_varlen() -> bool:
    """Whether the installed torch ships `varlen_attn`, found without importing torch (for `validate`)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    source = Path(next(iter(spec.submodule_search_locations))) / "nn" / "attention" / "varlen.py"
    try:
        return "def varlen_attn(" in source.read_text(encoding="utf-8")
    except OSError:
        return False


def matmul_params(model) -> int:
    """Parameters that take part in matrix multiplies: all but the input embedding (unless tied).
    bitsandbytes packs two 4-bit weights per stored element; they count as two."""
    total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embeddings is not None and (head is None or head.weight is not embeddings.weight):
        total -= embeddings.weight.numel()
    return total


def utilisation(tokens_per_s_per_device: float, n_params: int, full_finetune: bool, device: str) -> dict:
    """Achieved TFLOP/s per device and MFU against the device's bf16 peak (None when unknown)."""
    flops_per_token = (6 if full_finetune else 4) * n_params
    tflops = tokens_per_s_per_device * flops_per_token / 1e12
    peak = peak_tflops(device) if device != "cpu" else None
    return {
        "tflops": round(tflops, 3),
        "mfu": round(tflops / peak, 4) if peak else None,
        "device_peak_tflops": peak,
        "flops_per_token": flops_per_token,
    }


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def compute_dtype(dtype: str):
    """`auto` = bfloat16 on a CUDA GPU that supports it, float32 otherwise (CPU, older GPUs)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if has_cuda() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def sharded_launch() -> bool:
    """Under FSDP or DeepSpeed the launcher places (and shards) the weights, not us."""
    return (
        os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    )


def local_device():
    """This process's device: its GPU under a multi-process launch (LOCAL_RANK), else cuda:0 or cpu."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA or CPU allocation failure, however the library phrased it."""
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def peak_memory_mb() -> float:
    """Peak CUDA memory allocated by tensors on a GPU; peak resident set size of the process on CPU."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is in KiB on Linux and bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def rank_prefix() -> str:
    """ "rank 1: " in a multi-process run, "" otherwise (for messages a single rank prints)."""
    return f"rank {os.environ.get('RANK', '0')}: " if world_size() > 1 else ""


# Environment variables through which a user sets the CPU thread count themselves; peftcli then
# keeps their choice.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class CpuFacts:
    """What the CPU thread count depends on, read from the OS (no torch): model/speed.py decides."""

    cores: int  # the machine's logical cores (the load average is spread over these)
    affinity: int | None = None  # cores this process may run on (sched_getaffinity)
    quota: float | None = None  # the cgroup's CPU quota, in cores; None = no quota
    load: float | None = None  # 1-minute load average of the whole machine
    user_threads: tuple[str, str] | None = None  # (variable, value) the user set
    processes: int = 1  # training processes on this machine sharing the cores


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (cgroup v2 cpu.max, v1 cfs_quota/period)."""
    candidates = []
    try:  # v2: "0::/path" names this process's own group under the unified root
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                candidates.append(root / line[3:].lstrip("/") / "cpu.max")
    except OSError:
        pass
    candidates.append(root / "cpu.max")
    for path in candidates:
        try:
            quota, _, period = path.read_text().strip().partition(" ")
        except OSError:
            continue
        if quota == "max":
            return None
        try:
            return int(quota) / int(period or "100000")
        except ValueError:
            return None
    for folder in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        try:
            quota_us = int((root / folder / "cpu.cfs_quota_us").read_text())
            period_us = int((root / folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def cpu_facts() -> CpuFacts:
    """This machine's CPU facts as the OS reports them now."""
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        affinity = None
    try:
        load: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    user = next(((name, os.environ[name]) for name in THREAD_VARIABLES if os.environ.get(name)), None)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or "1")
    return CpuFacts(os.cpu_count() or 1, affinity, cgroup_cpu_quota(), load, user, processes)


def passive_cpu_wait() -> None:
    """Idle OpenMP threads sleep instead of spinning (unless the user chose a policy): a spinning
    thread steals the core that another process, or another of our threads, needs. Read once, when
    torch loads its OpenMP runtime: call this before importing torch."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
