"""The commands that help choose and inspect, beside the train -> eval -> merge path of cli.py:
`methods`, `compare`, `data preview`, `generate`, `init`, `schema`. Like cli.py, importing this
module imports no torch: each command imports its stage when it runs."""

from __future__ import annotations

from pathlib import Path

import typer

from peftcli import console
from peftcli.cli_options import RecipeArg, SetOpt, load
from peftcli.errors import UserError

explore = typer.Typer()


@explore.command()
def compare(
    recipe: Path = RecipeArg,
    methods_: str = typer.Option(
        ..., "--methods", help="Comma-separated methods, e.g. lora,dora,ia3,prompt_tuning.", show_default=False
    ),
    set_: list[str] = SetOpt,
    out: Path = typer.Option(
        None, "--out", help="Folder for the runs and the comparison (default: <output.dir>-compare)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing comparison folder."),
) -> None:
    """Train the same recipe once per method and compare params, size, memory, speed and loss.

    Every method is checked first, as `validate` does (exit 2 if one cannot run).
    A method that fails while training gets a `failed` row; the command then exits non-zero.

    [dim]Example: peftcli compare recipes/demo.yaml --methods lora,dora,ia3,prompt_tuning[/]
    """
    from peftcli.compare import parse_methods, run_compare

    names = parse_methods(methods_)
    resolved = load(recipe, set_)
    target = out.resolve() if out else Path(f"{resolved.output.dir}-compare")
    from peftcli import interruption

    finished = f"the methods that finished are in {target}/<method>/; the comparison report was not written"
    with interruption.saving(finished):
        run_compare(resolved, names, target, overwrite=overwrite)


@explore.command("generate")
def generate_text(
    adapter: list[str] = typer.Option(
        [], "--adapter", help="NAME=RUN: attach a run's adapter (repeatable).", metavar="NAME=RUN"
    ),
    base: str = typer.Option(None, "--base", help="Base model (default: the first adapter's base)."),
    prompt: str = typer.Option(None, "--prompt", help="One prompt, answered by every adapter in turn."),
    prompts: Path = typer.Option(None, "--prompts", help="File: a prompt per line (or JSON {prompt, adapter})."),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Chat; /adapter NAME, /base switch."),
    system: str = typer.Option(None, "--system", help="System message for chat templates."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0, help="0 = greedy."),
) -> None:
    """Generate with a base model and several adapters, switching per prompt without reloading.

    [dim]Example: peftcli generate --adapter demo=runs/demo --prompt "What comes after Monday?"[/]
    """
    from peftcli.chat import Session, parse_adapters, read_prompts, run_prompts
    from peftcli.chat import interactive as chat_loop

    chosen = sum(x is not None and x is not False for x in (prompt, prompts, interactive or None))
    if chosen != 1:
        raise UserError("give exactly one of --prompt TEXT, --prompts FILE or --interactive")
    session = Session(base, parse_adapters(adapter))
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    names = list(session.adapters)
    if interactive:
        chat_loop(session, system, **options)
    elif prompts is not None:
        run_prompts(session, read_prompts(prompts, names), system, **options)
    else:
        run_prompts(session, [(prompt, n) for n in names or [None]], system, **options)


@explore.command()
def init(
    method: str = typer.Option("lora", "--method", help="PEFT method (see `peftcli methods`)."),
    model: str = typer.Option("Qwen/Qwen2.5-0.5B-Instruct", "--model", help="Base model folder or hub id."),
    data: str = typer.Option("data/train.jsonl", "--data", help="Training data (file, folder, glob or hub id)."),
    out: Path = typer.Option(Path("recipe.yaml"), "--out", help="Where to write it ('-' prints it)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    """Write a commented starter recipe that validates as written.

    [dim]Example: peftcli init --method dora --model ./models/tiny --out my-recipe.yaml[/]
    """
    from peftcli.methods import REGISTRY
    from peftcli.starter import starter

    if method not in REGISTRY:
        raise UserError(f"--method {method!r}: unknown method", hint=f"methods: {', '.join(REGISTRY)}")
    name = "run" if str(out) == "-" else out.stem
    text = starter(method, model, data, name, out)
    if str(out) == "-":
        console.out.print(text, markup=False, end="")
        return
    if out.exists() and not out.is_file():
        raise UserError(f"--out {out} exists and is not a file", hint="give the path of the recipe file to write")
    if out.exists() and not force:
        raise UserError(f"--out {out} already exists", hint="choose another name, or add --force")
    from peftcli.rundir import atomic_write_text

    atomic_write_text(out, text)
    console.out.print(f"wrote {out}; next: peftcli validate {out}")


@explore.command()
def schema(
    out: Path = typer.Option(None, "--out", help="Write to this file instead of printing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file that is not an earlier schema."),
) -> None:
    """Print the recipe's JSON Schema (for editor completion and checks of recipe files).

    [dim]Example: peftcli schema --out peftcli.schema.json[/]
    """
    import json

    from peftcli.recipe import Recipe

    schema_ = Recipe.model_json_schema()
    text = json.dumps(schema_, indent=2) + "\n"
    if out is None:
        console.out.print(text, markup=False, end="")
    else:
        _check_schema_target(out, schema_["title"], force)
        from peftcli.rundir import atomic_write_text

        atomic_write_text(out, text)
        console.out.print(f"wrote {out}")


def _check_schema_target(out: Path, title: str, force: bool) -> None:
    """--out may replace an earlier schema (refreshing it is the point), not any other file."""
    if out.exists() and not out.is_file():
        raise UserError(f"--out {out} exists and is not a file")
    if not out.exists() or force:
        return
    try:
        import json

        earlier = json.loads(out.read_text(encoding="utf-8")).get("title") == title
    except (OSError, ValueError, AttributeError):
        earlier = False
    if not earlier:
        raise UserError(f"--out {out} already exists and is not a peftcli schema", hint="add --force to replace it")


data_app = typer.Typer(
    help="Inspect the data a recipe trains on.",
    epilog="Example: peftcli data preview recipes/demo.yaml --rows 3",
    no_args_is_help=True,
)
explore.add_typer(data_app, name="data")


@data_app.command("preview")
def data_preview(
    recipe: Path = RecipeArg,
    set_: list[str] = SetOpt,
    rows: int = typer.Option(3, "--rows", "-n", min=0, help="How many training examples to show."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per example: text, input_ids, labels."),
) -> None:
    """Show training examples exactly as the model sees them (trained tokens highlighted) + data stats.

    [dim]Example: peftcli data preview recipes/demo.yaml --rows 2[/]
    """
    resolved = load(recipe, set_)
    from peftcli import modeling
    from peftcli.data import prepare_data
    from peftcli.data.preview import show

    modeling.check_model_source(resolved.model)
    modeling.quiet_libraries()
    tokenizer = modeling.load_tokenizer(resolved.model)
    data = prepare_data(resolved.data, tokenizer, resolved.training.seed)
    show(tokenizer, data, rows, as_json, resolved, console.out)


@explore.command()
def methods(
    model: str = typer.Option(None, "--model", help="Model folder (or hub id): show each method's trainable share."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table (as in the README)."),
) -> None:
    """List every PEFT method: its keys and defaults, mergeable or not, quantized base or not.

    [dim]Example: peftcli methods --model models/tiny[/]
    """
    from peftcli import catalogue

    table = catalogue.rows(model)
    if markdown:
        console.out.print(catalogue.markdown(table), markup=False)
    else:
        catalogue.print_table(table, console.out)
