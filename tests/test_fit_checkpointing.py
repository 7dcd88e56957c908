"""The fit estimate `validate` prints assumes the gradient checkpointing the run will use: the one
`auto` rule (model/speed.py) decides it, and the estimate takes that decision, never its own."""

from __future__ import annotations

import json

import pytest
from helpers import base_recipe, write_recipe

from peftcli.model.device import Gpu


def _validate(cli, tmp_path, tiny_model, monkeypatch, gpus: list[Gpu]) -> dict:
    import peftcli.model.device as device

    monkeypatch.setattr(device, "detect_gpus", lambda: gpus)
    recipe = base_recipe(tiny_model, tmp_path / "run")  # gradient_checkpointing: auto
    result = cli("validate", write_recipe(tmp_path / "r.yaml", recipe), "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_on_cpu_the_estimate_is_without_checkpointing_as_the_run(cli, tmp_path, tiny_model, monkeypatch):
    shown = _validate(cli, tmp_path, tiny_model, monkeypatch, gpus=[])
    assert shown["settings"]["gradient_checkpointing"] is False
    assert shown["settings"]["checkpointing_reason"] == "auto: off on CPU"
    assert shown["fit_estimate"]["checkpointing"] is False


@pytest.mark.parametrize(("free_gib", "expected"), [(80.0, False), (1.0, True)])
def test_on_a_gpu_the_estimate_follows_the_auto_decision(free_gib, expected, cli, tmp_path, tiny_model, monkeypatch):
    gpu = Gpu("Fake GPU", memory_gib=80.0, free_gib=free_gib, capability=(9, 0))
    shown = _validate(cli, tmp_path, tiny_model, monkeypatch, gpus=[gpu])
    assert shown["settings"]["gradient_checkpointing"] is expected
    assert shown["fit_estimate"]["checkpointing"] is expected


def test_the_estimate_needs_the_decision(tmp_path, tiny_model):
    from peftcli.model.checks import read_config
    from peftcli.model.size import estimate
    from peftcli.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run")))
    config = read_config(recipe.model)
    with pytest.raises(TypeError):
        estimate(recipe, config)  # no `auto` rule of its own to fall back on
    assert estimate(recipe, config, False).activations_gib > estimate(recipe, config, True).activations_gib
