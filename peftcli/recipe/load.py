"""Reading a recipe: YAML (safe loader, duplicate keys refused), `--set` overrides, path resolution,
validation, and pydantic errors turned into one readable line that names the key and its line.

Relative paths written in a recipe file resolve against the recipe's folder, so a recipe runs the
same from any working directory; paths given with `--set` resolve against the current directory,
where the user typed them.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from peftcli.errors import UserError
from peftcli.recipe.files import human_size, read_capped, special_kind
from peftcli.recipe.schema import BUILTIN_TEMPLATES, Recipe
from peftcli.recipe.yaml_guard import YamlProblem, load_checked
from peftcli.redact import redact

# Suffixes that mark a string as a local file even when it does not exist (so the user gets
# "file not found" instead of a hub lookup).
_LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".jinja", ".yaml", ".yml")
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few KB; anything near this is the wrong file


@dataclass
class RawRecipe:
    """The recipe as plain data, plus where each key came from (for error messages)."""

    data: dict[str, Any]
    path: Path
    lines: dict[tuple[str, ...], int] = field(default_factory=dict)
    overridden: set[tuple[str, ...]] = field(default_factory=set)


def _line_index(node, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Map each key path to its 1-based line in the file, so errors can point at it."""
    index: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, str(key_node.value))
            index[path] = key_node.start_mark.line + 1
            index.update(_line_index(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            index.update(_line_index(item, (*prefix, str(i))))
    return index


def _recipe_bytes(path: Path) -> bytes:
    """The file's bytes; only a regular file of at most MAX_RECIPE_BYTES is read (a FIFO or a device
    would block or never end)."""
    kind = special_kind(path)
    if kind == "a directory":
        raise UserError(f"{path} is a directory, not a recipe file")
    if kind is not None:
        raise UserError(
            f"{path} is {kind}, not a regular file", hint="a recipe is a YAML file; save it to a file first"
        )
    try:
        data = read_capped(path, MAX_RECIPE_BYTES)
    except FileNotFoundError:
        raise UserError(
            f"recipe file not found: {path}", hint="check the path, or run `peftcli init` for a starter"
        ) from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from None
    if data is None:
        raise UserError(
            f"{path} is {human_size(path.stat().st_size)}; a recipe is a small YAML file (at most "
            f"{human_size(MAX_RECIPE_BYTES)})",
            hint="is this the right file? data goes in files that data.train names, not in the recipe",
        )
    return data


def read_yaml(path: Path) -> RawRecipe:
    try:
        text = _recipe_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not a UTF-8 text file (byte {exc.start})", hint="a recipe is a YAML text file"
        ) from None
    try:
        data, node = load_checked(text)
    except YamlProblem as exc:
        raise UserError(exc.where(f"{path}: "), hint=exc.hint) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        # The parser notices a missing ] or " where it gives up; the context says where it began.
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and start and mark and start.line != mark.line:
            problem += f" ({context} that starts at line {start.line + 1})"
        raise UserError(
            f"{path}: YAML syntax error at {where}{problem}", hint="check indentation and quoting"
        ) from None
    if data is None:
        raise UserError(f"{path}: the recipe is empty", hint="it needs at least model.name and data.train")
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: a recipe is a mapping of sections (model, peft, data, ...), not a {type(data).__name__}",
        )
    return RawRecipe(data=data, path=path, lines=_line_index(node))


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`a.b=c` -> (("a", "b"), c) with c parsed as YAML, so numbers, lists and null work."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set training.learning_rate=1e-4")
    parts = tuple(p.strip() for p in key.strip().split("."))
    if any(not p for p in parts):
        raise UserError(f"--set {key!r}: empty key part; use dotted keys like training.batch_size")
    try:
        parsed = load_checked(value)[0] if value.strip() else None
    except YamlProblem as exc:  # the same bounds as a recipe file: a value is a small YAML document
        raise UserError(f"--set {key}: {exc.message}", hint=exc.hint) from None
    except yaml.YAMLError:
        raise UserError(
            f"--set {key}: cannot parse the value as YAML", hint="quote strings that contain ':' or '#'"
        ) from None
    return parts, parsed


def apply_overrides(raw: RawRecipe, overrides: list[str], cwd: Path) -> None:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw.data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise UserError(f"--set {'.'.join(parts)}: '{where}' is a value, not a section")
            node = child
        node[parts[-1]] = _resolve_paths_at(parts, value, cwd)
        raw.overridden.add(parts)


# --- paths -------------------------------------------------------------------------------------


# A hub id: "name" or "org/name" (letters, digits, '-', '_', '.'), nothing more.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _localize(value: Any, base: Path, always: bool = False, key: str = "") -> Any:
    """Make a local path absolute (against `base`); leave hub ids ("org/name") alone.

    After this, every local path in a recipe is absolute and anything relative is a hub id. The
    libraries look a relative id up in the working directory first, so a name that is not next to
    the recipe but is in the working directory is refused instead of loaded from there."""
    if not isinstance(value, str) or not value.strip():
        return value  # validation names the key of an empty path
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return os.path.normpath(expanded)
    candidate = base / expanded
    if candidate.exists():
        return str(candidate.resolve())
    looks_local = always or value.startswith((".", "~")) or value.endswith(_LOCAL_SUFFIXES)
    if looks_local or any(ch in value for ch in "*?[") or not _HUB_ID.match(value):
        return os.path.normpath(str(candidate))  # reported as "not found" where it is used
    # transformers looks an id up as a folder; datasets as a file or folder
    shadowed = Path(value).is_dir() if key.startswith("model.") else Path(value).exists()
    if shadowed and Path.cwd().resolve() != base.resolve():
        raise UserError(
            f"{key or 'a path'}: '{value}' is not next to the recipe (no {candidate}), but the current directory "
            "has one",
            hint="write the path relative to the recipe file, or absolute (a hub id would be looked up there too)",
        )
    return value


def _localize_sources(value: Any, base: Path, key: str) -> Any:
    if isinstance(value, list):
        return [_localize_sources(item, base, key) for item in value]
    if isinstance(value, dict) and "path" in value:
        return {**value, "path": _localize(value["path"], base, key=key)}
    return _localize(value, base, key=key)


def _resolve_paths_at(parts: tuple[str, ...], value: Any, base: Path, skip: frozenset[str] = frozenset()) -> Any:
    """Resolve `value` if the key at `parts` holds a path (or a section containing paths); keys in
    `skip` (about to be replaced by --set) are left alone."""
    key = ".".join(parts)
    if key in skip:
        return value
    if len(parts) == 1 and isinstance(value, dict):
        return {k: _resolve_paths_at((parts[0], k), v, base, skip) for k, v in value.items()}
    if key in ("model.name", "model.tokenizer"):
        return _localize(value, base, key=key)
    if key in ("data.train", "data.eval"):
        return _localize_sources(value, base, key)
    if key == "data.chat_template" and isinstance(value, str) and value not in ("auto", *BUILTIN_TEMPLATES):
        return _localize(value, base, always=True)
    if key in ("output.dir", "eval.reference"):
        return _localize(value, base, always=True)
    return value


def resolve_recipe_paths(raw: RawRecipe, skip: frozenset[str] = frozenset()) -> None:
    base = raw.path.resolve().parent
    for section, body in list(raw.data.items()):
        if isinstance(section, str):
            raw.data[section] = _resolve_paths_at((section,), body, base, skip)


# --- validation and error messages -------------------------------------------------------------


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the keys at `loc` (for 'did you mean' suggestions)."""
    from peftcli.methods import REGISTRY

    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if model is Recipe and part == "peft":
            return None
        field = getattr(model, "model_fields", {}).get(part) if isinstance(model, type) else None
        if field is None:
            if part in REGISTRY:  # discriminated union branch
                model = REGISTRY[part].spec
                continue
            return None
        model = _unwrap_model(field.annotation)
        if model is None:
            return None
    return model


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _describe(error: dict, raw: RawRecipe) -> str:
    from peftcli.methods import DEFAULT_METHOD, REGISTRY

    loc = tuple(error["loc"])
    kind = error["type"]
    # Drop the discriminator tag pydantic inserts for the peft union: peft.ia3.alpha -> peft.alpha
    method = None
    if loc and loc[0] == "peft":
        peft = raw.data.get("peft")
        method = peft.get("method", DEFAULT_METHOD) if isinstance(peft, dict) else None
        if len(loc) >= 2 and loc[1] in REGISTRY:
            loc = (loc[0], *loc[2:])
    key = _dotted(loc)
    path = tuple(str(p) for p in loc)
    line = raw.lines.get(path)
    from_set = any(path[:n] in raw.overridden for n in range(1, len(path) + 1))
    origin = " (from --set)" if from_set else ""
    where = f"line {line}: " if line and not origin else ""

    if kind == "extra_forbidden":
        name = str(loc[-1])
        parent = loc[:-1]
        if method in REGISTRY and len(loc) == 2:
            return _wrong_method_keys(method, [name], where, origin)
        owner = _model_at(parent) if parent else Recipe
        valid = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        section = f"section '{_dotted(parent)}'" if parent else "the recipe (top level)"
        what = "unknown section" if not parent else "unknown key"
        guess = f"; did you mean '{close[0]}'?" if close else (f"; valid keys: {', '.join(valid)}" if valid else "")
        return f"{where}{key}{origin}: {what} '{name}' in {section}{guess}"
    if kind == "union_tag_invalid":
        given = error.get("input", {}).get("method") if isinstance(error.get("input"), dict) else None
        close = difflib.get_close_matches(str(given), list(REGISTRY), n=1)
        guess = f"; did you mean '{close[0]}'?" if close else ""
        line = raw.lines.get(("peft", "method"))
        where = f"line {line}: " if line else ""
        return f"{where}peft.method: unknown method '{given}'{guess} (methods: {', '.join(REGISTRY)})"
    if kind == "missing":
        return f"{key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if not loc:
        return message
    given = error.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {_shown(given)})"
    return f"{where}{key}{origin}: {message}{shown}"


def _shown(value: Any) -> str:
    """A value as the recipe wrote it, clipped: a megabyte-long value must not make a megabyte-long line."""
    text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"


def _wrong_method_keys(method: str, names: list[str], where: str = "", origin: str = "") -> str:
    from peftcli.methods import REGISTRY

    keys = list(REGISTRY[method].keys())
    takes = f"{method} takes: {', '.join(keys)}" if keys else f"{method} takes no keys"
    if len(names) == 1:
        close = difflib.get_close_matches(names[0], keys, n=1, cutoff=0.6)
        guess = f"did you mean '{close[0]}'? " if close else ""
        return f"{where}peft.{names[0]}{origin}: '{names[0]}' is not a key of peft.method '{method}'; {guess}{takes}"
    quoted = ", ".join(f"'{n}'" for n in names)
    # Usually the previous method's keys, left after switching with --set peft.method=...
    switch = f" (to switch on the command line, replace the section: --set 'peft={{method: {method}}}')"
    return f"peft: {quoted} are not keys of peft.method '{method}'; {takes}{switch}"


def _group_method_keys(errors: list[Any], raw: RawRecipe) -> list[Any]:
    """Several unknown keys of one method (say, LoRA keys left after switching to ia3) become one line."""
    from peftcli.methods import DEFAULT_METHOD, REGISTRY

    peft = raw.data.get("peft")
    method = peft.get("method", DEFAULT_METHOD) if isinstance(peft, dict) else DEFAULT_METHOD
    wrong = [
        e
        for e in errors
        if e["type"] == "extra_forbidden"
        and e["loc"][0] == "peft"
        and len(e["loc"]) == (3 if e["loc"][1] in REGISTRY else 2)
    ]
    if len(wrong) < 2 or method not in REGISTRY:
        return errors
    grouped = _wrong_method_keys(method, [str(e["loc"][-1]) for e in wrong])
    return [grouped] + [e for e in errors if e not in wrong]


def validate(raw: RawRecipe) -> Recipe:
    try:
        return Recipe.model_validate(raw.data)
    except ValidationError as exc:
        errors = _group_method_keys(exc.errors(include_url=False), raw)
        lines = [e if isinstance(e, str) else _describe(e, raw) for e in errors]
        more = f" (and {len(lines) - 1} more: {'; '.join(lines[1:])})" if len(lines) > 1 else ""
        raise UserError(f"{raw.path.name}: {lines[0]}{more}", hint="`peftcli schema` lists every key") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None, cwd: Path | None = None) -> Recipe:
    """Read, override, resolve paths and validate a recipe. Raises UserError with one clear line."""
    raw = read_yaml(Path(path))
    # A value --set replaces is not resolved first (it may be the very path the override fixes).
    replaced = frozenset(".".join(parse_override(text)[0]) for text in overrides or [])
    resolve_recipe_paths(raw, skip=replaced)
    apply_overrides(raw, overrides or [], cwd or Path.cwd())
    recipe = validate(raw)
    if recipe.output.dir is None:
        recipe.output.dir = str((cwd or Path.cwd()) / "runs" / Path(path).stem)
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, with any hub token redacted (see redact.py)."""
    return redact(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True))
