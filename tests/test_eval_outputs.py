"""Where eval and compare results go: `eval --out DIR` (the run left untouched, a foreign folder
refused), `--json` on eval and compare (one object on stdout), and the model card in adapter/."""

from __future__ import annotations

import json

import pytest
from helpers import base_recipe, read_json, write_recipe

from peftcli.errors import UserError


def test_overwrite_without_out_is_refused(cli, tmp_path):
    result = cli("eval", tmp_path / "run", "--overwrite")
    assert result.code == 2
    assert result.error_lines == ["error: --overwrite applies with --out"]
    assert "hint:" in result.err


def test_eval_out_refuses_foreign_folders_and_the_run_itself(tmp_path):
    from peftcli.rundir.eval_report import check_eval_out

    run = tmp_path / "run"
    run.mkdir()
    check_eval_out(tmp_path / "new", run, overwrite=False)  # a new folder is fine
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty and holds something else"):
        check_eval_out(foreign, run, overwrite=True)
    with pytest.raises(UserError, match="overlaps the run"):
        check_eval_out(run / "eval", run, overwrite=False)


def test_eval_out_replaces_only_an_earlier_eval_and_only_with_overwrite(tmp_path):
    from peftcli.rundir.eval_report import EVAL_KIND, check_eval_out

    out = tmp_path / "eval-1"
    out.mkdir()
    (out / "peftcli.json").write_text(json.dumps({"kind": EVAL_KIND}))
    (out / "eval.json").write_text("{}")
    with pytest.raises(UserError) as refused:
        check_eval_out(out, tmp_path / "run", overwrite=False)
    assert "--overwrite" in refused.value.hint
    check_eval_out(out, tmp_path / "run", overwrite=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write there: notes.txt"):
        check_eval_out(out, tmp_path / "run", overwrite=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    from peftcli.recipe import load_recipe
    from peftcli.training.run import run_training

    tmp = tmp_path_factory.mktemp("outputs")
    recipe = base_recipe(tiny_model, tmp / "run", training={"max_steps": 6, "save_steps": 6})
    return run_training(load_recipe(write_recipe(tmp / "r.yaml", recipe))).run_dir


def _snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_trained_adapter_has_a_filled_model_card_and_still_loads(run):
    from peftcli.rundir import open_run
    from peftcli.rundir.run import load_run

    card = (run / "adapter" / "README.md").read_text(encoding="utf-8")
    assert "[More Information Needed]" not in card  # PEFT's empty template is gone
    assert card.startswith("---\nlibrary_name: peft\n")
    assert "# `lora` adapter of `tiny-llama`" in card
    assert "- **lora**: r=8, alpha=16" in card
    metrics = read_json(run / "metrics.json")
    assert f"- training: demo_train.jsonl ({metrics['data']['train']['rows']:,} rows)" in card
    assert "## Training\n- 6 steps" in card and f"final train loss {metrics['train_loss']:.4f}" in card
    assert "```yaml\nmodel:" in card
    opened = open_run(run)
    model, _ = load_run(opened, opened.recipe())
    assert type(model).__name__ == "PeftModelForCausalLM"


@pytest.mark.slow
def test_eval_out_json_leaves_the_run_untouched(run, cli, tmp_path):
    before = _snapshot(run)
    out = tmp_path / "evals" / "first"
    result = cli("eval", run, "--out", out, "--json")
    assert result.code == 0, result.err
    printed = json.loads(result.out)  # stdout is the object alone: the tables went to stderr
    assert printed == read_json(out / "eval.json")
    assert printed["run"] == str(run) and set(printed) >= {"base", "tuned", "delta", "examples"}
    assert {p.name for p in out.iterdir()} == {"eval.json", "eval.md", "eval.png", "peftcli.json"}
    assert "base vs tuned" in result.err and f"written to {out / 'eval.json'}" in result.err
    assert _snapshot(run) == before  # no eval.*, report.md and card as they were

    again = cli("eval", run, "--out", out)
    assert again.code == 2 and again.error_lines == [f"error: --out {out} is not empty"]
    assert "--overwrite" in again.err
    assert cli("eval", run, "--out", out, "--overwrite").code == 0

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    foreign = cli("eval", run, "--out", mine)
    assert foreign.code == 2 and "holds something else" in foreign.err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    inside = cli("eval", run, "--out", run / "eval-copy")
    assert inside.code == 2 and "overlaps the run" in inside.err
    assert _snapshot(run) == before


@pytest.mark.slow
def test_eval_in_the_run_refreshes_report_and_card(run, cli):
    result = cli("eval", run)
    assert result.code == 0, result.err
    assert "written to" in result.out and not result.out.lstrip().startswith("{")
    evaluation = read_json(run / "eval.json")
    row = f"| loss | {evaluation['base']['loss']:.4f} | {evaluation['tuned']['loss']:.4f} |"
    card = (run / "adapter" / "README.md").read_text(encoding="utf-8")
    assert "## Eval (`peftcli eval`)" in card and row in card
    assert row in (run / "report.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_compare_json_prints_compare_json(cli, tmp_path, tiny_model):
    recipe = base_recipe(tiny_model, tmp_path / "run", training={"max_steps": 3, "save_steps": 3})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    out = tmp_path / "cmp"
    result = cli("compare", path, "--methods", "lora", "--out", out, "--json")
    assert result.code == 0, result.err
    assert len(result.out.strip().splitlines()) == 1
    printed = json.loads(result.out)
    assert printed == read_json(out / "compare.json")
    assert [row["method"] for row in printed["rows"]] == ["lora"] and printed["failed"] == []
    assert printed["rows"][0]["loss_history"]
    assert "| method |" in result.err
