"""Data sources and chat templates as both converters write them: a local file relative to the
recipe or a hub id, a source checked key by key against the schema, and a template name mapped onto
peftcli's built-in ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from peftcli.convert.ledger import Ledger
from peftcli.recipe import DataSource
from peftcli.recipe.schema import BUILTIN_TEMPLATES

# Suffixes that mark a name as a local file even when it is not there yet (else: a hub id).
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".arrow")
TEMPLATE_REASON = "peftcli's templates are auto (the model's own), chatml, llama3, mistral or a .jinja file"


def hub_or_local(
    ledger: Ledger, key: str, value: str, found: Path | None, base: Path | None = None
) -> tuple[dict, bool]:
    """({"path": ...}, whether it is a hub id) for a data location: a local one is written relative
    to the recipe.

    A name that looks like a file (a data suffix, ./, /, ~) but is not there is still written as a
    local path, resolved against `base` (default: the config's folder), with a note."""
    if found is not None:
        return {"path": ledger.for_recipe(found)}, False
    if value.startswith((".", "/", "~")) or value.lower().endswith(DATA_SUFFIXES) or base is not None:
        where = (base or ledger.origin.parent) / Path(value).expanduser()
        ledger.notes.append(f"{key}: {where} does not exist (yet); the recipe points there")
        return {"path": ledger.for_recipe(where)}, False
    return {"path": value}, True


def clean_source(ledger: Ledger, where: str, source: dict) -> dict | None:
    """`source` without empty keys, and without any key the schema refuses (listed as not carried);
    None when its path itself is refused."""
    source = {k: v for k, v in source.items() if v is not None and v != {}}
    while True:
        try:
            DataSource.model_validate(source)
            return source
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            key = str(error["loc"][0]) if error["loc"] else "path"
            if key == "path" or key not in source:
                ledger.drop(where, source, f"peftcli refuses this source: {error['msg'].lower()}")
                return None
            ledger.drop(f"{where}.{key}", source.pop(key), f"data source {key} refuses it: {error['msg'].lower()}")


def chat_template(ledger: Ledger, key: str, template: Any, jinja: Any = None, jinja_key: str = "") -> None:
    """The other tool's chat template choice -> data.chat_template (auto: the model's own)."""
    if template in BUILTIN_TEMPLATES:
        ledger.carry(key, "data.chat_template", template)
        if jinja is not None:
            ledger.drop(jinja_key, jinja, f"{key}: {template} is used")
    elif template == "tokenizer_default" and jinja is None:
        ledger.carry(key, "data.chat_template", "auto")
    elif jinja is not None and template in (None, "jinja"):
        found = ledger.find(jinja) if isinstance(jinja, str) and "\n" not in jinja and len(jinja) < 1024 else None
        if found is not None and found.is_file():
            ledger.carry(jinja_key, "data.chat_template", ledger.for_recipe(found))
            if template is not None:  # `chat_template: jinja` chose the file: carried with it
                ledger.mark(key)
        else:
            ledger.drop(jinja_key, jinja, "save the template to a .jinja file and set data.chat_template to its path")
    elif template is not None:
        ledger.drop(key, template, TEMPLATE_REASON)


def model_path(ledger: Ledger, key: str, value: str) -> str:
    """A local model folder written relative to the recipe; anything else is a hub id."""
    found = ledger.find(value)
    if found is not None and found.is_dir():
        return ledger.for_recipe(found)
    if value.startswith((".", "/", "~")) or value.count("/") > 1:
        ledger.notes.append(f"{key}: {value} is not a folder here; written as given (a hub id to peftcli)")
    return value
