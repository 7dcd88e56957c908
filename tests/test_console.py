"""What `peftcli train` shows while it works: a status line per loading phase, the loss of the step
each progress line names, every eval loss as it is computed, one final eval, and a summary block."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest
from helpers import base_recipe, read_json, write_recipe


def _progress(terminal: bool):
    from rich.console import Console

    from peftcli.training.progress import TrainingProgress

    console = Console(file=io.StringIO(), force_terminal=terminal, width=200)
    return TrainingProgress(console), console


def _state(max_steps: int):
    from transformers import TrainerState

    return TrainerState(max_steps=max_steps, global_step=0, is_world_process_zero=True)


def test_the_live_bar_shows_the_loss_of_the_step_it_names():
    """The loss of step N is logged after step N ends: the bar must never show step N with the loss
    of step N - 1."""
    from transformers import TrainerControl

    progress, _ = _progress(terminal=True)
    losses = {1: 2.5, 2: 1.75, 3: 1.125}
    state, args = _state(3), SimpleNamespace(logging_steps=1)
    progress.on_train_begin(args, state, TrainerControl())

    def assert_consistent():
        task = progress.progress.tasks[0]
        step = int(task.completed)
        assert task.fields["status"].startswith(f"loss {losses[step]:.4f}" if step else ""), (step, task.fields)
        return step

    try:
        for step, loss in losses.items():
            state.global_step = step
            control = TrainerControl(should_log=True)  # as DefaultFlowCallback sets it before us
            progress.on_step_end(args, state, control)
            assert_consistent()
            progress.on_log(args, state, control, logs={"loss": loss})
            assert assert_consistent() == step
    finally:
        progress.on_train_end(args, state, TrainerControl())


def test_each_eval_loss_is_printed_when_it_is_computed():
    from transformers import TrainerControl

    progress, console = _progress(terminal=False)
    state, args, control = _state(30), SimpleNamespace(logging_steps=1), TrainerControl()
    progress.on_train_begin(args, state, control)
    for step, loss in ((10, 1.5), (20, 1.25), (30, 1.3)):
        state.global_step = step
        progress.on_evaluate(args, state, control, metrics={"eval_loss": loss})
    progress.on_train_end(args, state, control)
    progress.on_evaluate(args, state, control, metrics={"eval_loss": 1.3})
    lines = [ln for ln in console.file.getvalue().splitlines() if "eval at" in ln]
    assert lines == [
        "eval at step 10: loss 1.5000 (best so far)",
        "eval at step 20: loss 1.2500 (best so far)",
        "eval at step 30: loss 1.3000 (best 1.2500)",
        "final eval at step 30: loss 1.3000 (best 1.2500)",
    ]


def _count_evaluations(monkeypatch) -> list[int]:
    """Wrap the trainer's `evaluate` of the next run; returns the steps it was called at."""
    from peftcli.training import run as stage

    real_build, calls = stage.build_trainer, []

    def build_counting(*args, **kwargs):
        trainer = real_build(*args, **kwargs)
        real_evaluate = trainer.evaluate

        def evaluate(*a, **k):
            calls.append(trainer.state.global_step)
            return real_evaluate(*a, **k)

        trainer.evaluate = evaluate
        return trainer

    monkeypatch.setattr(stage, "build_trainer", build_counting)
    return calls


def _lines(text: str, pattern: str) -> list[re.Match]:
    return [m for m in map(re.compile(pattern).match, text.splitlines()) if m]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("eval_steps", "evaluated_at"),
    [(4, [4, 8, 12]), (5, [5, 10, 12]), (None, [12])],
    ids=["divides-max-steps", "does-not-divide", "final-only"],
)
def test_train_console(cli, tiny_model, tmp_path, monkeypatch, eval_steps, evaluated_at):
    out = tmp_path / "run"
    training = {"max_steps": 12, "logging_steps": 1, "eval_steps": eval_steps}
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, out, training=training))
    calls = _count_evaluations(monkeypatch)

    result = cli("train", recipe)

    assert result.code == 0, result.err
    err, metrics = result.err, read_json(out / "metrics.json")
    # One eval per step evaluated: the final model is the one the trainer evaluated at step 12.
    assert calls == evaluated_at
    if eval_steps:
        assert metrics["eval_history"][-1] == {"step": 12, "eval_loss": metrics["eval_loss"]}

    # The loading phases are named, in order, before the first step.
    first_step = err.index("training: step 1/12")
    phases = ["loading libraries", "loading the tokenizer", "reading data", "loading the model (", "applying lora"]
    positions = [err.find(phase) for phase in phases]
    assert -1 not in positions and positions == sorted(positions) and positions[-1] < first_step, err

    # Every progress line shows the loss logged for the step it names.
    logged = {e["step"]: e["loss"] for e in metrics["loss_history"]}
    progress = _lines(err, r"training: step (\d+)/12\s+loss (\d+\.\d+)")
    assert [int(m[1]) for m in progress] == list(range(1, 13))
    for m in progress:
        assert float(m[2]) == pytest.approx(logged[int(m[1])], abs=5e-5)

    # Every eval loss, when computed; none twice.
    evals = _lines(err, r"(final )?eval at step (\d+): loss (\d+\.\d+)")
    assert [int(m[2]) for m in evals] == evaluated_at
    history = {e["step"]: e["eval_loss"] for e in metrics["eval_history"]}
    for m in evals:
        assert bool(m[1]) == (eval_steps is None)  # "final eval" only when the trainer did not evaluate
        assert float(m[3]) == pytest.approx(history.get(int(m[2]), metrics["eval_loss"]), abs=5e-5)
    assert float(evals[-1][3]) == pytest.approx(metrics["eval_loss"], abs=5e-5)

    # The summary block, after training: where the run is, and its figures.
    summary = err[err.rindex("trained 12 steps in") :]
    assert f"run dir      {out}" in summary
    assert f"adapter/     {out / 'adapter'}" in summary
    assert f"report       {out / 'report.md'}" in summary
    assert f"{metrics['train_tokens_per_s']:,.0f} tokens/s" in summary
    assert f"peak memory  {metrics['peak_memory_mb']:,.0f} MB" in summary
    assert f"train loss   {metrics['train_loss']:.4f}" in summary
    assert f"eval loss    {metrics['eval_loss']:.4f}" in summary
