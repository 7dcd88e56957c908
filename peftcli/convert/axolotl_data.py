"""Axolotl's `datasets:` / `test_datasets:` entries and data settings -> the recipe's `data` section.

Each entry's `type` picks the peftcli format: alpaca, chat_template (messages, or sharegpt when the
turns are from/value), the old sharegpt type, completion (text) and a user-defined type (alpaca with
its fields as columns). A type peftcli has no equivalent for leaves its dataset out, listed; with no
dataset left the conversion stops with an error.
"""

from __future__ import annotations

from typing import Any

from peftcli.convert.common import number
from peftcli.convert.ledger import Ledger, is_empty, shown
from peftcli.convert.sources import chat_template, clean_source, hub_or_local
from peftcli.data.turns import MESSAGE_KEYS, MESSAGES_ROLES, SHAREGPT_ROLES
from peftcli.errors import UserError

DEFAULT_SEQUENCE_LEN = 512  # Axolotl's, written when the config leaves sequence_len out (peftcli's is 1024)

PEFTCLI_ROLES = ("system", "user", "assistant", "tool")
# User-defined type fields -> alpaca fields.
USER_FIELDS = {"field_instruction": "instruction", "field_input": "input", "field_output": "output"}
USER_FIELDS["field_system"] = "system"
# Axolotl types with no peftcli format, and what to do instead.
NO_EQUIVALENT = {
    "input_output": "peftcli has no segments format; write prompt/completion rows (or messages) instead",
    "pretrain": "use a text source (format: text)",
}
# Axolotl message properties -> the keys of a turn peftcli reads them from (turns.py).
TURN_KEY_NAMES: dict[str, tuple[str, ...]] = {
    name: (name,) for name in MESSAGE_KEYS - {"role", "content", "loss_weight", "function_call"}
}
TURN_KEY_NAMES["weight"] = ("weight", "loss_weight")
# Keys of a dataset entry handled by the code below for every type.
_COMMON = ("path", "type", "split", "name", "revision", "data_files", "ds_type")


def carry_data(ledger: Ledger) -> None:
    datasets = ledger.take("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise UserError(f"{ledger.origin}: datasets is missing or empty", hint="list the training data under datasets:")
    train = _sources(ledger, "datasets", datasets)
    if not train:
        raise UserError(
            f"{ledger.origin}: datasets: nothing left to train on; no entry has a type peftcli reads",
            hint="peftcli reads the types alpaca, chat_template, sharegpt, completion and user-defined fields",
        )
    ledger.carry("datasets", "data.train", train)
    tests = ledger.take("test_datasets")
    evals = _sources(ledger, "test_datasets", tests) if isinstance(tests, list) else []
    if evals:
        ledger.carry("test_datasets", "data.eval", evals)
    split = number(ledger.take("val_set_size"))
    if split is not None and split != 0:
        if evals:
            ledger.drop("val_set_size", split, "test_datasets are the eval data")
        elif isinstance(split, float) and 0 < split < 1:
            ledger.carry("val_set_size", "data.eval_split", split)
        else:
            ledger.drop("val_set_size", split, "a number of rows; data.eval_split takes a fraction of the data")
    if ledger.given("sequence_len"):
        ledger.carry("sequence_len", "data.max_length", number(ledger.take("sequence_len")))
    else:
        ledger.take("sequence_len")
        ledger.fill("sequence_len", DEFAULT_SEQUENCE_LEN, "data.max_length")
    packing = ledger.take("sample_packing")
    if isinstance(packing, bool):
        ledger.carry("sample_packing", "data.packing", packing)
        if ledger.config.get("eval_sample_packing") in (None, packing):
            ledger.take("eval_sample_packing")
    if ledger.take("train_on_inputs") is True:
        ledger.carry("train_on_inputs", "data.train_on", "all")
    template, jinja = ledger.take("chat_template"), ledger.take("chat_template_jinja")
    chat_template(ledger, "chat_template", template, jinja, "chat_template_jinja")


def _sources(ledger: Ledger, key: str, entries: list) -> list[dict]:
    sources: list[dict] = []
    for index, entry in enumerate(entries):
        where = f"{key}[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            ledger.drop(where, entry, "an entry needs a path; left out")
            continue
        kind = entry.get("type")
        converted = _by_type(ledger, where, entry, kind)
        if converted is None:
            continue
        fields, handled = converted
        for source in _located(ledger, where, entry):
            source.update(fields)
            cleaned = clean_source(ledger, where, source)
            if cleaned is not None:
                sources.append(cleaned)
        for name, value in entry.items():
            if name not in _COMMON and name not in handled and not is_empty(value):
                ledger.drop(f"{where}.{name}", value, "peftcli has no equivalent for this dataset key")
    return sources


def _by_type(ledger: Ledger, where: str, entry: dict, kind: Any) -> tuple[dict, set[str]] | None:
    """(source keys, entry keys handled) for the dataset's type; None when it is left out."""
    if isinstance(kind, dict):
        return _user_defined(ledger, where, kind), set()
    if kind is None:
        ledger.change(f"{where}: no type -> format: auto (peftcli detects it from the columns)", where)
        return {"format": "auto"}, set()
    if kind == "alpaca":
        return {"format": "alpaca"}, set()
    if kind == "completion":
        field = entry.get("field")
        return {"format": "text", "columns": {"text": field} if field and field != "text" else None}, {"field"}
    if kind == "chat_template":
        return _chat(ledger, where, entry)
    if kind == "sharegpt":
        return _sharegpt(ledger, where, entry)
    reason = NO_EQUIVALENT.get(str(kind), "an Axolotl prompt strategy with no peftcli format")
    ledger.drop(f"{where}.type", kind, f"{reason}; this dataset ({entry['path']}) is left out")
    return None


def _user_defined(ledger: Ledger, where: str, kind: dict) -> dict:
    columns = {}
    for name, value in kind.items():
        if name in USER_FIELDS and isinstance(value, str):
            if value != USER_FIELDS[name]:
                columns[USER_FIELDS[name]] = value
        elif not is_empty(value):
            rendered = "format" in name or name == "system_prompt"
            why = "peftcli renders alpaca rows with the chat template" if rendered else "peftcli has no equivalent"
            ledger.drop(f"{where}.type.{name}", value, why)
    return {"format": "alpaca", "columns": columns or None}


def _chat(ledger: Ledger, where: str, entry: dict) -> tuple[dict, set[str]]:
    field = entry.get("field_messages") or "messages"
    mappings = dict(entry.get("message_property_mappings") or {})
    role = mappings.pop("role", None) or entry.get("message_field_role") or "role"
    content = mappings.pop("content", None) or entry.get("message_field_content") or "content"
    for name, value in mappings.items():
        _turn_key(ledger, f"{where}.message_property_mappings.{name}", name, value)
    if (role, content) == ("from", "value"):  # ShareGPT turns under another key: peftcli's sharegpt format
        fmt, columns = "sharegpt", {"conversations": field} if field != "conversations" else {}
    else:
        fmt, columns = "messages", {"messages": field} if field != "messages" else {}
        columns.update({k: v for k, v in (("role", role), ("content", content)) if k != v})
    tools = entry.get("field_tools")
    if isinstance(tools, str) and tools != "tools":  # peftcli reads a `tools` column; another is mapped
        columns["tools"] = tools
    roles = _roles(ledger, where, entry.get("roles"))
    trained = entry.get("roles_to_train")
    # Role names as the file writes them, read through the format's own names (gpt is the assistant
    # in ShareGPT turns) and the entry's `roles`; a function call is an assistant turn, trained.
    known = {**(SHAREGPT_ROLES if fmt == "sharegpt" else MESSAGES_ROLES), **roles}
    if trained is not None and {known.get(r, r) for r in trained} - {"tool_call"} != {"assistant"}:
        ledger.drop(
            f"{where}.roles_to_train", trained, "peftcli trains assistant turns (data.train_on: completions) or all"
        )
    if entry.get("train_on_eos") not in (None, "turn"):
        ledger.drop(f"{where}.train_on_eos", entry["train_on_eos"], "peftcli trains each trained turn's end token")
    template = entry.get("chat_template")
    if template not in (None, "tokenizer_default", ledger.config.get("chat_template")):
        ledger.drop(f"{where}.chat_template", template, "peftcli uses one chat template (data.chat_template)")
    if entry.get("drop_system_message") is True:
        ledger.drop(f"{where}.drop_system_message", True, "peftcli keeps system messages")
    handled = {"field_messages", "message_property_mappings", "message_field_role", "message_field_content"}
    handled |= {"roles", "roles_to_train", "train_on_eos", "chat_template", "drop_system_message", "field_tools"}
    return {"format": fmt, "columns": columns or None, "roles": roles or None}, handled


def _turn_key(ledger: Ledger, key: str, name: str, value: Any) -> None:
    """A message property other than role and content (`weight: weight`): honoured when the data
    holds it under the key peftcli reads for it, else listed as not carried."""
    read_as = TURN_KEY_NAMES.get(name)
    if read_as is None:
        ledger.drop(key, value, "peftcli reads no such message property")
    elif value in read_as:
        ledger.also(f"{key}: {shown(key, value)}", key)
    else:
        names = " or ".join(f"'{n}'" for n in read_as)
        ledger.drop(key, value, f"peftcli reads a turn's {name} from the key {names}; rename the key in the data")


def _roles(ledger: Ledger, where: str, roles: Any) -> dict[str, str]:
    """Axolotl's {peftcli-ish role: [names in the data]} -> peftcli's {name in the data: role}."""
    mapped: dict[str, str] = {}
    for target, sources in (roles or {}).items():
        if target not in PEFTCLI_ROLES:
            ledger.drop(f"{where}.roles.{target}", sources, f"peftcli's roles are {', '.join(PEFTCLI_ROLES)}")
            continue
        for name in sources if isinstance(sources, list) else [sources]:
            if name != target:
                mapped[str(name)] = target
    return mapped


def _sharegpt(ledger: Ledger, where: str, entry: dict) -> tuple[dict, set[str]]:
    roles = {}
    for key, role in (("field_human", "user"), ("field_model", "assistant")):
        if entry.get(key):
            roles[entry[key]] = role
    if entry.get("conversation"):
        ledger.drop(f"{where}.conversation", entry["conversation"], "peftcli renders with data.chat_template")
    return {"format": "sharegpt", "roles": roles or None}, {"field_human", "field_model", "conversation"}


def _located(ledger: Ledger, where: str, entry: dict) -> list[dict]:
    """The entry's path (and data_files) as one source per file, with hub keys where it is a hub id."""
    path, files = entry["path"], entry.get("data_files")
    found = ledger.find(path)
    if files and found is not None and found.is_dir():
        return [{"path": ledger.for_recipe(found / name)} for name in (files if isinstance(files, list) else [files])]
    source, hub = hub_or_local(ledger, f"{where}.path", path, found)
    if files:
        ledger.drop(f"{where}.data_files", files, "peftcli reads a hub dataset whole; download the files instead")
    if not hub:
        for key in ("split", "name", "revision"):
            if entry.get(key) not in (None, "train"):
                ledger.drop(f"{where}.{key}", entry[key], "applies to hub datasets; this one is local")
        return [source]
    for key, target in (("split", "split"), ("name", "subset"), ("revision", "revision")):
        if entry.get(key) not in (None, "train"):
            source[target] = entry[key]
    return [source]
