"""Chat templates: pick one (`data.chat_template`), and render conversations with it.

A wrong template is the most common silent failure in fine-tuning (the model trains fine, then
produces garbage at inference with a different template), so the chosen template is stored on the
tokenizer and saved with the adapter, and `auto` never guesses quietly: it warns when it falls back.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from peftcli import console
from peftcli.data.formats import BadRowError
from peftcli.errors import UserError
from peftcli.recipe.schema import BUILTIN_TEMPLATES

BUILTIN = BUILTIN_TEMPLATES


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
        path = Path(setting)
        if not path.is_file():
            raise UserError(
                f"data.chat_template: '{setting}' is neither a built-in template ({', '.join(BUILTIN)}, auto) "
                "nor an existing .jinja file"
            )
        template = ChatTemplate(str(path), path.read_text(encoding="utf-8"))
    tokenizer.chat_template = template.source
    return template


def render(tokenizer, turns, add_generation_prompt: bool = False) -> str:
    """Render a conversation (a sequence of Turn or role/content dicts) to text."""
    messages = [t if isinstance(t, dict) else {"role": t.role, "content": t.content} for t in turns]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises TemplateError subclasses, and templates raise their own
        # Templates often reject role orders they do not support (two user turns in a row, say):
        # that is a property of the row, so it is reported (or skipped) like any other bad row.
        raise BadRowError(f"the chat template refused this conversation: {exc}") from None
