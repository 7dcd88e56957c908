"""Scripting conventions of the command line: flags that look like flags in --help, -V, shell
completion, -q/-v, NO_COLOR, --json on validate/methods/generate, and names that never wrap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
from helpers import base_recipe, write_recipe

from peftcli.methods import REGISTRY


def _every_command() -> list[list[str]]:
    """Every command path of the app, as typer builds it (sub-apps included)."""
    import typer

    from peftcli.cli import app

    paths: list[list[str]] = []

    def walk(command, path: list[str]) -> None:
        paths.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


def test_help_shows_flags_without_a_value(cli):
    train = cli("train", "--help").out
    overwrite = next(line for line in train.splitlines() if "--overwrite" in line)
    assert "Delete an existing run" in overwrite and "<" not in overwrite  # a flag: nothing to type after it
    assert "KEY=VALUE" in train and "<int range>" in train  # options that take a value still say which


@pytest.mark.slow
def test_no_command_shows_a_type_for_a_flag(cli):
    commands = _every_command()
    assert ["train"] in commands and ["data", "preview"] in commands and len(commands) > 12
    for path in commands:
        result = cli(*path, "--help")
        assert result.code == 0, path
        assert "<bool>" not in result.out, path


def test_version_short_and_long(cli):
    short, long = cli("-V"), cli("--version")
    assert short.code == long.code == 0
    assert short.out == long.out and short.out.startswith("peftcli ")


def test_completion_script_is_offered(cli):
    assert "--install-completion" in cli("--help").out
    # The shell is detected from the parent process (sh under make, where typer has no script):
    # typer's own switch lets the test name the shell instead.
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    script = subprocess.run(
        [sys.executable, "-m", "peftcli", "--show-completion", "bash"], capture_output=True, text=True, env=env
    )
    assert script.returncode == 0 and "_PEFTCLI_COMPLETE" in script.stdout, script.stderr


@pytest.mark.slow
def test_completion_completes_commands_and_options_without_torch():
    code = (
        "import sys\nfrom peftcli.cli import main\n"
        "try:\n    main([])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    for words, expected in (("peftcli me", {"merge", "methods"}), ("peftcli train --ov", {"--overwrite"})):
        env = {**os.environ, "_PEFTCLI_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": "2"}
        if words.count(" ") == 1:
            env["COMP_CWORD"] = "1"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert set(done.stdout.split()) == expected, done
        assert done.stderr.strip().endswith("False"), done.stderr  # completing imports no torch


@pytest.fixture
def recipe(tmp_path, tiny_model):
    return write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run"))


def test_quiet_keeps_results_and_errors_only(cli, recipe, tmp_path):
    normal = cli("validate", recipe)
    assert normal.code == 0 and "recipe is valid" in normal.err
    quiet = cli("validate", recipe, "--quiet")  # a global option, also after the command
    assert quiet.code == 0, quiet.err
    assert quiet.out == normal.out  # the resolved recipe, the result, is still there
    assert quiet.err == ""
    failed = cli("-q", "validate", tmp_path / "missing.yaml")
    assert failed.code == 2 and failed.error_lines and "hint:" in failed.err  # errors are never silenced
    both = cli("-q", "-v", "validate", recipe)
    assert both.code == 2 and "-q/--quiet and -v/--verbose" in both.err


def test_verbose_lets_library_warnings_through(cli, monkeypatch):
    """Library warnings are hidden by default (they rarely say anything actionable); -v shows them."""
    from peftcli.cli import methods

    rows = methods.rows

    def chatty_rows(model=None):
        warnings.warn(f"library chatter {chatty_rows.calls}", UserWarning, stacklevel=1)
        chatty_rows.calls += 1
        return rows(model)

    chatty_rows.calls = 0
    monkeypatch.setattr(methods, "rows", chatty_rows)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert cli("methods").code == 0
        assert not [w for w in seen if "library chatter" in str(w.message)]
        assert cli("methods", "-v").code == 0
        assert [str(w.message) for w in seen if "library chatter" in str(w.message)] == ["library chatter 1"]


@pytest.mark.slow
def test_no_color_and_quiet_in_a_real_process(tmp_path):
    """NO_COLOR wins over a forced colour terminal, and -q leaves the error line alone."""
    env = {**os.environ, "FORCE_COLOR": "1"}
    argv = [sys.executable, "-m", "peftcli", "-q", "validate", str(tmp_path / "missing.yaml")]
    coloured = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert coloured.returncode == 2 and "\x1b[31m" in coloured.stderr  # the check below can see colour
    plain = subprocess.run(argv, capture_output=True, text=True, env={**env, "NO_COLOR": "1"})
    assert plain.returncode == 2 and "\x1b[" not in plain.stderr
    assert plain.stderr.splitlines()[0].startswith("error: recipe file not found")


def test_validate_json_is_one_object(cli, recipe):
    result = cli("validate", recipe, "--json", "--set", "peft.r=4")
    assert result.code == 0, result.err
    found = json.loads(result.out)
    assert found["valid"] is True
    assert found["recipe"]["peft"]["r"] == 4 and found["method"]["name"] == "lora"
    assert found["base"]["num_hidden_layers"] >= 1
    assert found["settings"]["packing_layout"] in ("varlen", "rows", "padded")
    assert found["fit_estimate"]["trainable_params"] > 0 and found["fit_estimate"]["total_gib"] > 0
    rows = sum(1 for line in open(found["recipe"]["data"]["train"][0]["path"], encoding="utf-8") if line.strip())
    train = next(source for source in found["data"] if source["key"] == "data.train")
    assert train["rows"] == rows and train["formats"] == ["messages"] and train["skipped"] == 0
    assert "recipe is valid" not in result.err


def test_methods_json_is_the_registry(cli):
    result = cli("methods", "--json")
    assert result.code == 0, result.err
    listed = json.loads(result.out)
    assert [row["method"] for row in listed] == list(REGISTRY)
    lora = listed[0]
    assert lora["mergeable"] is True and lora["keys"]["r"] == REGISTRY["lora"].keys()["r"]
    both = cli("methods", "--json", "--markdown")
    assert both.code == 2 and both.error_lines


def test_methods_table_never_cuts_a_method_name(cli):
    table = cli("methods").out  # captured: rich lays it out 80 columns wide
    cells = [cell.strip() for line in table.splitlines() for cell in line.split("│")[1:2]]
    assert set(REGISTRY) <= set(cells)
    assert "adaption_promp" not in {cell for cell in cells if cell not in REGISTRY}


class _FakeSession:
    """Stands in for evaluation/adapters.Session: replies name the adapter, streamed like TextStreamer."""

    def __init__(self, base, adapters):
        self.adapters = {name: None for name, _ in adapters}

    def reply(self, adapter, messages, stream, **options):
        text = f"reply of {adapter} to {messages[-1]['content']}"
        if stream:
            print(text, flush=True)
        return text


def test_generate_labels_every_reply_on_stdout(cli, monkeypatch):
    monkeypatch.setattr("peftcli.evaluation.adapters.Session", _FakeSession)
    argv = ["generate", "--adapter", "a=runs/a", "--adapter", "b=runs/b", "--prompt", "hi"]
    text = cli(*argv)
    assert text.code == 0, text.err
    assert text.out.splitlines() == ["[a] hi", "reply of a to hi", "", "[b] hi", "reply of b to hi"]

    as_json = cli(*argv, "--json")
    assert as_json.code == 0, as_json.err
    assert [json.loads(line) for line in as_json.out.splitlines()] == [
        {"adapter": "a", "prompt": "hi", "reply": "reply of a to hi"},
        {"adapter": "b", "prompt": "hi", "reply": "reply of b to hi"},
    ]
    assert "[a] hi" in as_json.err  # progress, while stdout stays machine-readable

    chat = cli("generate", "--adapter", "a=runs/a", "--interactive", "--json")
    assert chat.code == 2 and "--json" in chat.error_lines[0]
