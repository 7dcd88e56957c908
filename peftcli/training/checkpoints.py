"""Checkpoints that survive: written atomically, free of pickle, checked before a resume.

Upstream Trainer writes `checkpoint-N/` file by file, with `optimizer.pt`, `scheduler.pt`,
`rng_state.pth` and `training_args.bin` as pickles, and resumes from the highest-numbered folder
whether or not it is complete (a missing `optimizer.pt` silently restarts the LR schedule). Here:

- the Trainer writes into a hidden staging sibling `.tmp-checkpoint-N/`, which is fsynced and
  renamed to `checkpoint-N/` only when complete, so `kill -9` mid-save leaves the previous
  checkpoint as the newest one;
- optimizer and RNG state are stored as safetensors + JSON, scheduler state as JSON, the training
  arguments as JSON: no file in a checkpoint is a pickle, and resuming calls no `torch.load`;
- `--resume` picks the newest *complete and whole* checkpoint and says which ones it skipped, and
  why (a missing file, or one cut short);
- a save the disk refuses (full, over quota, read-only) removes what it wrote of the checkpoint, so
  the disk is not left full, and is one error naming the folder, the space left and what is saved.

With several processes the staging folder is cleared, written and renamed between barriers, and
each process keeps its own RNG state. Under FSDP and DeepSpeed, whose optimizer state is sharded,
the optimizer/scheduler/RNG files are upstream's own; their format is pickle, which peftcli never
loads, so such checkpoints cannot be resumed (docs/performance.md: "More than one GPU").
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftcli.errors import UserError
from peftcli.integrity import PICKLE_WHY, damaged_files, free_space, pickles, refused_write
from peftcli.recipe.files import human_size
from peftcli.rundir import TMP_PREFIX

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
OPTIMIZER_TENSORS, OPTIMIZER_META, SCHEDULER = "optimizer.safetensors", "optimizer.json", "scheduler.json"
RNG, STATE, SCALER = "rng_state", "trainer_state.json", "scaler.json"
REQUIRED = (STATE, OPTIMIZER_TENSORS, OPTIMIZER_META, SCHEDULER)


def _write_json(value, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle)  # Python's json round-trips floats exactly


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def missing_files(checkpoint: Path) -> list[str]:
    """What a checkpoint lacks to be resumed exactly; [] means complete. Strict: a checkpoint whose
    optimizer state exists only as upstream's pickle (`optimizer.pt`, written under FSDP/DeepSpeed)
    is not complete, since resuming it would either unpickle it or silently restart the optimizer."""
    missing = [name for name in REQUIRED if not (checkpoint / name).is_file()]
    if not any(checkpoint.glob(f"{RNG}*.safetensors")):
        missing.append(f"{RNG}.safetensors")
    has_adapter = (checkpoint / "adapter_config.json").is_file() and any(checkpoint.glob("adapter_model*.safetensors"))
    has_model = (checkpoint / "config.json").is_file() and any(checkpoint.glob("model*.safetensors"))
    if not (has_adapter or has_model):
        missing.append("adapter or model weights (.safetensors)")
    pickled = pickles(checkpoint)
    if missing and pickled:
        missing[-1] += f"; {', '.join(pickled)} {'is' if len(pickled) == 1 else 'are'} {PICKLE_WHY}"
    return missing


def problems(checkpoint: Path) -> list[str]:
    """Why a checkpoint cannot be resumed: files missing, or present but damaged (cut short). []: it can."""
    missing = missing_files(checkpoint)
    if missing:
        return [f"incomplete (missing {', '.join(missing)})"]
    damaged = damaged_files(checkpoint)
    if damaged:
        return [f"damaged ({'; '.join(damaged)})"]
    try:
        state = json.loads((checkpoint / STATE).read_text(encoding="utf-8"))
        int(state["global_step"])
    except (KeyError, TypeError, ValueError):
        return [f"damaged ({STATE} has no global_step)"]
    wrong = [f"{name} lacks {what}" for name, what in _json_shapes(checkpoint)]
    return [f"damaged ({'; '.join(wrong)})"] if wrong else []


def _json_shapes(checkpoint: Path) -> Iterator[tuple[str, str]]:
    """JSON state files that parse but do not hold what resuming reads (the trainer would fail on
    them only after the run started): (file, what is missing)."""

    def read(path: Path):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    # Only files that are there: sharded runs keep upstream's own (pickled) optimizer files instead.
    optimizer = (
        read(checkpoint / OPTIMIZER_META)
        if (checkpoint / OPTIMIZER_META).exists()
        else {"state": 0, "param_groups": []}
    )
    if not (isinstance(optimizer, dict) and "state" in optimizer and isinstance(optimizer.get("param_groups"), list)):
        yield OPTIMIZER_META, "its state and param_groups"
    scheduler = read(checkpoint / SCHEDULER) if (checkpoint / SCHEDULER).exists() else {"last_epoch": 0}
    if not (isinstance(scheduler, dict) and "last_epoch" in scheduler):
        yield SCHEDULER, "the scheduler's last_epoch"
    for rng in checkpoint.glob(f"{RNG}*.json"):
        meta = read(rng)
        python, numpy = (meta.get("python"), meta.get("numpy")) if isinstance(meta, dict) else (None, None)
        if not (isinstance(python, list) and len(python) == 3 and isinstance(numpy, list) and len(numpy) == 4):
            yield rng.name, "the python and numpy RNG states"


def checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-N folders, newest (highest N) first."""
    found = [p for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)] if run_dir.is_dir() else []
    return sorted(found, key=step_of, reverse=True)


def step_of(checkpoint: Path) -> int:
    """N of a checkpoint-N folder."""
    match = CHECKPOINT.match(checkpoint.name)
    if match is None:
        raise ValueError(f"{checkpoint.name} is not a checkpoint-N folder")
    return int(match.group(1))


def newest_complete(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that can be resumed, and notes on the ones skipped (and why)."""
    notes = [
        f"ignoring {p.name}: a save that was interrupted (never completed)"
        for p in run_dir.glob(f"{TMP_PREFIX}checkpoint-*")
        if p.is_dir()
    ]
    for checkpoint in checkpoints(run_dir):
        found = problems(checkpoint)
        if not found:
            return checkpoint, notes
        notes.append(f"skipping {checkpoint.name}: {found[0]}")
    return None, notes


def finished_training(checkpoint: Path, max_steps: int | None) -> bool:
    """Whether a checkpoint was saved at the last step (resuming from it would train one extra
    step: an off-by-one in Trainer's resume loop). `max_steps` is the recipe's, when it sets one
    (a forced resume may have raised it)."""
    state = json.loads((checkpoint / STATE).read_text(encoding="utf-8"))
    return state["global_step"] >= (max_steps or state["max_steps"]) > 0


def load_final_checkpoint(trainer, checkpoint: Path) -> None:
    """Load a last-step checkpoint's weights and state into the trainer, without training."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / STATE))


def remove_staging(run_dir: Path) -> None:
    for staging in run_dir.glob(f"{TMP_PREFIX}checkpoint-*"):
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def refused_by_disk(target: Path, staging: Path | None = None) -> Iterator[None]:
    """Saving `target` (a checkpoint, the adapter) in the run directory: if it fails, what was
    written of it (`staging`) goes, so a full disk is not left full; if the disk refused the write,
    the failure is one UserError naming `target`, the free space and what the run has saved. (An
    interrupted save keeps its staging folder: the next `--resume` says it was ignored, and removes it.)"""
    try:
        yield
    except Exception as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        code = refused_write(exc)
        if code is None:
            raise
        free = free_space(target.parent) if code == errno.ENOSPC else None  # a quota is not in statvfs
        room = f" ({free} free there)" if free is not None else ""
        error = UserError(f"cannot write {target}: {os.strerror(code).lower()}{room}", hint=_saved_hint(target, code))
        error.per_rank = True  # every process writes its own RNG state: one may fail alone
        raise error from None


def _saved_hint(target: Path, code: int) -> str:
    if code == errno.EROFS:
        return "output.dir is on a read-only file system: point it at a writable folder"
    saved, _ = newest_complete(target.parent)
    what = "free some space" if code == errno.ENOSPC else "free some space or raise the disk quota"
    if saved is None:
        return f"{what} (or point output.dir at another disk), then run the same command again: nothing was saved yet"
    size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
    return (
        f"{what} (each checkpoint takes {human_size(size)}; training.save_total_limit keeps fewer), then "
        f"continue with --resume: {saved.name} is complete; the unfinished save was removed"
    )


if TYPE_CHECKING:  # a mixin for transformers' Trainer (trainer.py puts it first in the MRO)
    from transformers import Trainer as _Trainer
else:
    _Trainer = object


class SafeCheckpoints(_Trainer):
    """Trainer mixin: atomic checkpoints; pickle-free ones outside FSDP/DeepSpeed."""

    _staging_dir: str | None = None

    def _sharded(self) -> bool:
        return bool(self.is_fsdp_enabled or self.is_deepspeed_enabled)

    def _barrier(self) -> None:
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()

    # --- atomic: upstream writes into a staging sibling, we rename it into place -----------------
    def _get_output_dir(self, trial):
        return self._staging_dir if self._staging_dir is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging = os.path.join(run_dir, f"{TMP_PREFIX}{name}")
        self._barrier()  # every process is done with the step before rank 0 clears a stale staging folder
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self._barrier()
        self._staging_dir = staging
        with refused_by_disk(Path(run_dir) / name, Path(staging)):
            try:
                super()._save_checkpoint(model, trial)  # every process writes its part into staging/checkpoint-N
            finally:
                self._staging_dir = None
            self._barrier()  # ... and has finished writing it
            if self.args.should_save:
                written, final = os.path.join(staging, name), os.path.join(run_dir, name)
                _fsync_tree(written)  # a network file system may say the disk is full only now
                if os.path.exists(final):  # the same step saved twice (a stop request on a save step)
                    shutil.rmtree(final)
                os.rename(written, final)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            _fsync(run_dir)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self._barrier()  # nobody goes on before the checkpoint is in place

    # --- pickle-free optimizer / scheduler / RNG / scaler / arguments ---------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        import safetensors.torch
        import torch

        if self._sharded():
            return super()._save_optimizer_and_scheduler(output_dir)
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        assert self.optimizer is not None and self.lr_scheduler is not None  # built before the first save
        state = self.optimizer.state_dict()
        tensors: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for pid, values in state["state"].items():
            meta[str(pid)] = {}
            for key, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
                    meta[str(pid)][key] = "__tensor__"
                else:
                    meta[str(pid)][key] = {"value": value}
        safetensors.torch.save_file(tensors, os.path.join(output_dir, OPTIMIZER_TENSORS))
        _write_json({"state": meta, "param_groups": state["param_groups"]}, os.path.join(output_dir, OPTIMIZER_META))
        _write_json(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER))
        return None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        import safetensors.torch

        if checkpoint is None:
            return None
        # Upstream's loader would unpickle optimizer.pt; `problems()` refused such checkpoints already.
        tensors = safetensors.torch.load_file(os.path.join(checkpoint, OPTIMIZER_TENSORS), device="cpu")
        with open(os.path.join(checkpoint, OPTIMIZER_META), encoding="utf-8") as handle:
            meta = json.load(handle)
        state = {
            int(pid): {k: tensors[f"state.{pid}.{k}"] if v == "__tensor__" else v["value"] for k, v in values.items()}
            for pid, values in meta["state"].items()
        }
        for group in meta["param_groups"]:
            if "betas" in group:  # JSON turned Adam's tuple into a list
                group["betas"] = tuple(group["betas"])
        assert self.optimizer is not None and self.lr_scheduler is not None  # created before loading
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        with open(os.path.join(checkpoint, SCHEDULER), encoding="utf-8") as handle:
            self.lr_scheduler.load_state_dict(json.load(handle))
        return None

    def _rng_name(self) -> str:
        """One RNG file per process when there are several (each has its own dropout stream)."""
        return RNG if self.args.world_size <= 1 else f"{RNG}_{self.args.process_index}"

    def _save_rng_state(self, output_dir: str) -> None:
        import numpy as np
        import safetensors.torch
        import torch

        if self._sharded():
            return super()._save_rng_state(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        py_version, py_state, py_gauss = random.getstate()
        np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
        tensors = {
            "cpu": torch.random.get_rng_state(),
            "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        }
        if torch.cuda.is_available():
            tensors["cuda"] = torch.cuda.random.get_rng_state()
        name = self._rng_name()
        safetensors.torch.save_file(tensors, os.path.join(output_dir, f"{name}.safetensors"))
        meta = {
            "python": [py_version, list(py_state), py_gauss],
            "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_cached)],
        }
        _write_json(meta, os.path.join(output_dir, f"{name}.json"))
        return None

    def _load_rng_state(self, checkpoint: str | None) -> None:
        import numpy as np
        import safetensors.torch
        import torch

        if checkpoint is None:
            return None
        name = self._rng_name()
        if not os.path.isfile(os.path.join(checkpoint, f"{name}.safetensors")):
            # Saved by another number of processes: dropout streams differ from an uninterrupted run's
            # (upstream's fallback would unpickle rng_state.pth instead).
            return None
        tensors = safetensors.torch.load_file(os.path.join(checkpoint, f"{name}.safetensors"))
        with open(os.path.join(checkpoint, f"{name}.json"), encoding="utf-8") as handle:
            meta = json.load(handle)
        version, state, gauss = meta["python"]
        random.setstate((version, tuple(state), gauss))
        np_name, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((np_name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.random.set_rng_state(tensors["cpu"])
        if torch.cuda.is_available() and "cuda" in tensors:
            torch.cuda.random.set_rng_state(tensors["cuda"])
        return None

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or self._sharded():
            return super()._save_scaler(output_dir)
        if self.args.should_save:  # fp16's loss scale: a few numbers, kept as JSON
            _write_json(scaler.state_dict(), os.path.join(output_dir, SCALER))
        return None

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is None or scaler is None or not os.path.isfile(os.path.join(checkpoint, SCALER)):
            return None  # never upstream's scaler.pt: a pickle
        with open(os.path.join(checkpoint, SCALER), encoding="utf-8") as handle:
            scaler.load_state_dict(json.load(handle))
        return None

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        out = output_dir if output_dir is not None else self.args.output_dir
        assert out is not None  # the trainer is always given the run directory
        if self.args.should_save:
            # upstream pickles the whole TrainingArguments object here; keep a JSON copy instead
            pickled = os.path.join(out, "training_args.bin")
            if os.path.exists(pickled):
                os.remove(pickled)
            with open(os.path.join(out, "training_args.json"), "w", encoding="utf-8") as handle:
                handle.write(self.args.to_json_string())
