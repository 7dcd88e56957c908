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
from peftcli.launch import is_main_process
from peftcli.recipe import Recipe
from peftcli.rundir import ADAPTER, MODEL, RECIPE
from peftcli.training.checkpoints import CHECKPOINT, checkpoints, missing_files, newest_complete

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
        out["training.epochs"] = 1.0
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


def plan_resume(recipe: Recipe, run_dir: Path, resume: str, force: bool) -> Path:
    """The checkpoint to resume from ("latest" = the newest complete one in the run directory)."""
    saved_file = run_dir / RECIPE
    if not saved_file.is_file():
        raise UserError(
            f"--resume: {run_dir} holds no run to resume (no {RECIPE})",
            hint="drop --resume to start a new run there",
        )
    if (run_dir / ADAPTER).is_dir() or (run_dir / MODEL).is_dir():
        raise UserError(
            f"--resume: the run in {run_dir} already finished; there is nothing to resume",
            hint="--overwrite trains it again from the start",
        )
    saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    changed = changed_keys(saved, recipe.model_dump(mode="json"))
    if changed and not force:
        shown = ", ".join(
            f"{k} ({_flatten(saved).get(k)!r} -> {_flatten(recipe.model_dump(mode='json')).get(k)!r})"
            for k in changed[:6]
        )
        raise UserError(
            f"--resume: the recipe differs from the run's {RECIPE} in training-relevant keys: {shown}",
            hint="resume with the recipe the run started with; --force resumes anyway (the result will differ from "
            "an uninterrupted run), --overwrite starts over",
        )
    if changed:
        console.warn(f"resuming with changed keys ({', '.join(changed)}) because of --force")

    if resume != "latest":
        checkpoint = Path(resume).resolve()
        if not checkpoint.is_dir():
            raise UserError(f"--resume {resume}: no such checkpoint folder")
        missing = missing_files(checkpoint)
        if missing:
            raise UserError(
                f"--resume {resume}: incomplete checkpoint (missing {', '.join(missing)})",
                hint="use --resume without a path to pick the newest complete checkpoint",
            )
        return checkpoint
    checkpoint, notes = newest_complete(run_dir)
    quiet = not is_main_process()  # say it once in a multi-process run
    for note in [] if quiet else notes:
        console.note(f"resume: {note}")
    if checkpoint is None:
        raise UserError(
            f"--resume: no complete checkpoint in {run_dir}",
            hint="the run stopped before its first save; --overwrite starts it over",
        )
    if not quiet:
        console.note(f"resuming from {checkpoint.name}")
    return checkpoint


def discard_abandoned(run_dir: Path, checkpoint: Path) -> list[str]:
    """Remove what a run saved after `checkpoint`: resuming from an older checkpoint (`--resume
    PATH`, often with `--force` and a changed key) starts a new timeline from there, and a later
    checkpoint or best adapter of the old one would otherwise be picked by the next `--resume` or
    become `adapter/`. Returns the names removed. Rank 0 only."""
    from peftcli.training.tracking import BEST, BEST_INFO  # imports transformers: only when resuming

    match = CHECKPOINT.match(checkpoint.name)
    if match is None:
        return []
    step = int(match.group(1))
    removed = []
    for later in checkpoints(run_dir):
        if int(CHECKPOINT.match(later.name).group(1)) > step:
            shutil.rmtree(later)
            removed.append(later.name)
    best_info = run_dir / BEST_INFO
    if best_info.is_file():
        try:
            best_step = json.loads(best_info.read_text(encoding="utf-8"))["step"]
        except (ValueError, KeyError, TypeError):
            best_step = None  # unreadable: cannot tell which timeline it belongs to
        if best_step is None or best_step > step:
            shutil.rmtree(run_dir / BEST, ignore_errors=True)
            best_info.unlink()
            removed.append(BEST)
    return sorted(removed, key=lambda name: (len(name), name))
