"""Search spaces: `--space KEY=SPEC`, where KEY is any recipe key and SPEC is a YAML list of choices
(`[4, 8, 16]`), `int(lo, hi)`, `float(lo, hi)` or `log(lo, hi)` (log-uniform; whole-number bounds
sample whole numbers). Every choice, and both ends and the inside of every range, is checked
against the recipe the way `--set` is before anything trains, so a wrong key or value is one
`error:` line naming it.

A trial's recipe is the recipe with the trial's values set as `--set` would set them. Searching
`peft.method` gives a trial whose method differs from the recipe's that method's defaults (as
`peftcli compare` does), plus the searched peft keys it takes, and that method's learning rate when
the recipe leaves training.learning_rate unset.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftcli.errors import UserError
from peftcli.methods import REGISTRY
from peftcli.recipe import Recipe
from peftcli.recipe.load import RawRecipe, apply_overrides, validate
from peftcli.recipe.schema import recipe_data
from peftcli.recipe.yaml_guard import YamlProblem, load_checked

FORMS = "a YAML list of choices like [4, 8, 16], int(lo, hi), float(lo, hi) or log(lo, hi)"
_RANGE = re.compile(r"^\s*(int|float|log)\s*\((.*)\)\s*$", re.DOTALL)
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
METHOD_KEY = "peft.method"
# Keys tune sets itself: each trial's run directory.
RESERVED = ("output.dir",)


@dataclass(frozen=True)
class Dimension:
    """One searched key: `choices` (categorical), or a range `kind` int | float | log from low to high."""

    key: str
    spec: str  # as the user wrote it
    kind: str  # choice | int | float | log
    choices: tuple = ()
    low: float = 0.0
    high: float = 0.0

    @property
    def whole(self) -> bool:
        """A range that samples whole numbers: int(...), or log(...) with whole-number bounds."""
        return self.kind == "int" or (self.kind == "log" and isinstance(self.low, int) and isinstance(self.high, int))

    def suggest(self, trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.whole:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.kind == "log")
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.kind == "log")

    def samples(self) -> list:
        """Values that stand for the whole dimension when it is checked: every choice, both ends, and a
        fraction inside a float range (a key that takes whole numbers only refuses it)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.whole:
            return [int(self.low), int(self.high)]
        inside = math.exp(math.log(self.low) * 0.63 + math.log(self.high) * 0.37) if self.kind == "log" else None
        inside = inside if inside is not None else self.low + (self.high - self.low) * 0.37
        return [float(self.low), float(self.high), inside]


def _number(text: Any) -> Any:
    """YAML reads `1e-4` (no dot) as a string; a recipe takes it as a number, and so does a space."""
    if isinstance(text, str) and _NUMBER.match(text.strip()):
        value = float(text)
        return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value
    return text


def parse_dimension(text: str) -> Dimension:
    key, sep, spec = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--space {text!r}: expected KEY=SPEC, e.g. --space peft.r=[4,8,16]", hint=f"SPEC is {FORMS}")
    parts = key.split(".")
    if any(not part.strip() for part in parts) or len(parts) < 2:
        raise UserError(f"--space {key}: expected a dotted recipe key such as training.learning_rate")
    if key in RESERVED:
        raise UserError(f"--space {key}: tune sets {key} itself (each trial's run directory is under --out)")
    problem = f"--space {key}: cannot read {spec.strip()!r} as a search space"
    ranged = _RANGE.match(spec)
    if ranged:
        kind, inner = ranged.group(1), ranged.group(2)
        bounds = [_number(b.strip()) for b in inner.split(",")]
        if len(bounds) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
            raise UserError(f"{problem}: {kind}(lo, hi) takes two numbers", hint=f"SPEC is {FORMS}")
        low, high = bounds
        if kind == "int" and not all(float(b).is_integer() for b in bounds):
            raise UserError(f"{problem}: int(lo, hi) takes whole numbers", hint="float(lo, hi) samples fractions")
        if not low < high:
            raise UserError(f"{problem}: the low end must be below the high end")
        if kind == "log" and low <= 0:
            raise UserError(f"{problem}: log(lo, hi) needs lo > 0", hint="float(lo, hi) samples a range with 0")
        return Dimension(key, spec.strip(), kind, low=low, high=high)
    try:
        parsed = load_checked(spec)[0] if spec.strip() else None
    except (YamlProblem, Exception):  # noqa: BLE001 - any YAML error is the same mistake here
        parsed = None
    if not isinstance(parsed, list):
        hint = "for one fixed value use --set" if parsed is not None else None
        raise UserError(f"{problem}; expected {FORMS}", hint=hint or f"quote the spec: --space '{key}=[4, 8]'")
    choices = [_number(choice) for choice in parsed]
    if not choices:
        raise UserError(f"{problem}: the list of choices is empty")
    if not all(choice is None or isinstance(choice, (bool, int, float, str)) for choice in choices):
        raise UserError(f"{problem}: choices are plain values (numbers, words, true/false, null)")
    if len({json.dumps(c) for c in choices}) != len(choices):
        raise UserError(f"{problem}: a choice is listed twice")
    return Dimension(key, spec.strip(), "choice", choices=tuple(choices))


def parse_space(texts: list[str]) -> list[Dimension]:
    if not texts:
        raise UserError(
            "tune needs at least one --space KEY=SPEC", hint=f"e.g. --space peft.r=[4,8,16]; SPEC is {FORMS}"
        )
    dims = [parse_dimension(text) for text in texts]
    seen: set[str] = set()
    for dim in dims:
        if dim.key in seen:
            raise UserError(f"--space {dim.key}: given twice; give each key once")
        seen.add(dim.key)
    return dims


def with_params(recipe: Recipe, params: dict[str, Any], out: Path | None = None, extra: dict | None = None) -> Recipe:
    """`recipe` with the searched values set as `--set` sets them (paths resolved against the current
    folder), `extra` keys on top (tune's own, e.g. eval_steps), and output.dir `out` if given.
    Raises the UserError of `--set`, without its file name."""
    method = params.get(METHOD_KEY)
    # Another method starts from its defaults, and from its own learning rate where the recipe left
    # it unset (as `compare` does); a searched training.learning_rate is set below either way.
    data = recipe_data(recipe, method if method in REGISTRY else recipe.peft.method)
    overrides = []
    for key, value in {**params, **(extra or {})}.items():
        if key == METHOD_KEY:
            overrides.append(f"{key}={json.dumps(value)}")
        elif not (method is not None and key.startswith("peft.") and not _method_takes(method, key)):
            overrides.append(f"{key}={json.dumps(value)}")
    if out is not None:
        data.setdefault("output", {})["dir"] = str(out)
    raw = RawRecipe(data=data, path=Path("space"))
    apply_overrides(raw, overrides, Path.cwd())
    raw.overridden.clear()  # the message names the key; "(from --set)" would point at the wrong flag
    try:
        return validate(raw)
    except UserError as exc:
        raise UserError(exc.message.removeprefix("space: "), hint=exc.hint) from None


def _method_takes(method: Any, key: str) -> bool:
    """Whether peft.method `method` has the key `peft.<name>` (a key another searched method takes is skipped)."""
    return method in REGISTRY and key.split(".", 1)[1].split(".")[0] in REGISTRY[method].keys()


def skipped_keys(params: dict[str, Any]) -> list[str]:
    """Searched peft keys a trial's method does not take (they were sampled, but not set)."""
    method = params.get(METHOD_KEY)
    if method is None:
        return []
    return [k for k in params if k.startswith("peft.") and k != METHOD_KEY and not _method_takes(method, k)]


def check_space(recipe: Recipe, dims: list[Dimension]) -> None:
    """Every value a dimension stands for, set on the recipe alone (a peft key with each searched
    method that takes it): a wrong key or value is refused now, naming it, not after hours of trials."""
    methods = next((list(d.choices) for d in dims if d.key == METHOD_KEY and d.kind == "choice"), None)
    for dim in dims:
        if dim.key == METHOD_KEY and dim.kind != "choice":
            raise UserError(f"--space {METHOD_KEY}: a method is a choice, e.g. --space {METHOD_KEY}=[lora,dora]")
        for value in dim.samples():
            contexts: list[dict[str, Any]] = [{}]
            if methods is not None and dim.key.startswith("peft.") and dim.key != METHOD_KEY:
                contexts = [{METHOD_KEY: m} for m in methods if _method_takes(m, dim.key)] or [{}]
            for context in contexts:
                try:
                    with_params(recipe, {**context, dim.key: value})
                except UserError as exc:
                    detail = exc.message.removeprefix(f"{dim.key}: ")
                    if dim.kind != "choice" and value not in (dim.low, dim.high):
                        detail += f"; {dim.spec} samples fractions: use int(lo, hi) for whole numbers"
                    raise UserError(f"--space {dim.key}={dim.spec}: value {value!r}: {detail}", hint=exc.hint) from None
