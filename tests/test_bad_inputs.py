"""The bad-input matrix: each row is a mistake a user can make (recipe, model, data, output folder,
command line, environment). Every one must exit 2 with exactly one `error:` line naming what is
wrong, print no traceback, and write nothing at all (a run already there is left untouched)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import DEMO_TRAIN, base_recipe, write_recipe
from safetensors.torch import save_file

from peftcli.rundir.guard import write_run_marker

Setup = Callable[[Path, Path, "pytest.MonkeyPatch"], list]


def _train_with(**sections) -> Setup:
    def setup(tmp: Path, model: Path, monkeypatch) -> list:
        return ["train", write_recipe(tmp / "recipe.yaml", base_recipe(model, tmp / "run", **sections))]

    return setup


def _recipe_text(text: str | bytes) -> Setup:
    def setup(tmp: Path, model: Path, monkeypatch) -> list:
        path = tmp / "recipe.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["train", path]

    return setup


def _peft(**peft) -> Setup:
    def setup(tmp: Path, model: Path, monkeypatch) -> list:
        recipe = base_recipe(model, tmp / "run")
        recipe["peft"] = peft
        return ["train", write_recipe(tmp / "recipe.yaml", recipe)]

    return setup


def _data_file(name: str, content: str | bytes | Callable[[Path], None], role: str = "train") -> Setup:
    def setup(tmp: Path, model: Path, monkeypatch) -> list:
        path = tmp / name
        if callable(content):
            content(path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        data = {"train": str(DEMO_TRAIN), "eval": None, role: str(path)}
        return ["train", write_recipe(tmp / "recipe.yaml", base_recipe(model, tmp / "run", data=data))]

    return setup


def _model_copy(drop: tuple[str, ...]) -> Setup:
    def setup(tmp: Path, model: Path, monkeypatch) -> list:
        copy = tmp / "model"
        shutil.copytree(model, copy)
        for name in drop:
            (copy / name).unlink()
        return ["train", write_recipe(tmp / "recipe.yaml", base_recipe(copy, tmp / "run"))]

    return setup


def _quantized_full(tmp: Path, model: Path, monkeypatch) -> list:
    recipe = base_recipe(model, tmp / "run", quantization={"bits": 4})
    recipe["peft"] = {"method": "full"}
    return ["train", write_recipe(tmp / "recipe.yaml", recipe)]


def _without_bitsandbytes(bits: int) -> Setup:
    def setup(tmp: Path, model: Path, monkeypatch) -> list:
        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
        )
        recipe = base_recipe(model, tmp / "run", quantization={"bits": bits})
        return ["train", write_recipe(tmp / "recipe.yaml", recipe)]

    return setup


def _output(where: Callable[[Path], Path]) -> Setup:
    def setup(tmp: Path, model: Path, monkeypatch) -> list:
        return ["train", write_recipe(tmp / "recipe.yaml", base_recipe(model, where(tmp)))]

    return setup


def _file_then(tmp: Path) -> Path:
    (tmp / "a-file").write_text("x")
    return tmp / "a-file" / "run"


def _existing_run(tmp: Path) -> Path:
    (tmp / "run" / "checkpoint-4").mkdir(parents=True)
    (tmp / "run" / "recipe.yaml").write_text(f"output: {{dir: {tmp / 'run'}}}\n")  # a run names its own folder
    write_run_marker(tmp / "run")  # and carries peftcli's marker: only that makes it a run
    return tmp / "run"


def _args(*argv: str, recipe: dict | None = None) -> Setup:
    """A command line; "{recipe}", "{run}" and "{tmp}" are filled in."""

    def setup(tmp: Path, model: Path, monkeypatch) -> list:
        path = write_recipe(tmp / "recipe.yaml", recipe or base_recipe(model, tmp / "run"))
        (tmp / "not-a-run").mkdir()
        (tmp / "not-a-run" / "notes.txt").write_text("hello")
        return [a.format(recipe=path, run=tmp / "fake-run", tmp=tmp) for a in argv]

    return setup


def _fake_run(*argv: str, adapter: bool = True, out_file: bool = False) -> Setup:
    """A run directory with a valid recipe.yaml (and an adapter folder unless told otherwise)."""

    def setup(tmp: Path, model: Path, monkeypatch) -> list:
        from peftcli.recipe import load_recipe, recipe_to_yaml

        run = tmp / "fake-run"
        run.mkdir()
        resolved = load_recipe(write_recipe(tmp / "recipe.yaml", base_recipe(model, run)))
        (run / "recipe.yaml").write_text(recipe_to_yaml(resolved))
        if adapter:
            (run / "adapter").mkdir()
            (run / "adapter" / "adapter_config.json").write_text("{}")
            save_file({"w": torch.zeros(1)}, str(run / "adapter" / "adapter_model.safetensors"))
        if out_file:
            (tmp / "out").mkdir()
            (tmp / "out" / "keep.txt").write_text("x")
        return [a.format(run=run, tmp=tmp) for a in argv]

    return setup


def _parquet_wrong_columns(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": "q", "reply": "a"}]), path)


def _directory(path: Path) -> None:
    path.mkdir()
    (path / "notes.md").write_text("not data")


def _eof_to_blocked_readers(fifo: Path, seconds: float = 3.0) -> None:
    """If anything opens `fifo` for reading within `seconds`, give it end-of-file at once, so code that
    wrongly reads a FIFO fails the test instead of hanging it."""

    def writer() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError:  # no reader (yet): ENXIO
                time.sleep(0.05)

    threading.Thread(target=writer, daemon=True).start()


def _fifo(path: Path) -> None:
    os.mkfifo(path)
    _eof_to_blocked_readers(path)


def _recipe_fifo(tmp: Path, model: Path, monkeypatch) -> list:
    _fifo(tmp / "recipe.yaml")
    return ["train", tmp / "recipe.yaml"]


def _alias_bomb() -> str:
    """Nine aliases of nine aliases ... of nine strings: 9**9 values from a few hundred bytes."""
    lines = ['  a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    return "model: {name: m}\ndata: {train: t.jsonl}\ntraining:\n  report_to:\n" + "\n".join(lines) + "\n"


def _deep_json(depth: int) -> str:
    return '{"prompt": "a", "completion": ' + "[" * depth + "]" * depth + "}"


def _template(text: str | bytes) -> Setup:
    def setup(tmp: Path, model: Path, monkeypatch) -> list:
        path = tmp / "chat.jinja"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return [
            "train",
            write_recipe(tmp / "recipe.yaml", base_recipe(model, tmp / "run", data={"chat_template": str(path)})),
        ]

    return setup


def _broken_saved_dataset(path: Path) -> None:
    path.mkdir()
    (path / "state.json").write_text("not json")


FIRST_ROW = DEMO_TRAIN.read_text().splitlines()[0]
TRUNCATED_JSONL = (
    DEMO_TRAIN.read_text().splitlines()[0]
    + "\n"
    + DEMO_TRAIN.read_text().splitlines()[1]
    + "\n"
    + '{"messages": [{"role": "user", "content": "What comes'
)
CASES: dict[str, tuple[Setup, tuple[str, ...]]] = {
    # recipe file
    "empty recipe file": (_recipe_text(""), ("recipe.yaml", "empty")),
    "recipe is a YAML list": (_recipe_text("- model\n- data\n"), ("mapping of sections",)),
    "binary recipe": (_recipe_text(b"\x89PNG\r\n\x1a\n\x00\xff\xfe"), ("not a UTF-8 text file",)),
    "duplicate YAML keys": (_recipe_text("model:\n  name: a\n  name: b\n"), ("duplicate key 'name'", "line 3")),
    "YAML syntax error": (
        _recipe_text("model:\n  name: [a\ndata: {\n"),
        ("YAML syntax error at line 3", "starts at line 2"),
    ),
    "recipe file missing": (lambda tmp, model, mp: ["train", tmp / "nope.yaml"], ("recipe file not found",)),
    "YAML alias bomb": (_recipe_text(_alias_bomb()), ("recipe.yaml: line", "more than 100,000 values")),
    "YAML alias inside itself": (
        _recipe_text("model: {name: m}\ndata: {train: t.jsonl}\nx: &a [1, *a]\n"),
        ("line 3", "alias *a", "endless loop"),
    ),
    "YAML list as a key": (
        _recipe_text("model: {name: m}\ndata: {train: t.jsonl}\n? [a, b]\n: c\n"),
        ("line 3", "keys must be names"),
    ),
    "YAML list as a flow-mapping key": (
        _recipe_text("model: {name: m}\ndata: {train: t.jsonl, columns: {[1]: 2}}\n"),
        ("line 2", "keys must be names"),
    ),
    "YAML key read as a boolean": (
        _recipe_text("model: {name: m}\ndata: {train: t.jsonl}\ntraining:\n  on: 1\n"),
        ("line 4", "a boolean ('on')"),
    ),
    "YAML nested 5,000 deep": (
        _recipe_text("model: {name: m}\ndata: {train: t.jsonl}\nx: " + "[" * 5000 + "]" * 5000 + "\n"),
        ("line 3", "nested more than 50 levels"),
    ),
    "YAML integer of 5,000 digits": (
        _recipe_text("model: {name: m}\ndata: {train: t.jsonl}\ntraining: {seed: " + "9" * 5000 + "}\n"),
        ("line 3", "as a number"),
    ),
    "YAML impossible date": (
        _recipe_text("model: {name: m}\ndata: {train: t.jsonl}\noutput: {dir: 2024-13-45}\n"),
        ("line 3", "2024-13-45 as a date"),
    ),
    "recipe is a FIFO": (_recipe_fifo, ("recipe.yaml is a FIFO (named pipe), not a regular file",)),
    "recipe is /dev/zero": (lambda tmp, model, mp: ["train", "/dev/zero"], ("/dev/zero is a character device",)),
    "recipe over 1 MiB": (
        _recipe_text("model: {name: m}\ndata: {train: t.jsonl}\n" + "# padding\n" * 120_000),
        ("recipe.yaml is 1.1 MiB", "small YAML file"),
    ),
    # values
    "negative learning rate": (_train_with(training={"learning_rate": -1e-4}), ("training.learning_rate",)),
    "zero learning rate": (_train_with(training={"learning_rate": 0}), ("training.learning_rate",)),
    "NaN learning rate": (
        _recipe_text("model: {name: m}\ndata: {train: t.jsonl}\ntraining: {learning_rate: .nan}\n"),
        ("training.learning_rate",),
    ),
    "r: 0": (_peft(method="lora", r=0), ("peft.r",)),
    "r: true": (_peft(method="lora", r=True), ("peft.r", "not true/false")),
    "batch_size: true": (_train_with(training={"batch_size": True}), ("training.batch_size", "not true/false")),
    "empty data.train": (_train_with(data={"train": ""}), ("data.train", "must not be empty")),
    "empty source path": (_train_with(data={"train": {"path": ""}}), ("data.train[0].path", "must not be empty")),
    "empty output.dir": (_train_with(output={"dir": ""}), ("output.dir", "must not be empty")),
    "NUL in model.name": (_train_with(model={"name": "models/a\x00b"}), ("model.name", "NUL character")),
    'batch_size: "four"': (_train_with(training={"batch_size": "four"}), ("training.batch_size",)),
    "misspelt key": (_train_with(training={"learning_rte": 1e-4}), ("training.learning_rte", "learning_rate")),
    "unknown section": (_train_with(trainer={"x": 1}), ("unknown section 'trainer'",)),
    "unknown method": (_peft(method="lorra"), ("peft.method", "did you mean 'lora'")),
    "key of another method": (_peft(method="ia3", alpha=16), ("'alpha' is not a key of peft.method 'ia3'",)),
    "max_length over the model context": (
        _train_with(data={"max_length": 100_000}),
        ("data.max_length 100000", "context (512"),
    ),
    "eval_split outside (0,1)": (_train_with(data={"eval": None, "eval_split": 1.5}), ("data.eval_split",)),
    "eval and eval_split": (_train_with(data={"eval_split": 0.1}), ("data.eval and data.eval_split",)),
    "quant_type with 8-bit": (_train_with(quantization={"bits": 8, "quant_type": "nf4"}), ("quant_type",)),
    "full fine-tune on a quantized base": (_quantized_full, ("'full' cannot train on a quantized base",)),
    # model
    "model folder missing": (_train_with(model={"name": "./no-such-model"}), ("model.name", "does not exist")),
    "model folder without config.json": (_model_copy(("config.json",)), ("no config.json",)),
    "tokenizer missing": (_model_copy(("tokenizer.json", "tokenizer_config.json")), ("no tokenizer files",)),
    "4-bit without bitsandbytes": (_without_bitsandbytes(4), ("4-bit needs bitsandbytes",)),
    "8-bit without bitsandbytes": (_without_bitsandbytes(8), ("8-bit needs bitsandbytes",)),
    "target_modules match nothing": (
        _train_with(peft={"target_modules": ["query", "key"]}),
        ("peft.target_modules", "match no module"),
    ),
    "method unsupported by the architecture": (
        lambda tmp, model, mp: _peft(method="adaption_prompt")(tmp, model.parent.parent / "qwen-for-bad-inputs", mp),
        ("does not support model type 'qwen2'",),
    ),
    "hub id without a hub": (
        _train_with(model={"name": "some-org/some-model"}),
        ("cannot load 'some-org/some-model'",),
    ),
    # output folder
    "output.dir inside a file": (_output(_file_then), ("is a file",)),
    "output.dir not writable": (_output(lambda tmp: Path("/proc/peftcli-test/run")), ("output.dir", "cannot")),
    "output.dir holds a run": (_output(_existing_run), ("already holds a run",)),
    # data
    "data file is a directory": (_data_file("folder", _directory), ("is a directory with no",)),
    "empty data file": (_data_file("d.jsonl", ""), ("d.jsonl is empty",)),
    "CSV with no header": (
        _data_file("d.csv", "What comes after Monday?,Tuesday\nAfter May?,June\n"),
        ("d.csv", "cannot detect the data format"),
    ),
    "parquet with wrong columns": (
        _data_file("d.parquet", _parquet_wrong_columns),
        ("d.parquet", "['question', 'reply']"),
    ),
    "JSONL with a truncated last line": (_data_file("d.jsonl", TRUNCATED_JSONL), ("d.jsonl line 3", "invalid JSON")),
    "row with a wrong type": (
        _data_file("d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 5}\n'),
        ("d.jsonl line 2", "should be text"),
    ),
    "eval file with zero usable rows": (_data_file("e.jsonl", "\n\n", role="eval"), ("data.eval", "no usable rows")),
    "data file missing": (_train_with(data={"train": "./missing.jsonl"}), ("data.train", "not found")),
    "unknown format name": (_train_with(data={"format": "chatgpt"}), ("data.format",)),
    "JSONL row nested 100,000 deep": (
        _data_file("d.jsonl", f"{FIRST_ROW}\n{_deep_json(100_000)}\n"),
        ("d.jsonl line 2", "nested too deeply"),
    ),
    "JSON record nested 100,000 deep": (
        _data_file("d.json", f"[{FIRST_ROW},\n{_deep_json(100_000)}]"),
        ("d.json record 2 (line 2)", "nested too deeply"),
    ),
    "JSONL integer of 5,000 digits": (
        _data_file("d.jsonl", f'{FIRST_ROW}\n{{"text": {"7" * 5000}}}\n'),
        ("d.jsonl line 2", "cannot read a number"),
    ),
    "data file is a FIFO": (_data_file("d.jsonl", _fifo), ("data.train", "d.jsonl is a FIFO (named pipe)")),
    "data file is /dev/zero": (
        _train_with(data={"train": "/dev/zero"}),
        ("data.train", "/dev/zero is a character device"),
    ),
    "CSV record over several lines": (
        _data_file("d.csv", 'prompt,completion\na,b\n"several\nlines",c,extra\n'),
        ("d.csv line 3:", "3 cells for 2 header columns"),
    ),
    "role that is a list": (
        _data_file("d.jsonl", '{"messages": [{"role": ["user"], "content": "a"}]}\n'),
        ("d.jsonl line 1", "turn 1: 'role' should be text, got list"),
    ),
    "damaged saved dataset": (_data_file("saved", _broken_saved_dataset), ("data.train", "cannot be loaded")),
    "chat template with an unknown filter": (
        _template("{% for m in messages %}{{ m.content | shout }}{% endfor %}"),
        ("data.chat_template", "chat.jinja fails on a plain", "shout"),
    ),
    "chat template syntax error": (
        _template("{% for m in messages %}\n{{ m.content }"),
        ("data.chat_template", "chat.jinja", "template line 2"),
    ),
    "chat template not UTF-8": (_template(b"{{ \xe9 }}"), ("data.chat_template", "not UTF-8")),
    # command line
    "--set key that does not exist": (
        _args("train", "{recipe}", "--set", "training.nope=1"),
        ("training.nope (from --set)",),
    ),
    "--set value that does not parse": (
        _args("train", "{recipe}", "--set", "training.max_steps=[1"),
        ("--set training.max_steps", "cannot parse"),
    ),
    "--set value nested 5,000 deep": (
        _args("train", "{recipe}", "--set", "training.report_to=" + "[" * 5000 + "]" * 5000),
        ("--set training.report_to", "nested more than 50 levels"),
    ),
    "--set value with a list key": (
        _args("train", "{recipe}", "--set", "data.columns={{[1]: 2}}"),  # braces doubled: _args formats it
        ("--set data.columns", "keys must be names"),
    ),
    "--set a boolean batch size": (
        _args("train", "{recipe}", "--set", "training.batch_size=true"),
        ("training.batch_size (from --set)", "not true/false"),
    ),
    "--set without a value": (_args("train", "{recipe}", "--set", "training.max_steps"), ("expected KEY=VALUE",)),
    "--resume with --overwrite": (_args("train", "{recipe}", "--resume", "--overwrite"), ("contradict",)),
    "--force without --resume": (_args("train", "{recipe}", "--force"), ("--force only applies with --resume",)),
    "merge of a run with no adapter": (
        _fake_run("merge", "{run}", "--out", "{tmp}/out", adapter=False),
        ("has no trained adapter",),
    ),
    "merge into a non-empty folder": (
        _fake_run("merge", "{run}", "--out", "{tmp}/out", out_file=True),
        ("--out", "is not empty"),
    ),
    "merge with an unknown dtype": (_fake_run("merge", "{run}", "--out", "{tmp}/out", "--dtype", "fp8"), ("--dtype",)),
    "eval of a folder that is not a run": (_args("eval", "{tmp}/not-a-run"), ("not a peftcli run",)),
    "compare with an unknown method": (_args("compare", "{recipe}", "--methods", "lora,qlora"), ("--methods", "qlora")),
}


@pytest.fixture(scope="module")
def qwen_for_bad_inputs(tiny_qwen):
    target = tiny_qwen.parent.parent / "qwen-for-bad-inputs"
    if not target.exists():
        shutil.copytree(tiny_qwen, target)
    return target


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.slow
def test_bad_input(case, tmp_path, tiny_model, qwen_for_bad_inputs, cli, monkeypatch):
    setup, needles = CASES[case]
    argv = setup(tmp_path, tiny_model, monkeypatch)
    before = _snapshot(tmp_path)
    result = cli(*argv)
    assert result.code == 2, (result.code, result.err)
    assert len(result.error_lines) == 1, result.err
    for needle in needles:
        assert needle in result.error_lines[0], (needle, result.error_lines[0])
    assert "Traceback" not in result.err
    assert _snapshot(tmp_path) == before, "a failed command must write nothing"
