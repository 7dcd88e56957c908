"""`peftcli serve --engine vllm`: the same base and adapters served by vLLM's own OpenAI server, with
its multi-LoRA batching, for when one process answering one request at a time is not enough.

The command is built here from the runs (`vllm serve BASE --enable-lora --lora-modules NAME=PATH ...
--max-lora-rank R`) and checked before vLLM starts: vLLM applies plain low-rank LoRA updates only, so
an adapter of another method (or a LoRA with DoRA, trained modules or biases) is refused, naming the
way to serve it instead (the registry's `vllm_unservable` says which). The base is served under the
name `base`, as the built-in engine names it, so clients do not change with the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from peftcli.errors import UserError
from peftcli.evaluation.adapters import BASE, base_model
from peftcli.methods import method_of
from peftcli.rundir import open_run

# The values vLLM's --max-lora-rank accepts (vllm/config/lora.py: MaxLoRARanks).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
INSTALL_HINT = "install it on a CUDA machine (`pip install vllm`), or use the built-in engine (drop --engine vllm)"


@dataclass(frozen=True)
class VllmAdapter:
    name: str
    path: Path  # the adapter folder (adapter_config.json + adapter_model.safetensors)
    rank: int  # the largest rank of any of its layers


def max_lora_rank(ranks: list[int]) -> int:
    """The smallest rank vLLM accepts that holds every adapter's."""
    largest = max(ranks, default=1)
    for allowed in VLLM_RANKS:
        if allowed >= largest:
            return allowed
    raise UserError(
        f"an adapter has rank {largest}; vLLM serves ranks up to {VLLM_RANKS[-1]}",
        hint="merge it (`peftcli merge RUN --out DIR`) and serve the merged model",
    )


def lora_module(adapter: VllmAdapter) -> str:
    """One --lora-modules value: NAME=PATH, or vLLM's JSON form when the path would break that one."""
    plain = f"{adapter.name}={adapter.path}"
    if plain.count("=") == 1 and "," not in plain:
        return plain
    return json.dumps({"name": adapter.name, "path": str(adapter.path)})


def vllm_command(
    base: str,
    adapters: list[VllmAdapter],
    *,
    host: str,
    port: int,
    executable: str = "vllm",
    revision: str | None = None,
    trust_remote_code: bool = False,
    chat_template: Path | None = None,
) -> list[str]:
    """The `vllm serve` command line (the API key travels in VLLM_API_KEY, never on it: `ps` shows argv)."""
    command = [executable, "serve", base, "--host", host, "--port", str(port), "--served-model-name", BASE]
    if revision:
        command += ["--revision", revision]
    if trust_remote_code:
        command.append("--trust-remote-code")
    if chat_template is not None:
        command += ["--chat-template", str(chat_template)]
    if adapters:
        command += ["--enable-lora", "--max-loras", str(len(adapters))]
        command += ["--max-lora-rank", str(max_lora_rank([a.rank for a in adapters]))]
        command += ["--lora-modules", *(lora_module(a) for a in adapters)]
    return command


def adapter_rank(folder: Path) -> int:
    """The largest rank in an adapter's config: its `r`, or a per-layer `rank_pattern` entry (a
    PiSSA/OLoRA adapter is saved with its rank doubled, so the recipe's `r` is not enough)."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    pattern = config.get("rank_pattern") or {}
    return max([int(config.get("r") or 1), *(int(r) for r in pattern.values())])


def unservable(name: str, run_path: Path, recipe) -> UserError | None:
    """Why vLLM cannot serve this run's adapter, with the way to serve it instead; None when it can."""
    method = method_of(recipe.peft)
    if method.saves_full_model:
        return UserError(
            f"--adapter {name}: that run trained the whole model (method {recipe.peft.method})",
            hint=f"serve its model folder as the base: peftcli serve --engine vllm --base {run_path}/model",
        )
    reason = method.vllm_unservable(recipe.peft)
    if reason is None:
        return None
    builtin = "serve it with the built-in engine (drop --engine vllm), which loads every PEFT method"
    merge = (
        f"merge it (`peftcli merge {run_path} --out merged/{name}`), then serve the merged model "
        f"(`peftcli serve --engine vllm --base merged/{name}`); or "
    )
    hint = (merge if method.mergeable else "") + builtin
    return UserError(f"--adapter {name}: vLLM cannot serve method {recipe.peft.method}: {reason}", hint=hint)


def chat_template_of(folders: list[Path]) -> Path | None:
    """The chat template the adapters were trained with (saved beside each), for vLLM to render every
    chat request with: vLLM renders with one template, so adapters trained with different ones are
    refused. None: none was saved (raw-text adapters), vLLM uses the base's."""
    found = [folder / "chat_template.jinja" for folder in folders if (folder / "chat_template.jinja").is_file()]
    if len({path.read_text(encoding="utf-8") for path in found}) > 1:
        raise UserError(
            "the adapters were trained with different chat templates; vLLM renders every request with one",
            hint="serve them with the built-in engine (drop --engine vllm), which renders each with its own",
        )
    return found[0] if found else None


def plan(base: str | None, adapters: list[tuple[str, Path]], host: str, port: int, executable: str) -> list[str]:
    """The vLLM command for these runs, after every check that can be made without vLLM."""
    runs = [(name, open_run(path)) for name, path in adapters]
    recipes = [run.recipe() for _, run in runs]
    for (name, run), recipe in zip(runs, recipes):
        refusal = unservable(name, run.path, recipe)
        if refusal is not None:
            raise refusal
    model = base_model(base, [(name, recipe) for (name, _), recipe in zip(runs, recipes)])
    served = [VllmAdapter(name, run.adapter, adapter_rank(run.adapter)) for name, run in runs]
    return vllm_command(
        model.name,
        served,
        host=host,
        port=port,
        executable=executable,
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
        chat_template=chat_template_of([a.path for a in served]),
    )
