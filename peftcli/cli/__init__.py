"""The `peftcli` command line: one module per command (train.py, validate.py, evaluate.py, ...),
registered here, and `main`, which runs the app and maps every exception to one line and an exit
code (0 ok, 1 a bug or a failed check, 2 a user error, 130/143 interrupted). The global options
(-V, -q/-v, shell completion) live on the root callback here.

No module of this package imports torch at import time: a command imports its stage when it runs,
so `peftcli --help` and `peftcli validate` stay light.
"""

from __future__ import annotations

import errno
import os
import sys
import warnings
from typing import Annotated

import typer

from peftcli import console, interruption
from peftcli.cli import (
    compare,
    convert,
    data,
    evaluate,
    export,
    generate,
    init,
    merge,
    methods,
    schema,
    serve,
    train,
    tune,
    validate,
)
from peftcli.errors import EXIT_BUG, EXIT_USER, ReportedError, UserError

app = typer.Typer(
    name="peftcli",
    help="Fine-tune causal LMs with parameter-efficient methods (LoRA, QLoRA, DoRA, IA3, ...) from one YAML recipe.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion: typer's scripts, no torch
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _flags_show_no_type() -> None:
    """typer 0.29's rich help prints a type for every option, `<bool>` for flags too, which reads as
    if `--overwrite true` were the way to say it (it is an error). A flag takes no value, so it shows
    none; options that take one keep theirs. Older typer (no `display_type_rich`) shows none already."""
    option = getattr(typer.core, "TyperOption", None)
    typed = getattr(option, "display_type_rich", None)
    if option is None or typed is None or getattr(typed, "peftcli_flags_untyped", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else typed(self, ctx)

    display_type_rich.peftcli_flags_untyped = True  # type: ignore[attr-defined]
    option.display_type_rich = display_type_rich


_flags_show_no_type()
# The order of `peftcli --help`: the path train -> eval -> merge first, then the helpers.
app.command("validate")(validate.validate)
app.command("train")(train.train)
app.command("eval")(evaluate.evaluate)
app.command("merge")(merge.merge)
app.command("export")(export.export)
app.command("compare")(compare.compare)
app.command("tune")(tune.tune)
app.command("generate")(generate.generate)
app.command("serve")(serve.serve)
app.command("init")(init.init)
app.command("schema")(schema.schema)
app.add_typer(data.data_app, name="data")
app.add_typer(convert.convert_app, name="convert")
app.command("methods")(methods.methods)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.out.print(f"peftcli {version('peftcli')}", markup=False)
        raise typer.Exit()


@app.callback(epilog="Example: peftcli init --out my.yaml && peftcli validate my.yaml && peftcli train my.yaml")
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only results (stdout) and errors: no progress, notes or warnings.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="More detail: library warnings too (PEFTCLI_DEBUG=1: tracebacks).")
    ] = False,
) -> None:
    """Fine-tune causal LMs with parameter-efficient methods (LoRA, QLoRA, DoRA, IA3, ...) from one YAML recipe."""
    if quiet and verbose:
        raise UserError("-q/--quiet and -v/--verbose contradict each other", hint="give one of them")
    console.set_verbosity(console.QUIET if quiet else console.VERBOSE if verbose else console.NORMAL)
    if verbose:
        import logging

        warnings.simplefilter("default")  # scoped: main() holds catch_warnings
        logging.getLogger("bitsandbytes").setLevel(logging.WARNING)


# Global options a user may also type after the command (`peftcli train r.yaml -q`): click reads a
# group's options only before the command name, so main() moves these there.
_GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")


def _global_flags_first(argv: list[str]) -> list[str]:
    """Move -q/-v (up to a `--`) to the front, where the root callback reads them."""
    end = argv.index("--") if "--" in argv else len(argv)
    moved = [arg for arg in argv[:end] if arg in _GLOBAL_FLAGS]
    return moved + [arg for arg in argv[:end] if arg not in _GLOBAL_FLAGS] + argv[end:]


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
    from peftcli.redact import redact

    console.problem(label, redact(message), redact(hint) if hint else None)


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

    # typer may vendor its own click: the exception classes of both are caught
    usage: list[type] = [click.ClickException]
    exits: list[type] = [click.exceptions.Exit]
    aborts: list[type] = [click.Abort]
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
    # Library deprecation chatter is not actionable for our users; -v or PEFTCLI_DEBUG=1 shows it.
    # Scoped, so an in-process caller (the tests) keeps its own filters.
    with warnings.catch_warnings():
        if not _debug():
            warnings.filterwarnings("ignore")
        _run(argv)


def _run(argv: list[str] | None) -> None:
    import logging

    from peftcli.training.launch import install_stop_recorder

    install_stop_recorder()  # first thing: a process of --num-processes must not die of a stop request
    # bitsandbytes logs a harmless "failed to load CPU kernel" line at import; keep it out of every command.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    console.set_verbosity(console.NORMAL)  # until the root callback reads -q/-v (also: a previous in-process run)
    try:
        args = _global_flags_first(_resume_flag(sys.argv[1:] if argv is None else argv))
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
        from peftcli.model.device import is_main_process, rank_prefix

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
        console.problems.print("interrupted", style="yellow")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - last resort: a bug, shown as one line unless debugging
        if _debug():
            raise
        environment = environment_error(exc)
        if environment is not None:
            _print_error(*environment)
            sys.exit(EXIT_USER)
        if "torch" in sys.modules:
            from peftcli.model.device import is_out_of_memory

            if is_out_of_memory(exc):  # train has its own message; eval, merge, generate land here
                _print_error(
                    "out of memory",
                    "use a smaller --batch-size, --dtype bfloat16, a quantized base, or a machine with more memory",
                )
                sys.exit(EXIT_USER)
        from peftcli.model.device import rank_prefix

        _print_error(
            f"{rank_prefix()}unexpected {exc.__class__.__name__}: {exc}",
            "this is a bug in peftcli; rerun with PEFTCLI_DEBUG=1 for the traceback and report it",
        )
        sys.exit(EXIT_BUG)
