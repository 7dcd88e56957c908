"""Chat templates: pick one (`data.chat_template`), and render conversations with it.

A wrong template is the most common silent failure in fine-tuning (the model trains fine, then
produces garbage at inference with a different template), so the chosen template is stored on the
tokenizer and saved with the adapter, and `auto` never guesses quietly: it warns when it falls back.

Conversations are rendered through the template's own syntax for everything a row holds: tool
schemas (`tools=`), assistant `tool_calls`, `tool` messages.

Templates that take `enable_thinking` (Qwen3) prompt generation differently in each mode: thinking
on, the prompt ends at `<|im_start|>assistant\n` and the model writes its reasoning; thinking off, the
template pre-fills an empty `<think>\n\n</think>\n\n`. The mode training used is recorded in the
installed (and saved) template as its default (`THINKING_ON` / `THINKING_OFF` at its top), and every
render that does not choose a mode takes that default, so generation prompts the model as training
did: on when the trained conversations carry reasoning (`thinking_from_data`), off otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from peftcli import console
from peftcli.data.formats import BadRowError
from peftcli.data.turns import carries_reasoning
from peftcli.errors import UserError
from peftcli.recipe.files import human_size, read_capped, special_kind
from peftcli.recipe.schema import BUILTIN_TEMPLATES

BUILTIN = BUILTIN_TEMPLATES
MAX_TEMPLATE_BYTES = 1 << 20  # templates are a few KB
# What any chat template must render. A template that fails on these fails on every row, so the
# fault is the template's, not row 1's. The system turn is tried first and then left out: some
# templates (Gemma's) refuse system turns, which only makes rows with one bad rows.
_PROBES = (
    ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}),
    ({"role": "user", "content": "Hi"},),
)
_REPLY = {"role": "assistant", "content": "Hello"}
# Prepended to a template that takes `enable_thinking`: the mode used unless a caller asks for one.
# An `if` opens no scope in Jinja, so the `set` holds for the whole template; no newline, so the
# template's line numbers (in error messages) stay its own.
THINKING_DEFAULT = "{%- if enable_thinking is not defined %}{%- set enable_thinking = VALUE %}{%- endif %}"
THINKING_OFF = THINKING_DEFAULT.replace("VALUE", "false")
THINKING_ON = THINKING_DEFAULT.replace("VALUE", "true")


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # chatml | llama3 | mistral | tokenizer | a file path
    source: str  # the jinja text


def builtin_template(name: str) -> str:
    return resources.files("peftcli.templates").joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def resolve_template(setting: str, tokenizer) -> ChatTemplate:
    """Turn `data.chat_template` into jinja text, and install it on the tokenizer."""
    if setting == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the chat one is "default"
            own = own.get("default") or next(iter(own.values()), None)
        if isinstance(own, str) and own.strip():
            template = ChatTemplate("tokenizer", own)
        else:
            console.warn("the tokenizer has no chat template; using chatml (set data.chat_template to choose one)")
            template = ChatTemplate("chatml", builtin_template("chatml"))
    elif setting in BUILTIN:
        template = ChatTemplate(setting, builtin_template(setting))
    else:
        template = ChatTemplate(setting, _read_template_file(Path(setting)))
    if takes_thinking(template.source) and thinking_default(template.source) is None:
        # Whoever renders with this tokenizer directly (apply_chat_template at generation, plain
        # transformers loading the adapter's saved template) then gets the prompts training saw.
        # Off until the training data says otherwise (thinking_from_data); a template that already
        # records a mode (an adapter's, for `eval --data`) keeps it.
        template = ChatTemplate(template.name, THINKING_OFF + template.source)
    tokenizer.chat_template = template.source
    _check_template(tokenizer, template)
    return template


def _read_template_file(path: Path) -> str:
    kind = special_kind(path)
    if kind is not None:
        raise UserError(f"data.chat_template: {path} is {kind}, not a template file")
    if not path.is_file():
        raise UserError(
            f"data.chat_template: '{path}' is neither a built-in template ({', '.join(BUILTIN)}, auto) "
            "nor an existing .jinja file"
        )
    data = read_capped(path, MAX_TEMPLATE_BYTES)
    if data is None:
        raise UserError(
            f"data.chat_template: {path} is {human_size(path.stat().st_size)}; a chat template is a few KB",
            hint="is this the right file?",
        )
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is no part of the template, and
        # left in it would be rendered at the start of every example.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"data.chat_template: {path} is not UTF-8 text (byte {exc.start})",
            hint="a chat template is a Jinja text file; save it as UTF-8",
        ) from None


def _check_template(tokenizer, template: ChatTemplate) -> None:
    """Render a plain conversation once, so that a broken template (a syntax error, an unknown filter)
    is reported as the template's fault instead of row 1's."""
    error = None
    for turns in _PROBES:
        try:
            render_raw(tokenizer, [*turns, _REPLY])
            render_raw(tokenizer, list(turns), add_generation_prompt=True)
            return
        except Exception as exc:  # noqa: BLE001 - jinja and templates raise anything
            error = error or exc
    what = {
        "tokenizer": "the tokenizer's own chat template (auto)",
        **{name: f"the built-in template '{name}'" for name in BUILTIN},
    }.get(template.name, f"the template file {template.name}")
    line = getattr(error, "lineno", None)
    at = f" (template line {line})" if line else ""
    raise UserError(
        f"data.chat_template: {what} fails on a plain system/user/assistant conversation{at}: {_first_line(error)}",
        hint="fix the template, or set data.chat_template to a built-in one (" + ", ".join(BUILTIN) + ")",
    )


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip() if exc is not None else ""
    return text.splitlines()[0][:300] if text else exc.__class__.__name__


def takes_thinking(template) -> bool:
    """Whether a template (its text, or the tokenizer's `chat_template`: a string or a dict of
    named ones) reads `enable_thinking`, as Qwen3's does."""
    return "enable_thinking" in str(template or "")


def thinking_default(template) -> bool | None:
    """The thinking mode a template records at its top (see THINKING_ON); None when it records none."""
    text = str(template or "")
    if text.startswith(THINKING_ON):
        return True
    if text.startswith(THINKING_OFF):
        return False
    return None


def thinking_from_data(tokenizer, template: ChatTemplate, examples) -> ChatTemplate:
    """Record on the tokenizer's template the thinking mode of the trained conversations: on when
    any of them carries reasoning (a <think> block; such replies are trained in thinking mode, and
    the others then learn to write an empty think block), off when none does."""
    recorded = thinking_default(template.source)
    if recorded is None:
        return template  # a template without `enable_thinking`: one way to prompt
    chats = [e for e in examples if e.is_chat]
    reasoned = sum(1 for e in chats if carries_reasoning(e.turns))
    body = template.source[len(THINKING_ON if recorded else THINKING_OFF) :]
    if not reasoned:
        return _install(tokenizer, ChatTemplate(template.name, THINKING_OFF + body))
    if reasoned < len(chats):
        console.warn(
            f"data.train: {reasoned} of {len(chats)} conversations carry reasoning (<think> or "
            "reasoning_content), the others do not: the model is prompted in thinking mode, so the "
            "replies without reasoning are trained to write an empty think block; give every reply "
            "its reasoning, or none, for one behaviour"
        )
    else:
        console.note("the training replies carry reasoning: generation prompts use thinking mode (enable_thinking)")
    return _install(tokenizer, ChatTemplate(template.name, THINKING_ON + body))


def _install(tokenizer, template: ChatTemplate) -> ChatTemplate:
    tokenizer.chat_template = template.source
    return template


def message(turn) -> dict:
    """A Turn as the message dict chat templates read (OpenAI's shape); dicts pass through.

    A turn that only calls tools has `content` "", not OpenAI's None: transformers drops keys whose
    value is None before rendering, and a missing `content` breaks templates that read it (Phi-3,
    Phi-4, TinyLlama, Mistral's), while DeepSeek-R1's `content is none` test is never true either way."""
    if isinstance(turn, dict):
        return turn
    out: dict = {"role": turn.role, "content": turn.content}
    if turn.tool_calls:
        out["tool_calls"] = [dict(call) for call in turn.tool_calls]
    if turn.name is not None:
        out["name"] = turn.name
    if turn.tool_call_id is not None:
        out["tool_call_id"] = turn.tool_call_id
    return out


def render(tokenizer, turns, add_generation_prompt: bool = False, *, tools=(), thinking: bool | None = None) -> str:
    """Render a conversation (a sequence of Turn or role/content dicts) to text."""
    try:
        return render_raw(tokenizer, turns, add_generation_prompt, tools=tools, thinking=thinking)
    except Exception as exc:  # jinja raises TemplateError subclasses, and templates raise their own
        # Templates often reject role orders they do not support (two user turns in a row, say):
        # that is a property of the row, so it is reported (or skipped) like any other bad row.
        raise BadRowError(f"the chat template refused this conversation: {exc}") from None


def render_raw(tokenizer, turns, add_generation_prompt: bool = False, *, tools=(), thinking: bool | None = None) -> str:
    """`render` with the template's own exceptions. `tools`: the tool schemas offered (OpenAI
    style). `thinking`: for templates that take `enable_thinking`; None means the mode the template
    records (see above), else off."""
    extra = {}
    template = getattr(tokenizer, "chat_template", None)
    if takes_thinking(template):
        extra["enable_thinking"] = bool(thinking if thinking is not None else thinking_default(template))
    return tokenizer.apply_chat_template(
        [message(t) for t in turns],
        tools=list(tools) or None,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **extra,
    )
