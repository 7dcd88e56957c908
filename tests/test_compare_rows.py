"""A comparison row is read from the method's run through the run directory's typed reader
(rundir.metrics), so its figures are metrics.json's keys by their RunResult names."""

from __future__ import annotations

import json
import subprocess
from dataclasses import fields

from helpers import base_recipe, write_recipe

FIGURES = {
    "trainable_params": 1024,
    "total_params": 4096,
    "trainable_percent": 25.0,
    "peak_memory_mb": 321.5,
    "train_tokens_per_s": 1234.5,
    "train_runtime_s": 9.5,
    "train_loss": 1.25,
    "eval_loss": 1.5,
    "loss_history": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.25}],
    "device": "cpu",
}


def _recipe(tmp_path):
    from peftcli.recipe import load_recipe

    return load_recipe(write_recipe(tmp_path / "r.yaml", base_recipe(tmp_path / "model", tmp_path / "run")))


def _finished_run(monkeypatch, metrics) -> None:
    """`peftcli train` as compare runs it: a run directory with `metrics` and a 2 MiB adapter."""
    from peftcli.training import compare

    def train(*args):
        recipe_file = args[1]
        from peftcli.recipe import load_recipe

        run = load_recipe(recipe_file).run_dir
        (run / "adapter").mkdir(parents=True)
        (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 2 * 2**20)
        (run / "metrics.json").write_text(json.dumps(metrics))
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(compare, "_peftcli", train)


def test_a_row_holds_the_runs_figures(tmp_path, monkeypatch):
    from peftcli.training.compare import _run_guarded

    recipe = _recipe(tmp_path)
    _finished_run(monkeypatch, {"status": "completed", "method": "lora", "extra_key": 1, **FIGURES})
    row = _run_guarded(tmp_path / "r.yaml", recipe, "lora")
    assert row["status"] == "completed" and row["artifact_mb"] == 2.0
    assert {key: row[key] for key in FIGURES} == FIGURES
    assert "extra_key" not in row


def test_a_figure_an_older_run_lacks_is_empty_and_unreadable_metrics_fail_the_row(tmp_path, monkeypatch):
    from peftcli.training.compare import _run_guarded

    recipe = _recipe(tmp_path)
    _finished_run(monkeypatch, {k: v for k, v in FIGURES.items() if k != "eval_loss"})
    assert _run_guarded(tmp_path / "r.yaml", recipe, "lora")["eval_loss"] is None
    (tmp_path / "run" / "adapter").rename(tmp_path / "old-adapter")
    _finished_run(monkeypatch, [1, 2])
    row = _run_guarded(tmp_path / "r.yaml", recipe, "lora")
    assert row["status"] == "failed" and "metrics.json is not a JSON object" in row["error"]


def test_every_figure_a_row_keeps_is_a_metrics_key():
    from peftcli.rundir.result import RunResult
    from peftcli.training.compare import KEPT_METRICS

    assert set(KEPT_METRICS) <= {item.name for item in fields(RunResult)}
