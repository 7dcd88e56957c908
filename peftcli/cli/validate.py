"""`peftcli validate`: the recipe resolved, what will train on what, the settings this machine gets
and whether it fits, without loading anything heavy (no torch). `--json`: all of it as one object."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer

from peftcli import console
from peftcli.cli._options import RecipeArg, SetOpt, load

if TYPE_CHECKING:  # the commands import their stage when they run: `peftcli --help` stays light
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
    data = data_summary(resolved)  # every row read and checked, as training will: still no torch
    if as_json:
        console.out.print(json.dumps(summary(resolved, data), indent=2), markup=False)
        return
    console.out.print(recipe_to_yaml(resolved), markup=False)
    for line in [*describe_recipe(resolved), *map(data_line, data)]:
        console.err.print(line, markup=False)
    console.err.print("recipe is valid", style="green")


def data_summary(recipe: Recipe) -> list[dict]:
    """Read every local data source as `train` will (files, format, rows, the first bad row, the
    columns ignored), without tokenizing; hub datasets are read when training."""
    import os

    from peftcli.data.pipeline import read_examples

    found = []
    for key, sources in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval or [])):
        for i, source in enumerate(sources):
            where = key if len(sources) == 1 else f"{key}[{i}]"
            if not os.path.isabs(source.path):
                found.append({"key": where, "path": source.path, "hub": True})
                continue
            read = read_examples([source], recipe.data, where)
            rows = sum(len(examples) for examples in read.per_source)
            formats = list(read.stats.formats)
            found.append({"key": where, "path": source.path, "rows": rows, "formats": formats})
            found[-1]["skipped"] = read.stats.skipped
    return found


def data_line(source: dict) -> str:
    if source.get("hub"):
        return f"{source['key']}: hub dataset {source['path']} (read when training)"
    skipped = f"; {source['skipped']} bad rows skipped (data.bad_rows: skip)" if source["skipped"] else ""
    return f"{source['key']}: {source['rows']:,} rows, format {', '.join(source['formats'])}{skipped}"


def data_lines(recipe: Recipe) -> list[str]:
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
        # On a GPU, with checkpointing as resolved here; elsewhere, as a GPU would start (on, unless set).
        # The micro-batch is the recipe's, or what batch_size: auto picks here.
        guess = estimate(
            recipe,
            config,
            checkpointing=settings.gradient_checkpointing if machine.cuda else None,
            tokens=settings.batch_size * recipe.data.max_length,
        )
    except (KeyError, TypeError, ZeroDivisionError):
        return Fit(gpus, settings, None)
    # As PEFT and the run report count it: a share of all parameters, the adapter's included.
    everything = guess.total_params + (0 if method_of(recipe.peft).saves_full_model else guess.trainable_params)
    return Fit(gpus, settings, guess, 100 * guess.trainable_params / max(everything, 1))


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


def summary(recipe: Recipe, data: list[dict]) -> dict:
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
    }
