"""The private library methods peftcli overrides or calls still exist in the installed versions: a
bump that renames one fails here, naming it, instead of silently falling back to the library's
pickles (or failing in the middle of a run). docs/dependencies.md lists each."""

from __future__ import annotations

import ast
import importlib
import inspect

import pytest
from helpers import ROOT

OVERRIDDEN = [
    "_save_checkpoint",
    "_get_output_dir",
    "_save_optimizer_and_scheduler",
    "_load_optimizer_and_scheduler",
    "_save_rng_state",
    "_load_rng_state",
    "_save_scaler",
    "_load_scaler",
    "_save",
]
# Private Trainer methods peftcli calls without overriding them.
CALLED = [
    "_load_from_checkpoint",  # load_final_checkpoint: a last-step checkpoint's weights, without training
]
# typer's internals that peftcli/cli/__init__.py reaches: (module, attribute path).
TYPER_INTERNALS = [
    ("typer._click.exceptions", "ClickException"),  # its vendored click's usage errors become `error:` lines
    ("typer.core", "TyperOption.display_type_rich"),  # patched so that flags show no type in --help
]


def test_every_private_trainer_method_peftcli_overrides_is_listed():
    from peftcli.training.checkpoints import SafeCheckpoints

    ours = {name for name, _ in inspect.getmembers(SafeCheckpoints, inspect.isfunction)}
    from transformers import Trainer

    overriding = {
        name for name in ours if name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)
    }
    assert overriding == set(OVERRIDDEN), "update OVERRIDDEN and docs/dependencies.md"


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_the_installed_trainer_still_has(name):
    from transformers import Trainer

    assert callable(getattr(Trainer, name, None)), f"transformers.Trainer.{name} is gone: see docs/dependencies.md"


def _private_trainer_attributes_used() -> set[str]:
    """Every `x._name` in peftcli's source where `_name` is a private attribute of TRL's SFTTrainer
    (transformers' Trainer included)."""
    from trl import SFTTrainer

    used = set()
    for path in (ROOT / "peftcli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = getattr(node, "attr", "") if isinstance(node, ast.Attribute) else ""
            if name.startswith("_") and not name.startswith("__") and hasattr(SFTTrainer, name):
                used.add(name)
    return used


def test_every_private_trainer_method_peftcli_calls_is_listed():
    unlisted = _private_trainer_attributes_used() - set(OVERRIDDEN) - set(CALLED)
    assert not unlisted, f"peftcli uses {sorted(unlisted)}: add them to CALLED and docs/dependencies.md"


@pytest.mark.parametrize("name", CALLED)
def test_the_installed_trainer_still_has_what_peftcli_calls(name):
    from transformers import Trainer

    assert callable(getattr(Trainer, name, None)), f"transformers.Trainer.{name} is gone: see docs/dependencies.md"


@pytest.mark.parametrize(("module", "attribute"), TYPER_INTERNALS)
def test_the_installed_typer_still_has(module, attribute):
    value = importlib.import_module(module)
    for part in attribute.split("."):
        value = getattr(value, part, None)
    assert value is not None, f"{module}.{attribute} is gone from typer: see docs/dependencies.md"


def test_every_pinned_private_name_is_in_the_dependencies_doc():
    doc = (ROOT / "docs" / "dependencies.md").read_text(encoding="utf-8")
    names = [*OVERRIDDEN, *CALLED, *(attribute.rsplit(".", 1)[-1] for _, attribute in TYPER_INTERNALS)]
    assert not [name for name in names if f"`{name}`" not in doc]
