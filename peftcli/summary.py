"""A few lines about a validated recipe for `peftcli validate`: what will train, on what. No torch."""

from __future__ import annotations

from peftcli.methods import method_of
from peftcli.modeling import read_config
from peftcli.recipe import Recipe


def describe_recipe(recipe: Recipe) -> list[str]:
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
    t = recipe.training
    length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs"
    lines.append(
        f"training: {length}, {t.batch_size} x {t.gradient_accumulation} examples per step, lr {t.learning_rate:g}"
    )
    lines.append(f"output: {recipe.output.dir}")
    return lines
