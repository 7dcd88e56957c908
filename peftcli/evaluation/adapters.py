"""`peftcli generate`: one base model, several adapters, switched per prompt without reloading.

    peftcli generate --base MODEL --adapter support=runs/a --adapter sales=runs/b --prompt "Hello"
    peftcli generate --adapter a=runs/a --prompts prompts.jsonl
    peftcli generate --adapter a=runs/a --adapter b=runs/b --interactive

The base is loaded once; every adapter is attached to it with PEFT's `load_adapter` and selected
with `set_adapter` (or switched off for `base`). Each adapter renders prompts with the chat
template it was trained with and stops at that template's end-of-turn token. Output streams to
the terminal token by token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftcli import console
from peftcli.errors import UserError
from peftcli.evaluation.generation import Prompt, active, generate, render_prompt
from peftcli.methods import method_of
from peftcli.model.checks import check_model_source
from peftcli.model.load import attach_adapter, load_model, load_tokenizer, quiet_libraries
from peftcli.recipe import ModelSection, Recipe
from peftcli.rundir import open_run

BASE = "base"


@dataclass
class Adapter:
    name: str
    run: Path
    tokenizer: object
    chat: bool  # trained on chat-formatted data (else on raw prompt/completion text)


def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    parsed, seen = [], set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter {spec!r}: expected NAME=RUN, e.g. --adapter support=runs/support")
        if "." in name or name == BASE or name in seen:
            raise UserError(f"--adapter {spec!r}: names must be unique, not '{BASE}', and contain no '.'")
        seen.add(name)
        parsed.append((name, Path(path)))
    return parsed


def base_model(base: str | None, adapters: list[tuple[str, Recipe]]) -> ModelSection:
    """The base the adapters attach to: --base (a folder, relative to the current directory, or a hub
    id), else the one base they were all trained on (their recipes' `model` section)."""
    if len({recipe.model.name for _, recipe in adapters}) > 1 and not base:
        listed = ", ".join(f"{name}: {recipe.model.name}" for name, recipe in adapters)
        raise UserError(
            f"the adapters were trained on different bases ({listed})",
            hint="give --base, and only adapters trained on it",
        )
    if not base:
        if not adapters:
            raise UserError("give --base MODEL, or at least one --adapter NAME=RUN")
        return adapters[0][1].model
    base = str(Path(base).resolve()) if Path(base).exists() else base
    for name, recipe in adapters:
        if recipe.model.name != base:
            console.warn(f"adapter {name} was trained on {recipe.model.name}, not on --base {base}")
    return ModelSection(name=base)


class Session:
    """The base model with its adapters attached, and the tokenizer each one uses."""

    def __init__(self, base: str | None, adapters: list[tuple[str, Path]]):
        runs = [(name, open_run(path)) for name, path in adapters]
        recipes = [run.recipe() for _, run in runs]
        model_section = base_model(base, [(name, recipe) for (name, _), recipe in zip(runs, recipes)])
        methods = [method_of(r.peft) for r in recipes]
        if len({m.attach_group or m.name for m in methods}) > 1:
            raise UserError(
                "these adapters use different methods, which PEFT cannot attach to one base together",
                hint="run one `peftcli generate` per method",
            )
        for (name, _), recipe, method in zip(runs, recipes, methods):
            if method.saves_full_model:
                raise UserError(
                    f"--adapter {name}: that run trained the whole model (method "
                    f"{recipe.peft.method}); load its model/ folder as --base instead"
                )
        quantization = recipes[0].quantization if recipes else None
        if len({(r.quantization.describe() if r.quantization else None) for r in recipes}) > 1:
            quantization = None  # adapters trained on differently quantized bases: use full precision
        check_model_source(model_section)
        self.base_name = model_section.name
        quiet_libraries()
        with console.err.status(f"loading {model_section.name}"):
            self.model = load_model(model_section, quantization)
        self.base_tokenizer = load_tokenizer(model_section)
        self.adapters: dict[str, Adapter] = {}
        for (name, run), recipe in zip(runs, recipes):
            label = f"{name} ({run.adapter})"
            self.model = attach_adapter(self.model, str(run.adapter), model_section.name, name, label)
            tokenizer = load_tokenizer(recipe.model, path=str(run.adapter))
            chat = (run.metrics().get("data") or {}).get("chat_template") is not None
            self.adapters[name] = Adapter(name, run.path, tokenizer, chat)
        self.model.eval()

    def tokenizer_for(self, adapter: str | None):
        return self.adapters[adapter].tokenizer if adapter else self.base_tokenizer

    def prompt(self, adapter: str | None, messages: list[dict]) -> Prompt:
        tokenizer = self.tokenizer_for(adapter)
        chat = self.adapters[adapter].chat if adapter else bool(tokenizer.chat_template)
        return Prompt(render_prompt(tokenizer, messages, chat), messages[-1]["content"], None, chat)

    def reply(self, adapter: str | None, messages: list[dict], stream: bool, **options) -> str:
        from transformers import TextStreamer

        tokenizer = self.tokenizer_for(adapter)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        return self.complete(adapter, self.prompt(adapter, messages), streamer, **options)

    def complete(self, adapter: str | None, prompt: Prompt, streamer=None, **options) -> str:
        """The reply of one adapter (None: the base) to a ready prompt. Switching adapters changes
        the model for every caller: callers on several threads take turns (peftcli serve's engine)."""
        with active(self.model, adapter) as model:
            return generate(model, self.tokenizer_for(adapter), [prompt], streamer=streamer, **options)[0][0]
