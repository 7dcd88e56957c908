"""The run directory contract: names of its artifacts, atomic writes, and opening a finished run.

Every artifact is written to a temporary sibling and renamed into place, so an interrupted
command leaves either the previous complete artifact or the new complete one, never a partial one
that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from peftcli.errors import UserError

ADAPTER = "adapter"
MODEL = "model"  # `full`/`freeze` runs train the base weights and save the whole model here
RECIPE = "recipe.yaml"
METRICS = "metrics.json"
REPORT = "report.md"
LOSS_PLOT = "loss.png"
EVAL = "eval.json"
TMP_PREFIX = ".tmp-"


def artifact_dir(run_dir: Path, method) -> Path:
    return run_dir / (MODEL if method.saves_full_model else ADAPTER)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + "-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; artifacts get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def atomic_save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG through a temporary sibling, then close it."""
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + "-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format="png")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished directory into place, replacing an older one."""
    if target.exists():
        old = target.with_name(f"{TMP_PREFIX}old-{target.name}-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success it replaces `target`, on failure it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
        path = self.path / METRICS
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def open_run(path: str | Path, need_adapter: bool = True) -> Run:
    run = Run(Path(path).resolve())
    if not run.path.is_dir():
        raise UserError(f"{path}: no such run directory")
    if not run.recipe_file.is_file():
        raise UserError(
            f"{path} is not a peftcli run (no {RECIPE})",
            hint="pass the output.dir of a `peftcli train` run",
        )
    if (
        need_adapter
        and not (run.adapter / "adapter_config.json").is_file()
        and not (run.full_model / "config.json").is_file()
    ):
        raise UserError(
            f"{path} has no trained adapter ({ADAPTER}/adapter_config.json missing)",
            hint="the run did not finish; resume it with `peftcli train RECIPE --resume`",
        )
    return run


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


IGNORED = {".DS_Store", ".gitkeep", "Thumbs.db"}  # a folder holding only these counts as empty
MARKER = "peftcli.json"  # written into merge/combine outputs: what `--force` may replace


def has_content(path: Path) -> bool:
    return path.is_dir() and any(entry.name not in IGNORED for entry in path.iterdir())


def is_run_dir(path: Path) -> bool:
    """Whether a folder is a run written by `peftcli train` (the only kind --overwrite may delete):
    its recipe.yaml names this very folder as output.dir."""
    try:
        saved = yaml.safe_load((path / RECIPE).read_text(encoding="utf-8"))
        return Path(saved["output"]["dir"]).resolve() == path.resolve()
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return False


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse to mix a new run into an existing one unless the user says so. Writes nothing."""
    if path.exists() and not path.is_dir():
        raise UserError(f"output.dir: {path} exists and is a file")
    if has_content(path):
        if not is_run_dir(path):
            # Never offer to delete a folder peftcli did not write (a typo could point at ~ or the data).
            raise UserError(
                f"output.dir: {path} is not empty and is not a peftcli run", hint="choose a new or empty output.dir"
            )
        if not overwrite:
            if (path / ADAPTER).is_dir() or (path / MODEL).is_dir():
                raise UserError(
                    f"output.dir: {path} already holds a finished run",
                    hint="you probably want --overwrite to train it again (deletes it), or another output.dir",
                )
            raise UserError(
                f"output.dir: {path} already holds a run that did not finish",
                hint="you probably want --resume to continue it from its last checkpoint (or --overwrite to start "
                "over)",
            )
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise UserError(f"output.dir: {existing} is a file, so {path} cannot be created inside it")
    try:  # really try: permission bits say nothing for root or on a read-only filesystem
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UserError(f"output.dir: cannot write in {existing} ({exc.strerror})") from None


def check_replaceable(
    out: Path, force: bool, what: str, marker: str, protect: Path | None = None, flag: str = "--force"
) -> None:
    """An output folder of merge/compare may be replaced (--force/--overwrite) only if it holds that
    command's own output (recognised by `marker`), and never if it is, holds or lies in `protect`."""
    out = out.resolve()
    if protect is not None:
        protect = protect.resolve()
        if out == protect or protect in out.parents or out in protect.parents:
            raise UserError(f"{what} {out} overlaps the run {protect}", hint="write to a folder outside the run")
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out} is a file")
    if has_content(out):
        if is_run_dir(out) or not (out / marker).exists():
            raise UserError(
                f"{what} {out} is not empty and holds something else",
                hint="choose a new or empty folder (peftcli only replaces its own output)",
            )
        if not force:
            raise UserError(f"{what} {out} is not empty", hint=f"choose another folder, or add {flag} to replace it")


def create_output_dir(path: Path, overwrite: bool) -> None:
    check_output_dir(path, overwrite)
    if has_content(path) and overwrite:  # a run (check_output_dir made sure)
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"output.dir: cannot create {path}: {exc.strerror}") from None


@contextmanager
def discard_unsaved_run(path: Path, fresh: bool) -> Iterator[None]:
    """Remove a run folder this command created when it fails before saving anything of its own
    (only the recipe, logs and staging are there), so the same command can simply be run again."""
    try:
        yield
    except BaseException:
        if fresh and path.is_dir():
            transient = {RECIPE, "tensorboard"}
            if all(p.name in transient or p.name.startswith(TMP_PREFIX) for p in path.iterdir()):
                shutil.rmtree(path, ignore_errors=True)
        raise
