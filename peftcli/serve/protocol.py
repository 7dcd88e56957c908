"""The OpenAI wire format `peftcli serve` speaks: request bodies (validated here, every refusal an
`ApiError` with OpenAI's status code and error object) and the response and stream-chunk objects.

Requests are read leniently where OpenAI's clients send fields a local model has no use for (`user`,
`metadata`, ...): those are ignored. Fields that would change the answer and that this server cannot
honour (tools, logprobs, several choices, penalties) are refused, never silently dropped.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ApiError(Exception):
    """A request the server refuses: sent as {"error": {message, type, param, code}} with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# Fields that change the answer and that this server does not implement, with the values that
# mean "not used" (what a client sends when the caller did not ask for the feature).
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "response_format": (None, {"type": "text"}),
}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, content):
        for part in content if isinstance(content, list) else []:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text parts are supported: {'type': 'text', 'text': '...'}")
        return content

    def as_turn(self) -> dict:
        """The turn as a chat template reads it: a developer message is the system message of newer
        OpenAI clients; text parts are joined."""
        text = self.content if isinstance(self.content, str) else "".join(p["text"] for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Sampling(_Lenient):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default: sampling
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "'stop' takes up to 4 non-empty strings", param="stop", code="invalid_value")
        return tuple(stops)

    def wants_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, "this server takes one prompt per request", param="prompt", code="invalid_value")
        return self.prompt[0]

    def token_limit(self) -> int | None:
        return self.max_tokens


def parse(body: bytes, kind: type[_Sampling]) -> Any:
    """The request body as `kind`, or an ApiError saying which field is wrong."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    for name, unused in _UNSUPPORTED.items():
        if name in data and data[name] not in unused:
            raise ApiError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = _param(data, error["loc"], error["type"] == "missing")
        if error["type"] == "missing":
            raise ApiError(400, f"missing required parameter: '{param}'", param, "missing_required_parameter") from None
        raise ApiError(400, f"invalid value for '{param}': {error['msg']}", param, "invalid_value") from None


def _param(data: Any, loc: tuple, missing: bool) -> str:
    """The path of the wrong field as the client wrote it (`messages.0.role`): pydantic's location
    also names the union member it tried (`content.str`), which is not in the request."""
    path = []
    for part in loc:
        present = (isinstance(data, dict) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and part < len(data)
        )
        if not present:
            if missing:
                path.append(part)
            break
        path.append(part)
        data = data[part]
    return ".".join(str(part) for part in path)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_choice(text: str | None, finish_reason: str | None, delta: bool, first: bool = False) -> dict:
    """A choice of a chat completion, or of one of its stream chunks (`delta`)."""
    if not delta:
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
    content = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
    return {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}


def text_choice(text: str, finish_reason: str | None) -> dict:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


def envelope(kind: str, ident: str, model: str, choices: list[dict], created: int | None = None) -> dict:
    """A response or chunk object: chat.completion, chat.completion.chunk or text_completion."""
    return {"id": ident, "object": kind, "created": created or int(time.time()), "model": model, "choices": choices}


def sse(data: dict | str) -> str:
    """One server-sent event, as OpenAI streams them."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
