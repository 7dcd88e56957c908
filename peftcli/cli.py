"""The `peftcli` command line. Each command parses its arguments, loads a recipe or a run, calls one
stage, and maps errors to exit codes (0 ok, 1 bug or failed check, 2 user error, 130/143 signal).

This module must not import torch at import time: `peftcli --help` and `peftcli validate` stay
instant because stages are imported inside the commands that need them.
"""

from __future__ import annotations

import errno
import os
import sys
import warnings
from pathlib import Path

import typer

from peftcli import console, interruption
from peftcli.cli_explore import explore
from peftcli.cli_options import RecipeArg, SetOpt, load
from peftcli.errors import EXIT_BUG, EXIT_USER, ReportedError, UserError

app = typer.Typer(
    name="peftcli",
    help="Fine-tune causal LMs with parameter-efficient methods (LoRA, QLoRA, DoRA, IA3, ...) from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.add_typer(explore)  # methods, compare, data preview, generate, init, schema (cli_explore.py)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.out.print(f"peftcli {version('peftcli')}", markup=False)
        raise typer.Exit()


@app.callback(epilog="Example: peftcli init --out my.yaml && peftcli validate my.yaml && peftcli train my.yaml")
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Fine-tune causal LMs with parameter-efficient methods (LoRA, QLoRA, DoRA, IA3, ...) from one YAML recipe."""


@app.command()
def validate(recipe: Path = RecipeArg, set_: list[str] = SetOpt) -> None:
    """Check a recipe and print it resolved (defaults filled, overrides applied, paths absolute).

    [dim]Example: peftcli validate recipes/demo.yaml --set peft.r=16[/]
    """
    from peftcli.preflight import check_environment
    from peftcli.recipe import recipe_to_yaml
    from peftcli.summary import describe_recipe

    resolved = load(recipe, set_)
    check_environment(resolved, deep=False)  # the model folder, tokenizer, context length, ...: no torch
    console.out.print(recipe_to_yaml(resolved), markup=False)
    for line in describe_recipe(resolved):
        console.err.print(line, markup=False)
    console.err.print("recipe is valid", style="green")


@app.command()
def train(
    recipe: Path = RecipeArg,
    set_: list[str] = SetOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing run in output.dir first."),
    resume: str = typer.Option(
        None,
        "--resume",
        metavar="[CHECKPOINT]",
        help="Continue the run in output.dir from its newest complete checkpoint, or from CHECKPOINT.",
    ),
    force: bool = typer.Option(False, "--force", help="With --resume: accept a recipe that differs from the run's."),
    num_processes: int = typer.Option(
        1, "--num-processes", min=1, help="Train on N devices (DDP; FSDP/ZeRO with --accelerate-config)."
    ),
    accelerate_config: Path = typer.Option(
        None, "--accelerate-config", help="accelerate config for --num-processes (see recipes/accelerate/)."
    ),
) -> None:
    """Train an adapter as the recipe says and write the run directory.

    [dim]Examples: peftcli train recipes/demo.yaml --set training.max_steps=50
    peftcli train recipes/demo.yaml --resume   (after an interruption)[/]
    """
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
    from peftcli import launch

    if num_processes > 1 and launch.world_size() == 1:
        from peftcli.training.stage import preflight

        if not resume:
            preflight(resolved, overwrite)  # report recipe/model/folder errors once, not once per process
        args = ["train", str(recipe.resolve()), *[f"--set={item}" for item in set_]]
        args += ["--overwrite"] * overwrite + [f"--resume={resume}"] * bool(resume) + ["--force"] * force
        launch.relaunch(args, num_processes, accelerate_config)
    from peftcli.training import run_training

    outcome = run_training(
        resolved,
        overwrite=overwrite,
        resume=resume,
        force=force,
        console=console.err,
        # With --set overrides the run's saved recipe.yaml is what resumes it (it holds them).
        source=None if set_ else str(recipe),
        recipe_file=recipe.resolve(),
    )
    if launch.is_main_process():
        metrics = outcome.run_dir / "metrics.json"
        console.out.print(
            f"run written to {outcome.run_dir} (report: {outcome.run_dir / 'report.md'}, metrics: {metrics})"
        )


@app.command("eval")
def evaluate(
    run: Path = typer.Argument(..., help="Run directory written by `peftcli train`.", show_default=False),
    data: Path = typer.Option(None, "--data", help="Evaluate on this file instead of the run's eval data."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Examples per forward pass."),
    generate: bool = typer.Option(False, "--generate", help="Also generate completions and score them."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help="Generation length (eval section)."),
    temperature: float = typer.Option(None, "--temperature", min=0, help="0 = greedy (eval section)."),
    num_samples: int = typer.Option(None, "--num-samples", min=1, help="Samples per prompt (eval section)."),
    limit: int = typer.Option(None, "--limit", min=1, help="Generate for at most N eval prompts."),
    reference: Path = typer.Option(None, "--reference", help="General text to measure forgetting on."),
) -> None:
    """Base vs tuned on held-out data: loss, perplexity, token accuracy; generation scores; forgetting.

    [dim]Example: peftcli eval runs/demo --generate --max-new-tokens 16[/]
    """
    from peftcli.evaluate import GenerateOptions, run_eval
    from peftcli.rundir import open_run

    options = None
    if generate:
        defaults = open_run(run).recipe().eval
        options = GenerateOptions(
            max_new_tokens=max_new_tokens or defaults.max_new_tokens,
            temperature=defaults.temperature if temperature is None else temperature,
            num_samples=num_samples or defaults.num_samples,
            limit=limit,
        )
        if options.num_samples > 1 and options.temperature == 0:
            raise UserError("--num-samples > 1 needs --temperature > 0 (greedy samples are identical)")
    elif any(v is not None for v in (max_new_tokens, temperature, num_samples, limit)):
        raise UserError("--max-new-tokens, --temperature, --num-samples and --limit apply with --generate")
    with interruption.saving(f"the eval results were not written ({run / 'eval.json'} is as it was)"):
        run_eval(
            run,
            data_path=data,
            batch_size=batch_size,
            generate=options,
            reference=str(reference.resolve()) if reference else None,
        )


@app.command()
def merge(
    runs: list[Path] = typer.Argument(
        ..., help="Run directories written by `peftcli train` (one, or several to combine).", show_default=False
    ),
    out: Path = typer.Option(
        ..., "--out", help="Folder for the merged model (or combined adapter).", show_default=False
    ),
    dtype: str = typer.Option("auto", "--dtype", help="auto | bfloat16 | float16 | float32 (saved weights)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out folder."),
    weights: str = typer.Option(
        None, "--weights", help="Several runs: comma-separated weights, e.g. 0.7,0.3 (default: equal)."
    ),
    combination: str = typer.Option(
        "linear",
        "--combination",
        help="Several runs: linear | cat | svd | ties | dare_linear | dare_ties | magnitude_prune.",
    ),
    density: float = typer.Option(None, "--density", help="ties/dare/magnitude_prune: fraction of weights kept."),
    as_adapter: bool = typer.Option(
        False, "--as-adapter", help="Several runs: save the combined adapter, not a merged model."
    ),
) -> None:
    """Fold an adapter into the base weights (or combine several), verify logits, save a plain HF model.

    [dim]Examples: peftcli merge runs/demo --out merged/demo
    peftcli merge runs/a runs/b --weights 0.7,0.3 --combination ties --density 0.5 --out merged/ab[/]
    """
    if dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise UserError(f"--dtype {dtype!r}: expected auto, bfloat16, float16 or float32")
    if len(runs) == 1:
        extra = [
            flag
            for flag, used in (
                ("--weights", weights is not None),
                ("--density", density is not None),
                ("--as-adapter", as_adapter),
            )
            if used
        ]
        if extra:
            raise UserError(f"{', '.join(extra)} combine several runs; give two or more run directories")
        from peftcli.merge import run_merge

        with interruption.saving(f"nothing was written to {out}"):
            run_merge(runs[0], out, dtype=dtype, force=force)
        return
    from peftcli.combine import run_combine

    with interruption.saving(f"nothing was written to {out}"):
        run_combine(
            runs,
            out,
            weights=weights,
            combination=combination,
            density=density,
            as_adapter=as_adapter,
            dtype=dtype,
            force=force,
        )


# File-system conditions the user (or the machine) has to fix, not bugs.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free some space (what was saved before is complete: every write is atomic)",
    errno.EDQUOT: "free some space or raise the quota (what was saved before is complete)",
    errno.EROFS: "write to a writable location",
    errno.EACCES: "check the permissions of that path",
    errno.EPERM: "check the permissions of that path",
    errno.EMFILE: "raise the open-file limit (ulimit -n)",
    errno.ENFILE: "raise the system's open-file limit",
    errno.EIO: "the disk or network file system reported an I/O error",
}


def environment_error(exc: BaseException) -> tuple[str, str] | None:
    """(message, hint) for an operating-system failure that is not peftcli's fault: a full disk, a
    read-only or unreadable path. Libraries written in Rust (safetensors, tokenizers) report a full
    disk in their own words, so the text is checked as well."""
    if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc.__class__.__name__}{where}", _ENVIRONMENT_ERRNOS[exc.errno]
    text = str(exc)
    if "No space left on device" in text or "StorageFull" in text or "os error 28" in text:
        return f"no space left on device ({text.splitlines()[0][:200]})", _ENVIRONMENT_ERRNOS[errno.ENOSPC]
    return None


def _debug() -> bool:
    return os.environ.get("PEFTCLI_DEBUG", "") not in ("", "0")


def _print_error(message: str, hint: str | None, label: str = "error") -> None:
    from peftcli.secrets import redact

    console.err.print(f"{label}: {redact(message)}", markup=False, style="red" if label == "error" else "yellow")
    if hint:
        console.err.print(f"hint: {redact(hint)}", markup=False)


def _resume_flag(argv: list[str]) -> list[str]:
    """`--resume` may stand alone (= the newest checkpoint) or take a checkpoint folder. Click options
    always take a value, so a bare `--resume` (last, or followed by an option or by the recipe file)
    is rewritten to `--resume=latest`; anything else after it is the checkpoint (checked later)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--resume":
            following = out[i + 1] if i + 1 < len(out) else None
            if following is None or following.startswith("-") or following.endswith((".yaml", ".yml")):
                out[i] = "--resume=latest"
    return out


def _click_exceptions() -> tuple[tuple, tuple, tuple]:
    """(usage errors, exits, aborts) as click raises them, and as newer typer releases raise them
    from their own vendored copy of click (whose classes are not click's)."""
    import click

    usage, exits, aborts = [click.ClickException], [click.exceptions.Exit], [click.Abort]
    try:
        from typer._click.exceptions import ClickException as VendoredClickException

        usage.append(VendoredClickException)
    except ImportError:  # typer that uses click itself
        pass
    exits.append(typer.Exit)
    aborts.append(typer.Abort)
    return tuple(usage), tuple(exits), tuple(aborts)


_USAGE_ERRORS, _EXITS, _ABORTS = _click_exceptions()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and turn exceptions into exit codes."""
    import logging

    from peftcli.launch import install_stop_recorder

    install_stop_recorder()  # first thing: a process of --num-processes must not die of a stop request
    # bitsandbytes logs a harmless "failed to load CPU kernel" line at import; keep it out of every command.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if not _debug():
        # Library deprecation chatter is not actionable for our users; PEFTCLI_DEBUG=1 shows it.
        warnings.filterwarnings("ignore")
    try:
        args = _resume_flag(sys.argv[1:] if argv is None else argv)
        # Ctrl-C/SIGTERM: clean up on the way out, say what was saved, exit 130/143 (never 0).
        with interruption.installed():
            code = app(args=args, prog_name="peftcli", standalone_mode=False)
        if isinstance(code, int) and code != 0:  # typer returns an explicit exit code instead of raising it
            sys.exit(code)
    except interruption.Interruption as exc:
        message, hint = interruption.message(exc)
        _print_error(message, hint, label="interrupted")
        sys.exit(exc.exit_code)
    except ReportedError as exc:
        if _debug():
            raise
        from peftcli.launch import is_main_process, rank_prefix

        # In a multi-process run most errors happen on every rank alike: rank 0 says it. Errors one
        # rank may hit alone (out of memory) are said by that rank.
        if is_main_process() or exc.per_rank:
            _print_error((rank_prefix() if exc.per_rank else "") + exc.message, exc.hint, exc.label)
        sys.exit(exc.exit_code)
    except _EXITS as exc:
        sys.exit(exc.exit_code)
    except _USAGE_ERRORS as exc:  # a missing argument, an unknown option or command: the user's
        exc.show()
        sys.exit(EXIT_USER)
    except (*_ABORTS, KeyboardInterrupt):
        console.err.print("interrupted", style="yellow")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - last resort: a bug, shown as one line unless debugging
        if _debug():
            raise
        environment = environment_error(exc)
        if environment is not None:
            _print_error(*environment)
            sys.exit(EXIT_USER)
        if "torch" in sys.modules:
            from peftcli.modeling import is_out_of_memory

            if is_out_of_memory(exc):  # train has its own message; eval, merge, generate land here
                _print_error(
                    "out of memory",
                    "use a smaller --batch-size, --dtype bfloat16, a quantized base, or a machine with more memory",
                )
                sys.exit(EXIT_USER)
        from peftcli.launch import rank_prefix

        _print_error(
            f"{rank_prefix()}unexpected {exc.__class__.__name__}: {exc}",
            "this is a bug in peftcli; rerun with PEFTCLI_DEBUG=1 for the traceback and report it",
        )
        sys.exit(EXIT_BUG)
