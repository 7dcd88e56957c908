"""`peftcli train`: the recipe, then the training stage (training/run.py), or N processes of it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from peftcli import console
from peftcli.cli._options import RecipeArg, SetOpt, load
from peftcli.errors import UserError


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
    from peftcli.model.device import is_main_process, world_size

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
