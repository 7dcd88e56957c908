"""A run on disk, opened for `eval`, `merge` and `generate`: its saved recipe, metrics and weights,
checked whole before anything loads them, then loaded (`load_run`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from peftcli.errors import UserError
from peftcli.rundir.layout import ADAPTER, METRICS, MODEL, RECIPE, artifact_dir


@dataclass(frozen=True)
class Run:
    """A finished (or interrupted) training run on disk."""

    path: Path

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def full_model(self) -> Path:
        return self.path / MODEL

    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE

    def recipe(self):
        """The run's saved recipe, validated like any recipe (an edited or older one is a user error)."""
        from peftcli.recipe.load import read_yaml, resolve_recipe_paths, validate

        raw = read_yaml(self.recipe_file)
        resolve_recipe_paths(raw)
        return validate(raw)

    def metrics(self) -> dict:
        """metrics.json, or {} when there is none (or it is unreadable: only reports use it)."""
        try:
            value = json.loads((self.path / METRICS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}


def check_weights(folder: Path, stem: str, what: str) -> None:
    """`folder` holds `stem*.safetensors`, whole, and its JSON files parse; pickled weights are refused
    (unpickling can run code), never handed to torch.load."""
    from peftcli.integrity import PICKLE_WHY, damaged_files, pickles

    damaged = damaged_files(folder)
    if damaged:
        raise UserError(
            f"{what}: {folder}/{damaged[0]}",
            hint="the file was cut short or corrupted (a full disk, an interrupted copy); copy it again, or "
            "retrain (or resume from the last checkpoint)",
        )
    if not any(folder.glob(f"{stem}*.safetensors")):
        pickled = pickles(folder, stem)
        if pickled:
            raise UserError(
                f"{what}: {folder} holds its weights only as {pickled[0]}, {PICKLE_WHY}",
                hint="convert it to safetensors with code you trust (load it, then save_pretrained(..., "
                "safe_serialization=True))",
            )
        raise UserError(f"{what}: {folder} has no {stem}*.safetensors weights")


def open_run(path: str | Path, need_adapter: bool = True) -> Run:
    run = Run(Path(path).resolve())
    if not run.path.is_dir():
        raise UserError(f"{path}: no such run directory")
    if not run.recipe_file.is_file():
        raise UserError(
            f"{path} is not a peftcli run (no {RECIPE})",
            hint="pass the output.dir of a `peftcli train` run",
        )
    if not need_adapter:
        return run
    if (run.adapter / "adapter_config.json").is_file():
        check_weights(run.adapter, "adapter_model", f"{path}: the adapter")
    elif (run.full_model / "config.json").is_file():
        check_weights(run.full_model, "model", f"{path}: the trained model")
    else:
        raise UserError(
            f"{path} has no trained adapter ({ADAPTER}/adapter_config.json missing)",
            hint="the run did not finish; resume it with `peftcli train RECIPE --resume`",
        )
    return run


def load_run(run, recipe, base: str = "as_trained", dtype=None):
    """A run's tuned model and its tokenizer (which carries the chat template used in training).

    `base`: "as_trained" (quantized as in training: eval, generate), "full_precision" (merge), or
    "dequantized" (merge of a LoftQ adapter into the 4-bit weights it corrects). Runs that trained
    the weights themselves (`full`, `freeze`) load their own `model/`."""
    from peftcli.methods import method_of
    from peftcli.model.load import attach_adapter, load_model, load_tokenizer

    method = method_of(recipe.peft)
    artifact = artifact_dir(run.path, method)
    tokenizer = load_tokenizer(recipe.model, path=str(artifact))
    if method.saves_full_model:
        own = recipe.model.model_copy(update={"name": str(artifact), "revision": None})
        return load_model(own, None, dtype), tokenizer
    model = load_model(recipe.model, None if base == "full_precision" else recipe.quantization, dtype)
    if base == "dequantized":
        model = model.dequantize(dtype=dtype)
    return attach_adapter(model, str(artifact), recipe.model.name), tokenizer
