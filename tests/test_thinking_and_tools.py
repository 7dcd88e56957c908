"""Reasoning and tool-calling rows as real datasets write them: a model trained on reasoning is
prompted for generation in thinking mode (and one trained on plain replies without), a template that
strips the reasoning from the reply refuses the row instead of training the answer alone, a turn's
`reasoning_content` is trained, a template file with a byte-order mark renders none, calls without
ids get ids linked to their outputs, ms-swift's agent roles are read, and skipped rows group by reason.

The templates here are small stand-ins written for these tests, each with the one behaviour of a
real model's template that matters (Qwen3's `enable_thinking`, DeepSeek-R1's split on `</think>`,
Mistral v0.3's 9-character call ids)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import trained_pieces

from peftcli.data import prepare_data
from peftcli.data.formats import Example, Turn
from peftcli.data.turns import check_turns
from peftcli.errors import UserError
from peftcli.recipe import DataSection

# Qwen3's behaviour: the last reply is written after a think block (empty when it has no reasoning);
# the generation prompt pre-fills an empty one when thinking is off, and nothing when it is on.
QWEN3_LIKE = r"""{%- for message in messages %}
{%- if message.role == 'assistant' %}
{%- set content = message.content %}{%- set reasoning = '' %}
{%- if '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\n') %}
{%- endif %}
{{- '<|im_start|>assistant\n' }}
{%- if loop.last %}{{- '<think>\n' + reasoning + '\n</think>\n\n' }}{%- endif %}
{{- content + '<|im_end|>\n' }}
{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}"""
EMPTY_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
# DeepSeek-R1-distill's behaviour: every assistant reply keeps only the text after </think>.
R1_LIKE = r"""{%- for message in messages %}
{%- if message.role == 'assistant' %}{%- set content = message.content %}
{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}
{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}
{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<think>\n' }}{%- endif %}"""
# Mistral v0.3's behaviour: calls and tool results need 9-character alphanumeric ids.
MISTRAL_LIKE = r"""{%- set NINE = 'Tool call IDs should be alphanumeric strings with length 9!' %}
{%- if tools %}{{- '[AVAILABLE_TOOLS]' + tools | tojson + '[/AVAILABLE_TOOLS]' }}{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}{{- '[INST] ' + message.content + '[/INST]' }}
{%- elif message.tool_calls is defined %}{{- '[TOOL_CALLS] [' }}
{%- for call in message.tool_calls %}
{%- if call.id is not defined or call.id | length != 9 %}{{- raise_exception(NINE) }}{%- endif %}
{{- '{"name": "' + call.function.name + '", "id": "' + call.id + '"}' }}{%- if not loop.last %}{{- ', ' }}{%- endif %}
{%- endfor %}{{- ']<|im_end|>' }}
{%- elif message.role == 'tool' %}
{%- if message.tool_call_id is not defined or message.tool_call_id | length != 9 %}{{- raise_exception(NINE) }}
{%- endif %}
{{- '[TOOL_RESULTS] ' + message.content + ' (' + message.tool_call_id + ')[/TOOL_RESULTS]' }}
{%- elif message.role == 'assistant' %}{{- ' ' + message.content + '<|im_end|>' }}
{%- endif %}
{%- endfor %}"""
REASONED = "<think>\nMonday comes first.\n</think>\n\nTuesday"
TOOLS = [
    {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {}}},
    {"name": "get_time", "description": "Time", "parameters": {"type": "object", "properties": {}}},
]


def _file(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _chats(path: Path, replies: list[str], **turn_keys) -> str:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"After Monday? ({n})"},
                {"role": "assistant", "content": r, **turn_keys},
            ]
        }
        for n, r in enumerate(replies)
    ]
    return _file(path, "".join(json.dumps(row) + "\n" for row in rows))


def _adapter_tokenizer(tokenizer, folder: Path):
    """The tokenizer as an adapter saves it and generation loads it back."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("reasoning", [True, False], ids=["reasoning-rows", "plain-rows"])
def test_generation_prompts_in_the_thinking_mode_the_model_was_trained_in(tmp_path, tokenizer, reasoning):
    from peftcli.evaluation.generation import prompt_from_example

    replies = [REASONED, REASONED] if reasoning else ["Tuesday", "Tuesday"]
    data = _chats(tmp_path / "d.jsonl", replies)
    section = DataSection(train=data, chat_template=_file(tmp_path / "qwen3.jinja", QWEN3_LIKE))
    item = prepare_data(section, tokenizer, seed=0).train[0]
    trained = [j for j, label in enumerate(item.labels) if label != -100]
    before_reply = tokenizer.decode(item.input_ids[: trained[0]])

    saved = _adapter_tokenizer(tokenizer, tmp_path / "adapter")
    example = Example("x", turns=(Turn("user", "After Monday? (0)"), Turn("assistant", "?")))
    prompt = prompt_from_example(saved, example).text
    assert prompt == before_reply  # generation is prompted exactly as the trained reply was preceded
    if reasoning:
        assert trained_pieces(tokenizer, item) == [REASONED + "<|im_end|>"]
        assert not prompt.endswith(EMPTY_THINK) and prompt.endswith("<|im_start|>assistant\n")
    else:
        assert prompt.endswith(EMPTY_THINK)  # plain replies: thinking off, as before


def test_mixed_reasoning_rows_are_said_once(tmp_path, tokenizer, capsys):
    data = _chats(tmp_path / "d.jsonl", [REASONED, "Tuesday", "Tuesday"])
    section = DataSection(train=data, chat_template=_file(tmp_path / "qwen3.jinja", QWEN3_LIKE))
    prepared = prepare_data(section, tokenizer, seed=0)
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("1 of 3 conversations carry reasoning") == 1
    # Every reply is trained after the prompt generation will use: the plain ones write an empty block.
    pieces = [trained_pieces(tokenizer, item)[0] for item in prepared.train]
    assert sorted(pieces)[0].startswith("<think>\n\n</think>")


def test_a_template_that_strips_the_reasoning_refuses_the_row(tmp_path, tokenizer):
    data = _chats(tmp_path / "d.jsonl", [REASONED])
    section = DataSection(train=data, chat_template=_file(tmp_path / "r1.jinja", R1_LIKE))
    with pytest.raises(UserError) as info:
        prepare_data(section, tokenizer, seed=0)
    message = info.value.message
    assert "removes the reasoning" in message and "DeepSeek-R1-distill" in message
    assert "data.chat_template" in message  # and what to do about it

    # The same template with the split taken out trains the reasoning.
    kept = R1_LIKE.replace(
        "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}", ""
    )
    section = DataSection(train=data, chat_template=_file(tmp_path / "r1-kept.jinja", kept))
    item = prepare_data(section, tokenizer, seed=0).train[0]
    assert "Monday comes first." in "".join(trained_pieces(tokenizer, item))


def test_reasoning_content_is_trained_as_a_think_block(tmp_path, tokenizer, capsys):
    data = _chats(tmp_path / "d.jsonl", ["Tuesday"], reasoning_content="Monday comes first.")
    item = prepare_data(DataSection(train=data, chat_template="chatml"), tokenizer, seed=0).train[0]
    assert trained_pieces(tokenizer, item) == ["<think>\nMonday comes first.\n</think>\n\nTuesday<|im_end|>"]
    assert "ignored keys" not in capsys.readouterr().err

    row = {
        "messages": [
            {"role": "user", "content": "Hi", "reasoning_content": "x"},
            {"role": "assistant", "content": "Yo"},
        ]
    }
    bad = _file(tmp_path / "bad.jsonl", json.dumps(row) + "\n")
    with pytest.raises(UserError, match="'reasoning_content' on a user turn"):
        prepare_data(DataSection(train=bad, chat_template="chatml"), tokenizer, seed=0)


def test_a_template_file_with_a_byte_order_mark_renders_none(tmp_path, tokenizer):
    from peftcli.data.templates import builtin_template

    path = tmp_path / "bom.jinja"
    path.write_bytes(b"\xef\xbb\xbf" + builtin_template("chatml").encode("utf-8"))
    data = _chats(tmp_path / "d.jsonl", ["Tuesday"])
    item = prepare_data(DataSection(train=data, chat_template=str(path)), tokenizer, seed=0).train[0]
    assert "\ufeff" not in tokenizer.decode(item.input_ids)
    assert "\ufeff" not in tokenizer.chat_template


def test_calls_without_ids_get_ids_linked_to_their_outputs(tmp_path, tokenizer):
    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]
    row = {
        "conversations": [
            {"from": "human", "value": "Weather and time in Paris?"},
            {"from": "function_call", "value": json.dumps(calls)},
            {"from": "observation", "value": "18 C"},
            {"from": "observation", "value": "noon"},
            {"from": "gpt", "value": "18 C at noon."},
        ],
        "tools": json.dumps(TOOLS),
    }
    data = _file(tmp_path / "glaive.json", json.dumps([row]))
    section = DataSection(train=data, chat_template=_file(tmp_path / "mistral.jinja", MISTRAL_LIKE))
    item = prepare_data(section, tokenizer, seed=0).train[0]
    pieces = trained_pieces(tokenizer, item)
    calls = '[{"name": "get_weather", "id": "call00001"}, {"name": "get_time", "id": "call00002"}]'
    assert pieces[0] == f"[TOOL_CALLS] {calls}<|im_end|>"
    text = tokenizer.decode(item.input_ids)
    assert "18 C (call00001)" in text and "noon (call00002)" in text

    # An output that names its tool answers that tool's call; ids the row gives are kept.
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {}}}
    turns = check_turns(
        [
            Turn("user", "?"),
            Turn("assistant", "", tool_calls=(call, {**call, "function": {"name": "get_time", "arguments": {}}})),
            Turn("tool", "noon", name="get_time"),
            Turn("tool", "18 C"),
            Turn("assistant", "Done."),
            Turn("user", "Again?"),
            Turn("assistant", "", tool_calls=({**call, "id": "call00001"},)),
            Turn("tool", "19 C"),
            Turn("assistant", "19 C."),
        ]
    )
    first = [c["id"] for c in turns[1].tool_calls]
    assert first == ["call00002", "call00003"]  # call00001 is the row's own, later on
    assert (turns[2].tool_call_id, turns[3].tool_call_id, turns[7].tool_call_id) == (
        "call00003",
        "call00002",
        "call00001",
    )


def test_ms_swift_agent_roles_are_read(tmp_path, tokenizer):
    tools = [{"type": "function", "function": TOOLS[0]}]
    row = {
        "tools": json.dumps(tools),
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "tool_call", "content": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
            {"role": "tool_response", "content": "18 C"},
            {"role": "assistant", "content": "18 C."},
        ],
    }
    data = _file(tmp_path / "agent.jsonl", json.dumps(row) + "\n")
    item = prepare_data(DataSection(train=data, chat_template="chatml"), tokenizer, seed=0).train[0]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert trained_pieces(tokenizer, item) == [call, "18 C.<|im_end|>"]

    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]}
    with pytest.raises(UserError, match=r"unknown role 'bot'.*data\.roles"):
        prepare_data(DataSection(train=_file(tmp_path / "b.jsonl", json.dumps(row) + "\n")), tokenizer, seed=0)


def test_rows_a_template_cannot_render_group_under_one_reason(tmp_path, tokenizer):
    rows = [
        {
            "messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": "Sure."}],
            "tools": json.dumps([tool]),
        }
        for tool in TOOLS
    ]
    data = _file(
        tmp_path / "d.jsonl", "".join(json.dumps(row) + "\n" for row in rows + [{"messages": rows[0]["messages"]}])
    )
    # The built-in llama3 template writes no tool schemas.
    prepared = prepare_data(DataSection(train=data, chat_template="llama3", bad_rows="skip"), tokenizer, seed=0)
    assert prepared.train_stats.skipped == 2
    assert list(prepared.train_stats.skipped_reasons.values()) == [["d.jsonl line 1", "d.jsonl line 2"]]


def test_a_recorded_mode_follows_the_data_when_trained_again(tmp_path, tokenizer):
    """Training again from a tokenizer that records thinking on (an adapter's, a merged model's)."""
    from peftcli.data.templates import THINKING_OFF, render_raw

    template = _file(tmp_path / "qwen3.jinja", QWEN3_LIKE)
    prepare_data(DataSection(train=_chats(tmp_path / "r.jsonl", [REASONED]), chat_template=template), tokenizer, 0)
    saved = _adapter_tokenizer(tokenizer, tmp_path / "adapter")
    prepare_data(DataSection(train=_chats(tmp_path / "p.jsonl", ["Tuesday"])), saved, 0)
    assert saved.chat_template == THINKING_OFF + QWEN3_LIKE
    assert render_raw(saved, [Turn("user", "?")], add_generation_prompt=True).endswith(EMPTY_THINK)
