"""The study folder (`--out`): a study that continues where it stopped, or one replaced with
`--overwrite`, which deletes only what tune wrote there.

What tune wrote is the fixed set of its reports plus each trial's run directory and recipe; the
marker (`peftcli.json`, kind `tune`) lists the trials, and a trial is listed before its folder is
made, so nothing a user put beside them is ever taken for tune's.
"""

from __future__ import annotations

from pathlib import Path

from peftcli import __version__
from peftcli.errors import UserError
from peftcli.rundir import MARKER, atomic_write_json, read_marker, remove_owned
from peftcli.rundir.guard import check_not_holding, foreign_entries, has_content

TUNE_KIND = "tune"
STUDY_DB = "study.db"
BEST_RECIPE = "best-recipe.yaml"
REPORTS = ("tune.json", "tune.md", "tune.png")
# SQLite's side files live beside the database while it is open (and after a crash).
OUTPUTS = (MARKER, STUDY_DB, f"{STUDY_DB}-journal", f"{STUDY_DB}-wal", f"{STUDY_DB}-shm", BEST_RECIPE, *REPORTS)


def trial_name(number: int) -> str:
    return f"trial-{number:03d}"


def _trials(out: Path) -> list[str]:
    return [t for t in (read_marker(out) or {}).get("trials") or [] if isinstance(t, str)]


def owned_by(out: Path):
    """What of `out` tune wrote: its reports and database, and each listed trial's folder and recipe."""
    names = set(OUTPUTS) | {n for t in _trials(out) for n in (t, f"{t}.yaml")}
    return lambda name: name in names


def prepare(out: Path, overwrite: bool, protected: list[tuple[str, Path]]) -> bool:
    """Make `out` ready; True when it holds a study to continue. Refuses a folder that holds
    anything else, and (with --overwrite) deletes only what tune wrote."""
    check_not_holding(out, protected)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file")
    if has_content(out):
        if (read_marker(out) or {}).get("kind") != TUNE_KIND:
            raise UserError(
                f"--out {out} is not empty and is not a tune study (no {MARKER} of kind {TUNE_KIND})",
                hint="choose a new or empty folder (peftcli only replaces its own output)",
            )
        foreign = foreign_entries(out, owned_by(out))
        if foreign:
            raise UserError(
                f"--out {out} holds files tune did not write: {', '.join(foreign[:5])}",
                hint="move them out first, or choose another folder",
            )
        if not overwrite:
            return (out / STUDY_DB).is_file()
        remove_owned(out, owned_by(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out: cannot create {out}: {exc.strerror}") from None
    atomic_write_json(out / MARKER, {"kind": TUNE_KIND, "peftcli": __version__, "trials": _trials(out)})
    return False


def claim_trial(out: Path, name: str) -> None:
    """List a trial in the marker before its folder and recipe are written."""
    trials = _trials(out)
    if name not in trials:
        atomic_write_json(out / MARKER, {"kind": TUNE_KIND, "peftcli": __version__, "trials": [*trials, name]})
