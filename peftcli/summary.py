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
    from peftcli.fit import estimate
    from peftcli.hardware import detect_gpus
    from peftcli.methods import method_of
    from peftcli.speed import decide, probe_without_torch

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
