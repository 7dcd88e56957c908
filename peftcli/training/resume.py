"""Deciding whether and from where a run resumes, before any model loads.

A resumed run must be the run that was interrupted: the same model, method, data and schedule.
Upstream Trainer checks none of this (a changed `max_steps` silently bends the LR schedule; a
changed dataset silently shifts which batches are skipped), so the saved `recipe.yaml` is compared
key by key, and any training-relevant difference stops the resume unless `--force`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from peftcli import console
from peftcli.errors import UserError
from peftcli.model.device import is_main_process
from peftcli.recipe import Recipe
from peftcli.recipe.schema import DEFAULT_EPOCHS
from peftcli.rundir import ADAPTER, BEST_ADAPTER, BEST_INFO, MARKER, MODEL, RECIPE, is_run_dir
from peftcli.training.checkpoints import CHECKPOINT, checkpoints, newest_complete, problems, step_of

# Keys that change how often things are logged or kept, or what eval reads, not what is trained.
NOT_TRAINING_RELEVANT = (
    "training.logging_steps",
    "training.save_steps",
    "training.save_total_limit",
    "training.eval_steps",
    "training.report_to",
    "output.dir",
    "data.eval",
    "data.bad_rows",
    "eval",
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _effective(flat: dict[str, Any]) -> dict[str, Any]:
    """Unset keys as the values they stand for (older runs saved them filled in)."""
    out = dict(flat)
    if out.get("training.max_steps") is None and out.get("training.epochs") is None:
        out["training.epochs"] = DEFAULT_EPOCHS
    if out.get("quantization.bits") == 4:
        out["quantization.quant_type"] = out.get("quantization.quant_type") or "nf4"
        out["quantization.double_quant"] = (
            True if out.get("quantization.double_quant") is None else out["quantization.double_quant"]
        )
    return out


def changed_keys(saved: dict, current: dict) -> list[str]:
    """Training-relevant keys whose values differ between two resolved recipes."""
    old, new = _effective(_flatten(saved)), _effective(_flatten(current))
    keys = sorted(set(old) | set(new))
    relevant = [k for k in keys if not any(k == p or k.startswith(p + ".") for p in NOT_TRAINING_RELEVANT)]
    return [k for k in relevant if old.get(k) != new.get(k)]


def _differences(saved: dict, current: dict) -> str:
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    return ", ".join(
        f"{k} ({flat_saved.get(k)!r} -> {flat_current.get(k)!r})" for k in changed_keys(saved, current)[:6]
    )


def _read_saved(path: Path) -> dict:
    """A saved recipe.yaml as plain data (or {} when it cannot be read: reported as a difference)."""
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _check_owner(checkpoint: Path, run_dir: Path, current: dict, force: bool, resume: str, quiet: bool) -> None:
    """A checkpoint from elsewhere (another run, a copy) must have been trained with this recipe:
    its weights would not load into this model otherwise, or would resume another training."""
    owner = checkpoint.parent
    if owner.resolve() == run_dir.resolve():
        return
    saved_file = owner / RECIPE
    if not saved_file.is_file():
        if force:
            if not quiet:
                console.warn(f"--resume {resume}: cannot tell which recipe trained it (no {saved_file}); --force")
            return
        raise UserError(
            f"--resume {resume}: the checkpoint is not in {run_dir} and no {RECIPE} beside it says which recipe "
            "trained it",
            hint="resume a checkpoint of this run, or add --force if you are sure it was trained with this recipe",
        )
    if changed_keys(_read_saved(saved_file), current):
        shown = _differences(_read_saved(saved_file), current)
        if not force:
            raise UserError(
                f"--resume {resume}: the checkpoint belongs to another run ({owner}), whose recipe differs in "
                f"training-relevant keys: {shown}",
                hint="resume a checkpoint of this run; --force takes it anyway (its weights must fit this model)",
            )
        if not quiet:
            console.warn(f"--resume {resume}: the checkpoint's run differs ({shown}); resuming anyway (--force)")


def plan_resume(recipe: Recipe, run_dir: Path, resume: str, force: bool, quiet: bool = False) -> Path:
    """The checkpoint to resume from ("latest" = the newest complete one in the run directory),
    checked to belong to this run and to be complete and whole. Reads only: nothing is removed here.
    `quiet`: a first pass that only checks (the notes come with the second, under the run's lock)."""
    saved_file = run_dir / RECIPE
    if not saved_file.is_file():
        raise UserError(
            f"--resume: {run_dir} holds no run to resume (no {RECIPE})",
            hint="drop --resume to start a new run there",
        )
    if not is_run_dir(run_dir):
        raise UserError(
            f"--resume: {run_dir} is not a peftcli run (no {MARKER}), though it holds a {RECIPE}",
            hint="point output.dir at the run folder that `peftcli train` wrote",
        )
    if (run_dir / ADAPTER).is_dir() or (run_dir / MODEL).is_dir():
        raise UserError(
            f"--resume: the run in {run_dir} already finished; there is nothing to resume",
            hint="--overwrite trains it again from the start",
        )
    saved = _read_saved(saved_file)
    current = recipe.model_dump(mode="json")
    changed = changed_keys(saved, current)
    if changed and not force:
        raise UserError(
            f"--resume: the recipe differs from the run's {RECIPE} in training-relevant keys: "
            f"{_differences(saved, current)}",
            hint="resume with the recipe the run started with; --force resumes anyway (the result will differ from "
            "an uninterrupted run), --overwrite starts over",
        )
    quiet = quiet or not is_main_process()  # say it once in a multi-process run
    if changed and not quiet:
        console.warn(f"resuming with changed keys ({', '.join(changed)}) because of --force")

    if resume != "latest":
        checkpoint = Path(resume).resolve()
        if not checkpoint.is_dir():
            raise UserError(f"--resume {resume}: no such checkpoint folder")
        _check_owner(checkpoint, run_dir, current, force, resume, quiet)
        found = problems(checkpoint)
        if found:
            raise UserError(
                f"--resume {resume}: {found[0].replace(' (', ' checkpoint (', 1)}",
                hint="use --resume without a path to pick the newest complete checkpoint",
            )
        return checkpoint
    newest, notes = newest_complete(run_dir)
    for note in [] if quiet else notes:
        console.note(f"resume: {note}")
    if newest is None:
        raise UserError(
            f"--resume: no complete checkpoint in {run_dir}",
            hint="the run stopped before its first save; --overwrite starts it over",
        )
    if not quiet:
        console.note(f"resuming from {newest.name}")
    return newest


def discard_abandoned(run_dir: Path, checkpoint: Path) -> list[str]:
    """Remove what a run saved after `checkpoint`: resuming from an older checkpoint (`--resume
    PATH`, often with `--force` and a changed key) starts a new timeline from there, and a later
    checkpoint or best adapter of the old one would otherwise be picked by the next `--resume` or
    become `adapter/`. Called once the checkpoint has loaded (DiscardAbandoned), never before: a
    checkpoint that fails to load leaves the run as it was. Returns the names removed. Rank 0 only."""
    if CHECKPOINT.match(checkpoint.name) is None:
        return []
    step = step_of(checkpoint)
    removed = []
    for later in checkpoints(run_dir):
        if later.resolve() != checkpoint.resolve() and step_of(later) > step:
            shutil.rmtree(later)
            removed.append(later.name)
    best_info = run_dir / BEST_INFO
    if best_info.is_file():
        try:
            best_step = json.loads(best_info.read_text(encoding="utf-8"))["step"]
        except (ValueError, KeyError, TypeError):
            best_step = None  # unreadable: cannot tell which timeline it belongs to
        if best_step is None or best_step > step:
            shutil.rmtree(run_dir / BEST_ADAPTER, ignore_errors=True)
            best_info.unlink()
            removed.append(BEST_ADAPTER)
    return sorted(removed, key=lambda name: (len(name), name))


def discard_after_load(run_dir: Path, checkpoint: Path):
    """A trainer callback that drops the abandoned timeline once the checkpoint has loaded: the
    Trainer calls on_train_begin after the weights, optimizer and scheduler are restored."""
    from transformers import TrainerCallback

    class DiscardAbandoned(TrainerCallback):
        # At the first step, not at train begin: by then the trainer has loaded the checkpoint's
        # optimizer, scheduler and RNG state, so a checkpoint that fails to load deletes nothing.
        done = False

        def on_step_begin(self, args, state, control, **kwargs):
            if self.done:
                return
            self.done = True
            removed = discard_abandoned(run_dir, checkpoint)
            if removed:
                console.note(f"resuming from {checkpoint.name}: removed the later {', '.join(removed)}")

    return DiscardAbandoned()
