"""The private library methods peftcli overrides still exist in the installed versions: a bump that
renames one fails here, naming it, instead of silently falling back to the library's pickles."""

from __future__ import annotations

import inspect

import pytest

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
