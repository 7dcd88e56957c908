"""Generating text with a base model and any of its adapters: prompts rendered with the chat
template the adapter was trained with, stopping at that template's end-of-turn token.

Used by `peftcli eval --generate` (base vs tuned on the eval prompts), `peftcli generate`
(several adapters on one base, switched per prompt with PEFT's `set_adapter`) and `peftcli serve`
(the same, behind an HTTP API: `ReplyStreamer` hands it the reply piece by piece, and its size).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

from peftcli.data.encode import special_token_ids
from peftcli.data.formats import Example
from peftcli.data.templates import render_raw

PROBE = "\u2063probe-reply\u2063"  # a reply no template rewrites, to find what follows a reply


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for the model, and the reference answer when there is one."""

    text: str  # what the model is fed (rendered with the chat template for chat examples)
    shown: str  # what a person reads: the last user message, or the raw prompt
    reference: str | None
    chat: bool  # rendered by a template, which writes its own BOS; raw prompts get the tokenizer's
    origin: str = ""


def render_prompt(tokenizer, messages: list, chat: bool, tools: tuple[dict, ...] = ()) -> str:
    """The text a model continues: rendered as training rendered it (the same template, tool
    schemas and thinking mode), or the raw prompt. The thinking mode is the one the adapter's saved
    template records (on when it was trained on reasoning), so no mode is passed here."""
    if chat:
        return render_raw(tokenizer, messages, add_generation_prompt=True, tools=tools, thinking=None)
    return messages[-1]["content"]


def prompt_from_example(tokenizer, example: Example) -> Prompt | None:
    """The prompt of an eval example (everything before its last reply) and the reply as reference."""
    if example.is_chat:
        turns = list(example.turns)
        last = max(i for i, t in enumerate(turns) if t.role == "assistant")
        history = turns[:last]  # with its tool calls and outputs, as in training
        user = next((t.content for t in reversed(history) if t.role == "user"), "")
        text = render_prompt(tokenizer, history, True, example.tools)
        return Prompt(text, user, turns[last].content, True, example.origin)
    if not example.prompt:  # plain text: nothing to answer
        return None
    return Prompt(example.prompt, example.prompt, example.completion, False, example.origin)


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the token the chat template writes after a reply (`<|eot_id|>`, `<|im_end|>`, ...)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # noqa: BLE001 - a template may reject the probe; EOS still stops
            return ids
        after = text[text.find(PROBE) + len(PROBE) :]
        special = special_token_ids(tokenizer)
        for token in tokenizer(after, add_special_tokens=False)["input_ids"]:
            if token in special:
                if token not in ids:
                    ids.append(token)
                break
    return ids


def end_marker_text(tokenizer) -> str:
    """What the chat template writes after a reply when that is not a special token (a template
    from another family, ChatML on a base tokenizer): training taught the model to write it and
    then EOS, so a generated reply ends where it starts. '' when the marker is a special token."""
    if not tokenizer.chat_template:
        return ""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template may reject the probe
        return ""
    after = text[text.find(PROBE) + len(PROBE) :].strip()
    marker = after.split()[0] if after else ""
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
    return "" if len(ids) == 1 and ids[0] in special_token_ids(tokenizer) else marker


def _cut_at(text: str, marker: str) -> str:
    return text.split(marker, 1)[0] if marker else text


def cut_reply(text: str, cuts: tuple[str, ...]) -> str:
    """The reply: the decoded text up to the first of `cuts` (the end-of-turn marker, stop strings), stripped."""
    for cut in cuts:  # cutting at each one's first occurrence in turn leaves the text before the earliest
        text = _cut_at(text, cut)
    return text.strip()


def prompt_length(tokenizer, prompt: Prompt) -> int:
    """Tokens the model is fed for `prompt`, encoded as generate() encodes it."""
    return len(tokenizer(prompt.text, add_special_tokens=not prompt.chat)["input_ids"])


@contextmanager
def active(model, adapter: str | None):
    """Run `model` with one adapter active, or with adapters off (`None` = the base model)."""
    if adapter is None:
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                yield model
        else:
            yield model
        return
    model.set_adapter(adapter)
    yield model


def generate(
    model,
    tokenizer,
    prompts: list[Prompt],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    num_samples: int = 1,
    batch_size: int = 8,
    streamer=None,
    seed: int = 0,
    top_p: float = 1.0,
    stop: tuple[str, ...] = (),
) -> list[list[str]]:
    """Completions for each prompt (`num_samples` each), decoded without the prompt and cut before
    the first of the `stop` strings."""
    import torch

    device = next(model.parameters()).device
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    stops = stop_token_ids(tokenizer)
    cuts = (end_marker_text(tokenizer), *stop)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "num_return_sequences": num_samples}
    # Stop strings end generation as soon as one is written (transformers matches them on tokens).
    stop_strings = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
    outputs: list[list[str]] = [[] for _ in prompts]
    torch.manual_seed(seed)
    # A template writes its own BOS; a raw prompt gets the tokenizer's, as in training: batch each kind apart.
    for chat in (True, False):
        indices = [i for i, p in enumerate(prompts) if p.chat == chat]
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = tokenizer(
                [prompts[i].text for i in chunk], return_tensors="pt", padding=True, add_special_tokens=not chat
            ).to(device)
            with torch.no_grad():
                generated = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stops,
                    pad_token_id=tokenizer.pad_token_id,
                    streamer=streamer,
                    **stop_strings,
                    **(sampling if temperature > 0 else {"do_sample": False}),
                )
            texts = [
                cut_reply(tokenizer.decode(t, skip_special_tokens=True), cuts)
                for t in generated[:, batch["input_ids"].shape[1] :]
            ]
            for n, i in enumerate(chunk):
                outputs[i] = texts[n * num_samples : (n + 1) * num_samples]
    return outputs


class Cancelled(Exception):
    """The reader of a streamed reply went away: generation stops at the next token."""


class ReplyStreamer:
    """A streamer for generate() on one prompt: hands `on_text` the reply as it grows, exactly as
    generate() returns it (cut before the end marker and the stop strings, stripped), and counts
    the tokens of the prompt and of the reply.

    Text is released a word at a time, as transformers' TextStreamer does: more tokens can still
    change the end of a word (a multi-byte character, a tokenizer's clean-up), and what may be the
    start of a stop string is held back until the next tokens say whether it is one. `finish` sends
    the rest of the returned reply."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), on_text: Callable[[str], None] | None = None):
        self.tokenizer = tokenizer
        self.cuts = tuple(cut for cut in (end_marker_text(tokenizer), *stop) if cut)
        self.stop_ids = set(stop_token_ids(tokenizer))
        self.on_text = on_text
        self.prompt_tokens: int | None = None
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False  # ended by a stop token or string, not by the length limit
        self.cancelled = False

    def put(self, value) -> None:
        ids = value.reshape(-1).tolist()
        if self.prompt_tokens is None:  # generate() hands over the prompt first
            self.prompt_tokens = len(ids)
            return
        if self.cancelled:
            raise Cancelled()
        self.ids += ids
        self.stopped = self.stopped or bool(ids and ids[-1] in self.stop_ids)
        if self.on_text is not None:
            self._release(self._settled())

    def end(self) -> None:
        pass

    def _settled(self) -> str:
        """The part of the reply that more tokens cannot change."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd")
        if any(cut in text for cut in self.cuts):
            return cut_reply(text, self.cuts)
        head = text[: max(text.rfind(" "), text.rfind("\n")) + 1]  # whole words only
        for cut in self.cuts:
            held = next((n for n in range(min(len(cut) - 1, len(head)), 0, -1) if head.endswith(cut[:n])), 0)
            head = head[: len(head) - held]
        return head.strip()

    def _release(self, text: str) -> None:
        if self.on_text is not None and len(text) > len(self.sent) and text.startswith(self.sent):
            self.on_text(text[len(self.sent) :])
            self.sent = text

    def finish(self, reply: str) -> None:
        """Send what is left of `reply` (generate()'s answer), and note whether a stop string ended it."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.stopped = self.stopped or any(cut in text for cut in self.cuts)
        self._release(reply)

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)

    def finish_reason(self, max_new_tokens: int) -> str:
        """OpenAI's: "length" when the reply was cut by the token limit, else "stop"."""
        return "length" if not self.stopped and len(self.ids) >= max_new_tokens else "stop"
