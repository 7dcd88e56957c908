"""The bad-input matrix: each row is a mistake a user can make (recipe, model, data, output folder,
command line, environment). Every one must exit 2 with exactly one `error:` line naming what is
wrong, print no traceback, and write nothing at all (a run already there is left untouched)."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DEMO_TRAIN, base_recipe, write_recipe

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
    # values
    "negative learning rate": (_train_with(training={"learning_rate": -1e-4}), ("training.learning_rate",)),
    "zero learning rate": (_train_with(training={"learning_rate": 0}), ("training.learning_rate",)),
    "NaN learning rate": (
        _recipe_text("model: {name: m}\ndata: {train: t.jsonl}\ntraining: {learning_rate: .nan}\n"),
        ("training.learning_rate",),
    ),
    "r: 0": (_peft(method="lora", r=0), ("peft.r",)),
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
    # command line
    "--set key that does not exist": (
        _args("train", "{recipe}", "--set", "training.nope=1"),
        ("training.nope (from --set)",),
    ),
    "--set value that does not parse": (
        _args("train", "{recipe}", "--set", "training.max_steps=[1"),
        ("--set training.max_steps", "cannot parse"),
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
