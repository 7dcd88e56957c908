"""Chat templates: pick one (`data.chat_template`), and render conversations with it.

A wrong template is the most common silent failure in fine-tuning (the model trains fine, then
produces garbage at inference with a different template), so the chosen template is stored on the
tokenizer and saved with the adapter, and `auto` never guesses quietly: it warns when it falls back.

Conversations are rendered through the template's own syntax for everything a row holds: tool
schemas (`tools=`), assistant `tool_calls`, `tool` messages. Templates that take `enable_thinking`
(Qwen3) are rendered with thinking off, in training and for generation prompts alike: such a
template writes an empty think block before the last reply in training but none in its default
generation prompt, so the model would be prompted at inference unlike anything it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from peftcli import console
from peftcli.data.formats import BadRowError
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
# Prepended to a template that takes `enable_thinking`: thinking off unless a caller asks for it.
# An `if` opens no scope in Jinja, so the `set` holds for the whole template; no newline, so the
# template's line numbers (in error messages) stay its own.
THINKING_OFF = "{%- if enable_thinking is not defined %}{%- set enable_thinking = false %}{%- endif %}"


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
    if takes_thinking(template.source):
        # Whoever renders with this tokenizer directly (apply_chat_template at generation, plain
        # transformers loading the adapter's saved template) then gets the prompts training saw.
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
        return data.decode("utf-8")
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


def message(turn) -> dict:
    """A Turn as the message dict chat templates read (OpenAI's shape); dicts pass through."""
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
    style). `thinking`: for templates that take `enable_thinking`; None means off (see above)."""
    extra = {}
    if takes_thinking(getattr(tokenizer, "chat_template", None)):
        extra["enable_thinking"] = bool(thinking)
    return tokenizer.apply_chat_template(
        [message(t) for t in turns],
        tools=list(tools) or None,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **extra,
    )
