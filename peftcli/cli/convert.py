"""`peftcli convert axolotl|llamafactory CONFIG`: a recipe from another tool's training config
(peftcli/convert/), every key it cannot carry listed on stderr and at the top of the recipe."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from peftcli import console
from peftcli.errors import UserError

if TYPE_CHECKING:  # the command imports its stage when it runs: `peftcli --help` stays light
    from peftcli.convert import Ledger

convert_app = typer.Typer(
    help="Write a peftcli recipe from an Axolotl or LLaMA-Factory training config.",
    epilog="Example: peftcli convert axolotl lora.yml --out recipe.yaml && peftcli validate recipe.yaml",
    no_args_is_help=True,
)

OutOpt = Annotated[
    Path | None, typer.Option("--out", help="Where to write the recipe (default recipe.yaml; '-' prints it).")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")]


@convert_app.command("axolotl")
def axolotl(
    config: Annotated[Path, typer.Argument(help="Axolotl config (YAML).", show_default=False)],
    out: OutOpt = None,
    force: ForceOpt = False,
) -> None:
    """Convert an Axolotl config (`axolotl train CONFIG`) into a recipe.

    [dim]Example: peftcli convert axolotl examples/llama-3/lora-1b.yml --out lora-1b.yaml[/]
    """
    from peftcli.convert import from_axolotl

    target = _target(out, Path("recipe.yaml"), force)
    ledger = from_axolotl(config, target)
    _write(ledger, "peftcli convert axolotl", target)


@convert_app.command("llamafactory")
def llamafactory(
    config: Annotated[
        Path | None,
        typer.Argument(help="LLaMA-Factory training config (YAML); optional with --data-only.", show_default=False),
    ] = None,
    dataset_info: Annotated[
        Path | None,
        typer.Option(
            "--dataset-info", help="dataset_info.json (default: the config's dataset_dir, data/, next to the config)."
        ),
    ] = None,
    data_only: Annotated[
        bool, typer.Option("--data-only", help="Print (or write with --out) only the data: section.")
    ] = False,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="With --data-only: dataset names, NAME[,NAME].")
    ] = None,
    out: OutOpt = None,
    force: ForceOpt = False,
) -> None:
    """Convert a LLaMA-Factory config (`llamafactory-cli train CONFIG`) and its datasets into a recipe.

    [dim]Example: peftcli convert llamafactory qwen_lora_sft.yaml --dataset-info data/dataset_info.json[/]
    """
    from peftcli.convert import from_llamafactory, llamafactory_data

    if data_only:
        target = _target(out, None, force)
        ledger = llamafactory_data(dataset_info, dataset, target, config)
        _write(ledger, "peftcli convert llamafactory --data-only", target, data_section=True)
        return
    if config is None:
        raise UserError("CONFIG is missing", hint="give the LLaMA-Factory config, or use --data-only --dataset NAME")
    if dataset is not None:
        raise UserError("--dataset goes with --data-only", hint="the config's dataset: names the training data")
    target = _target(out, Path("recipe.yaml"), force)
    ledger = from_llamafactory(config, target, dataset_info)
    _write(ledger, "peftcli convert llamafactory", target)


def _target(out: Path | None, default: Path | None, force: bool) -> Path | None:
    """The file to write (None: print), refused before any work when it exists and --force is not given."""
    target = default if out is None else (None if str(out) == "-" else out)
    if target is not None and target.exists():
        if not target.is_file():
            raise UserError(f"--out {target} exists and is not a file", hint="give the path of the file to write")
        if not force:
            raise UserError(f"--out {target} already exists", hint="choose another name, or add --force")
    return target


def _write(ledger: Ledger, command: str, target: Path | None, data_section: bool = False) -> None:
    text = ledger.text(command, data_section)
    for label, line in ledger.report_lines():
        console.err.print(f"{label}: {line}", markup=False, style="yellow" if label == "warning" else None)
    carried = f"{ledger.carried} key{'s' if ledger.carried != 1 else ''}"
    summary = f"{carried} carried, {len(ledger.not_carried)} not carried"
    if ledger.not_carried:
        summary += " (listed above and at the top of the file)" if target is not None else " (listed above)"
    if target is None:
        console.out.print(text, markup=False, end="")
        console.err.print(summary, markup=False)
        return
    from peftcli.rundir import atomic_write_text

    atomic_write_text(target, text)
    if not data_section:  # a data: section alone is not a recipe
        _check(target)
    next_step = "paste its data: section into a recipe" if data_section else f"peftcli validate {target}"
    console.err.print(f"wrote {target}: {summary}; next: {next_step}", markup=False)


def _check(target: Path) -> None:
    """Say at once when the written recipe would not load (a conflict the converter did not settle)."""
    from peftcli.recipe import load_recipe

    try:
        load_recipe(target)
    except UserError as exc:
        console.warn(f"the recipe does not load yet: {exc.message}")
