"""`peftcli eval --tasks`: standard benchmarks through lm-evaluation-harness on the base and on base +
adapter, offline on local task files: the terminal table, eval.json, eval.md and report.md, the
regression flag, and the errors a user can meet (an unknown task, a hub-only dataset with no hub,
lm-eval not installed)."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
from helpers import ROOT, base_recipe, read_json, train, write_recipe

pytestmark = pytest.mark.slow

CALENDAR = ROOT / "recipes" / "tasks" / "calendar.yaml"
REFERENCE = ROOT / "recipes" / "data" / "reference.txt"

# General text scored by perplexity (lower is better): the adapter was trained on something else.
GENERAL_TASK = """\
task: general_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/general.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model) -> Path:
    tmp = tmp_path_factory.mktemp("bench")
    # A high learning rate: a dozen steps shift the model onto the calendar chats, away from general text.
    recipe = base_recipe(
        tiny_model,
        tmp / "run",
        training={"max_steps": 12, "save_steps": 12, "learning_rate": 2e-2},
        eval={"benchmark_threshold": 50.0},
    )
    return train(write_recipe(tmp / "recipe.yaml", recipe)).run_dir


@pytest.fixture(scope="module")
def general_task(tmp_path_factory) -> Path:
    """A task file whose data_files is relative to its own folder (not to the working directory)."""
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "data").mkdir()
    passages = [p.strip() for p in REFERENCE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rows = "".join(json.dumps({"text": p}) + "\n" for p in passages)
    (folder / "data" / "general.jsonl").write_text(rows, encoding="utf-8")
    (folder / "general.yaml").write_text(GENERAL_TASK, encoding="utf-8")
    return folder / "general.yaml"


@pytest.fixture(scope="module")
def evaluated(run, general_task):
    """One `peftcli eval RUN --tasks calendar.yaml,general.yaml --chat-template --json`: (stdout, stderr)."""
    from peftcli.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["eval", str(run), "--tasks", f"{CALENDAR},{general_task}", "--chat-template", "--json"])
        except SystemExit as exc:
            assert not exc.code, err.getvalue()
    return out.getvalue(), err.getvalue()


def _rows(benchmarks: dict, task: str) -> dict[str, dict]:
    return {row["metric"]: row for row in benchmarks["rows"] if row["task"] == task}


def test_both_models_are_scored_on_the_local_tasks_with_stderr_and_change(run, evaluated):
    printed = json.loads(evaluated[0])
    benchmarks = read_json(run / "eval.json")["benchmarks"]
    assert printed["benchmarks"] == benchmarks
    assert benchmarks["tasks"] == [str(CALENDAR), benchmarks["tasks"][1]] and benchmarks["chat_template"]
    acc = _rows(benchmarks, "calendar")["acc"]
    assert acc["examples"] == 64 and acc["headline"] and acc["higher_is_better"] is True
    for column in ("base", "tuned"):
        assert 0 <= acc[column] <= 1
        assert 0 < acc[f"{column}_stderr"] < 0.1  # 64 questions: sqrt(p (1 - p) / 63)
    assert acc["change"] == pytest.approx(acc["tuned"] - acc["base"], abs=1e-6)
    # Paired over the same 64 questions: never more than the two errors combined as independent.
    assert 0 <= acc["change_stderr"] <= (acc["base_stderr"] ** 2 + acc["tuned_stderr"] ** 2) ** 0.5 + 1e-6
    perplexity = _rows(benchmarks, "general_text")["word_perplexity"]
    assert perplexity["higher_is_better"] is False and perplexity["examples"] > 0
    assert perplexity["base"] != perplexity["tuned"]


def test_a_benchmark_regression_above_the_threshold_is_flagged(run, evaluated):
    benchmarks = read_json(run / "eval.json")["benchmarks"]
    assert benchmarks["threshold_percent"] == 50.0  # the run's eval.benchmark_threshold
    for row in benchmarks["rows"]:
        worse = row["change_percent"] if row["higher_is_better"] is False else -row["change_percent"]
        noise = row["change_stderr"] is not None and abs(row["change"]) <= 2 * row["change_stderr"]
        assert row["flagged"] == (worse > 50.0 and not noise), row
    # Training on calendar chats made general text far less likely (word perplexity: many times the
    # base's), while its bits per byte rose by a few % only, below the threshold.
    general = _rows(benchmarks, "general_text")
    assert general["word_perplexity"]["change_percent"] > 200 and general["word_perplexity"]["flagged"]
    assert 0 < general["bits_per_byte"]["change_percent"] < 30 and not general["bits_per_byte"]["flagged"]
    assert benchmarks["flagged"]
    stderr = evaluated[1]
    flag_line = next(line for line in stderr.splitlines() if "benchmark regression on" in line)
    assert "general_text" in flag_line and "more than 50 %" in flag_line and "eval.benchmark_threshold" in flag_line


def test_the_terminal_table_shows_base_tuned_and_the_change_with_standard_errors(run, evaluated):
    from rich.console import Console

    from peftcli.cli.evaluate import print_benchmarks
    from peftcli.rundir.result import BenchmarkRow, Benchmarks

    stderr = evaluated[1]
    assert "benchmarks (lm-eval 0.4." in stderr and "chat template" in stderr and "±" in stderr
    saved = read_json(run / "eval.json")["benchmarks"]
    acc = _rows(saved, "calendar")["acc"]
    setting = {k: v for k, v in saved.items() if k not in ("rows", "flagged")}
    wide = Console(file=io.StringIO(), width=200)  # the terminal's table, unwrapped
    print_benchmarks(Benchmarks(**setting, rows=[BenchmarkRow(**acc)]), wide)
    line = next(line for line in wide.file.getvalue().splitlines() if "calendar" in line)
    cells = [cell.strip() for cell in line.strip("│ ").split("│")]
    assert cells[:2] == ["calendar", "acc"]
    assert cells[2] == f"{acc['base']:.4f} ± {acc['base_stderr']:.4f}"
    assert cells[3] == f"{acc['tuned']:.4f} ± {acc['tuned_stderr']:.4f}"
    assert cells[4] == f"{acc['change']:+.4f} ± {acc['change_stderr']:.4f}"


def test_eval_md_and_report_md_show_the_benchmarks(run, evaluated):
    benchmarks = read_json(run / "eval.json")["benchmarks"]
    acc = _rows(benchmarks, "calendar")["acc"]
    row = (
        f"| calendar | acc | {acc['base']:.4f} ± {acc['base_stderr']:.4f} | {acc['tuned']:.4f} ± "
        f"{acc['tuned_stderr']:.4f} | {acc['change']:+.4f} ± {acc['change_stderr']:.4f} |"
    )
    for page in ("eval.md", "report.md"):
        text = (run / page).read_text(encoding="utf-8")
        assert "Benchmarks (lm-eval 0.4." in text, page
        assert row in text, page
        assert "| general_text | word_perplexity ↓ |" in text and "**regression** |" in text, page
        flag_line = next(line for line in text.splitlines() if line.startswith("**Benchmark regression** on"))
        assert "`general_text`" in flag_line, page


@pytest.fixture
def only_hellaswag_builtin(monkeypatch):
    """lm-eval indexes its ~15k task files in half a minute on 2 cores: here it sees its hellaswag
    folder alone, which is enough to know a name and to need the hub for its data."""
    import lm_eval.tasks
    from lm_eval.tasks._index import TaskIndex

    builtin = Path(lm_eval.tasks.__file__).parent
    walk = TaskIndex._iter_yaml_files

    def hellaswag_only(root):
        return walk(builtin / "hellaswag" if root == builtin else root)

    monkeypatch.setattr(TaskIndex, "_iter_yaml_files", staticmethod(hellaswag_only))


def test_an_unknown_task_is_named_before_any_model_loads(cli, run, only_hellaswag_builtin, monkeypatch):
    from peftcli.evaluation import evaluate

    monkeypatch.setattr(evaluate, "EvalModels", None)  # loading a model would fail the test
    result = cli("eval", run, "--tasks", f"{CALENDAR},hellaswagg")
    assert result.code == 2
    assert result.error_lines == ["error: --tasks: unknown lm-eval task 'hellaswagg'"]
    assert "did you mean hellaswag?" in result.err
    missing = cli("eval", run, "--tasks", "tasks/nowhere.yaml")
    assert missing.code == 2 and missing.error_lines == ["error: --tasks: task file tasks/nowhere.yaml not found"]


def test_a_task_whose_dataset_is_on_the_hub_says_so_without_a_hub(cli, run, only_hellaswag_builtin, monkeypatch):
    from peftcli.evaluation import evaluate

    monkeypatch.setattr(evaluate, "EvalModels", None)
    result = cli("eval", run, "--tasks", "hellaswag")
    assert result.code == 2
    assert len(result.error_lines) == 1
    assert result.error_lines[0].startswith(
        "error: --tasks: task hellaswag needs its dataset from the Hugging Face hub, which is not reachable"
    )
    assert "Traceback" not in result.err and "local data_files" in result.err


def test_without_lm_eval_the_error_says_how_to_install_it(cli, run, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if not installed
    result = cli("eval", run, "--tasks", CALENDAR)
    assert result.code == 2
    assert result.error_lines == ["error: --tasks needs lm-evaluation-harness (lm-eval), which is not installed"]
    assert 'pip install "peftcli[bench]"' in result.err
    flags = cli("eval", run, "--chat-template")
    assert flags.code == 2 and flags.error_lines == [
        "error: --num-fewshot, --task-limit and --chat-template apply with --tasks"
    ]
