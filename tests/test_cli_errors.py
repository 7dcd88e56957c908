"""Every user error exits 2 with one `error:` line naming the key or file, and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from helpers import ROOT, base_recipe, write_recipe


def _assert_user_error(result, *needles):
    assert result.code == 2, (result.code, result.err)
    assert len(result.error_lines) == 1, result.err
    for needle in needles:
        assert needle in result.error_lines[0], (needle, result.error_lines[0])
    assert "Traceback" not in result.err


def _train(cli, tmp_path, base_model, **sections):
    recipe = write_recipe(tmp_path / "recipe.yaml", base_recipe(base_model, tmp_path / "run", **sections))
    return cli("train", recipe)


def test_yaml_syntax_error(cli, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: x\n   bad: indentation\n", encoding="utf-8")
    _assert_user_error(cli("train", path), "YAML syntax error", "line 3")


def test_unknown_key_with_suggestion(cli, tmp_path, tiny_model):
    _assert_user_error(_train(cli, tmp_path, tiny_model, training={"bacth_size": 2}), "did you mean 'batch_size'")


def test_wrong_type(cli, tmp_path, tiny_model):
    _assert_user_error(_train(cli, tmp_path, tiny_model, training={"batch_size": "four"}), "training.batch_size")


def test_out_of_range(cli, tmp_path, tiny_model):
    _assert_user_error(_train(cli, tmp_path, tiny_model, peft={"dropout": 1.5}), "peft.dropout")


def test_missing_model_path(cli, tmp_path, tiny_model):
    result = _train(cli, tmp_path, tiny_model, model={"name": str(tmp_path / "nowhere")})
    _assert_user_error(result, "model.name", "nowhere", "does not exist")
    assert not (tmp_path / "run").exists()


def test_model_dir_without_config(cli, tmp_path, tiny_model):
    (tmp_path / "empty_model").mkdir()
    _assert_user_error(
        _train(cli, tmp_path, tiny_model, model={"name": str(tmp_path / "empty_model")}), "no config.json"
    )


def test_missing_data_file(cli, tmp_path, tiny_model):
    result = _train(cli, tmp_path, tiny_model, data={"train": str(tmp_path / "missing.jsonl")})
    _assert_user_error(result, "data.train", "missing.jsonl", "not found")
    assert not (tmp_path / "run").exists()


def test_undetectable_format(cli, tmp_path, tiny_model):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"q": "a", "a": "b"}) + "\n", encoding="utf-8")
    _assert_user_error(
        _train(cli, tmp_path, tiny_model, data={"train": str(data), "eval": None}),
        "cannot detect the data format",
        "['a', 'q']",
    )


def test_unknown_format_name(cli, tmp_path, tiny_model):
    _assert_user_error(_train(cli, tmp_path, tiny_model, data={"format": "chatgpt"}), "data.format")


def test_empty_dataset(cli, tmp_path, tiny_model):
    data = tmp_path / "d.jsonl"
    data.write_text("\n\n", encoding="utf-8")
    _assert_user_error(
        _train(cli, tmp_path, tiny_model, data={"train": str(data), "eval": None}), "data.train", "no usable rows"
    )


def test_quantization_without_usable_bitsandbytes(cli, tmp_path, tiny_model, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    result = _train(cli, tmp_path, tiny_model, quantization={"bits": 4})
    _assert_user_error(result, "quantization", "bitsandbytes")
    assert not (tmp_path / "run").exists()


def test_existing_run_needs_overwrite(cli, tmp_path, tiny_model):
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "keep.txt").write_text("x")
    (run / "recipe.yaml").write_text(f"output: {{dir: {run}}}\n")
    (run / "peftcli.json").write_text('{"kind": "run"}')  # what peftcli writes when a run starts
    result = _train(cli, tmp_path, tiny_model)
    _assert_user_error(result, "already holds a run that did not finish")
    assert "you probably want --resume" in result.err
    overwrite = cli("train", tmp_path / "recipe.yaml", "--overwrite")
    _assert_user_error(overwrite, "holds files peftcli did not write: keep.txt")
    # A folder peftcli did not mark is never offered for deletion, whatever its recipe.yaml says:
    # none, one that names another folder (a copied run), or one that names this very folder.
    (run / "peftcli.json").unlink()
    for marker in (None, f"output: {{dir: {tmp_path / 'elsewhere'}}}\n", f"output: {{dir: {run}}}\n"):
        (run / "recipe.yaml").unlink(missing_ok=True)
        if marker:
            (run / "recipe.yaml").write_text(marker)
        for flags in ([], ["--overwrite"]):
            refused = cli("train", tmp_path / "recipe.yaml", *flags)
            _assert_user_error(refused, "is not empty and is not a peftcli run")
            assert "--overwrite" not in refused.err
    assert (run / "keep.txt").exists() and (run / "checkpoint-2").is_dir()


def test_eval_and_merge_of_a_directory_that_is_not_a_run(cli, tmp_path):
    _assert_user_error(cli("eval", tmp_path), "not a peftcli run")
    _assert_user_error(cli("merge", tmp_path, "--out", tmp_path / "m"), "not a peftcli run")


@pytest.mark.slow
def test_a_crash_while_saving_the_adapter_leaves_none(cli, tmp_path, tiny_model, monkeypatch):
    from peft import PeftModel

    real_save = PeftModel.save_pretrained

    def half_then_crash(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)
        if "checkpoint" not in str(folder):  # the final adapter, not a checkpoint
            raise OSError("disk full")

    monkeypatch.setattr(PeftModel, "save_pretrained", half_then_crash)
    result = _train(cli, tmp_path, tiny_model)
    assert result.code == 1 and "disk full" in result.err
    assert not (tmp_path / "run" / "adapter").exists()  # the written files stayed in the temporary sibling
    assert not list((tmp_path / "run").glob(".tmp-*"))


@pytest.mark.slow
def test_debug_variable_shows_the_traceback(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("[1, 2]\n", encoding="utf-8")
    quiet = subprocess.run([sys.executable, "-m", "peftcli", "validate", str(path)], capture_output=True, text=True)
    loud = subprocess.run(
        [sys.executable, "-m", "peftcli", "validate", str(path)],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PEFTCLI_DEBUG": "1"},
    )
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and quiet.stderr.startswith("error:")
    assert "Traceback" in loud.stderr


@pytest.mark.slow
def test_cli_import_does_not_import_torch_and_help_is_fast():
    code = "import sys, peftcli.cli; sys.exit(3 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "peftcli", "--help"], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0 and "train" in result.stdout
    assert elapsed < 3.0  # generous for a loaded CI box; typically ~0.3 s


@pytest.mark.parametrize("command", ["validate"])
@pytest.mark.slow
def test_validate_does_not_import_torch(command, tmp_path, tiny_model):
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run"))
    code = (
        "import sys; from peftcli.cli import main\n"
        f"try:\n    main([{command!r}, {str(recipe)!r}])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "sys.exit(3 if 'torch' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["trian", "recipes/demo.yaml"], "Did you mean 'train'?"),
        (["train"], "Missing argument"),
        (["train", "r.yaml", "--max-steps", "5"], "No such option: --max-steps"),
        (["merge", "runs/demo"], "Missing option '--out'"),
        (["eval", "runs/demo", "--batch-size", "0"], "Invalid value for '--batch-size'"),
        (["compare", "recipes/demo.yaml"], "Missing option '--methods'"),
        (["train", "r.yaml", "--set"], "requires an argument"),
    ],
)
def test_command_line_mistakes_are_usage_errors(cli, args, says):
    """A wrong command, option or argument is the user's mistake (exit 2, click's usage message),
    never reported as a bug in peftcli."""
    result = cli(*args)
    assert result.code == 2, result.err
    assert says in result.err and "this is a bug" not in result.err


def test_version_and_bare_command(cli):
    from importlib.metadata import version

    result = cli("--version")
    assert result.code == 0 and result.out.strip() == f"peftcli {version('peftcli')}"
    bare = cli()
    assert bare.code == 2 and "Commands" in bare.err + bare.out and "this is a bug" not in bare.err


def test_accelerate_config_without_processes_is_refused(cli, tmp_path, tiny_model):
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run"))
    result = cli("train", recipe, "--accelerate-config", ROOT / "recipes" / "accelerate" / "ddp.yaml")
    assert result.code == 2 and "--num-processes" in result.err
    assert not (tmp_path / "run").exists()
