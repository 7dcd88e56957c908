"""`peftcli data preview`: the training examples exactly as the model sees them (data/preview.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from peftcli import console
from peftcli.cli._options import RecipeArg, SetOpt, load

data_app = typer.Typer(
    help="Inspect the data a recipe trains on.",
    epilog="Example: peftcli data preview recipes/demo.yaml --rows 3",
    no_args_is_help=True,
)


@data_app.command("preview")
def preview(
    recipe: RecipeArg,
    set_: SetOpt = None,
    rows: Annotated[int, typer.Option("--rows", "-n", min=0, help="How many training examples to show.")] = 3,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per example: text, input_ids, labels.")
    ] = False,
) -> None:
    """Show training examples exactly as the model sees them (trained tokens highlighted) + data stats.

    [dim]Example: peftcli data preview recipes/demo.yaml --rows 2[/]
    """
    resolved = load(recipe, set_)
    from peftcli.data import prepare_data
    from peftcli.data.preview import show
    from peftcli.model.checks import check_model_source
    from peftcli.model.device import detect_gpus
    from peftcli.model.load import load_tokenizer, quiet_libraries
    from peftcli.model.speed import decide, probe_without_torch

    check_model_source(resolved.model)
    quiet_libraries()
    tokenizer = load_tokenizer(resolved.model)
    data = prepare_data(resolved.data, tokenizer, resolved.training.seed)
    chosen = decide(resolved, probe_without_torch(detect_gpus()))  # as training would pack and batch here
    show(tokenizer, data, rows, as_json, resolved, console.out, chosen.packing, chosen.batch_size)
