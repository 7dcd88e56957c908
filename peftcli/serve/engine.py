"""The built-in engine behind `peftcli serve`: the `peftcli generate` session (one base model, its
adapters attached side by side), answering one request at a time.

Which adapter is active is state of the one model every request shares (PEFT's `set_adapter`), so
requests take turns under one lock: a request never sees another's adapter, and its answer is the
answer `peftcli generate` gives, token for token. (Batching several prompts pads them, which can
change a greedy answer; a server that batches across adapters is vLLM: `--engine vllm`.)
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from peftcli.evaluation.adapters import BASE, Session
from peftcli.evaluation.generation import Prompt, ReplyStreamer, prompt_length
from peftcli.serve.protocol import ApiError


@dataclass(frozen=True)
class Settings:
    """How one request is answered."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]


@dataclass(frozen=True)
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Engine:
    def __init__(self, session: Session, default_max_tokens: int):
        self.session = session
        self.base_name = session.base_name  # the base model's folder or hub id, shown as the base's `root`
        self.default_max_tokens = default_max_tokens
        self.context = getattr(session.model.config, "max_position_embeddings", None)
        self._turn = threading.Lock()

    def turn(self) -> threading.Lock:
        """Held while the model or a tokenizer is in use: requests take turns."""
        return self._turn

    def models(self) -> list[str]:
        """What a request's `model` may name: the base, then every adapter."""
        return [BASE, *self.session.adapters]

    def adapter(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base), or a 404 listing the models."""
        if model == BASE:
            return None
        if model in self.session.adapters:
            return model
        raise ApiError(
            404,
            f"the model '{model}' does not exist; this server has: {', '.join(self.models())}",
            param="model",
            code="model_not_found",
        )

    def chat_prompt(self, adapter: str | None, messages: list[dict]) -> Prompt:
        """Rendered with the chat template the adapter was trained with (as `peftcli generate` does)."""
        return self.session.prompt(adapter, messages)

    def text_prompt(self, text: str) -> Prompt:
        """A raw completion prompt: fed as written, after the tokenizer's BOS."""
        return Prompt(text, text, None, False)

    def settings(self, adapter: str | None, prompt: Prompt, asked: int | None, **options) -> Settings:
        """The request's settings, its token limit checked against the model's context: a prompt that
        leaves no room is refused; without a limit asked, the reply gets what room there is."""
        size = prompt_length(self.session.tokenizer_for(adapter), prompt)
        limit = asked or self.default_max_tokens
        if self.context is not None:
            if size >= self.context or (asked is not None and size + asked > self.context):
                wanted = f"{size} in the prompt" + (f" + {asked} to generate" if asked else "")
                raise ApiError(
                    400,
                    f"this model's context is {self.context} tokens; the request needs {wanted}",
                    param="messages" if prompt.chat else "prompt",
                    code="context_length_exceeded",
                )
            limit = min(limit, self.context - size)
        return Settings(max_tokens=limit, **options)

    def answer(self, adapter: str | None, prompt: Prompt, settings: Settings, on_text=None) -> Reply:
        """Generate under the lock; `on_text` receives the reply piece by piece."""
        streamer = ReplyStreamer(self.session.tokenizer_for(adapter), settings.stop, on_text)
        with self._turn:
            return self._generate(adapter, prompt, settings, streamer)

    def _generate(self, adapter: str | None, prompt: Prompt, settings: Settings, streamer: ReplyStreamer) -> Reply:
        text = self.session.complete(
            adapter,
            prompt,
            streamer,
            max_new_tokens=settings.max_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=settings.seed,
            stop=settings.stop,
        )
        streamer.finish(text)
        finish = streamer.finish_reason(settings.max_tokens)
        return Reply(text, streamer.prompt_tokens or 0, streamer.completion_tokens, finish)

    def stream(self, adapter: str | None, prompt: Prompt, settings: Settings) -> Stream:
        """The reply as it is generated. Generation runs on its own thread, which holds the turn and
        hands the pieces over a queue; `Stream.cancel` stops it at the next token."""
        events: queue.Queue = queue.Queue()
        streamer = ReplyStreamer(self.session.tokenizer_for(adapter), settings.stop, events.put)

        def work() -> None:
            try:
                with self._turn:
                    events.put(self._generate(adapter, prompt, settings, streamer))
            except BaseException as exc:  # noqa: BLE001 - handed to the reader, who reports it
                events.put(_Failed(exc))

        threading.Thread(target=work, name="peftcli-serve-generate", daemon=True).start()
        return Stream(events, streamer)


class Stream:
    """A reply being generated: iterating yields its pieces, then the whole Reply."""

    def __init__(self, events: queue.Queue, streamer: ReplyStreamer):
        self._events, self._streamer = events, streamer

    def __iter__(self) -> Iterator[str | Reply]:
        while True:
            event = self._events.get()
            if isinstance(event, _Failed):
                raise event.error
            yield event
            if isinstance(event, Reply):
                return

    def cancel(self) -> None:
        """The reader is gone (the client hung up): free the model for the others at the next token."""
        self._streamer.cancelled = True
