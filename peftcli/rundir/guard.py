"""What peftcli may create, replace or delete, and when: a run folder is recognised by the marker
peftcli writes into it, only peftcli's own files in it are ever deleted, and it is never the folder
of the recipe, the data or the model, nor inside a folder read as data. A marked run's own
recipe.yaml names that run, wherever it was copied or moved."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from peftcli.errors import UserError
from peftcli.model.checks import is_local
from peftcli.recipe import Recipe
from peftcli.rundir.io import atomic_write_json
from peftcli.rundir.layout import ADAPTER, LOCK, MARKER, MODEL, RECIPE, TENSORBOARD, TMP_PREFIX, run_owns


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


IGNORED = {".DS_Store", ".gitkeep", "Thumbs.db"}  # a folder holding only these counts as empty
RUN_KIND = "run"


def has_content(path: Path) -> bool:
    return path.is_dir() and any(entry.name not in IGNORED and entry.name != LOCK for entry in path.iterdir())


def read_marker(path: Path) -> dict | None:
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_run_marker(path: Path) -> None:
    from peftcli import __version__

    if (read_marker(path) or {}).get("kind") != RUN_KIND:
        atomic_write_json(path / MARKER, {"kind": RUN_KIND, "peftcli": __version__})


def foreign_entries(path: Path, owns) -> list[str]:
    """Entries of `path` that `owns(name)` does not claim (ignoring .DS_Store and the like)."""
    if not path.is_dir():
        return []
    return sorted(e.name for e in path.iterdir() if e.name not in IGNORED and e.name != LOCK and not owns(e.name))


def is_run_dir(path: Path) -> bool:
    """Whether a folder is a run written by `peftcli train` (the only kind --overwrite may empty)."""
    # Only the marker says so: a folder that merely looks like a run (a recipe.yaml naming it, a
    # report.md) may be the user's project, and --overwrite would empty it.
    marker = read_marker(path)
    return marker is not None and marker.get("kind") == RUN_KIND


def own_run_folder(recipe_file: Path) -> Path | None:
    """The run whose own saved recipe `recipe_file` is (<folder>/recipe.yaml in a marked run), else None.
    Training that file trains that folder, wherever it now lies: a copied or moved run's recipe must
    not act on the folder it was first written in."""
    file = recipe_file.resolve()
    return file.parent if file.name == RECIPE and is_run_dir(file.parent) else None


def _listed(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# Sources read as whole folders: a run inside one would be read back as data (its checkpoints'
# JSON, eval's predictions.jsonl). The model folder is read file by file and may hold a run.
DATA_KEYS = ("data.train", "data.eval")


def _glob_split(path: Path) -> tuple[Path, tuple[str, ...]]:
    """A glob's fixed folder and its pattern parts after it; a path that is not a glob is all folder.
    A part that exists is a name, not a pattern (`train[v2].jsonl`), as the data reader takes it."""
    parts = path.parts
    for i, part in enumerate(parts):
        if re.search(r"[*?[]", part) and not Path(*parts[: i + 1]).exists():
            return Path(*parts[:i]), parts[i:]
    return path, ()


def _reaches_into(pattern: tuple[str, ...], below: tuple[str, ...]) -> bool:
    """Whether a glob's parts (after its fixed folder) could match a file inside the folder at
    `below` (that folder's parts after the fixed folder): `**` reaches anything under it."""
    for depth, name in enumerate(below):
        if depth >= len(pattern):
            return False
        if pattern[depth] == "**":
            return True
        if not fnmatch.fnmatchcase(name, pattern[depth]):
            return False
    return len(pattern) > len(below)


def check_not_holding(out: Path, protected: list[tuple[str, Path]]) -> None:
    """output.dir may not be, or contain, the recipe's folder, the data or the model: a run
    directory is a folder of its own, which --overwrite and --resume manage entirely. Nor may it lie
    inside a data folder, or where a data glob reaches: the run's files would be read as data."""
    out = out.resolve()
    for what, given in protected:
        path, pattern = _glob_split(given)
        path = path.resolve()
        if out == path or out in path.parents:
            raise UserError(
                f"output.dir: {out} holds {what} ({given}); a run directory must be a folder of its own",
                hint="point output.dir at a new folder, e.g. runs/<name> beside the recipe",
            )
        if what not in DATA_KEYS or path not in out.parents:
            continue
        below = out.relative_to(path).parts
        if (not pattern and path.is_dir()) or (pattern and _reaches_into(pattern, below)):
            where = f"where the pattern of {what} reaches" if pattern else f"inside the data folder of {what}"
            raise UserError(
                f"output.dir: {out} lies {where} ({given}): the run's checkpoints and predictions would be "
                "read as data",
                hint="point output.dir at a folder outside the data, e.g. runs/<name> beside the recipe",
            )


def check_output_dir(path: Path, overwrite: bool, protected: Sequence[tuple[str, Path]] = ()) -> None:
    """Refuse to mix a new run into an existing one unless the user says so. Writes nothing."""
    check_not_holding(path, list(protected))
    if path.exists() and not path.is_dir():
        raise UserError(f"output.dir: {path} exists and is a file")
    if has_content(path):
        if not is_run_dir(path):
            # Never offer to delete a folder peftcli did not write (a typo could point at ~ or the data).
            raise _not_a_run(path)
        foreign = foreign_entries(path, run_owns)
        if overwrite and foreign:
            raise UserError(
                f"output.dir: {path} holds files peftcli did not write: {_listed(foreign)}",
                hint="--overwrite replaces only a run's own files: move those out first, or choose another output.dir",
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


# Folders other peftcli commands mark (their peftcli.json `kind`): what each is, said when
# output.dir names one, since "no peftcli.json" would be false there.
_OTHER_KINDS = {
    "merged-model": "a merged model written by `peftcli merge`",
    "combined-adapter": "a combined adapter written by `peftcli merge --as-adapter`",
    "eval": "an eval written by `peftcli eval --out`",
    "compare": "a comparison written by `peftcli compare`",
    "tune": "a study written by `peftcli tune`",
}


def _not_a_run(path: Path) -> UserError:
    kind = (read_marker(path) or {}).get("kind")
    if not isinstance(kind, str):
        why = f"its {MARKER} is unreadable or names no kind" if (path / MARKER).exists() else f"no {MARKER}"
        return UserError(
            f"output.dir: {path} is not empty and is not a peftcli run ({why})",
            hint="choose a new or empty output.dir",
        )
    what = _OTHER_KINDS.get(kind, f"a folder of kind {kind!r}")
    onto = f"; to train on top of this merged model, set model.name: {path}" if kind == "merged-model" else ""
    return UserError(
        f"output.dir: {path} is {what} (its {MARKER} says so), not a training run",
        hint=f"point output.dir at a new or empty folder{onto}",
    )


def check_replaceable(
    out: Path,
    force: bool,
    what: str,
    kinds: tuple[str, ...],
    protect: Path | None = None,
    flag: str = "--force",
    owns=None,
) -> None:
    """An output folder of merge/compare may be replaced (--force/--overwrite) only if its marker says
    it is that command's own output (`kinds`), never if it is, holds or lies in `protect`, and never
    while it holds files that output did not include (`owns(name)`, default: the marker's list)."""
    out = out.resolve()
    if protect is not None:
        protect = protect.resolve()
        if out == protect or protect in out.parents or out in protect.parents:
            raise UserError(f"{what} {out} overlaps the run {protect}", hint="write to a folder outside the run")
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out} is a file")
    if not has_content(out):
        return
    marker = read_marker(out) or {}
    if marker.get("kind") not in kinds:
        raise UserError(
            f"{what} {out} is not empty and holds something else",
            hint="choose a new or empty folder (peftcli only replaces its own output)",
        )
    if owns is None:
        written = marker.get("files")
        owns = (lambda name: name in written or name == MARKER) if isinstance(written, list) else (lambda name: True)
    foreign = foreign_entries(out, owns)
    if foreign:
        raise UserError(
            f"{what} {out} holds files peftcli did not write there: {_listed(foreign)}",
            hint="move them out first, or choose another folder",
        )
    if not force:
        raise UserError(f"{what} {out} is not empty", hint=f"choose another folder, or add {flag} to replace it")


def remove_owned(path: Path, owns) -> None:
    """Delete the entries of `path` that `owns(name)` claims, and nothing else."""
    for entry in path.iterdir():
        if owns(entry.name) and entry.name != LOCK:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def start_run_dir(path: Path, overwrite: bool) -> None:
    """The run folder, emptied of an earlier run's files with --overwrite, and marked as a run."""
    if overwrite and has_content(path):
        check_output_dir(path, overwrite=True)  # under the lock: what is there may have changed
        remove_owned(path, run_owns)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"output.dir: cannot create {path}: {exc.strerror}") from None
    write_run_marker(path)


@contextmanager
def claim_run_dir(path: Path, fresh: bool) -> Iterator[None]:
    """Hold the run folder's lock (creating the folder if needed) while the body runs. When a new
    run fails or is interrupted before it saved anything of its own (only the recipe, marker, logs
    and staging are there), what this command made goes, so the same command can simply run again:
    the folder itself if this command created it, else only those files."""
    from peftcli.rundir.lock import RunLock

    # Whether this command created the folder is what mkdir says, not an earlier exists(): two new
    # runs racing for one folder must not both think they made it (the loser would remove it).
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
            created = True
        except FileExistsError:
            created = False
    except OSError as exc:
        raise UserError(f"output.dir: cannot create {path}: {exc.strerror}") from None
    lock = RunLock(path)
    try:
        lock.acquire()
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    try:
        yield
    except BaseException:
        if fresh and path.is_dir():
            transient = {RECIPE, TENSORBOARD, MARKER, LOCK}
            entries = list(path.iterdir())
            if all(p.name in transient or p.name.startswith(TMP_PREFIX) or p.name in IGNORED for p in entries):
                if created:
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    remove_owned(path, lambda name: name in transient or name.startswith(TMP_PREFIX))
        raise
    finally:
        lock.release()


def _local(value: str | None) -> Path | None:
    """A recipe path that is local (recipes make local paths absolute); a glob stays a pattern."""
    if not value or not is_local(value):
        return None
    return Path(value)


def protected_paths(recipe: Recipe, recipe_file: Path | None = None) -> list[tuple[str, Path]]:
    """What a run directory may never be or contain: the recipe's folder, the data, the model."""
    found: list[tuple[str, Path | None]] = [("the recipe file", recipe_file)] if recipe_file is not None else []
    found += [("model.name", _local(recipe.model.name)), ("model.tokenizer", _local(recipe.model.tokenizer))]
    for key, sources in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval or [])):
        found += [(key, _local(source.path)) for source in sources]
    template = recipe.data.chat_template
    found += [("data.chat_template", _local(template)), ("eval.reference", _local(recipe.eval.reference))]
    return [(what, path) for what, path in found if path is not None]
