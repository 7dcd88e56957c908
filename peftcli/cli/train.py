"""`peftcli train`: the recipe and `validate`'s cheap checks, then the training stage
(training/run.py, which imports torch), or N processes of it.

A mistake `validate` finds in seconds (the recipe, unreadable data, an occupied output folder, a
missing model folder) fails here the same way, before torch and transformers load (half a minute
on a busy machine)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from peftcli import console
from peftcli.cli._options import RecipeArg, SetOpt, load
from peftcli.errors import UserError

if TYPE_CHECKING:
    from peftcli.recipe import Recipe


def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an existing run in output.dir first.")] = False,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            metavar="[CHECKPOINT]",
            help="Continue the run in output.dir from its newest complete checkpoint, or from CHECKPOINT.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="With --resume: accept a recipe that differs from the run's.")
    ] = False,
    num_processes: Annotated[
        int,
        typer.Option("--num-processes", min=1, help="Train on N devices (DDP; FSDP/ZeRO with --accelerate-config)."),
    ] = 1,
    accelerate_config: Annotated[
        Path | None,
        typer.Option("--accelerate-config", help="accelerate config for --num-processes (see recipes/accelerate/)."),
    ] = None,
) -> None:
    """Train an adapter as the recipe says and write the run directory.

    [dim]Examples: peftcli train recipes/demo.yaml --set training.max_steps=50
    peftcli train recipes/demo.yaml --resume   (after an interruption)[/]
    """
    set_ = set_ or []
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; choose one")
    if force and not resume:
        raise UserError("--force only applies with --resume")
    if accelerate_config is not None and num_processes == 1:
        raise UserError(
            "--accelerate-config applies to multi-process runs",
            hint="add --num-processes N (the number of GPUs to train on)",
        )
    resolved = load(recipe, set_)
    from peftcli.model.device import is_main_process, passive_cpu_wait, world_size

    train_own_run(resolved, recipe, set_)

    early_checks(resolved, overwrite, resume, recipe.resolve())
    passive_cpu_wait()  # before torch loads its OpenMP runtime, which reads it once

    if num_processes > 1 and world_size() == 1:
        from peftcli.training import launch
        from peftcli.training.run import preflight

        if not resume:
            preflight(resolved, overwrite)  # report recipe/model/folder errors once, not once per process
        args = ["train", str(recipe.resolve()), *[f"--set={item}" for item in set_]]
        args += ["--overwrite"] * overwrite + [f"--resume={resume}"] * bool(resume) + ["--force"] * force
        launch.relaunch(args, num_processes, accelerate_config)
    from peftcli.training.run import run_training

    trained = run_training(
        resolved,
        overwrite=overwrite,
        resume=resume,
        force=force,
        console=console.err,
        # With --set overrides the run's saved recipe.yaml is what resumes it (it holds them).
        source=None if set_ else str(recipe),
        recipe_file=recipe.resolve(),
    )
    if is_main_process():
        run_dir = trained.run_dir
        console.out.print(
            f"run written to {run_dir} (report: {run_dir / 'report.md'}, metrics: {run_dir / 'metrics.json'})"
        )


def train_own_run(recipe: Recipe, recipe_file: Path, overrides: list[str]) -> None:
    """A run's own recipe.yaml trains that run, wherever it now lies: the output.dir a copied or
    moved run's recipe saved (older runs saved an absolute one) would retrain, delete or resume the
    original. `--set output.dir=...` still says where."""
    from peftcli.model.device import is_main_process
    from peftcli.recipe.load import parse_override
    from peftcli.rundir.guard import own_run_folder

    folder = own_run_folder(recipe_file)
    if folder is None or any(parse_override(text)[0][:2] in (("output",), ("output", "dir")) for text in overrides):
        return
    saved = recipe.run_dir
    if saved.resolve() != folder and is_main_process():
        console.note(
            f"{recipe_file} is the recipe of the run in {folder}: training that run (its output.dir, {saved}, is "
            "where the run was written before it was copied or moved)"
        )
    recipe.output.dir = str(folder)


def early_checks(recipe: Recipe, overwrite: bool, resume: str | None, recipe_file: Path) -> None:
    """`validate`'s checks that need no torch, in training's order: the output folder (a resume
    checks its own later), the model folder and environment, then every row of local data. The
    training stage repeats them (and the deep ones) under the run lock; this only makes them fast."""
    from peftcli.cli.validate import data_lines
    from peftcli.model.checks import check_environment
    from peftcli.model.device import is_main_process
    from peftcli.rundir import check_output_dir
    from peftcli.rundir.guard import own_run_folder, protected_paths

    out = recipe.run_dir
    if is_main_process() and not resume:
        # The run's own saved recipe (`peftcli train RUN/recipe.yaml`) lies in the run, of course.
        own_recipe = own_run_folder(recipe_file) == out.resolve()
        check_output_dir(out, overwrite, protected_paths(recipe, None if own_recipe else recipe_file))
    check_environment(recipe, deep=False)
    quiet, console.err.quiet = console.err.quiet, True  # the data notes are said once, by training
    try:
        data_lines(recipe)
    finally:
        console.err.quiet = quiet
