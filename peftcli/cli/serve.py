"""`peftcli serve`: an OpenAI-compatible HTTP server over a base model and its adapters, on the
engine of `peftcli generate` (peftcli/serve/), or on vLLM with `--engine vllm`.

It binds to loopback unless told otherwise; `--api-key` (or PEFTCLI_API_KEY) requires
`Authorization: Bearer KEY` on every /v1 route. SIGTERM or Ctrl-C stops it gracefully: the requests
in flight finish, then it exits 143 / 130 like every interrupted command (never 0: a script must not
take a stopped server for a finished job)."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import shlex
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from peftcli import console
from peftcli.errors import Interrupted, ReportedError, UserError

DEFAULT_MAX_NEW_TOKENS = 128


class ServeEngine(str, Enum):
    builtin = "builtin"
    vllm = "vllm"


def serve(
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", help="A run's adapter, served as model NAME (repeatable).", metavar="NAME=RUN"),
    ] = None,
    base: Annotated[
        str | None, typer.Option("--base", help="Base model, served as model 'base' (default: the adapters' base).")
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; anything but loopback is reachable by others.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="PEFTCLI_API_KEY",
            help="Require 'Authorization: Bearer KEY' (the variable keeps the key out of `ps`).",
            show_default=False,
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", min=1, help="Reply length when a request sets no max_tokens [default: 128]."),
    ] = None,
    engine: Annotated[
        ServeEngine,
        typer.Option("--engine", help="builtin: this process; vllm: vLLM's server with multi-LoRA (GPU)."),
    ] = ServeEngine.builtin,
) -> None:
    """Serve the base and its adapters behind an OpenAI-compatible API; `model` picks the adapter.

    [dim]Example: peftcli serve --adapter support=runs/support --adapter sales=runs/sales --port 8000[/]
    """
    from peftcli.evaluation.adapters import parse_adapters

    adapters = parse_adapters(adapter or [])
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty", hint="give a key, or leave --api-key (and PEFTCLI_API_KEY) unset")
    if not _is_loopback(host) and api_key is None:
        console.warn(f"listening on {host} without --api-key: anyone who can reach this port can use the model")
    if engine is ServeEngine.vllm:
        if max_new_tokens is not None:
            console.warn(
                "--max-new-tokens is the built-in engine's; vLLM gives a request without max_tokens the room left"
            )
        _exec_vllm(base, adapters, host, port, api_key)
        return
    from peftcli.evaluation.adapters import Session
    from peftcli.serve.app import create_app, listen, serve_forever, url
    from peftcli.serve.engine import Engine

    sock = listen(host, port)
    session = Session(base, adapters)
    server = Engine(session, max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
    app = create_app(server, api_key, {name: str(Path(path).resolve()) for name, path in adapters})
    console.err.print(
        f"serving {', '.join(server.models())} at {url(host, port)}/v1" + (" (API key required)" if api_key else ""),
        markup=False,
    )
    signum = serve_forever(app, sock, quiet=console.verbosity == console.QUIET)
    if signum is None:  # uvicorn gave up on its own (its log above says why): not a finished job either
        raise ReportedError("the server stopped without being asked to", hint="its log above says why")
    raise Interrupted(
        signum,
        f"{signal.Signals(signum).name} received; the server stopped after the requests in flight finished; "
        "nothing was lost (a server writes nothing)",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def _exec_vllm(base: str | None, adapters: list[tuple[str, Path]], host: str, port: int, api_key: str | None) -> None:
    """Replace this process with vLLM's server (signals and exit code are then vLLM's)."""
    from peftcli.serve.vllm import INSTALL_HINT, plan

    beside = Path(sys.executable).parent / "vllm"  # the venv's script, even when the venv is not activated
    command = plan(base, adapters, host, port, executable=str(beside) if beside.exists() else "vllm")
    if importlib.util.find_spec("vllm") is None:
        console.note("the vLLM command would be: " + shlex.join(command))
        raise UserError("--engine vllm: vLLM is not installed", hint=INSTALL_HINT)
    console.err.print(shlex.join(command), markup=False)
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, "VLLM_API_KEY": api_key} if api_key else dict(os.environ)
    os.execvpe(command[0], command, env)
