"""The bookkeeping every conversion shares: which keys of the other tool's config were carried into
the recipe, which were not (and why), which were changed or filled with that tool's default, and the
recipe text with all of that at its top.

Nothing is dropped silently: every key a converter does not take explicitly is listed as not carried
when the conversion ends (`leftovers`), so a key added to Axolotl or LLaMA-Factory next year shows up
in the list instead of vanishing.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from peftcli.errors import UserError
from peftcli.methods import REGISTRY
from peftcli.recipe.files import human_size, read_capped, special_kind
from peftcli.recipe.schema import DataSection, ModelSection, OutputSection, QuantizationSection, TrainingSection
from peftcli.recipe.yaml_guard import YamlProblem, load_checked
from peftcli.redact import REDACTED, redact

MAX_CONFIG_BYTES = 1 << 20  # a training config is a few KB
MAX_INFO_BYTES = 16 << 20  # dataset_info.json files run to tens of KB; this leaves room for big ones
# Key names whose values are credentials (hf_hub_token, wandb_api_key, ...): listed, never shown.
_SECRET_WORDS = ("api_key", "secret", "password")
_SHOWN_CHARS = 70  # a value longer than this is cut in the lists (the config has it whole)
# What YAML takes for the end of a line (PyYAML: NEL, LS and PS too); replaced inside comments.
_LINE_BREAKS = re.compile("[\r\n\x85\u2028\u2029]")
# Recipe sections in the order `peftcli init` writes them.
_SECTIONS = ("model", "quantization", "peft", "data", "training", "eval", "output")
# Each section's schema with the least it needs, so that one key can be checked on its own.
_SCHEMAS: dict[str, tuple[type[BaseModel], dict[str, Any]]] = {
    "model": (ModelSection, {"name": "m"}),
    "quantization": (QuantizationSection, {"bits": 4}),
    "data": (DataSection, {"train": "t"}),
    "training": (TrainingSection, {}),
    "output": (OutputSection, {}),
}


def read_config(path: Path, what: str = "config") -> dict[str, Any]:
    """The other tool's YAML (or JSON) config as a mapping; a UserError names the file otherwise."""
    text = _read_text(path, what, MAX_CONFIG_BYTES)
    try:
        data, _ = load_checked(text)
    except YamlProblem as exc:
        raise UserError(exc.where(f"{path}: "), hint=exc.hint) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: YAML syntax error{where}", hint="check indentation and quoting") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def read_json(path: Path, what: str) -> Any:
    text = _read_text(path, what, MAX_INFO_BYTES)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a {what}") from None


def _read_text(path: Path, what: str, limit: int) -> str:
    kind = special_kind(path)
    if kind is not None:
        raise UserError(f"{path} is {kind}, not a {what} file")
    try:
        data = read_capped(path, limit)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}", hint="check the path (relative to this directory)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if data is None:
        raise UserError(f"{path} is {human_size(path.stat().st_size)}; is this the {what}?")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a UTF-8 text file (byte {exc.start})") from None


def shown(key: str, value: Any) -> str:
    """`value` on one short line for the lists; credentials are never shown."""
    if key.lower().endswith("token") or any(word in key.lower() for word in _SECRET_WORDS):
        return REDACTED
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else value
    text = redact(" ".join(text.split()))
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _root(key: str) -> str:
    """The top-level config key of a listed key: `datasets[0].type` -> `datasets`."""
    return key.split(".")[0].split("[")[0]


def is_empty(value: Any) -> bool:
    """YAML's `key:` with nothing after it (and "" or []): a setting left at the tool's default."""
    return value is None or value == "" or value == [] or value == {}


def full_finetune_method() -> str:
    """The method that trains every weight, which Axolotl runs when a config names no adapter. Found
    through the registry's facts (saves the full model, takes no key that narrows what trains), so
    no module outside methods/ names a method."""
    return next(m.name for m in REGISTRY.values() if m.saves_full_model and not m.keys())


@dataclass
class Ledger:
    """One conversion: the config read so far, the recipe being built, and what happened to each key."""

    tool: str  # "Axolotl" or "LLaMA-Factory", as the lists name it
    config: dict[str, Any]
    origin: Path  # the config file (or dataset_info.json for --data-only)
    out: Path | None  # where the recipe will be written; None: printed
    recipe: dict[str, Any] = field(default_factory=lambda: {s: {} for s in _SECTIONS})
    carried: int = 0
    not_carried: list[tuple[str, str, str]] = field(default_factory=list)  # (key, value shown, why)
    changed: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    same: list[str] = field(default_factory=list)  # set to what peftcli does anyway
    notes: list[str] = field(default_factory=list)  # said on stderr only (e.g. a data file not found yet)
    local_model: Path | None = None  # the base model's folder, when it is one here
    carried_keys: set[str] = field(default_factory=set)  # top-level config keys that reached the recipe
    _seen: set[str] = field(default_factory=set)  # keys a converter read
    _said: set[str] = field(default_factory=set)  # keys carried or named in one of the lists
    _from: dict[str, str] = field(default_factory=dict)  # recipe key -> the config key it came from

    # --- reading the config -------------------------------------------------------------------
    def take(self, key: str, default: Any = None) -> Any:
        """The value of a top-level key (marked as read), or `default` when absent or empty."""
        self._seen.add(key)
        value = self.config.get(key)
        if key in self.config and is_empty(value) and key not in self._said:
            self.empty.append(key)
            self._said.add(key)
        return default if is_empty(value) else value

    def given(self, key: str) -> bool:
        return not is_empty(self.config.get(key))

    # --- building the recipe ------------------------------------------------------------------
    def put(self, dotted: str, value: Any) -> None:
        section, _, key = dotted.partition(".")
        self.recipe[section][key] = value

    def get(self, dotted: str) -> Any:
        section, _, key = dotted.partition(".")
        return self.recipe[section].get(key)

    def remove(self, dotted: str) -> Any:
        section, _, key = dotted.partition(".")
        return self.recipe[section].pop(key, None)

    def carry(self, key: str, dotted: str, value: Any) -> bool:
        """`key` of the config becomes `dotted` in the recipe, when peftcli accepts the value there
        (else it is listed as not carried, with peftcli's reason)."""
        problem = self.problem(dotted, value)
        if problem:
            self.drop(key, value, f"{dotted} {problem}")
            return False
        self.put(dotted, value)
        self.mark(key)
        self._from[dotted] = key
        return True

    def mark(self, key: str) -> None:
        """`key` reached the recipe (put there by the caller)."""
        self.carried += 1
        self.carried_keys.add(_root(key))
        self._said.add(_root(key))

    def retract(self, dotted: str, why: str) -> None:
        """Take back a carried key that conflicts with another one (peftcli would refuse the pair)."""
        value = self.remove(dotted)
        self.carried -= 1
        key = self._from.pop(dotted, dotted)
        if not any(origin == key for origin in self._from.values()):
            self.carried_keys.discard(_root(key))
        self.drop(key, self.config.get(key, value), why)

    def problem(self, dotted: str, value: Any) -> str | None:
        """What the schema says against `value` at `dotted`, checked on its own; None when it fits."""
        section, _, key = dotted.partition(".")
        schema: type[BaseModel]
        if section == "peft":
            method = self.recipe["peft"]["method"]
            schema, base = REGISTRY[method].spec, {"method": method}
        else:
            schema, base = _SCHEMAS[section]
        try:
            schema.model_validate({**base, key: value})
        except ValidationError as exc:
            return "refuses it: " + exc.errors(include_url=False)[0]["msg"].lower()
        return None

    def drop(self, key: str, value: Any, why: str) -> None:
        self._seen.add(_root(key))
        self._said.add(_root(key))
        self.not_carried.append((key, shown(key, value), why))

    def change(self, text: str, key: str | None = None) -> None:
        """A value carried in another form; `key`: the config key it came from (default: the text's first word)."""
        self.changed.append(text)
        self._said.add(_root(key or text.split(":")[0]))

    def also(self, text: str, key: str) -> None:
        """`key` needs no recipe key: its value is what peftcli does anyway."""
        self.same.append(text)
        self._said.add(_root(key))

    def fill(self, key: str, value: Any, dotted: str) -> None:
        """The config leaves `key` out: write the other tool's default, which differs from peftcli's."""
        self.put(dotted, value)
        self.filled.append(f"{key}: {shown(key, value)} -> {dotted}")
        self._said.add(key)

    def leftovers(self, reasons: dict[str, str], default_reason: str, same: dict[str, Any]) -> None:
        """Name every key of the config that is not named yet. One no converter read: not carried
        (or, set to what peftcli does anyway, `same`, as needing no key). One a converter read and
        neither carried nor listed (a `false` flag, a default): as needing no key."""
        for key, value in self.config.items():
            if key in self._said:
                continue
            if is_empty(value):
                self.empty.append(key)
                self._said.add(key)
            elif key in self._seen or same.get(key, object()) == value:
                self.also(f"{key}: {shown(key, value)}", key)
            else:
                self.drop(key, value, reasons.get(key, default_reason))

    # --- peft keys, checked against the chosen method's own keys ---------------------------------
    def peft_key(self, key: str, peft_key: str, value: Any) -> bool:
        method = self.recipe["peft"]["method"]
        if peft_key in REGISTRY[method].keys():
            return self.carry(key, f"peft.{peft_key}", value)
        self.drop(key, value, f"peft.method {method} has no key {peft_key}")
        return False

    # --- paths ------------------------------------------------------------------------------
    def find(self, value: str, bases: list[Path] | None = None) -> Path | None:
        """The local file or folder `value` names, looked up against `bases` (default: the config's
        folder, then the current directory); None when it is nowhere (a hub id, or not there yet)."""
        expanded = Path(os.path.expanduser(value))
        if expanded.is_absolute():
            return expanded if expanded.exists() else None
        for base in bases if bases is not None else [self.origin.parent, Path.cwd()]:
            if (base / expanded).exists():
                return (base / expanded).resolve()
        return None

    def for_recipe(self, path: Path) -> str:
        """A local path as the recipe should hold it: relative to the recipe's folder (recipes resolve
        paths against their own folder), or absolute when the recipe is printed."""
        target = os.path.realpath(path)
        if self.out is None:
            return target
        try:
            return os.path.relpath(target, os.path.dirname(os.path.realpath(self.out)))
        except ValueError:  # another drive (Windows): no relative path leads there
            return target

    # --- the result -----------------------------------------------------------------------------
    def sections(self) -> dict[str, Any]:
        return {name: body for name, body in self.recipe.items() if body}

    def header(self, command: str, data_only: bool = False) -> list[str]:
        name = self.out.name if self.out is not None else "recipe.yaml"
        if data_only:
            lines = [
                f"# A peftcli data: section converted by `{command}` from {self.origin.name} ({self.tool}).",
                "# Paste it into a recipe (relative paths resolve against the recipe's folder).",
            ]
        else:
            lines = [
                f"# A peftcli recipe converted by `{command}` from {self.origin.name} ({self.tool}).",
                f"# Check it: peftcli validate {name}; see the data as the model will: peftcli data preview {name}.",
                "# Relative paths resolve against this file's folder.",
            ]
        if self.not_carried:
            lines += ["#", f"# NOT CARRIED OVER ({len(self.not_carried)}): peftcli has no equivalent, or it differs:"]
            lines += [f"#   {key}: {value}  -- {why}" for key, value, why in self.not_carried]
        if self.changed:
            lines += ["#", "# CHANGED ON THE WAY:"] + [f"#   {text}" for text in self.changed]
        if self.filled:
            lines += ["#", f"# FILLED WITH {self.tool.upper()}'S DEFAULTS (the config leaves them out):"]
            lines += [f"#   {text}" for text in self.filled]
        if self.same:
            lines += ["#", f"# WHAT PEFTCLI DOES ANYWAY (no key needed): {', '.join(self.same)}"]
        if self.empty:
            lines += ["#", f"# EMPTY IN THE CONFIG (nothing to carry): {', '.join(self.empty)}"]
        return [_LINE_BREAKS.sub(" ", line) for line in lines]  # a key or value with a line break stays a comment

    def text(self, command: str, data_only: bool = False) -> str:
        body = {"data": self.recipe["data"]} if data_only else self.sections()
        dumped = yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=100)
        return "\n".join([*self.header(command, data_only), "", dumped.rstrip("\n"), ""])

    def report_lines(self) -> list[tuple[str, str]]:
        """(label, line) for stderr: one line per key not carried, then the changes and notes."""
        lines = [("warning", f"not carried: {key}: {value} -- {why}") for key, value, why in self.not_carried]
        lines += [("note", f"changed: {text}") for text in self.changed]
        lines += [("note", f"filled with {self.tool}'s default: {text}") for text in self.filled]
        if self.same:
            lines.append(("note", f"what peftcli does anyway, no key needed: {', '.join(self.same)}"))
        if self.empty:
            lines.append(("note", f"empty in the config, nothing to carry: {', '.join(self.empty)}"))
        return lines + [("note", text) for text in self.notes]
