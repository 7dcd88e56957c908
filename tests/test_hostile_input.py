"""Hostile recipe and data input handled with bounded work: what still works next to what is refused
(the refusals themselves are rows of tests/test_bad_inputs.py), and rows far longer than max_length
tokenized only as far as truncation needs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import types
import typing
from typing import Annotated, Any, Literal, Union

import pytest
from helpers import ROOT, trained_pieces

from peftcli.data import encode as encode_module
from peftcli.data import prepare_data
from peftcli.data.encode import encode, fit_length
from peftcli.data.formats import Example, Turn
from peftcli.errors import UserError
from peftcli.recipe import DataSection, load_recipe
from peftcli.recipe import schema as recipe_schema
from peftcli.strict import Strict

# --- recipe ------------------------------------------------------------------------------------


def test_anchors_aliases_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "model: {name: some/model}\n"
        "data:\n"
        "  train: &source {path: train.jsonl, format: messages}\n"
        "  eval: {<<: *source, path: eval.jsonl}\n"
        "training: &steps {max_steps: 3}\n"
    )
    recipe = load_recipe(path)
    assert recipe.data.eval[0].path.endswith("eval.jsonl") and recipe.data.eval[0].format == "messages"
    assert recipe.training.max_steps == 3


@pytest.mark.slow
def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path):
    lines = ["x0: &x0 [a, a, a, a, a, a, a, a, a, a]"]
    lines += [f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 10)}]" for i in range(1, 12)]  # 10**12 values
    path = tmp_path / "recipe.yaml"
    path.write_text("model: {name: m}\ndata: {train: t.jsonl}\nextra:\n" + "".join(f"  {x}\n" for x in lines))
    # In a subprocess with a timeout: code that expands the aliases fails the test instead of hanging it.
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "peftcli", "validate", str(path)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 2, result.stderr
    assert "recipe.yaml: line 8: the document expands to more than 100,000 values" in result.stderr
    assert time.monotonic() - start < 30


def _leaves(annotation: Any) -> set:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _leaves(typing.get_args(annotation)[0])
    if origin is Literal:
        return {type(v) for v in typing.get_args(annotation)}
    if origin in (Union, types.UnionType, list):
        return {leaf for arg in typing.get_args(annotation) for leaf in _leaves(arg)}
    return {annotation}


def _strict_models() -> list[type[Strict]]:
    from peftcli.methods import REGISTRY

    sections = [v for v in vars(recipe_schema).values() if isinstance(v, type) and issubclass(v, Strict)]
    return sections + [method.spec for method in REGISTRY.values()]


def test_every_numeric_key_refuses_booleans():
    checked = []
    for model in _strict_models():
        names = typing.get_args(model.model_fields["method"].annotation) if "method" in model.model_fields else ()
        if "method" in model.model_fields and not names:
            continue  # the MethodSpec base: a method of no name
        tag = {"method": names[0]} if names else {}
        for name, field in model.model_fields.items():
            leaves = _leaves(field.annotation)
            if not leaves & {int, float} or bool in leaves:
                continue
            takes_list = any(
                typing.get_origin(a) is list for a in (field.annotation, *typing.get_args(field.annotation))
            )
            value = [True] if takes_list else True
            try:
                model.model_validate({**tag, name: value})
                problems = []
            except Exception as exc:  # pydantic.ValidationError
                problems = [e for e in exc.errors() if e["loc"][:1] == (name,)]
            assert problems, f"{model.__name__}.{name} accepts {value!r}"
            checked.append(f"{model.__name__}.{name}")
    assert {"TrainingSection.batch_size", "TrainingSection.learning_rate", "LoraSpec.r", "LoraSpec.alpha"} <= set(
        checked
    )


def test_numbers_written_as_strings_still_work(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: {name: some/model}\ndata: {train: t.jsonl}\npeft: {r: '4'}\n")
    recipe = load_recipe(path, ["training.learning_rate=1e-4", "training.batch_size=2"])
    assert (recipe.training.learning_rate, recipe.training.batch_size, recipe.peft.r) == (1e-4, 2, 4)


# --- data files --------------------------------------------------------------------------------

ROW = {"prompt": "After Monday comes", "completion": " Tuesday"}


def test_a_file_named_like_a_pattern_is_that_file(tmp_path, tokenizer):
    (tmp_path / "train[v2].jsonl").write_text(json.dumps(ROW) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {name: some/model}\ndata: {train: 'train[v2].jsonl'}\n")
    assert prepare_data(load_recipe(recipe).data, tokenizer, seed=0).train_stats.rows == 1
    # A path that does not exist is still a pattern.
    (tmp_path / "more.jsonl").write_text(json.dumps(ROW) + "\n")
    assert prepare_data(DataSection(train=str(tmp_path / "*.jsonl")), tokenizer, seed=0).train_stats.rows == 2


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_a_row_nested_too_deeply_is_a_skippable_bad_row(tmp_path, tokenizer, suffix):
    deep = '{"prompt": "a", "completion": ' + "[" * 100_000 + "]" * 100_000 + "}"
    rows = [json.dumps(ROW), deep, json.dumps(ROW)]
    path = tmp_path / f"d.{suffix}"
    path.write_text("\n".join(rows) + "\n" if suffix == "jsonl" else "[" + ",\n".join(rows) + "]")
    prepared = prepare_data(DataSection(train=str(path), bad_rows="skip"), tokenizer, seed=0)
    assert (prepared.train_stats.rows, prepared.train_stats.skipped) == (2, 1)
    [(reason, origins)] = prepared.train_stats.skipped_reasons.items()
    assert "nested too deeply" in reason
    assert origins == ["d.jsonl line 2"] if suffix == "jsonl" else ["d.json record 2 (line 2)"]


def test_a_json_file_of_one_conversation_is_one_example_not_columns(tmp_path, tokenizer):
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})
    )
    prepared = prepare_data(DataSection(train=str(path)), tokenizer, seed=0)
    assert [e.origin for e in prepared.train] == ["d.json (its one object)"]


def test_a_csv_cell_longer_than_the_csv_module_default(tmp_path, tokenizer):
    path = tmp_path / "d.csv"
    path.write_text(f'prompt,completion\n"{"word " * 40_000}",done\nshort,row\n')
    prepared = prepare_data(DataSection(train=str(path), max_length=64), tokenizer, seed=0)
    assert prepared.train_stats.rows == 1 and prepared.train_stats.dropped == 1  # only prompt fits in 64


# --- chat templates ----------------------------------------------------------------------------

ALTERNATING = (
    "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _chat(*turns: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


def test_a_row_the_template_refuses_stays_a_row_error(tmp_path, tokenizer):
    (tmp_path / "alt.jinja").write_text(ALTERNATING)
    good = _chat(("user", "After Monday?"), ("assistant", "Tuesday"))
    bad = _chat(("user", "After Monday?"), ("user", "Well?"), ("assistant", "Tuesday"))
    data = tmp_path / "d.jsonl"
    data.write_text(f"{good}\n{bad}\n")
    section = DataSection(train=str(data), chat_template=str(tmp_path / "alt.jinja"))
    with pytest.raises(UserError, match="d.jsonl line 2: the chat template refused this conversation"):
        prepare_data(section, tokenizer, seed=0)
    skipped = prepare_data(section.model_copy(update={"bad_rows": "skip"}), tokenizer, seed=0)
    assert (skipped.train_stats.rows, skipped.train_stats.skipped) == (1, 1)


def test_a_template_without_system_turns_is_accepted(tmp_path, tokenizer):
    no_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    (tmp_path / "gemma.jinja").write_text(no_system + ALTERNATING)
    data = tmp_path / "d.jsonl"
    data.write_text(_chat(("user", "After Monday?"), ("assistant", "Tuesday")) + "\n")
    prepared = prepare_data(DataSection(train=str(data), chat_template=str(tmp_path / "gemma.jinja")), tokenizer, 0)
    assert prepared.train_stats.rows == 1


def test_a_broken_tokenizer_template_is_blamed_on_the_template(tmp_path, tokenizer):
    tokenizer.chat_template = "{{ messages | no_such_filter }}"
    data = tmp_path / "d.jsonl"
    data.write_text(_chat(("user", "After Monday?"), ("assistant", "Tuesday")) + "\n")
    with pytest.raises(UserError) as info:
        prepare_data(DataSection(train=str(data)), tokenizer, seed=0)
    assert info.value.message.startswith("data.chat_template: the tokenizer's own chat template")
    assert "no_such_filter" in info.value.message and "chatml" in info.value.hint


# --- rows far over max_length ------------------------------------------------------------------

SENTENCE = "The quick brown fox jumps over the lazy dog.\nA journey of a thousand miles begins with a step. "


def _example(kind: str, chars: int) -> Example:
    body = (SENTENCE * (chars // len(SENTENCE) + 1))[:chars]
    if kind == "raw":
        return Example("d.jsonl line 1", prompt="Repeat after me: ", completion=body)
    if kind == "huge_user_turn":  # the reply lies past the cut: nothing trained survives truncation
        return Example("d.jsonl line 1", turns=(Turn("user", body), Turn("assistant", "Done.")))
    return Example(
        "d.jsonl line 1",
        turns=(
            Turn("system", "Be brief."),
            Turn("user", "Repeat:"),
            Turn("assistant", body),
            Turn("user", "Again"),
            Turn("assistant", body[:500]),
        ),
    )


@pytest.mark.parametrize("longest", ["vocabulary", "too small"])
@pytest.mark.parametrize("train_on", ["completions", "last_turn", "all"])
@pytest.mark.parametrize("kind", ["chat", "raw", "huge_user_turn"])
def test_a_long_text_truncates_as_the_whole_text_would(tokenizer, monkeypatch, kind, train_on, longest):
    from peftcli.data.templates import resolve_template

    resolve_template("chatml", tokenizer)
    if longest == "too small":  # a bound that does not hold (a normaliser deleting characters): still exact
        monkeypatch.setattr(encode_module, "longest_token_chars", lambda tokenizer: 1)
    max_length = 64
    whole = encode(tokenizer, _example(kind, 20_000), train_on)  # the old path: every token
    long = encode(tokenizer, _example(kind, 2_000_000), train_on, max_length)
    assert not long.complete and len(long.input_ids) < 10 * max_length
    expected = fit_length(whole, max_length, "truncate")
    got = fit_length(long, max_length, "truncate")
    if expected is None:
        assert got is None
    else:
        assert (got.input_ids, got.labels) == (expected.input_ids, expected.labels)
    assert fit_length(long, max_length, "drop") is None


def test_a_long_row_under_overlong_error_and_drop(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    long_row = {"prompt": "Repeat:", "completion": SENTENCE * 100_000}  # 10 MB
    path.write_text(json.dumps(long_row) + "\n" + json.dumps(ROW) + "\n")
    with pytest.raises(UserError, match="d.jsonl line 1: more than 64 tokens, over data.max_length 64"):
        prepare_data(DataSection(train=str(path), max_length=64, overlong="error"), tokenizer, seed=0)
    dropped = prepare_data(DataSection(train=str(path), max_length=64, overlong="drop"), tokenizer, seed=0)
    assert (dropped.train_stats.rows, dropped.train_stats.dropped) == (1, 1)


HUGE_ROW_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    from peftcli.data import prepare_data
    from peftcli.model.load import load_tokenizer
    from peftcli.recipe import DataSection, ModelSection

    tokenizer = load_tokenizer(ModelSection(name=sys.argv[1]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    item = prepare_data(DataSection(train=sys.argv[2], max_length=64), tokenizer, seed=0).train[0]
    seconds = time.monotonic() - start
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"seconds": seconds, "grown_mb": grown_mb, "input_ids": item.input_ids, "labels": item.labels}))
    """
)


@pytest.mark.slow
def test_a_huge_row_takes_bounded_time_and_memory(tmp_path, tiny_model, tokenizer):
    """A 30 MB conversation: the old code tokenized all of it (50 MB took 7 GB and 2.5 minutes)."""
    reply = SENTENCE * (30_000_000 // len(SENTENCE))
    huge = tmp_path / "huge.jsonl"
    huge.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Repeat:"}, {"role": "assistant", "content": reply}]})
    )
    del reply
    # A fresh process, so the peak resident size is this row's alone, not the test session's.
    result = subprocess.run(
        [sys.executable, "-c", HUGE_ROW_SCRIPT, str(tiny_model), str(huge)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=True,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    # The row is read and rendered (a few copies of 30 MB); tokenizing it whole took gigabytes.
    assert measured["seconds"] < 15 and measured["grown_mb"] < 600, measured
    small = tmp_path / "small.jsonl"
    small.write_text(_chat(("user", "Repeat:"), ("assistant", SENTENCE * 200)) + "\n")
    reference = prepare_data(DataSection(train=str(small), max_length=64), tokenizer, seed=0).train[0]
    assert (measured["input_ids"], measured["labels"]) == (reference.input_ids, reference.labels)
    assert trained_pieces(tokenizer, reference)[0].lstrip().startswith("The quick brown fox")
