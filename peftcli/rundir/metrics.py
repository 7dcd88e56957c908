"""metrics.json: a RunResult's fields, by name and in order (the keys are public: scripts read them),
and a RunResult read back from one (eval adds its section to an existing run's report)."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from dataclasses import MISSING, fields
from pathlib import Path

from peftcli.recipe import Recipe
from peftcli.redact import redact
from peftcli.rundir.io import atomic_write_text
from peftcli.rundir.layout import METRICS
from peftcli.rundir.result import DataReport, RunResult

PACKAGES = ("peftcli", "torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def to_metrics(result: RunResult) -> dict:
    out = {}
    for item in fields(result):
        if item.metadata.get("metric", True):
            value = getattr(result, item.name)
            out[item.name] = value.as_json() if isinstance(value, DataReport) else value
    return out


def from_metrics(metrics: dict, recipe: Recipe, run_dir: Path) -> RunResult:
    """A RunResult from metrics.json; keys an older peftcli did not write take their defaults."""
    known = {item.name: item for item in fields(RunResult)}
    values = {k: v for k, v in metrics.items() if k in known}
    values["data"] = DataReport.from_json(metrics.get("data") or {})
    for name, item in known.items():  # figures a run written by an older peftcli lacks
        no_default = item.default is MISSING and item.default_factory is MISSING
        if name not in values and item.metadata.get("metric", True) and no_default:
            values[name] = None
    return RunResult(recipe=recipe, run_dir=run_dir, **values)


def read_metrics(run_dir: Path, recipe: Recipe) -> RunResult:
    """The RunResult in a run's metrics.json (as `recipe` trained it). Raises OSError or ValueError
    when the file is missing or not a JSON object."""
    metrics = json.loads((run_dir / METRICS).read_text(encoding="utf-8"))
    if not isinstance(metrics, dict):
        raise ValueError(f"{run_dir / METRICS} is not a JSON object")
    return from_metrics(metrics, recipe, run_dir)


def write_metrics(result: RunResult) -> None:
    atomic_write_text(result.run_dir / METRICS, redact(json.dumps(to_metrics(result), indent=2)) + "\n")
