"""`peftcli generate`: one base model, several adapters switched per prompt (evaluation/adapters.py);
prompts from the command line, a file, or an interactive chat.

stdout holds every reply under its label (`[adapter] prompt`, the reply, a blank line) or, with
`--json`, one JSON object per reply ({adapter, prompt, reply}); stderr repeats the label as progress
when stdout goes elsewhere (a file, a pipe)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from peftcli import console
from peftcli.errors import UserError

if TYPE_CHECKING:
    from peftcli.evaluation.adapters import Session


def generate(
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", help="NAME=RUN: attach a run's adapter (repeatable).", metavar="NAME=RUN"),
    ] = None,
    base: Annotated[str | None, typer.Option("--base", help="Base model (default: the first adapter's base).")] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="One prompt, answered by every adapter in turn.")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="File: a prompt per line (or JSON {prompt, adapter}).")
    ] = None,
    interactive: Annotated[
        bool, typer.Option("--interactive", "-i", help="Chat; /adapter NAME, /base switch.")
    ] = False,
    system: Annotated[str | None, typer.Option("--system", help="System message for chat templates.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0, help="0 = greedy.")] = 0.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per reply on stdout: adapter, prompt, reply (JSONL).")
    ] = False,
) -> None:
    """Generate with a base model and several adapters, switching per prompt without reloading.

    [dim]Example: peftcli generate --adapter demo=runs/demo --prompt "What comes after Monday?"[/]
    """
    from peftcli.evaluation.adapters import Session, parse_adapters

    chosen = sum(x is not None and x is not False for x in (prompt, prompts, interactive or None))
    if chosen != 1:
        raise UserError("give exactly one of --prompt TEXT, --prompts FILE or --interactive")
    if as_json and interactive:
        raise UserError(
            "--json writes replies for a script; --interactive is a chat for a person",
            hint="give the prompts with --prompt TEXT or --prompts FILE and add --json",
        )
    parsed = parse_adapters(adapter or [])
    names = [name for name, _ in parsed]
    # Prompts are read and checked before the model loads: a bad one fails in a second, not a minute.
    _check_text(system, "--system")
    _check_text(prompt, "--prompt")
    pairs = read_prompts(prompts, names) if prompts is not None else [(prompt or "", n) for n in _every_adapter(names)]
    session = Session(base, parsed)
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    if interactive:
        chat(session, system, **options)
    else:
        run_prompts(session, pairs, system, as_json, **options)


def _check_text(text: str | None, what: str) -> None:
    """Text a tokenizer can encode: bytes that are not UTF-8 reach Python as lone surrogates (an
    argument in another encoding, a JSON \\ud800 escape), which no tokenizer accepts."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(
            f"{what}: not UTF-8 text (character {exc.start + 1} is a stray byte or lone surrogate)",
            hint="write the prompt in UTF-8 (check the terminal's or the file's encoding)",
        ) from None


def _every_adapter(names: list[str]) -> list[str | None]:
    """Every adapter by name, or the base alone (None) when there is none."""
    return [*names] if names else [None]


def read_prompts(path: Path, names: list[str]) -> list[tuple[str, str | None]]:
    """(prompt, adapter) pairs: a plain line goes to every adapter, a JSON line may name one."""
    from peftcli.data.paths import not_a_file
    from peftcli.evaluation.adapters import BASE

    problem = not_a_file(path)  # checked before opening: reading a FIFO blocks, a device never ends
    if problem is not None:
        raise UserError(f"--prompts {path} is {problem}", hint="give a text file: a prompt per line")
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file", hint="check the path (relative to this directory)")
    pairs: list[tuple[str, str | None]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line_number = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise UserError(
            f"--prompts {path}: not UTF-8 text (line {line_number}, byte {exc.start})",
            hint="save the file as UTF-8",
        ) from None
    except OSError as exc:
        raise UserError(f"--prompts {path}: cannot read it ({exc.strerror or exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"--prompts {path.name} line {number}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise UserError(f"--prompts {path.name} line {number}: needs a 'prompt' string")
            text, target = row["prompt"], row.get("adapter")
            _check_text(text, f"--prompts {path.name} line {number}")
            if target is not None and target not in names and target != BASE:
                raise UserError(
                    f"--prompts {path.name} line {number}: unknown adapter {target!r}",
                    hint=f"adapters: {', '.join(names)} (or {BASE})",
                )
            chosen = [None if target == BASE else target] if target else _every_adapter(names)
            pairs += [(text, n) for n in chosen]
        else:
            pairs += [(line, n) for n in _every_adapter(names)]
    return pairs


def run_prompts(
    session: Session, pairs: list[tuple[str, str | None]], system: str | None, as_json: bool = False, **options
) -> None:
    """Answer each (prompt, adapter): labelled text, streamed to stdout, or a JSON line per reply."""
    from peftcli.evaluation.adapters import BASE

    # On a terminal stdout already shows the label; elsewhere stderr says what is being answered.
    progress = as_json or not console.out.is_terminal
    for index, (text, adapter) in enumerate(pairs):
        label = f"[{adapter or BASE}] {text}"
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        if progress:
            console.err.print(f"\n{label}", markup=False, style="bold")
        if as_json:
            reply = session.reply(adapter, messages, stream=False, **options)
            record = {"adapter": adapter or BASE, "prompt": text, "reply": reply}
            console.out.print(json.dumps(record, ensure_ascii=False), markup=False)
            continue
        console.out.print(("\n" if index else "") + label, markup=False, style="bold")
        session.reply(adapter, messages, stream=True, **options)
        sys.stdout.flush()


HELP = "commands: /adapter NAME, /base, /adapters, /reset, /quit"


def chat(session: Session, system: str | None, **options) -> None:
    from peftcli.evaluation.adapters import BASE

    adapter = next(iter(session.adapters), None)
    history: list[dict] = []
    console.err.print(f"chatting with {adapter or BASE}; {HELP}", markup=False)
    while True:
        try:
            line = input(f"{adapter or BASE}> ")
        except EOFError:
            print(file=sys.stderr)
            return
        command, _, argument = line.strip().partition(" ")
        if command in ("/quit", "/exit"):
            return
        if command == "/adapter":
            if argument not in session.adapters:
                console.err.print(f"no adapter {argument!r}; adapters: {', '.join(session.adapters)}", markup=False)
                continue
            adapter = argument
        elif command == "/base":
            adapter = None
        elif command == "/adapters":
            console.err.print(", ".join(session.adapters) or "(none)", markup=False)
        elif command == "/reset":
            history = []
        elif command.startswith("/"):
            console.err.print(HELP, markup=False)
        elif line.strip():
            try:
                _check_text(line, "that line")
            except UserError as exc:  # a chat goes on: say so, and wait for the next line
                console.err.print(exc.message, markup=False)
                continue
            history.append({"role": "user", "content": line})
            system_turn = [{"role": "system", "content": system}] if system else []
            history.append(
                {"role": "assistant", "content": session.reply(adapter, system_turn + history, stream=True, **options)}
            )
            continue
        else:
            continue
        console.err.print(f"now using {adapter or BASE}", markup=False)
