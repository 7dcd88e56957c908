"""Every user error is one `error:` line naming the file, key or row it is about, exit 2: a file of
bad rows says why its first row is bad, skipped rows are counted per kind of fault, a template
that is not UTF-8 is named with its byte, a path says what it is (a FIFO, a directory, a symlink
loop), `--reference` is not called `data.eval`, and a merge's folder is not "a folder without a marker"."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import base_recipe, write_recipe


def _one_error(result, *needles: str) -> str:
    assert result.code == 2, (result.code, result.err)
    assert len(result.error_lines) == 1, result.err
    line = result.error_lines[0]
    for needle in needles:
        assert needle in line, (needle, line)
    assert "Traceback" not in result.err
    return line


def _recipe(tmp_path: Path, model: Path, **data) -> Path:
    recipe = base_recipe(model, tmp_path / "run", data={"eval": None, **data})
    return write_recipe(tmp_path / "recipe.yaml", recipe)


DEEP_ARRAY = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("row", "reason"),
    [(DEEP_ARRAY, "nested too deeply"), ('[{"text": "a"}]', "expected a JSON object, got list")],
    ids=["100,000-deep array", "a JSON array"],
)
def test_a_file_of_only_bad_rows_says_why_its_first_row_is_bad(tmp_path, tiny_model, cli, row, reason):
    data = tmp_path / "d.jsonl"
    data.write_text(row + "\n" + row + "\n", encoding="utf-8")
    recipe = _recipe(tmp_path, tiny_model, train=str(data))
    _one_error(cli("validate", recipe), "data.train", "d.jsonl line 1", reason)
    skipping = _one_error(cli("validate", recipe, "--set", "data.bad_rows=skip"), "every row", "all 2 rows", reason)
    assert "d.jsonl line 1" in skipping


def test_skipped_rows_are_counted_per_kind_of_fault_not_listed_per_row(tmp_path, tiny_model, cli):
    rows = [json.dumps({"text": f"good {i}"}) for i in range(3)]
    rows += ['{"text": "broken' + " " * i + '" 1' for i in range(7)]  # invalid JSON, each at its own column
    rows += [json.dumps([i]) for i in range(3)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    recipe = _recipe(tmp_path, tiny_model, train=str(data), bad_rows="skip")
    result = cli("data", "preview", recipe, "--rows", "0")
    assert result.code == 0, result.err
    skipped = [line for line in result.out.splitlines() if line.startswith("skipped (train)")]
    assert len(skipped) == 2, result.out
    assert "invalid JSON" in skipped[0] and "7 rows" in skipped[0] and "d.jsonl line 4" in skipped[0]
    assert "and 2 more" in skipped[0]  # the first five rows named, the rest counted
    assert "expected a JSON object" in skipped[1] and "3 rows" in skipped[1]


def test_a_chat_template_that_is_not_utf8_is_named_with_its_byte(tmp_path, tiny_model, cli):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_bytes("{% for m in messages %}é{{ m.content }}{% endfor %}".encode("latin-1"))
    recipe = _recipe(tmp_path, model)
    for command in ("validate", "train"):
        line = _one_error(cli(command, recipe), "model.name", "chat_template.jinja", "not UTF-8", "0xe9")
        assert "codec" not in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["FIFO", "directory", "symlink loop"])
def test_generate_prompts_says_what_the_path_is(tmp_path, tiny_model, cli, kind):
    path = tmp_path / "prompts"
    if kind == "FIFO":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "other")
        (tmp_path / "other").symlink_to(path)
    _one_error(cli("generate", "--base", tiny_model, "--prompts", path), "--prompts", str(path), kind)


def test_a_data_path_that_is_a_symlink_loop_is_called_one(tmp_path, tiny_model, cli):
    loop = tmp_path / "train.jsonl"
    loop.symlink_to(tmp_path / "again.jsonl")
    (tmp_path / "again.jsonl").symlink_to(loop)
    line = _one_error(cli("validate", _recipe(tmp_path, tiny_model, train=str(loop))), "data.train", "symlink loop")
    assert "not found" not in line


def _finished_looking_run(tmp_path: Path, tiny_model: Path, **sections) -> Path:
    """A folder `eval` opens as a finished run (marker, recipe, adapter files); nothing in it loads."""
    import numpy as np
    from safetensors.numpy import save_file

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    write_recipe(run / "recipe.yaml", base_recipe(tiny_model, run, **sections))
    (run / "peftcli.json").write_text(json.dumps({"kind": "run", "peftcli": "0"}), encoding="utf-8")
    (run / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    save_file({"weight": np.zeros(1, dtype=np.float32)}, str(run / "adapter" / "adapter_model.safetensors"))
    return run


@pytest.mark.parametrize("reference", ["/dev/zero", "loop"])
def test_eval_reference_errors_are_labelled_with_the_flag(tmp_path, tiny_model, cli, reference):
    if reference == "loop":
        reference = str(tmp_path / "ref.txt")
        Path(reference).symlink_to(tmp_path / "ref2.txt")
        (tmp_path / "ref2.txt").symlink_to(reference)
    run = _finished_looking_run(tmp_path, tiny_model)
    line = _one_error(cli("eval", run, "--reference", reference), "--reference", reference)
    assert "data.eval" not in line


def test_a_recipes_eval_reference_is_labelled_with_its_key(tmp_path, tiny_model, cli):
    run = _finished_looking_run(tmp_path, tiny_model, eval={"reference": "/dev/zero"})
    line = _one_error(cli("eval", run), "eval.reference", "/dev/zero", "character device")
    assert "data.eval" not in line


def test_training_into_a_merged_model_folder_says_what_that_folder_is(tmp_path, tiny_model, cli):
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model, merged)
    files = sorted(entry.name for entry in merged.iterdir())
    marker = {"kind": "merged-model", "peftcli": "0", "max_logit_diff": 0.0, "files": files}
    (merged / "peftcli.json").write_text(json.dumps(marker), encoding="utf-8")
    recipe = write_recipe(tmp_path / "recipe.yaml", base_recipe(tiny_model, merged))
    before = sorted(entry.name for entry in merged.iterdir())
    for flags in ([], ["--overwrite"]):
        result = cli("train", recipe, *flags)
        line = _one_error(result, "output.dir", str(merged), "merged model", "peftcli merge", "not a training run")
        assert "no peftcli.json" not in line
        assert f"model.name: {merged}" in result.err  # how to train on top of it instead
    assert sorted(entry.name for entry in merged.iterdir()) == before  # nothing written, nothing removed


@pytest.mark.slow
def test_a_reference_file_that_is_not_text_is_labelled_with_the_flag(tmp_path, tiny_model, cli):
    from helpers import train

    recipe = base_recipe(tiny_model, tmp_path / "run", training={"max_steps": 1, "save_steps": 1})
    run = train(write_recipe(tmp_path / "recipe.yaml", recipe)).run_dir
    reference = tmp_path / "general.txt"
    reference.write_bytes("caf\xe9 au lait\n".encode("latin-1"))  # read once the models are loaded
    line = _one_error(cli("eval", run, "--reference", reference), "--reference", "general.txt", "not UTF-8")
    assert "data.eval" not in line
