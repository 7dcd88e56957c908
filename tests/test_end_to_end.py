"""train -> eval -> merge on the tiny model, checked the way a user would check the artifacts."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import DEMO_EVAL, base_recipe, read_json, write_recipe


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model):
    """One LoRA run shared by the checks below (training is the expensive part)."""
    import peftcli.training.run
    from peftcli.cli import main

    tmp = tmp_path_factory.mktemp("e2e")
    recipe = write_recipe(tmp / "recipe.yaml", base_recipe(tiny_model, tmp / "run", training={"max_steps": 30}))
    outcomes = []  # keep the model as trained, in memory, to compare reloads with
    real_run_training = peftcli.training.run.run_training
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_info:
        patch.setattr(
            peftcli.training.run,
            "run_training",
            lambda *a, **k: outcomes.append(real_run_training(*a, **k)) or outcomes[-1],
        )
        main(["train", str(recipe), "--set", "peft.r=4", "--set", "training.learning_rate=8e-3"])
        raise SystemExit(0)
    assert exit_info.value.code == 0
    TRAINED_MODEL["model"] = outcomes[0].model.eval()
    return tmp / "run"


TRAINED_MODEL = {}  # the in-memory model of trained_run


@pytest.mark.slow
def test_run_directory_follows_the_contract(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"adapter", "recipe.yaml", "metrics.json", "report.md", "loss.png"} <= names
    assert {"checkpoint-24", "checkpoint-30"} <= names and "checkpoint-6" not in names  # save_total_limit 3
    assert not [n for n in names if n.startswith(".tmp-")]
    metrics = read_json(trained_run / "metrics.json")
    for key in (
        "trainable_params",
        "total_params",
        "train_loss",
        "loss_history",
        "eval_loss",
        "train_runtime_s",
        "train_tokens_per_s",
        "peak_memory_mb",
        "device",
        "versions",
    ):
        assert metrics[key] is not None, key
    assert metrics["status"] == "completed" and metrics["steps"] == 30
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert {"step", "loss"} == set(metrics["loss_history"][0])
    assert "loss.png" in (trained_run / "report.md").read_text()


@pytest.mark.slow
def test_loss_goes_down(trained_run):
    history = [h["loss"] for h in read_json(trained_run / "metrics.json")["loss_history"]]
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < first - 0.5, (first, last)


@pytest.mark.slow
def test_overrides_land_in_the_saved_recipe(trained_run):
    saved = yaml.safe_load((trained_run / "recipe.yaml").read_text())
    assert saved["peft"]["r"] == 4 and saved["training"]["learning_rate"] == 8e-3
    assert saved["training"]["epochs"] is None and saved["data"]["format"] == "auto"


def _probe(tokenizer):
    batch = tokenizer(["What comes after Monday?", "Add two and three."], return_tensors="pt", padding=True)
    return batch


@pytest.mark.slow
def test_adapter_reloads_in_plain_peft_with_identical_logits(trained_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained_run / "adapter")
    assert "<|im_start|>" in tokenizer.chat_template  # the template used in training travels with the adapter
    tokenizer.pad_token = tokenizer.eos_token
    probe = _probe(tokenizer)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), trained_run / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        got, trained, untouched = (m(**probe).logits for m in (reloaded.eval(), TRAINED_MODEL["model"], base))
    assert torch.equal(got, trained)  # the adapter on disk is exactly the model as trained
    assert (got - untouched).abs().max() > 1e-3  # and it really changes the base


@pytest.mark.slow
def test_eval_shows_tuned_beats_base(trained_run, cli):
    result = cli("eval", trained_run)
    assert result.code == 0, result.err
    report = read_json(trained_run / "eval.json")
    assert report["tuned"]["loss"] < report["base"]["loss"]
    assert report["tuned"]["perplexity"] < report["base"]["perplexity"]
    assert report["examples"] == len(DEMO_EVAL.read_text().splitlines())  # every held-out example
    assert "base" in result.out and "tuned" in result.out


@pytest.mark.slow
def test_eval_with_other_data(trained_run, cli, tmp_path):
    data = tmp_path / "other.jsonl"
    data.write_text('{"prompt": "January is followed by", "completion": " February"}\n', encoding="utf-8")
    result = cli("eval", trained_run, "--data", data)
    assert result.code == 0, result.err
    assert read_json(trained_run / "eval.json")["examples"] == 1


@pytest.mark.parametrize("where", ["data", "train source"])
@pytest.mark.slow
def test_eval_data_in_the_runs_own_column_schema(trained_run, cli, tmp_path, where):
    """--data detects a file's format; a file in the run's custom columns (undetectable) still works."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    custom = {"format": "alpaca", "columns": {"instruction": "question", "output": "answer"}}
    (saved["data"] if where == "data" else saved["data"]["train"][0]).update(custom)
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved))
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "What follows Monday?", "answer": "Tuesday"}\n' * 3, encoding="utf-8")
    result = cli("eval", run, "--data", data)
    assert result.code == 0, result.err
    assert read_json(run / "eval.json")["examples"] == 3
    data.write_text('{"q": "What follows Monday?", "a": "Tuesday"}\n', encoding="utf-8")
    neither = cli("eval", run, "--data", data)  # the detection error is the one that helps
    assert neither.code == 2 and "['a', 'q']" in neither.err


@pytest.mark.slow
def test_merge_matches_adapter_and_loads_in_plain_transformers(trained_run, tiny_model, cli, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result = cli("merge", trained_run, "--out", out)
    assert result.code == 0, result.err
    assert "max |merged - adapter|" in result.out
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))

    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.pad_token = tokenizer.eos_token
    probe = _probe(tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), trained_run / "adapter")
    with torch.no_grad():
        diff = (merged(**probe).logits - adapter.eval()(**probe).logits).abs().max()
    assert diff < 1e-4

    again = cli("merge", trained_run, "--out", out)
    assert again.code == 2 and "--force" in again.err
    assert cli("merge", trained_run, "--out", out, "--force").code == 0  # its own output: replaced
    (out / "peftcli.json").unlink()  # a model folder peftcli did not write (or no longer recognises)
    foreign = cli("merge", trained_run, "--out", out, "--force")
    assert foreign.code == 2 and "holds something else" in foreign.err and (out / "config.json").exists()


@pytest.mark.slow
def test_merge_that_does_not_reproduce_the_adapter_fails_and_writes_nothing(trained_run, cli, tmp_path, monkeypatch):
    """A merge whose saved weights drift from the adapter model (a PEFT bug, a lossy dtype) must
    exit 1 and leave the previous merge, not hand the user a model that looks fine."""
    import torch
    from peft.tuners.tuners_utils import BaseTuner

    out = tmp_path / "merged"
    assert cli("merge", trained_run, "--out", out).code == 0
    before = (out / "model.safetensors").read_bytes()

    real_merge = BaseTuner.merge_and_unload

    def drifting_merge(self, *args, **kwargs):
        merged = real_merge(self, *args, **kwargs)
        with torch.no_grad():
            merged.get_output_embeddings().weight.add_(0.05)  # far above the fp32 tolerance
        return merged

    monkeypatch.setattr(BaseTuner, "merge_and_unload", drifting_merge)
    result = cli("merge", trained_run, "--out", out, "--force")
    assert result.code == 1
    assert "merged logits differ from the adapter model's" in result.err and "nothing was written" in result.err
    assert (out / "model.safetensors").read_bytes() == before  # the previous merge is intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_validate_predicts_the_trainable_share_the_run_reports(trained_run, cli):
    metrics = read_json(trained_run / "metrics.json")
    result = cli("validate", trained_run / "recipe.yaml")
    assert result.code == 0, result.err
    assert f"trainable ({metrics['trainable_percent']:.3f} %)" in result.err
