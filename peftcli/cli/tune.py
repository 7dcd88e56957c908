"""`peftcli tune`: search recipe keys with Optuna, each trial a run, the best recipe written
(tune/study.py)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Annotated

import typer

from peftcli import interruption
from peftcli.cli._options import RecipeArg, SetOpt, load
from peftcli.errors import UserError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")


def parse_timeout(text: str | None) -> float | None:
    """`90`, `90s`, `30m` or `2h` -> seconds."""
    if text is None:
        return None
    found = _DURATION.match(text)
    if not found or float(found.group(1)) <= 0:
        raise UserError(f"--timeout {text!r}: expected a duration such as 600, 30m or 2h")
    return float(found.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[found.group(2)]


def tune(
    recipe: RecipeArg,
    space: Annotated[
        list[str],
        typer.Option(
            "--space",
            metavar="KEY=SPEC",
            help="A recipe key to search and its values: [4, 8, 16], int(lo, hi), float(lo, hi) or log(lo, hi) "
            "(repeatable).",
            show_default=False,
        ),
    ],
    trials: Annotated[
        int, typer.Option("--trials", min=1, help="Trials to finish (a continued study counts its own).")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Folder for the study, the trials' runs and the reports (default: <output.dir>-tune)."
        ),
    ] = None,
    metric: Annotated[
        str, typer.Option("--metric", help="What to minimize: eval_loss (the kept adapter's) or train_loss.")
    ] = "eval_loss",
    timeout: Annotated[
        str | None,
        typer.Option("--timeout", metavar="DURATION", help="Start no new trial after this long, e.g. 600, 30m, 2h."),
    ] = None,
    prune: Annotated[
        bool, typer.Option("--prune/--no-prune", help="Stop trials whose loss falls behind the median of the others.")
    ] = True,
    set_: SetOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start a new study in --out, deleting what tune wrote there.")
    ] = False,
) -> None:
    """Search recipe keys (rank, learning rate, ...) for the lowest loss; write the best recipe.

    Each trial is a normal run directory in --out; hopeless ones are pruned.
    The study is kept in --out/study.db: the same command continues it after an interruption.

    [dim]Example: peftcli tune recipes/demo.yaml --trials 12
    --space peft.r=[4,8,16] --space training.learning_rate=log(1e-4,1e-2)[/]
    """
    from peftcli.tune.space import parse_space
    from peftcli.tune.study import run_tune

    dims = parse_space(space)
    seconds = parse_timeout(timeout)
    resolved = load(recipe, set_)
    target = out.resolve() if out else Path(f"{resolved.output.dir}-tune")
    command = " ".join(
        [
            "peftcli tune",
            shlex.quote(str(recipe)),
            *(f"--space {shlex.quote(text)}" for text in space),
            *(f"--set {shlex.quote(text)}" for text in set_ or []),
            f"--trials {trials}",
            f"--out {shlex.quote(str(target))}",
            *([f"--metric {metric}"] if metric != "eval_loss" else []),
            *([] if prune else ["--no-prune"]),
        ]
    )

    def saved() -> tuple[str, str | None]:
        if not (target / "study.db").is_file():
            return "nothing was written", None
        done = f"the study is saved in {target / 'study.db'} (the trial that was running will run again)"
        return done, f"continue the study with: {command}"

    with interruption.saving(saved):
        run_tune(
            resolved,
            dims,
            trials,
            target,
            metric=metric,
            timeout_s=seconds,
            overwrite=overwrite,
            prune=prune,
            recipe_file=recipe.resolve(),
            command=command,
        )
