"""`peftcli validate`: the recipe resolved, what will train on what, the settings this machine gets
and whether it fits, without loading anything heavy (no torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftcli import console
from peftcli.cli._options import RecipeArg, SetOpt, load

if TYPE_CHECKING:  # the commands import their stage when they run: `peftcli --help` stays light
    from peftcli.recipe import Recipe


def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe and print it resolved (defaults filled, overrides applied, paths absolute).

    [dim]Example: peftcli validate recipes/demo.yaml --set peft.r=16[/]
    """
    from peftcli.model.checks import check_environment
    from peftcli.recipe import recipe_to_yaml

    resolved = load(recipe, set_)
    check_environment(resolved, deep=False)  # the model folder, tokenizer, context length, ...: no torch
    data = data_lines(resolved)  # every row read and checked, as training will: still no torch
    console.out.print(recipe_to_yaml(resolved), markup=False)
    for line in [*describe_recipe(resolved), *data]:
        console.err.print(line, markup=False)
    console.err.print("recipe is valid", style="green")


def data_lines(recipe: Recipe) -> list[str]:
    """Read every local data source as `train` will (files, format, rows, the first bad row, the
    columns ignored), without tokenizing; hub datasets are read when training."""
    import os

    from peftcli.data.pipeline import read_examples

    lines = []
    for key, sources in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval or [])):
        for i, source in enumerate(sources):
            where = key if len(sources) == 1 else f"{key}[{i}]"
            if not os.path.isabs(source.path):
                lines.append(f"{where}: hub dataset {source.path} (read when training)")
                continue
            read = read_examples([source], recipe.data, where)
            formats = ", ".join(f"{fmt}" for fmt in read.stats.formats)
            rows = sum(len(examples) for examples in read.per_source)
            skipped = f"; {read.stats.skipped} bad rows skipped (data.bad_rows: skip)" if read.stats.skipped else ""
            lines.append(f"{where}: {rows:,} rows, format {formats}{skipped}")
    return lines


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
    lines += fit_lines(recipe, config)
    t = recipe.training
    length = t.describe_length()
    lines.append(
        f"training: {length}, {t.batch_size} x {t.gradient_accumulation} examples per step, lr {t.learning_rate:g}"
    )
    lines.append(f"output: {recipe.output.dir}")
    return lines


def fit_lines(recipe: Recipe, config: dict) -> list[str]:
    """What the `auto` settings become on this machine, the peak GPU memory estimate, and a warning
    when it exceeds the GPU found here."""
    from peftcli.methods import method_of
    from peftcli.model.device import detect_gpus
    from peftcli.model.size import estimate
    from peftcli.model.speed import decide, probe_without_torch

    gpus = detect_gpus()
    machine = probe_without_torch(gpus)
    settings = decide(recipe, machine)
    where = f"the {gpus[0].name}" if gpus else "this machine (no CUDA GPU)"
    lines = [f"settings on {where}:", *(f"  {line}" for line in settings.lines())]
    try:
        # On a GPU, with checkpointing as resolved here; elsewhere, as a GPU would start (on, unless set).
        guess = estimate(recipe, config, checkpointing=settings.gradient_checkpointing if machine.cuda else None)
    except (KeyError, TypeError, ZeroDivisionError):
        return lines + (["fit estimate: not available for this model's config"] if config else [])

    # As PEFT and the run report count it: a share of all parameters, the adapter's included.
    everything = guess.total_params + (0 if method_of(recipe.peft).saves_full_model else guess.trainable_params)
    share = 100 * guess.trainable_params / max(everything, 1)
    lines += [
        f"parameters: {guess.total_params / 1e6:,.1f}M in the base, {guess.trainable_params / 1e6:,.3f}M "
        f"trainable ({share:.3f} %)",
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
