"""`peftcli validate`: the recipe resolved, what will train on what, the settings this machine gets
and whether it fits, without loading anything heavy (no torch). `--json`: all of it as one object."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer

from peftcli import console
from peftcli.cli._options import RecipeArg, SetOpt, load
from peftcli.errors import UserError

if TYPE_CHECKING:  # the commands import their stage when they run: `peftcli --help` stays light
    from peftcli.data.formats import Example
    from peftcli.model.device import Gpu
    from peftcli.model.size import Estimate
    from peftcli.model.speed import Settings
    from peftcli.recipe import Recipe


def validate(
    recipe: RecipeArg,
    set_: SetOpt = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="One JSON object on stdout: recipe, settings, fit estimate, data (no text)."),
    ] = False,
) -> None:
    """Check a recipe and print it resolved (defaults filled, overrides applied, paths absolute).

    [dim]Example: peftcli validate recipes/demo.yaml --set peft.r=16[/]
    """
    from peftcli.model.checks import check_environment
    from peftcli.recipe import recipe_to_yaml

    resolved = load(recipe, set_)
    check_environment(resolved, deep=False)  # the model folder, tokenizer, context length, ...: no torch
    data, template = check_data(resolved)  # every row read and checked, as training will: still no torch
    if as_json:
        console.out.print(json.dumps(summary(resolved, data, template), indent=2), markup=False)
        return
    console.out.print(recipe_to_yaml(resolved), markup=False)
    for line in [*describe_recipe(resolved), *map(data_line, data), *template_lines(template)]:
        console.err.print(line, markup=False)
    console.err.print("recipe is valid", style="green")


@contextmanager
def _said(into: dict) -> Iterator[None]:
    """Record the warnings and notes the data stage says (still saying them), for `--json` and for
    telling which source they are about. The stage says them through `console`'s functions."""
    from rich.text import Text

    warn, note = console.warn, console.note

    def recorded_warn(message: str) -> None:
        into.setdefault("warnings", []).append(Text.from_markup(message).plain)
        warn(message)

    def recorded_note(message: str) -> None:
        into.setdefault("notes", []).append(message)
        note(message)

    console.warn, console.note = recorded_warn, recorded_note
    try:
        yield
    finally:
        console.warn, console.note = warn, note


def _read_sources(recipe: Recipe) -> list[tuple[dict, list[Example]]]:
    """Every local data source read as `train` reads it (files, format, rows, the first bad row,
    the columns ignored), with its examples; hub datasets are read when training."""
    import os

    from peftcli.data.pipeline import read_examples

    found: list[tuple[dict, list[Example]]] = []
    for key, sources in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval or [])):
        for i, source in enumerate(sources):
            where = key if len(sources) == 1 else f"{key}[{i}]"
            if not os.path.isabs(source.path):
                found.append(({"key": where, "path": source.path, "hub": True}, []))
                continue
            entry: dict = {"key": where, "path": source.path}
            with _said(entry):
                read = read_examples([source], recipe.data, where)
            examples = [example for part in read.per_source for example in part]
            entry.update(
                rows=len(examples),
                formats=list(read.stats.formats),
                skipped=read.stats.skipped,
                skipped_reasons=dict(read.stats.skipped_reasons),
            )
            found.append((entry, examples))
    for entry, _ in found:
        _first_skipped(entry)
    return found


def _first_skipped(entry: dict) -> None:
    reasons = entry.get("skipped_reasons") or {}
    entry["first_skipped"] = next(({"row": rows[0], "reason": why} for why, rows in reasons.items()), None)


def data_summary(recipe: Recipe) -> list[dict]:
    """What `_read_sources` found, without the examples."""
    return [entry for entry, _ in _read_sources(recipe)]


def check_data(recipe: Recipe) -> tuple[list[dict], dict | None]:
    """The sources read, then every conversation rendered and masked through the chat template as
    training will (see data/template_check.py), in the thinking mode training picks from the rows of
    data.train (with its warning when only some carry reasoning). A row that fails is an error naming
    it, as in training; with data.bad_rows: skip it is counted in its source's `skipped`. Returns the
    sources and what the template check found (None: nothing to check)."""
    read = _read_sources(recipe)
    data = recipe.data
    if data.chat_template == "auto" and not any(e.is_chat for _, examples in read for e in examples):
        return [entry for entry, _ in read], None
    from peftcli.data.template_check import failing_conversations, offline_tokenizer
    from peftcli.data.templates import resolve_template, thinking_from_data

    template: dict = {"setting": data.chat_template}
    tokenizer, why_not = offline_tokenizer(recipe.model)
    if tokenizer is None:
        template.update(checked=False, why_not=why_not)
        return [entry for entry, _ in read], template
    with _said(template):
        chosen = resolve_template(data.chat_template, tokenizer)
        template["name"] = chosen.name
        # Training picks the thinking mode from its rows (warning when only some carry reasoning) and
        # installs it before any row renders; so does this, so each row renders as it will in training.
        trained = [e for entry, examples in read if entry["key"].split("[")[0] == "data.train" for e in examples]
        thinking_from_data(tokenizer, chosen, trained)
        template["rows"] = 0
        left = {"data.train": 0, "data.eval": 0}  # rows each split keeps; a hub source keeps some
        for entry, examples in read:
            split = entry["key"].split("[")[0]
            if entry.get("hub"):
                left[split] += 1
                continue
            failures = failing_conversations(tokenizer, examples, data)
            template["rows"] += failures.checked
            if failures.first is not None and data.bad_rows == "error":
                row, reason = failures.first
                raise UserError(
                    f"{entry['key']}: {row}: {reason}",
                    hint=f"{failures.failed:,} of the {failures.checked:,} conversations of {entry['path']} fail when "
                    "rendered and masked as training does; fix them or data.chat_template, or set "
                    "data.bad_rows: skip to skip and count them",
                )
            entry["rows"] -= failures.failed  # as before: the rows training keeps
            entry["skipped"] += failures.failed
            for reason, rows in failures.reasons.items():
                entry["skipped_reasons"].setdefault(reason, []).extend(rows)
            _first_skipped(entry)
            left[split] += entry["rows"]
    template["checked"] = True
    sources = [entry for entry, _ in read]
    for split, kept in left.items():
        first = next(
            (e["first_skipped"] for e in sources if e["key"].split("[")[0] == split and e.get("first_skipped")), None
        )
        if kept == 0 and first is not None:  # training stops there: "no usable examples left"
            raise UserError(
                f"{split}: every row would be skipped as bad; the first, {first['row']}: {first['reason']}",
                hint="fix the rows or data.chat_template; data.bad_rows: error stops at each with its reason",
            )
    return sources, template


def data_line(source: dict) -> str:
    if source.get("hub"):
        return f"{source['key']}: hub dataset {source['path']} (read when training)"
    line = f"{source['key']}: {source['rows']:,} rows, format {', '.join(source['formats'])}"
    first = source.get("first_skipped")
    if source["skipped"] and first:
        line += (
            f"; {source['skipped']:,} bad rows skipped (data.bad_rows: skip), the first: {first['row']}: "
            f"{first['reason']}"
        )
    return line


def template_lines(template: dict | None) -> list[str]:
    if template is None:
        return []
    if not template["checked"]:
        return [f"chat template: not checked here: {template['why_not']} (training checks every row)"]
    name = template["name"]
    what = "the tokenizer's own" if name == "tokenizer" else name
    return [f"chat template: {what}; {template['rows']:,} conversations rendered and masked as training will"]


def data_lines(recipe: Recipe) -> list[str]:
    """The sources as read (for `train`'s early checks, which leave the template to training)."""
    return [data_line(source) for source in data_summary(recipe)]


def describe_recipe(recipe: Recipe) -> list[str]:
    from peftcli.methods import method_of
    from peftcli.model.checks import read_config

    method = method_of(recipe.peft)
    quant = recipe.quantization
    lines = [
        f"method: {method.name} — {method.summary}",
        f"quantization: {'none' if quant is None else quant.describe()}",
    ]
    config = read_config(recipe.model)
    if config:
        layers = config.get("num_hidden_layers")
        hidden = config.get("hidden_size")
        lines.append(
            f"base: {config.get('model_type', '?')}, {layers} layers, hidden {hidden}, vocab {config.get('vocab_size')}"
        )
    else:
        lines.append(f"base: {recipe.model.name} (hub id; not inspected offline)")
    found = fit(recipe, config)
    lines += fit_lines(found, config)
    t, chosen = recipe.training, found.settings
    length = t.describe_length()
    auto = " (batch_size: auto, on this machine)" if t.batch_size == "auto" else ""
    lines.append(
        f"training: {length}, {chosen.batch_size} x {chosen.gradient_accumulation} examples per step{auto}, "
        f"lr {t.learning_rate:g}"
    )
    lines.append(f"output: {recipe.output.dir}")
    return lines


@dataclass
class Fit:
    """What the `auto` settings become on this machine and the peak GPU memory estimate."""

    gpus: list[Gpu]
    settings: Settings
    guess: Estimate | None  # None: the model's config does not say enough
    share: float = 0.0  # trainable share of all parameters, in %

    @property
    def where(self) -> str:
        return f"the {self.gpus[0].name}" if self.gpus else "this machine (no CUDA GPU)"

    @property
    def fits(self) -> bool | None:
        """Whether the estimate fits the GPU found here (None: no GPU or no estimate)."""
        if not self.gpus or self.guess is None:
            return None
        return self.guess.total_gib <= self.gpus[0].memory_gib


def fit(recipe: Recipe, config: dict) -> Fit:
    from peftcli.methods import method_of
    from peftcli.model.device import detect_gpus
    from peftcli.model.size import estimate
    from peftcli.model.speed import decide, probe_without_torch

    gpus = detect_gpus()
    machine = probe_without_torch(gpus)
    settings = decide(recipe, machine)
    try:
        # With checkpointing as resolved here (speed.decide: off on CPU, on a GPU only when needed).
        # The micro-batch is the recipe's, or what batch_size: auto picks here.
        guess = estimate(
            recipe,
            config,
            checkpointing=settings.gradient_checkpointing,
            tokens=settings.batch_size * recipe.data.max_length,
        )
    except (KeyError, TypeError, ZeroDivisionError):
        return Fit(gpus, settings, None)
    share = method_of(recipe.peft).trainable_percent(guess.trainable_params, guess.total_params)
    return Fit(gpus, settings, guess, share)


def fit_lines(found: Fit, config: dict) -> list[str]:
    """What the `auto` settings become on this machine, the peak GPU memory estimate, and a warning
    when it exceeds the GPU found here."""
    gpus, guess = found.gpus, found.guess
    lines = [f"settings on {found.where}:", *(f"  {line}" for line in found.settings.lines())]
    if guess is None:
        return lines + (["fit estimate: not available for this model's config"] if config else [])
    lines += [
        f"parameters: {guess.total_params / 1e6:,.1f}M in the base, {guess.trainable_params / 1e6:,.3f}M "
        f"trainable ({found.share:.3f} %)",
        guess.describe(),
    ]
    if gpus and guess.total_gib > gpus[0].memory_gib:
        lines.append(
            f"warning: the estimate exceeds this machine's {gpus[0].name} ({gpus[0].memory_gib:.0f} GiB): lower "
            "training.batch_size or data.max_length, enable training.gradient_checkpointing, or quantize the base"
        )
    elif gpus:
        lines.append(
            f"fits the {gpus[0].name} ({gpus[0].memory_gib:.0f} GiB) with "
            f"{gpus[0].memory_gib - guess.total_gib:.1f} GiB to spare"
        )
    return lines


def summary(recipe: Recipe, data: list[dict], template: dict | None = None) -> dict:
    """`validate --json`: what the text output says, as one object for scripts."""
    from dataclasses import asdict

    from peftcli.methods import method_of
    from peftcli.model.checks import read_config
    from peftcli.redact import redact

    config = read_config(recipe.model)
    found = fit(recipe, config)
    method = method_of(recipe.peft)
    estimate = None
    if found.guess is not None:
        estimate = {
            **asdict(found.guess),
            "total_gib": found.guess.total_gib,
            "trainable_percent": found.share,
            "gpu": asdict(found.gpus[0]) if found.gpus else None,
            "fits": found.fits,
        }
    return {
        "valid": True,
        "recipe": json.loads(redact(json.dumps(recipe.model_dump(mode="json")))),
        "method": {"name": method.name, "summary": method.summary},
        "quantization": None if recipe.quantization is None else recipe.quantization.describe(),
        "base": {key: config.get(key) for key in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")}
        if config
        else None,
        "settings": {"device": found.where, **found.settings.as_dict()},
        "fit_estimate": estimate,
        "data": data,
        "chat_template": template,
    }
