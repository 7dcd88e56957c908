"""The pictures a run leaves, checked on what matplotlib drew (titles, tick labels, bar labels, axis
limits), and the Markdown beside them: no raw control characters, no broken tables, no token.
Rendering takes about a second a picture, so those tests are in the slow lane."""

from __future__ import annotations

import re

import pytest
from helpers import base_recipe, write_recipe

# Control characters a Markdown file may not carry (newline is allowed, and tab is not needed).
RAW_CONTROLS = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


@pytest.fixture
def recipe(tmp_path):
    from peftcli.recipe import load_recipe

    return load_recipe(write_recipe(tmp_path / "r.yaml", base_recipe(tmp_path / "tiny-llama", tmp_path / "run")))


def run_result(recipe, steps: int = 4, **values):
    from peftcli.rundir.metrics import from_metrics

    metrics = {
        "status": "completed",
        "method": "lora",
        "base_model": recipe.model.name,
        "steps": steps,
        "epochs": 0.5,
        "trainable_params": 1024,
        "total_params": 150_000,
        "trainable_percent": 0.68,
        "train_loss": 2.5,
        "eval_loss": 2.75,
        "loss_history": [{"step": s, "loss": 4.0 - s / 2} for s in range(1, steps + 1)],
        "train_runtime_s": 3.2,
        "peak_memory_mb": 512.0,
        "peak_memory_kind": "cpu_rss",
        "train_tokens": 4000,
        "train_tokens_per_s": 1250.0,
        "tflops": 0.01,
        "world_size": 1,
        "settings": {"packing": False},
        "versions": {"peftcli": "test"},
        "device": "cpu",
        "dtype": "float32",
        "data": {"train": {"rows": 120}, "eval": {"rows": 30}},
        "adapter_is": "final",
        **values,
    }
    return from_metrics(metrics, recipe, recipe.run_dir)


def eval_result(base=(3.0, 0.2), tuned=(2.0, 0.4), generation=None, forgetting=None, predictions=()):
    from peftcli.rundir.result import EvalResult, Scores

    def scores(loss, accuracy):
        return Scores(loss=loss, perplexity=round(2.718**loss, 4), token_accuracy=accuracy, tokens=100)

    return EvalResult(
        run="/runs/demo",
        data="run eval data",
        examples=10,
        base=scores(*base),
        tuned=scores(*tuned),
        generation=generation,
        forgetting=forgetting,
        predictions=list(predictions),
    )


def drawn(fig):
    fig.canvas.draw()  # tick labels are filled in by drawing
    return fig.axes


def visible_ticks(ax) -> list[float]:
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticks() if low <= t <= high]


def bar_labels(ax) -> list[str]:
    return [text.get_text() for text in ax.texts]


@pytest.mark.slow
def test_loss_plot_has_a_title_labels_and_whole_step_ticks(recipe):
    from peftcli.rundir.report import loss_figure

    (ax,) = drawn(loss_figure(run_result(recipe, steps=4)))
    assert ax.get_title() == "lora on tiny-llama: 4 steps"
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "loss"
    ticks = visible_ticks(ax)
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


@pytest.mark.slow
def test_loss_plot_of_one_step_and_of_an_interrupted_run(recipe):
    from peftcli.rundir.report import loss_figure

    (ax,) = drawn(loss_figure(run_result(recipe, steps=1, status="interrupted")))
    assert ax.get_title() == "lora on tiny-llama: 1 step (interrupted)"
    assert all(float(t).is_integer() for t in visible_ticks(ax))


@pytest.mark.slow
def test_loss_plot_keeps_the_eval_points(recipe):
    from peftcli.rundir.report import loss_figure

    points = [{"step": 2, "eval_loss": 3.1}, {"step": 4, "eval_loss": 2.9}]
    (ax,) = drawn(loss_figure(run_result(recipe, eval_history=points)))
    assert [line.get_label() for line in ax.get_lines()] == ["train loss", "eval loss"]
    assert list(ax.get_lines()[1].get_xdata()) == [2, 4]


@pytest.mark.slow
def test_eval_plot_prints_values_and_which_way_is_better():
    from peftcli.rundir.eval_report import eval_figure
    from peftcli.rundir.result import Forgetting, GenerationScores

    generation = GenerationScores(
        examples=4,
        max_new_tokens=8,
        temperature=0.0,
        num_samples=1,
        base={"rouge_l": 0.25, "exact_match": 0.0},
        tuned={"rouge_l": 0.5, "exact_match": 0.0},
    )
    forgetting = Forgetting("/ref.txt", 3, 10.0, 11.0, 10.0, 5.0, True)
    axes = drawn(eval_figure(eval_result(generation=generation, forgetting=forgetting)))
    titles = [ax.get_title() for ax in axes]
    assert titles == [
        "eval loss\n(lower is better)",
        "token accuracy\n(higher is better)",
        "ROUGE-L\n(higher is better)",
        "exact match\n(higher is better)",
        "reference perplexity\n(lower is better)",
    ]
    assert bar_labels(axes[0]) == ["3", "2"] and bar_labels(axes[2]) == ["0.25", "0.5"]
    # exact match is 0 for both: an upright unit axis with its zeros printed, not an empty one around 0
    assert bar_labels(axes[3]) == ["0", "0"] and axes[3].get_ylim() == (0.0, 1.0)
    for ax in axes:
        low, high = ax.get_ylim()
        assert low == 0 and high > 0
        assert max(bar.get_height() for bar in ax.patches) <= high


@pytest.mark.slow
def test_compare_plot_overlays_every_methods_loss_curve(tmp_path):
    from peftcli.training.compare import figure

    def row(method, losses, **values):
        history = [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)]
        base = {"trainable_params": 100, "eval_loss": 1.0, "train_tokens_per_s": 50.0, "peak_memory_mb": 300.0}
        return {"method": method, "status": "completed", "loss_history": history, **base, **values}

    rows = [
        row("lora", [3.0, 2.5, 2.0]),
        row("ia3", [3.0, 2.9, 2.8], eval_loss=None, peak_memory_mb=0.0),
        {"method": "dora", "status": "failed", "error": "error: x", "wall_s": 1.0},
    ]
    curves, *bars = drawn(figure(rows))
    assert curves.get_title() == "training loss" and curves.get_xlabel() == "optimizer step"
    assert [line.get_label() for line in curves.get_lines()] == ["lora", "ia3"]
    assert [t.get_text() for t in curves.get_legend().get_texts()] == ["lora", "ia3"]
    assert all(float(t).is_integer() for t in visible_ticks(curves))
    assert [ax.get_title() for ax in bars] == ["trainable params", "eval loss", "tokens/s", "peak memory (MiB)"]
    assert bar_labels(bars[1]) == ["1.0000", "—"]  # a missing figure says so instead of drawing a 0
    for ax in bars[1:]:
        assert ax.get_ylim()[0] == 0

    # with eval.reference, each method's forgetting: a panel of its own, room below 0 when one improved
    rows[0]["forgetting_percent"], rows[1]["forgetting_percent"] = 40.5, -1.5
    _, *bars = drawn(figure(rows))
    assert bars[-1].get_title() == "forgetting % (lower is better)"
    assert bar_labels(bars[-1]) == ["+40.5", "-1.5"] and bars[-1].get_ylim()[0] < -1.5


@pytest.mark.slow
def test_eval_md_carries_no_raw_control_characters_or_stray_pipes(tmp_path):
    from peftcli.rundir.eval_report import write_eval

    nasty = "red\x1b[31m|pipe\x00nul\u0085nel\rcr"
    scores = {"base": {"rouge_l": 0.1}, "tuned": {"rouge_l": 0.9}}
    predictions = [{"prompt": f"p0 {nasty}", "reference": "ref", "base": nasty, "tuned": "ok", "scores": scores}]
    write_eval(tmp_path, eval_result(predictions=predictions))
    text = (tmp_path / "eval.md").read_text(encoding="utf-8")
    assert not RAW_CONTROLS.search(text), RAW_CONTROLS.findall(text)
    assert "red\\x1b[31m\\|pipe\\x00nul\\x85nel cr" in text  # shown, not acted on
    table_rows = [line for line in text.splitlines() if line.startswith("| p0")]
    assert table_rows and all(len(re.findall(r"(?<!\\)\|", line)) == 6 for line in table_rows)


def test_report_md_escapes_control_characters(recipe):
    from peftcli.rundir.report import write_report
    from peftcli.rundir.result import Forgetting

    recipe.run_dir.mkdir()
    forgetting = Forgetting("/data/ref\x1b[2J.txt", 3, 10.0, 11.0, 10.0, 5.0, True)
    write_report(run_result(recipe), has_plot=True, evaluation=eval_result(forgetting=forgetting))
    text = (recipe.run_dir / "report.md").read_text(encoding="utf-8")
    assert not RAW_CONTROLS.search(text)
    assert "ref\\x1b[2J.txt" in text


def test_model_card_describes_the_run_and_its_eval(recipe, monkeypatch):
    from peftcli.rundir.report import render_card

    result = run_result(recipe)
    card = render_card(recipe, result)
    assert card.startswith("---\nlibrary_name: peft\n")  # a local base is no hub `base_model`
    assert "# `lora` adapter of `tiny-llama`" in card
    assert f"- `{recipe.model.name}`" in card
    assert "- **lora**: r=8, alpha=16" in card
    assert "- training: demo_train.jsonl (120 rows)" in card and "- eval: demo_eval.jsonl (30 rows)" in card
    assert "- 4 steps (0.5 epochs), batch 16 x 1 accumulation" in card
    assert "final train loss 2.5000, eval loss 2.7500" in card
    assert "```yaml\nmodel:" in card and "## Eval" not in card
    with_eval = render_card(recipe, result, eval_result())
    assert "## Eval (`peftcli eval`)" in with_eval and "| loss | 3.0000 | 2.0000 | -1.0000 |" in with_eval


def test_model_card_of_a_hub_base_names_it_and_redacts_tokens(tmp_path, monkeypatch):
    from peftcli.recipe import load_recipe
    from peftcli.rundir.report import CARD, write_card

    token = "hf_" + "a1B2" * 8
    recipe = base_recipe(tmp_path / "m", tmp_path / "run")
    recipe["model"]["name"] = "org/base-model"
    recipe["data"]["train"] = f"/data/{token}.jsonl"
    write_card(tmp_path, load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    card = (tmp_path / CARD).read_text(encoding="utf-8")
    assert card.startswith('---\nbase_model: "org/base-model"\nlibrary_name: peft\ntags: ["peftcli", "lora"]\n---')
    assert token not in card and "<redacted>" in card
    assert not RAW_CONTROLS.search(card)
