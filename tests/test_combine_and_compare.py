"""Several adapters combined into one (PEFT's add_weighted_adapter), and `peftcli compare`."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import DEMO_EVAL, base_recipe, read_json, write_recipe


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model):
    """Two LoRA runs on the same base, trained on different halves of the task (different seeds)."""
    from peftcli.recipe import load_recipe
    from peftcli.training.run import run_training

    tmp = tmp_path_factory.mktemp("combine")
    runs = []
    for name, seed in (("a", 1), ("b", 2)):
        recipe = base_recipe(tiny_model, tmp / name, training={"seed": seed, "max_steps": 10})
        recipe["peft"] = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
        runs.append(run_training(load_recipe(write_recipe(tmp / f"{name}.yaml", recipe))).run_dir)
    return runs


def _probe(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(["What comes after Monday?", "Add two and three."], return_tensors="pt", padding=True)


def _logits(model, probe):
    with torch.no_grad():
        return model.eval()(**probe).logits


def _peft_combined(tiny_model, runs, weights, combination, **kwargs):
    """The reference: the same combination built directly with PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), runs[0] / "adapter", adapter_name="x0"
    )
    model.load_adapter(runs[1] / "adapter", adapter_name="x1")
    model.add_weighted_adapter(["x0", "x1"], weights, "ref", combination_type=combination, **kwargs)
    model.set_adapter("ref")
    return model


@pytest.mark.parametrize("combination, extra", [("linear", []), ("ties", ["--density", "0.5"])])
@pytest.mark.slow
def test_combined_full_model_matches_peft(two_runs, tiny_model, cli, tmp_path, combination, extra):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = cli("merge", *two_runs, "--weights", "0.7,0.3", "--combination", combination, *extra, "--out", out)
    assert result.code == 0, result.err
    probe = _probe(out)
    merged = AutoModelForCausalLM.from_pretrained(out)
    kwargs = {"density": 0.5} if combination == "ties" else {}
    reference = _peft_combined(tiny_model, two_runs, [0.7, 0.3], combination, **kwargs)
    assert (_logits(merged, probe) - _logits(reference, probe)).abs().max() < 1e-4
    assert "0.7" in (out / "README.md").read_text()


@pytest.mark.slow
def test_cat_equals_both_adapters_at_once(two_runs, tiny_model, cli, tmp_path):
    """`cat` with weights 1,1 is exact: the same as running both adapters together."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "combined"
    result = cli("merge", *two_runs, "--weights", "1,1", "--combination", "cat", "--as-adapter", "--out", out)
    assert result.code == 0, result.err
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    probe = _probe(out)
    combined = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    both = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), two_runs[0] / "adapter", adapter_name="a"
    )
    both.load_adapter(two_runs[1] / "adapter", adapter_name="b")
    both.base_model.set_adapter(["a", "b"])
    assert (_logits(combined, probe) - _logits(both, probe)).abs().max() < 1e-4


@pytest.mark.slow
def test_refusals(two_runs, tiny_model, cli, tmp_path):
    out = tmp_path / "out"
    missing_density = cli("merge", *two_runs, "--combination", "ties", "--out", out)
    assert missing_density.code == 2 and "--density" in missing_density.err
    wrong_count = cli("merge", *two_runs, "--weights", "1,2,3", "--out", out)
    assert wrong_count.code == 2 and "3 values for 2 runs" in wrong_count.err
    single = cli("merge", two_runs[0], "--weights", "1", "--out", out)
    assert single.code == 2 and "two or more" in single.err

    # Same weights, different base folder: refused before anything loads.
    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model, other_base)
    moved = tmp_path / "moved"
    shutil.copytree(two_runs[1], moved)
    recipe_file = moved / "recipe.yaml"
    recipe_file.write_text(recipe_file.read_text().replace(str(tiny_model), str(other_base)))
    different = cli("merge", two_runs[0], moved, "--out", out)
    assert different.code == 2 and "different base models" in different.err
    assert not out.exists()


@pytest.mark.slow
def test_dora_and_rank_mismatch_are_refused(two_runs, tiny_model, cli, tmp_path):
    from peftcli.recipe import load_recipe
    from peftcli.training.run import run_training

    recipe = base_recipe(tiny_model, tmp_path / "dora", training={"max_steps": 2})
    recipe["peft"] = {"method": "dora", "r": 4}
    dora = run_training(load_recipe(write_recipe(tmp_path / "dora.yaml", recipe))).run_dir
    result = cli("merge", two_runs[0], dora, "--out", tmp_path / "out")
    assert result.code == 2 and "DoRA" in result.err

    recipe = base_recipe(tiny_model, tmp_path / "r8", training={"max_steps": 2})
    recipe["peft"] = {"method": "lora", "r": 8}
    rank8 = run_training(load_recipe(write_recipe(tmp_path / "r8.yaml", recipe))).run_dir
    result = cli("merge", two_runs[0], rank8, "--combination", "linear", "--out", tmp_path / "out")
    assert result.code == 2 and "equal rank" in result.err and "cat" in result.err


@pytest.mark.slow
def test_compare_two_methods_end_to_end(cli, tmp_path, tiny_model):
    recipe = base_recipe(tiny_model, tmp_path / "run", training={"max_steps": 6}, data={"eval": str(DEMO_EVAL)})
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = tmp_path / "cmp"
    result = cli("compare", path, "--methods", "lora,ia3", "--out", out)
    assert result.code == 0, result.err
    summary = read_json(out / "compare.json")
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"lora", "ia3"} and all(r["status"] == "completed" for r in rows.values())
    assert rows["ia3"]["trainable_params"] < rows["lora"]["trainable_params"]
    assert rows["ia3"]["artifact_mb"] < rows["lora"]["artifact_mb"]
    for row in rows.values():
        assert row["eval_loss"] is not None and row["train_tokens_per_s"] > 0
        assert row["peak_memory_mb"] > 0 and row["wall_s"] > 0
    assert (out / "compare.png").stat().st_size > 0
    assert "| lora |" in (out / "compare.md").read_text()
    assert (out / "ia3" / "adapter" / "adapter_config.json").exists()


def test_compare_refuses_a_method_that_cannot_use_the_recipe(cli, tmp_path, tiny_model):
    recipe = base_recipe(tiny_model, tmp_path / "run", quantization={"bits": 4})
    result = cli(
        "compare", write_recipe(tmp_path / "r.yaml", recipe), "--methods", "lora,loha", "--out", tmp_path / "cmp"
    )
    assert result.code == 2 and "loha" in result.err and "quantized base" in result.err
    assert not (tmp_path / "cmp").exists()


@pytest.mark.slow
def test_merge_and_compare_never_replace_what_they_did_not_write(two_runs, cli, tmp_path, tiny_model):
    inside = cli("merge", two_runs[0], "--out", two_runs[0] / "merged", "--force")
    assert inside.code == 2 and "overlaps the run" in inside.err
    onto = cli("merge", two_runs[0], "--out", two_runs[0], "--force")
    assert onto.code == 2 and (two_runs[0] / "adapter").is_dir()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    refused = cli("merge", two_runs[0], "--out", other, "--force")
    assert refused.code == 2 and "holds something else" in refused.err and (other / "keep.txt").exists()
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run"))
    compared = cli("compare", recipe, "--methods", "lora", "--out", other, "--overwrite")
    assert compared.code == 2 and (other / "keep.txt").exists()


def test_compare_refuses_a_method_the_architecture_lacks_before_training(cli, tmp_path, tiny_qwen):
    """validate's no-weights checks run for every method first: nothing trains, nothing is written."""
    run, out = tmp_path / "run", tmp_path / "cmp"
    path = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_qwen, run, training={"max_steps": 2}))
    result = cli("compare", path, "--methods", "lora,adaption_prompt,ia3", "--out", out)
    assert result.code == 2, result.err
    assert result.error_lines == [
        "error: --methods adaption_prompt: peft.method 'adaption_prompt' does not support model type 'qwen2'"
    ]
    assert "training with" not in result.err and not out.exists() and not run.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]

    # A problem of the recipe, not of one method, is said once, without a method.
    missing = write_recipe(tmp_path / "r.yaml", base_recipe(tmp_path / "no-model", run))
    result = cli("compare", missing, "--methods", "lora,ia3", "--out", out)
    assert result.code == 2 and result.error_lines == [f"error: model.name: {tmp_path / 'no-model'} does not exist"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.slow
def test_compare_exits_nonzero_when_a_method_fails_while_training(cli, tmp_path, tiny_model, monkeypatch):
    """A runtime failure keeps its row and the reports; the exit code is the failure's class."""
    from peftcli.errors import UserError
    from peftcli.training import compare

    real = compare._run_one
    failure = {"ia3": UserError("out of memory")}

    def run_one(recipe_file, run_dir, method):
        if method in failure:
            raise failure[method]
        return real(recipe_file, run_dir, method)

    monkeypatch.setattr(compare, "_run_one", run_one)
    path = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run", training={"max_steps": 2}))
    out = tmp_path / "cmp"
    result = cli("compare", path, "--methods", "lora,ia3", "--out", out)
    assert result.code == 2, result.err
    assert result.error_lines == ["error: 1 of 2 methods failed: ia3"]
    table = (out / "compare.md").read_text()
    assert "| ia3 | failed: error: out of memory |" in table and "| lora | " in table
    summary = read_json(out / "compare.json")
    assert summary["failed"] == ["ia3"]
    assert [r["status"] for r in summary["rows"]] == ["completed", "failed"]
    assert (out / "lora" / "adapter" / "adapter_config.json").exists()

    # Anything that is not a user error (a crash, a killed process) exits 1.
    failure = {"lora": RuntimeError("boom"), "ia3": UserError("out of memory")}
    result = cli("compare", path, "--methods", "lora,ia3", "--out", out, "--overwrite")
    assert result.code == 1, result.err
    assert result.error_lines == ["error: 2 of 2 methods failed: lora, ia3"]
    assert "| lora | failed: error: unexpected RuntimeError: boom |" in (out / "compare.md").read_text()
