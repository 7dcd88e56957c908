"""`peftcli tune`: a search over recipe keys on Optuna, each trial a run directory, hopeless trials
pruned, the study resumable from its SQLite file, and the best recipe ready for `peftcli train`."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml
from helpers import DEMO_EVAL, DEMO_TRAIN, base_recipe, interrupt_at, read_json, write_recipe

# Good, good, hopeless (pruned at its first eval), then the best, interrupted and tried again.
RATES = [5e-3, 1e-2, 1e-7, 2e-2]


def _recipe(tmp_path, tiny_model):
    """A few steps on a slice of the demo data: a trial takes seconds."""
    data = {}
    for name, source, rows in (("train", DEMO_TRAIN, 96), ("eval", DEMO_EVAL, 16)):
        data[name] = str(tmp_path / f"{name}.jsonl")
        Path(data[name]).write_text("".join(source.read_text().splitlines(keepends=True)[:rows]))
    recipe = base_recipe(
        tiny_model,
        tmp_path / "run",
        data=data,
        training={"max_steps": 4, "batch_size": 8, "eval_steps": 2, "save_steps": 2, "report_to": []},
    )
    return write_recipe(tmp_path / "r.yaml", recipe)


@pytest.mark.parametrize(
    ("space", "named"),
    [
        ("training.learning_rate=floot(1e-4, 1e-2)", "--space training.learning_rate: cannot read"),
        ("training.lerning_rate=[1e-4, 3e-4]", "did you mean 'learning_rate'"),
        ("peft.r=[0, 8]", "--space peft.r=[0, 8]: value 0"),
        ("peft.r=float(4, 16)", "use int(lo, hi) for whole numbers"),
        ("training.learning_rate=log(0, 1e-2)", "log(lo, hi) needs lo > 0"),
        ("peft.r=int(16, 4)", "the low end must be below the high end"),
        ("peft.r=int(4.5, 16)", "int(lo, hi) takes whole numbers"),
        ("peft.r=8", "--space peft.r: cannot read '8'"),
        ("peft.r=[]", "the list of choices is empty"),
        ("output.dir=[a, b]", "--space output.dir: tune sets output.dir itself"),
        ("learning_rate=[1e-4]", "--space learning_rate: expected a dotted recipe key"),
        ("peft.method=[lora, lorra]", "unknown method 'lorra'"),
    ],
)
def test_a_bad_search_space_is_refused_naming_its_key(cli, tmp_path, tiny_model, space, named):
    out = tmp_path / "study"
    result = cli("tune", _recipe(tmp_path, tiny_model), "--space", space, "--trials", "2", "--out", out)
    assert result.code == 2 and len(result.error_lines) == 1 and named in result.error_lines[0], result.err
    assert not out.exists()  # refused before anything was written


def test_other_mistakes_are_refused_before_anything_is_written(cli, tmp_path, tiny_model):
    recipe = _recipe(tmp_path, tiny_model)
    out = tmp_path / "study"
    twice = cli("tune", recipe, "--space", "peft.r=[4,8]", "--space", "peft.r=[2]", "--trials", "2", "--out", out)
    assert twice.code == 2 and "--space peft.r: given twice" in twice.err
    no_eval = write_recipe(
        tmp_path / "noeval.yaml",
        base_recipe(tiny_model, tmp_path / "run", data={"eval": None}, training={"max_steps": 6}),
    )
    metric = cli("tune", no_eval, "--space", "peft.r=[4,8]", "--trials", "2", "--out", out)
    assert metric.code == 2 and "--metric eval_loss needs eval data" in metric.err
    timeout = cli("tune", recipe, "--space", "peft.r=[4,8]", "--trials", "2", "--out", out, "--timeout", "soon")
    assert timeout.code == 2 and "--timeout 'soon'" in timeout.err
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    foreign = cli("tune", recipe, "--space", "peft.r=[4,8]", "--trials", "2", "--out", out, "--overwrite")
    assert foreign.code == 2 and "is not a tune study" in foreign.err and (out / "notes.txt").exists()


def _queue(monkeypatch, rates):
    """Have the study propose `rates` first, in order (Optuna's enqueue_trial): which trials prune
    must not depend on what the sampler happens to draw."""
    from peftcli.tune import study as module

    real = module.open_study

    def open_with_queue(*args, **kwargs):
        study = real(*args, **kwargs)
        if not study.trials:
            for rate in rates:
                study.enqueue_trial({"training.learning_rate": rate})
        return study

    monkeypatch.setattr(module, "open_study", open_with_queue)


def _interrupt_trial(monkeypatch, which: int, step: int):
    """SIGINT while the `which`-th trial (0-based) trains step `step` + 1."""
    from peftcli.tune import study as module

    real, calls = module.run_trial, []

    def run_trial(*args, **kwargs):
        calls.append(1)
        if len(calls) == which + 1:
            interrupt_at(monkeypatch, step, signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "run_trial", run_trial)


@pytest.mark.slow
def test_a_study_prunes_resumes_after_an_interruption_and_writes_a_best_recipe(cli, tmp_path, tiny_model, monkeypatch):
    recipe, out = _recipe(tmp_path, tiny_model), tmp_path / "study"
    command = ("tune", recipe, "--space", "training.learning_rate=log(1e-7, 3e-2)", "--trials", "4", "--out", out)
    _queue(monkeypatch, RATES)
    _interrupt_trial(monkeypatch, which=3, step=1)

    stopped = cli(*command)
    assert stopped.code == 130, stopped.err
    assert "stopped during trial 3" in stopped.err and "continue the study with: peftcli tune" in stopped.err
    assert (out / "study.db").is_file() and (out / "trial-003" / "checkpoint-2").is_dir()
    rows = read_json(out / "tune.json")["rows"]
    assert [r["state"] for r in rows] == ["complete", "complete", "pruned", "interrupted"]

    resumed = cli(*command)
    assert resumed.code == 0, resumed.err
    assert "continuing the study" in resumed.err and "trying again the interrupted trial(s) 3" in resumed.err
    summary = read_json(out / "tune.json")
    rows = summary["rows"]
    assert [r["state"] for r in rows] == ["complete", "complete", "pruned", "interrupted", "complete"]
    assert rows[4]["retry_of"] == 3 and rows[4]["params"] == rows[3]["params"]
    # the hopeless trial stopped at its first eval, and its folder is an ordinary finished run
    pruned = rows[2]
    assert pruned["pruned_at"] == 2 and pruned["steps"] == 2
    assert read_json(out / "trial-002" / "metrics.json")["steps"] == 2 and (out / "trial-002" / "adapter").is_dir()
    for number in (0, 1, 4):
        assert read_json(out / f"trial-{number:03d}" / "metrics.json")["steps"] == 4
    best = summary["best"]
    assert best["trial"] in (0, 1, 4) and best["value"] == min(r["value"] for r in rows if r["state"] == "complete")
    assert "(best)" in (out / "tune.md").read_text() and (out / "tune.png").stat().st_size > 0

    # the best recipe validates and trains into the recipe's own output.dir
    best_recipe = out / "best-recipe.yaml"
    checked = cli("validate", best_recipe)
    assert checked.code == 0, checked.err
    written = yaml.safe_load(best_recipe.read_text())
    assert written["training"]["learning_rate"] == pytest.approx(best["params"]["training.learning_rate"])
    assert written["output"]["dir"] == str(tmp_path / "run")

    # a finished study is left as it is; another space there is refused, --overwrite deletes only tune's files
    again = cli(*command)
    assert again.code == 0 and len(read_json(out / "tune.json")["rows"]) == 5
    other = cli("tune", recipe, "--space", "peft.r=[4,8]", "--trials", "1", "--out", out)
    assert other.code == 2 and "holds a study of another space" in other.err
    (out / "trial-000" / "notes.txt").write_text("a file inside a run is the run's")
    (out / "mine.txt").write_text("not tune's")
    refused = cli(*command, "--overwrite")
    assert refused.code == 2 and "mine.txt" in refused.err and (out / "trial-000").is_dir()


def _load(tmp_path, recipe: dict):
    from peftcli.recipe import load_recipe

    return load_recipe(write_recipe(tmp_path / "searched.yaml", recipe))


@pytest.mark.parametrize(("recipe_method", "trial_method"), [("lora", "full"), ("full", "lora")])
def test_a_trial_of_another_method_trains_at_its_learning_rate(tmp_path, tiny_model, recipe_method, trial_method):
    """A recipe that leaves training.learning_rate to the method: a trial that switches method takes
    the new method's rate (full fine-tuning at LoRA's 2e-4 would wreck the base), unless it samples one."""
    from peftcli.methods import REGISTRY
    from peftcli.tune.space import with_params

    recipe = base_recipe(tiny_model, tmp_path / "run")
    recipe["peft"] = {"method": recipe_method}
    del recipe["training"]["learning_rate"]
    searched = _load(tmp_path, recipe)
    assert REGISTRY["full"].learning_rate == 2e-5 != REGISTRY["lora"].learning_rate
    for method in (recipe_method, trial_method):
        trial = with_params(searched, {"peft.method": method})
        assert trial.training.learning_rate == REGISTRY[method].learning_rate, method
    sampled = with_params(searched, {"peft.method": trial_method, "training.learning_rate": 3e-3})
    assert sampled.training.learning_rate == 3e-3


def test_a_trial_evaluates_on_the_steps_training_will_take(tmp_path, tiny_model, tokenizer):
    """tune spreads EVALS_PER_TRIAL evaluations over a trial's steps, counted as training counts them:
    30 rows less the 3 that data.eval_split holds out are 27, in steps of 4 that is 7 a epoch (the
    last one partial), 14 over 2 epochs: evaluations every 2 steps (not 30 * 2 / 4 = 15 steps, every 3)."""
    from peftcli.data import prepare_data
    from peftcli.training.settings import resolve
    from peftcli.training.setup import planned_steps
    from peftcli.tune.study import EVALS_PER_TRIAL, eval_every, trial_steps

    train = tmp_path / "train.jsonl"
    train.write_text("".join(DEMO_TRAIN.read_text().splitlines(keepends=True)[:30]))
    recipe = base_recipe(tiny_model, tmp_path / "run", data={"train": str(train), "eval_split": 0.1})
    del recipe["data"]["eval"], recipe["training"]["max_steps"], recipe["training"]["save_steps"]
    recipe["training"].update(epochs=2, batch_size=4)
    searched = _load(tmp_path, recipe)
    settings = resolve(searched, cuda=False)
    rows = len(prepare_data(searched.data, tokenizer, searched.training.seed).train)
    trained = planned_steps(searched.training, rows, settings.batch_size * settings.gradient_accumulation)
    assert (rows, trained) == (27, 14)
    assert eval_every(searched, "eval_loss") == trained // EVALS_PER_TRIAL == 2
    assert trial_steps(searched) == trained
