"""Tool calling and think blocks through the model's own chat template: every assistant reply
(its text and/or its tool calls, in the template's syntax) is trained with its end marker; tool
outputs, replies marked `weight: 0`, user and system turns never are; a template that cannot
render tool calls makes a bad row; a Qwen3-style template prompts generation exactly as the
trained replies were preceded in training.

The templates of real models are copied here as strings (Llama 3.1's trimmed of its built-in tools
and date): the folder they come from does not ship with the tests."""

from __future__ import annotations

import json

import pytest
from helpers import TURNS, make_tiny_model, trained_pieces

from peftcli.data import prepare_data
from peftcli.data.encode import encode
from peftcli.data.formats import BadRowError, Example, Turn
from peftcli.data.templates import builtin_template, render_raw
from peftcli.recipe import DataSection

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""  # noqa: E501 (the template's own lines)
QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501 (the template's own lines)
LLAMA31 = r"""{{- bos_token }}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""  # noqa: E501 (the template's own lines)
MISTRAL03 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}"""  # noqa: E501 (the template's own lines)

TOOLS = (
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
)
CALL = {"type": "function", "id": "call00001", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
OUTPUT = "18 C and sunny"
FINAL = "It is 18 C in Paris."
CHATML_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
# What each template trains: the call in its own syntax + end marker, then the final reply + end marker.
TRAINED = {
    "chatml": [f"{CHATML_CALL}<|im_end|>", f"{FINAL}<|im_end|>"],
    "qwen2.5": [f"{CHATML_CALL}<|im_end|>", f"{FINAL}<|im_end|>"],
    "qwen3": [f"{CHATML_CALL}<|im_end|>", f"{FINAL}<|im_end|>"],
    "llama3.1": ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', f"{FINAL}<|eot_id|>"],
    # The tiny tokenizer's EOS is <|im_end|>; Mistral writes a space before a reply.
    "mistral0.3": [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]<|im_end|>',
        f" {FINAL}<|im_end|>",
    ],
}
TEMPLATES = {"qwen2.5": QWEN25, "qwen3": QWEN3, "llama3.1": LLAMA31, "mistral0.3": MISTRAL03}


def _use(tokenizer, name: str) -> None:
    tokenizer.chat_template = builtin_template(name) if name in ("chatml", "llama3", "mistral") else TEMPLATES[name]


def _weather(system: bool = True, final: bool = True, before: tuple[Turn, ...] = ()) -> Example:
    turns = [Turn("system", "Be brief.")] if system else []
    turns += [
        *before,
        Turn("user", "Weather in Paris?"),
        Turn("assistant", "", tool_calls=(CALL,)),
        Turn("tool", OUTPUT, name="get_weather", tool_call_id="call00001"),
    ]
    if final:
        turns.append(Turn("assistant", FINAL))
    return Example("d.jsonl line 1", turns=tuple(turns), tools=TOOLS)


@pytest.mark.parametrize("name", list(TRAINED))
def test_tool_calls_are_trained_in_the_templates_own_syntax(tokenizer, name):
    _use(tokenizer, name)
    example = _weather(system=name != "mistral0.3")  # Mistral v0.3 drops a system turn before a reply
    item = encode(tokenizer, example, "completions")
    assert trained_pieces(tokenizer, item) == TRAINED[name]
    text = tokenizer.decode(item.input_ids)
    assert OUTPUT in text and '"description": "The weather in a city"' in text  # tool output and schema: context
    assert trained_pieces(tokenizer, encode(tokenizer, example, "last_turn")) == TRAINED[name][-1:]


def test_chatml_writes_tools_as_qwen25_does_and_plain_chats_as_before(tokenizer):
    second = {"type": "function", "function": {"name": "get_time", "arguments": {"zone": "CET"}}}
    turns = [
        *_weather().turns,
        Turn("user", "And the time?"),
        Turn("assistant", "Checking both.", tool_calls=(CALL, second)),
        Turn("tool", OUTPUT),
        Turn("tool", "12:00"),
    ]
    rendered = {}
    for name, template in (("chatml", builtin_template("chatml")), ("qwen2.5", QWEN25)):
        tokenizer.chat_template = template
        rendered[name] = render_raw(tokenizer, turns, add_generation_prompt=True, tools=TOOLS)
    assert rendered["chatml"] == rendered["qwen2.5"]
    assert '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>' in rendered["chatml"]

    plain = [Turn("system", "Be brief."), Turn("user", "After Monday?"), Turn("assistant", "Tuesday")]
    for generation in (False, True):
        tokenizer.chat_template = make_tiny_model.CHATML  # plain ChatML, as the built-in was before tools
        before = render_raw(tokenizer, plain, generation)
        tokenizer.chat_template = builtin_template("chatml")
        assert render_raw(tokenizer, plain, generation) == before


def test_weight_zero_replies_and_tool_outputs_are_never_trained(tokenizer):
    _use(tokenizer, "chatml")
    aside = (Turn("user", "Hi"), Turn("assistant", "Hello! Ask me anything.", trained=False))
    plain = Example("x", turns=(*aside, Turn("user", "After Monday?"), Turn("assistant", "Tuesday")))
    item = encode(tokenizer, plain, "completions")
    assert trained_pieces(tokenizer, item) == ["Tuesday<|im_end|>"]
    assert "Hello! Ask me anything.<|im_end|>" in tokenizer.decode(item.input_ids)  # rendered, untrained

    item = encode(tokenizer, _weather(before=aside), "completions")
    assert trained_pieces(tokenizer, item) == TRAINED["chatml"]  # neither the aside nor the tool's output

    calls_only = _weather(final=False)  # a row that teaches the call: last_turn is the call
    assert trained_pieces(tokenizer, encode(tokenizer, calls_only, "last_turn")) == TRAINED["chatml"][:1]

    untrained = Example("x", turns=(*aside, Turn("user", "Bye"), Turn("assistant", "Bye!", trained=False)))
    for train_on in ("completions", "last_turn"):
        with pytest.raises(BadRowError, match="nothing to learn"):
            encode(tokenizer, untrained, train_on)


@pytest.mark.parametrize("case", ["drops the calls", "raises on them"])
def test_a_template_that_cannot_render_tool_calls_makes_a_bad_row(tokenizer, case):
    if case == "drops the calls":
        _use(tokenizer, "llama3")  # the built-in Llama 3 template writes role and content only
        example = _weather()
    else:
        _use(tokenizer, "llama3.1")
        two = {"type": "function", "function": {"name": "get_time", "arguments": {}}}
        turns = [Turn("user", "Weather and time?"), Turn("assistant", "", tool_calls=(CALL, two))]
        example = Example("x", turns=tuple(turns), tools=TOOLS)
    with pytest.raises(BadRowError) as info:
        encode(tokenizer, example, "completions")
    assert "the chat template cannot render tool calls" in str(info.value)
    assert "set data.chat_template to one that can" in str(info.value)


def _first_token_of_last_reply(item) -> int:
    trained = [j for j, label in enumerate(item.labels) if label != -100]
    starts = [j for j in trained if j - 1 not in trained]
    return starts[-1]


def test_think_blocks_agree_between_training_and_generation(tmp_path, tokenizer):
    from peftcli.evaluation.generation import prompt_from_example

    (tmp_path / "qwen3.jinja").write_text(QWEN3)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": r, "content": c} for r, c in TURNS]}) + "\n")
    section = DataSection(train=str(data), chat_template=str(tmp_path / "qwen3.jinja"))
    item = prepare_data(section, tokenizer, seed=0).train[0]
    assert trained_pieces(tokenizer, item) == ["Tuesday<|im_end|>", "Wednesday<|im_end|>"]
    before = item.input_ids[: _first_token_of_last_reply(item)]
    assert tokenizer.decode(before).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")

    example = Example("x", turns=tuple(Turn(r, c) for r, c in TURNS))
    prompts = {
        "eval --generate": prompt_from_example(tokenizer, example).text,
        "render_raw": render_raw(tokenizer, example.turns[:-1], add_generation_prompt=True),
    }
    for text in prompts.values():
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == before

    # A reply that writes its own reasoning is trained with it, after the thinking-mode prompt.
    reasoned = Example(
        "x", turns=(*example.turns[:-1], Turn("assistant", "<think>\nMonday + 2.\n</think>\n\nWednesday"))
    )
    item = encode(tokenizer, reasoned, "last_turn")
    assert trained_pieces(tokenizer, item) == ["<think>\nMonday + 2.\n</think>\n\nWednesday<|im_end|>"]
    prompt = render_raw(tokenizer, reasoned.turns[:-1], add_generation_prompt=True, thinking=True)
    assert (
        tokenizer(prompt, add_special_tokens=False)["input_ids"] == item.input_ids[: _first_token_of_last_reply(item)]
    )
