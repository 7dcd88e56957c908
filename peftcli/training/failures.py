"""What a run that failed or was interrupted tells the user: out of memory with the knobs to turn,
a checkpoint that does not fit the model, and what an interruption left on disk."""

from __future__ import annotations

from pathlib import Path

from peftcli.errors import UserError
from peftcli.model.load import is_shape_mismatch
from peftcli.recipe import Recipe
from peftcli.rundir import ADAPTER, MODEL, is_run_dir


def out_of_memory_error(recipe: Recipe, settings, step: int) -> UserError:
    t, quant = recipe.training, recipe.quantization
    # What trained: the recipe's numbers, or the ones batch_size: auto picked (known once set up).
    micro = settings.batch_size if settings else t.batch_size
    knobs = [
        f"lower training.batch_size and raise training.gradient_accumulation (same effective batch of "
        f"{t.batch_size * t.gradient_accumulation})"
        if isinstance(t.batch_size, int)
        else f"set a training.batch_size below the {micro} that auto picked"
        if settings
        else None,
        "set training.gradient_checkpointing: true" if not (settings and settings.gradient_checkpointing) else None,
        f"lower data.max_length ({recipe.data.max_length})",
        "quantize the base (quantization.bits: 4)" if quant is None else None,
    ]
    where = f"at step {step}" if step else "while loading the model"
    error = UserError(
        f"out of memory {where} with training.batch_size {micro}, data.max_length "
        f"{recipe.data.max_length}, quantization {quant.describe() if quant else 'none'}",
        hint="; ".join(k for k in knobs if k) + ". Checkpoints saved so far are kept (resume with --resume).",
    )
    error.per_rank = True  # one process of several may run out alone
    return error


def interrupted_note(out: Path, command: str) -> tuple[str, str | None]:
    """What an interruption outside the training loop leaves in `out` (said by cli.main)."""
    from peftcli.training.checkpoints import newest_complete

    if not is_run_dir(out):
        return "nothing was saved", None
    if (out / ADAPTER).is_dir() or (out / MODEL).is_dir():
        return f"the run in {out} had finished and its results are saved", None
    checkpoint, _ = newest_complete(out)
    if checkpoint is None:
        return f"{out} holds no checkpoint yet", f"start it over: {command} --overwrite"
    saved = f"{checkpoint.name} is saved in {out}; the final adapter was not written"
    return saved, f"continue with: {command} --resume"


def does_not_fit(exc: Exception) -> bool:
    """A checkpoint's tensors or optimizer state that differ from the model's."""
    return is_shape_mismatch(exc) or (isinstance(exc, KeyError) and str(exc).startswith("'state."))
