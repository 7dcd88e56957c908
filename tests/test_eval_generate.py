"""Did it help, and what did it cost: generation scores, forgetting, eval during training with
early stopping, adapter hot-swap generation, and the front door (init, schema, loggers)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from helpers import DEMO_EVAL, ROOT, base_recipe, read_json, write_recipe
from safetensors.torch import load_file

from peftcli.evaluation import scoring
from peftcli.methods import REGISTRY

REFERENCE = ROOT / "recipes" / "data" / "reference.txt"


def test_scores_on_fixed_strings():
    assert scoring.exact_match("Paris", "Paris") == 1.0 and scoring.exact_match("paris", "Paris") == 0.0
    assert scoring.normalized_exact_match("The Paris!", "paris") == 1.0
    # "cat sat" vs "cat sat down": precision 1, recall 2/3
    assert scoring.token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    assert scoring.token_f1("dog", "cat") == 0.0 and scoring.token_f1("", "") == 1.0
    # LCS("w x y z", "w y z q") = 3 -> P = R = 3/4
    assert scoring.rouge_l("w x y z", "w y z q") == pytest.approx(0.75)
    assert scoring.rouge_l("a b c d", "a c d e") == pytest.approx(2 / 3)  # the article "a" is normalised away
    assert scoring.rouge_l("x y z", "z y x") == pytest.approx(1 / 3)
    assert scoring.score("one two three", "one")["length"] == 3.0


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    from peftcli.recipe import load_recipe
    from peftcli.training.run import run_training

    tmp = tmp_path_factory.mktemp("evalrun")
    recipe = base_recipe(
        tiny_model,
        tmp / "run",
        training={"max_steps": 600, "learning_rate": 5e-3, "save_steps": 600},
        eval={"reference": str(REFERENCE)},
    )
    recipe["peft"] = {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0}  # the demo's settings
    return run_training(load_recipe(write_recipe(tmp / "r.yaml", recipe))).run_dir


@pytest.mark.slow
def test_generation_eval_writes_predictions_and_tables(run, cli):
    result = cli("eval", run, "--generate", "--max-new-tokens", "4", "--limit", "16")
    assert result.code == 0, result.err
    report = read_json(run / "eval.json")
    gen = report["generation"]
    assert gen["examples"] == 16 and set(gen["tuned"]) == {
        "exact_match",
        "normalized_exact_match",
        "token_f1",
        "rouge_l",
        "length",
    }
    assert gen["tuned"]["token_f1"] > gen["base"]["token_f1"]
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {"prompt", "reference", "base", "tuned", "scores"} <= set(rows[0])
    first = json.loads((DEMO_EVAL).read_text().splitlines()[0])
    assert rows[0]["reference"] == first["messages"][-1]["content"]
    # per-example scores are the metrics of that example's outputs
    assert rows[0]["scores"]["tuned"] == scoring.score(rows[0]["tuned"], rows[0]["reference"])
    text = (run / "eval.md").read_text()
    assert "## Best" in text and "## Worst" in text and "| prompt | reference | base | tuned |" in text
    assert "## Eval (`peftcli eval`)" in (run / "report.md").read_text()
    assert (run / "eval.png").stat().st_size > 0
    assert "generation on 16 prompts" in result.out


def _reference_perplexity(model, tokenizer, max_length: int) -> float:
    """Independent check: token-weighted perplexity over the reference paragraphs (+ EOS)."""
    paragraphs = [p for p in REFERENCE.read_text().split("\n\n") if p.strip()]
    total, count = 0.0, 0
    for paragraph in paragraphs:
        ids = tokenizer(paragraph.strip() + tokenizer.eos_token, return_tensors="pt")["input_ids"][:, :max_length]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(total / count)


@pytest.mark.slow
def test_forgetting_is_base_vs_tuned_perplexity_on_the_reference(run, cli, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert cli("eval", run).code == 0
    forgetting = read_json(run / "eval.json")["forgetting"]
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run / "adapter").eval()
    base_ppl, tuned_ppl = _reference_perplexity(base, tokenizer, 64), _reference_perplexity(tuned, tokenizer, 64)
    assert forgetting["base_perplexity"] == pytest.approx(base_ppl, rel=1e-3)
    assert forgetting["tuned_perplexity"] == pytest.approx(tuned_ppl, rel=1e-3)
    assert forgetting["forgetting_percent"] == pytest.approx(100 * (tuned_ppl / base_ppl - 1), abs=0.01)
    assert forgetting["flagged"] == (forgetting["forgetting_percent"] > forgetting["threshold_percent"])
    assert "Forgetting on `reference.txt`" in (run / "report.md").read_text()


def plain_reply(model, tokenizer_dir, messages, max_new_tokens=6) -> str:
    """What plain transformers answers: the saved chat template, greedy, stopping at <|im_end|>."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.eval().generate(
        **ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@pytest.mark.slow
def test_generate_switches_adapters_without_reloading_the_base(tmp_path, tiny_model, run, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftcli.evaluation import adapters
    from peftcli.evaluation.adapters import Session
    from peftcli.recipe import load_recipe
    from peftcli.training.run import run_training

    other = run_training(
        load_recipe(
            write_recipe(
                tmp_path / "b.yaml",
                base_recipe(tiny_model, tmp_path / "b", training={"max_steps": 30, "seed": 3, "learning_rate": 2e-2}),
            )
        )
    ).run_dir
    loads = []
    real_load = adapters.load_model
    monkeypatch.setattr(adapters, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    session = Session(None, [("a", run), ("b", other)])
    messages = [{"role": "user", "content": "What comes after Monday?"}]
    order = ("b", "a", None, "b")
    replies = [session.reply(name, messages, stream=False, max_new_tokens=6) for name in order]
    assert len(loads) == 1  # one base, two adapters, four switches

    expected = {None: plain_reply(AutoModelForCausalLM.from_pretrained(tiny_model), tiny_model, messages)}
    for name, folder in (("a", run), ("b", other)):
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), folder / "adapter")
        expected[name] = plain_reply(alone, folder / "adapter", messages)
    assert replies == [expected[name] for name in order]
    assert len(set(expected.values())) == 3  # the three models really answer differently


@pytest.mark.slow
def test_generate_command(cli, run, tiny_model):
    result = cli(
        "generate", "--adapter", f"demo={run}", "--prompt", "What comes after Monday?", "--max-new-tokens", "4"
    )
    assert result.code == 0, result.err
    assert "[demo] What comes after Monday?" in result.err
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run / "adapter")
    reply = plain_reply(tuned, run / "adapter", [{"role": "user", "content": "What comes after Monday?"}], 4)
    assert reply and reply in result.out  # the streamed answer is the adapter's own
    bad = cli("generate", "--adapter", "no-equals-sign", "--prompt", "x")
    assert bad.code == 2 and "NAME=RUN" in bad.err


def _script_eval_losses(monkeypatch, losses: dict[int, float]) -> None:
    """Make the eval at step N report losses[N] (logged, and seen by every callback), so the
    early-stopping decisions do not hang on how a tiny model happens to learn."""
    from peftcli.training import run as stage

    real_build = stage.build_trainer

    def build(*args, **kwargs):
        trainer = real_build(*args, **kwargs)
        real_loop = trainer.evaluation_loop

        def loop(*a, **k):
            output = real_loop(*a, **k)
            if trainer.state.global_step in losses and "eval_loss" in output.metrics:
                output.metrics["eval_loss"] = losses[trainer.state.global_step]
            return output

        trainer.evaluation_loop = loop
        return trainer

    monkeypatch.setattr(stage, "build_trainer", build)


@pytest.mark.slow
def test_early_stopping_stops_and_keeps_the_best_adapter(tmp_path, tiny_model, monkeypatch):
    from peftcli.recipe import load_recipe
    from peftcli.training.run import run_training

    # The eval loss rises at step 10: patience 1 stops there, and the best adapter is step 5's.
    _script_eval_losses(monkeypatch, {5: 1.0, 10: 2.0})
    recipe = base_recipe(
        tiny_model,
        tmp_path / "run",
        training={
            "max_steps": 40,
            "eval_steps": 5,
            "save_steps": 5,
            "save_total_limit": None,
            "early_stopping_patience": 1,
        },
    )
    outcome = run_training(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    metrics = read_json(outcome.run_dir / "metrics.json")
    assert metrics["stopped_early"] is True and metrics["steps"] == 10 and metrics["best_step"] == 5
    assert [h["step"] for h in metrics["eval_history"]] == [5, 10]
    assert metrics["adapter_is"] == "best" and metrics["eval_loss"] == metrics["eval_history"][0]["eval_loss"]
    best = load_file(outcome.run_dir / "adapter" / "adapter_model.safetensors")
    at_step_5 = load_file(outcome.run_dir / "checkpoint-5" / "adapter_model.safetensors")
    assert all(torch.equal(best[k], at_step_5[k]) for k in best)
    assert "adapter/ is the best one seen: step 5" in (outcome.run_dir / "report.md").read_text()

    # The best step need not be a checkpoint: saving every 4 steps, step 5's adapter is kept anyway.
    recipe["training"]["save_steps"], recipe["output"]["dir"] = 4, str(tmp_path / "off-cadence")
    other = run_training(load_recipe(write_recipe(tmp_path / "o.yaml", recipe))).run_dir
    assert not (other / "checkpoint-5").exists() and read_json(other / "metrics.json")["best_step"] == 5
    kept = load_file(other / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(kept[k], at_step_5[k]) for k in at_step_5)


@pytest.mark.slow
def test_early_stopping_threshold_sets_the_patience_not_the_best(tmp_path, tiny_model, monkeypatch):
    """Gains of at most the threshold use up the patience, but the lowest loss is still the best."""
    from peftcli.recipe import load_recipe
    from peftcli.training.run import run_training

    _script_eval_losses(monkeypatch, {4: 4.0, 8: 3.9, 12: 3.8, 16: 3.0})
    training = {"max_steps": 40, "eval_steps": 4, "save_steps": 4, "save_total_limit": None}
    training |= {"early_stopping_patience": 2, "early_stopping_threshold": 0.5}
    recipe = base_recipe(tiny_model, tmp_path / "run", training=training)
    outcome = run_training(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    metrics = read_json(outcome.run_dir / "metrics.json")
    assert metrics["stopped_early"] is True and metrics["steps"] == 12
    assert metrics["best_step"] == 12 and metrics["eval_loss"] == 3.8
    best = load_file(outcome.run_dir / "adapter" / "adapter_model.safetensors")
    at_step_12 = load_file(outcome.run_dir / "checkpoint-12" / "adapter_model.safetensors")
    assert all(torch.equal(best[k], at_step_12[k]) for k in best)


@pytest.mark.slow
def test_early_stopping_result_survives_a_kill_after_the_last_checkpoint(tmp_path, tiny_model, cli, monkeypatch):
    """Killed after the last checkpoint, before adapter/ was written: the resume finds nothing left to
    train and must still ship the best adapter (step 5), not the last weights (step 10)."""
    _script_eval_losses(monkeypatch, {5: 1.0, 10: 2.0})
    recipe = base_recipe(
        tiny_model,
        tmp_path / "run",
        training={"max_steps": 10, "eval_steps": 5, "save_steps": 5, "save_total_limit": None}
        | {"early_stopping_patience": 1},
    )
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert cli("train", path).code == 0
    run = tmp_path / "run"
    (run / "adapter").rename(run / "best-adapter")  # where it was before the (killed) final move
    (run / "metrics.json").unlink()
    result = cli("train", path, "--resume")
    assert result.code == 0 and "nothing left to train" in result.err, result.err
    metrics = read_json(run / "metrics.json")
    assert metrics["adapter_is"] == "best" and metrics["best_step"] == 5
    assert metrics["eval_loss"] == metrics["eval_history"][0]["eval_loss"]
    best = load_file(run / "adapter" / "adapter_model.safetensors")
    at_step_5 = load_file(run / "checkpoint-5" / "adapter_model.safetensors")
    assert all(torch.equal(best[k], at_step_5[k]) for k in best)


def test_eval_steps_need_eval_data(cli, tmp_path, tiny_model):
    recipe = base_recipe(tiny_model, tmp_path / "run", data={"eval": None}, training={"eval_steps": 5})
    result = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 2 and "training.eval_steps needs eval data" in result.err


@pytest.mark.slow
def test_tensorboard_logs_by_default_and_missing_loggers_are_refused(tmp_path, tiny_model, cli, monkeypatch):
    path = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run", training={"max_steps": 2}))
    assert cli("train", path).code == 0
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert not (tmp_path / "run" / "runs").exists()
    import importlib.util

    real_find_spec = importlib.util.find_spec  # as if wandb were not installed, whether or not it is
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a)
    )
    result = cli("train", path, "--overwrite", "--set", "training.report_to=[wandb]")
    assert result.code == 2 and "wandb is not installed" in result.err
    assert (tmp_path / "run" / "adapter").is_dir()  # the refused run left the finished one alone


@pytest.mark.parametrize("method", list(REGISTRY))
def test_init_writes_a_recipe_that_validates(method, cli, tmp_path):
    from peftcli.recipe import load_recipe

    out = tmp_path / "starter.yaml"
    result = cli("init", "--method", method, "--model", "some/model", "--out", out)
    assert result.code == 0, result.err
    recipe = load_recipe(out)
    assert recipe.peft.method == method
    assert "# " in out.read_text()  # commented
    again = cli("init", "--method", method, "--out", out)
    assert again.code == 2 and "--force" in again.err


def test_schema_accepts_every_shipped_recipe_and_rejects_unknown_keys(cli):
    import jsonschema

    result = cli("schema")
    assert result.code == 0
    schema = json.loads(result.out)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path
    broken = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    broken["training"]["lerning_rate"] = 1e-3
    assert any("lerning_rate" in e.message for e in validator.iter_errors(broken))


def test_every_command_has_help_with_an_example(cli):
    commands = ["train", "eval", "merge", "validate", "methods", "compare", "generate", "init", "schema"]
    for command in commands:
        result = cli(command, "--help")
        assert result.code == 0 and "Example" in result.out, command
    assert cli("data", "preview", "--help").out.count("Example") == 1


@pytest.mark.slow
def test_generate_prompts_file_routes_each_prompt(cli, run, tiny_model, tmp_path):
    """Plain lines go to every adapter; a JSON line may name one adapter, or `base`."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "What comes after Monday?\n\n"
        + json.dumps({"prompt": "What comes after Friday?", "adapter": "base"})
        + "\n"
        + json.dumps({"prompt": "What comes after Sunday?", "adapter": "demo"})
        + "\n"
    )
    result = cli("generate", "--adapter", f"demo={run}", "--prompts", prompts, "--max-new-tokens", "4")
    assert result.code == 0, result.err
    headers = [line for line in result.err.splitlines() if line.startswith("[")]
    assert headers == [
        "[demo] What comes after Monday?",
        "[base] What comes after Friday?",
        "[demo] What comes after Sunday?",
    ]
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base_reply = plain_reply(base, tiny_model, [{"role": "user", "content": "What comes after Friday?"}], 4)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run / "adapter")
    tuned_reply = plain_reply(tuned, run / "adapter", [{"role": "user", "content": "What comes after Sunday?"}], 4)
    assert base_reply in result.out and tuned_reply in result.out

    prompts.write_text("fine\n" + json.dumps({"prompt": "x", "adapter": "nope"}) + "\n")
    unknown = cli("generate", "--adapter", f"demo={run}", "--prompts", prompts)
    assert unknown.code == 2 and "prompts.jsonl line 2: unknown adapter 'nope'" in unknown.err
    prompts.write_text('{"prompt": "x"\n')
    broken = cli("generate", "--adapter", f"demo={run}", "--prompts", prompts)
    assert broken.code == 2 and "line 1: invalid JSON" in broken.err


@pytest.mark.slow
def test_generate_interactive_switches_and_resets(cli, run, tiny_model, monkeypatch):
    import io

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    question = "What comes after Monday?"
    typed = [question, "/adapter nope", "/base", "/reset", question, "/quit", "never read"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(typed) + "\n"))
    result = cli("generate", "--adapter", f"demo={run}", "--interactive", "--max-new-tokens", "4")
    assert result.code == 0, result.err
    assert "chatting with demo" in result.err
    assert "no adapter 'nope'; adapters: demo" in result.err and "now using base" in result.err

    messages = [{"role": "user", "content": question}]
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run / "adapter")
    tuned_reply = plain_reply(tuned, run / "adapter", messages, 4)
    # After /reset the base answers the question afresh, without the tuned model's turn in its history.
    base_reply = plain_reply(AutoModelForCausalLM.from_pretrained(tiny_model), tiny_model, messages, 4)
    assert tuned_reply != base_reply
    assert tuned_reply in result.out and base_reply in result.out
    assert result.out.index(tuned_reply) < result.out.rindex(base_reply)
