"""What ends a trained reply: the end-of-turn special token, or an EOS appended after a marker the
tokenizer does not know (said once per run), the whitespace before the marker trained with it; and
`data preview` showing those runs of tokens with every character intact.

Templates of other model families are copied here as strings, trimmed to what reproduces the
behaviour (the folder they come from does not ship with the tests)."""

from __future__ import annotations

import json

import pytest
from helpers import TURNS, base_recipe, trained_pieces, write_recipe

from peftcli.data import IGNORE, prepare_data
from peftcli.data.formats import Example, Turn
from peftcli.recipe import DataSection

# Llama 2's template, less its system prompt and BOS (the tiny tokenizer has none): `reply </s>`.
LLAMA2 = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
# Phi-3's template, whole: `<|end|>` closes each turn, EOS only the conversation.
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Gemma's template, less its role checks: `<end_of_turn>` closes each turn.
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}"
)
TEXT = "Say “Héllo” in Chinese, café-style."
REPLY = "“Héllo” — 你好"


def _rows(path, n: int = 1, turns=TURNS):
    path.write_text(
        "".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n" for _ in range(n))
    )
    return path


def _template(tmp_path, text: str) -> str:
    path = tmp_path / "template.jinja"
    path.write_text(text)
    return str(path)


@pytest.fixture
def base_tokenizer():
    """A base model's tokenizer: no chat template, EOS `</s>`, no ChatML markers in its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([c for _, c in TURNS] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")


def test_the_whitespace_before_a_llama2_eos_is_trained(tmp_path, tokenizer):
    section = DataSection(train=str(_rows(tmp_path / "d.jsonl")), chat_template=_template(tmp_path, LLAMA2))
    item = prepare_data(section, tokenizer, seed=0).train[0]
    # One run per reply: the space token between the reply and EOS is not left out.
    assert trained_pieces(tokenizer, item) == [" Tuesday <|im_end|>", " Wednesday <|im_end|>"]


@pytest.mark.parametrize("train_on", ["completions", "last_turn", "all"])
def test_chatml_on_a_base_tokenizer_appends_a_trained_eos_and_says_so_once(tmp_path, base_tokenizer, capsys, train_on):
    section = DataSection(train=str(_rows(tmp_path / "d.jsonl", n=3)), train_on=train_on)
    prepared = prepare_data(section, base_tokenizer, seed=0)
    assert prepared.template.name == "chatml"  # the fallback: the tokenizer has no template
    eos = base_tokenizer.eos_token_id
    replies = 1 if train_on == "last_turn" else 2  # EOS goes after the replies trained as replies
    for item in prepared.train:
        text = base_tokenizer.decode(item.input_ids)
        assert text.count("<|im_end|></s>\n") == replies and text.endswith("Wednesday<|im_end|></s>\n")
        assert [label for label in item.labels if label == eos] == [eos] * replies
        if train_on == "all":
            assert IGNORE not in item.labels
        else:
            expected = ["Tuesday<|im_end|></s>", "Wednesday<|im_end|></s>"]
            assert trained_pieces(base_tokenizer, item) == expected[-1:] if train_on == "last_turn" else expected
    err = capsys.readouterr().err
    said = "the end-of-turn marker <|im_end|> is not a special token of this tokenizer: the model learns to stop"
    assert err.count(said) == 1 and "by the EOS </s> appended after it" in err


@pytest.mark.parametrize(
    ("template", "turns", "expected"),
    [
        # Mid-conversation EOS is appended after `<|end|>`; at the end Phi-3 writes EOS itself: trained, not doubled.
        (PHI3, TURNS, ["Tuesday<|end|><|im_end|>", "Wednesday<|end|>\n<|im_end|>"]),
        (GEMMA, TURNS[1:], ["Tuesday<end_of_turn><|im_end|>", "Wednesday<end_of_turn><|im_end|>"]),
    ],
    ids=["phi3", "gemma"],
)
def test_a_marker_the_tokenizer_lacks_is_trained_with_an_eos_after_it(
    tmp_path, tokenizer, capsys, template, turns, expected
):
    section = DataSection(
        train=str(_rows(tmp_path / "d.jsonl", n=2, turns=turns)), chat_template=_template(tmp_path, template)
    )
    prepared = prepare_data(section, tokenizer, seed=0)
    for item in prepared.train:
        assert trained_pieces(tokenizer, item) == expected
    marker = expected[0].removeprefix("Tuesday").removesuffix("<|im_end|>")
    said = f"the end-of-turn marker {marker} is not a special token of this tokenizer"
    assert capsys.readouterr().err.count(said) == 1


def test_preview_decodes_runs_of_tokens_whole(tmp_path, tiny_model, tokenizer, cli):
    from peftcli.data.encode import encode
    from peftcli.data.preview import render_example
    from peftcli.data.templates import resolve_template

    resolve_template("chatml", tokenizer)
    item = encode(tokenizer, Example("x", turns=(Turn("user", TEXT), Turn("assistant", REPLY))), "completions")
    assert len(tokenizer(REPLY, add_special_tokens=False)["input_ids"]) > len(REPLY)  # bytes split over tokens
    shown = render_example(tokenizer, item, marks=True).plain
    assert shown == f"<|im_start|>user\n{TEXT}<|im_end|>\n<|im_start|>assistant\n⟦{REPLY}<|im_end|>⟧\n"

    data = _rows(tmp_path / "d.jsonl", n=2, turns=[("user", TEXT), ("assistant", REPLY)])
    recipe = base_recipe(tiny_model, tmp_path / "run", data={"train": str(data), "eval": None})
    result = cli("data", "preview", write_recipe(tmp_path / "r.yaml", recipe), "--rows", "1")
    assert result.code == 0, result.err
    assert "\ufffd" not in result.out
    assert f"{TEXT}<|im_end|>" in result.out and f"⟦{REPLY}<|im_end|>⟧" in result.out


def test_generation_stops_at_a_marker_the_tokenizer_does_not_know(base_tokenizer):
    """Trained to write `<|im_end|>` as text then EOS, a reply is cut where the marker starts."""
    from peftcli.data.templates import resolve_template
    from peftcli.evaluation.generation import _cut_at, end_marker_text

    resolve_template("chatml", base_tokenizer)
    marker = end_marker_text(base_tokenizer)
    assert marker == "<|im_end|>"
    assert _cut_at("Tuesday<|im_end|>\n<|im_start|>user", marker).strip() == "Tuesday"
