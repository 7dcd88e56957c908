"""Every conversation of the data through the chat template, rendered and masked as training will,
for `peftcli validate`, which must not import torch.

Training loads the tokenizer with `AutoTokenizer`, which reads the model's config through modules
that import torch. The tokenizer classes themselves do not: the class the tokenizer files name
(`tokenizer_config.json`'s `tokenizer_class`) is loaded from the same files, so the chat template is
the same text, rendered by the same `apply_chat_template` (the same jinja environment), with the
same special tokens. Each conversation then goes through `encode`, the very function training
calls, so a row fails here exactly when it would fail, or be skipped, in training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftcli import console
from peftcli.data.encode import encode
from peftcli.data.formats import BadRowError, Example
from peftcli.recipe import DataSection, ModelSection

_SHOWN_ROWS = 5  # as the training report: the first few rows of each reason


@dataclass
class Failures:
    """What the conversations of one source do in the chat template."""

    checked: int = 0
    failed: int = 0
    reasons: dict[str, list[str]] = field(default_factory=dict)  # reason -> its first rows

    def add(self, origin: str, reason: str) -> None:
        self.failed += 1
        shown = self.reasons.setdefault(reason, [])
        if len(shown) < _SHOWN_ROWS:
            shown.append(origin)

    @property
    def first(self) -> tuple[str, str] | None:
        """(row, reason) of the first row that fails."""
        return next(((rows[0], reason) for reason, rows in self.reasons.items()), None)


def failing_conversations(tokenizer, examples: list[Example], data: DataSection) -> Failures:
    """Render, tokenize and mask every conversation as training does (`encode`). The tokenizer holds
    the resolved template already (`resolve_template`). Raw text rows need no template: not checked."""
    found = Failures()
    for example in examples:
        if not example.is_chat:
            continue
        found.checked += 1
        try:
            encode(tokenizer, example, data.train_on, data.max_length)
        except BadRowError as exc:
            found.add(example.origin, str(exc))
    return found


def offline_tokenizer(model: ModelSection) -> tuple[Any, str]:
    """The tokenizer training will use, read from local files (a model folder, or the local Hugging
    Face cache for a hub id) without torch: (tokenizer, "") or (None, why it cannot be)."""
    name = model.tokenizer or model.name
    local = os.path.isabs(os.path.expanduser(name))
    config_file = Path(name) / "tokenizer_config.json" if local else _cached(name, model.revision)
    if not local and config_file is None:
        return None, f"{name}'s tokenizer is not in the local Hugging Face cache"
    config = _read_json(config_file) if config_file is not None and config_file.is_file() else {}
    auto_map = config.get("auto_map")
    if isinstance(auto_map, list) or (isinstance(auto_map, dict) and "AutoTokenizer" in auto_map):
        return None, f"{name}'s tokenizer is its own code (auto_map), which only training runs"
    if not console.verbose():
        import transformers

        transformers.utils.logging.set_verbosity_error()  # as training: its start-up chatter is not ours
    error: Exception | None = None
    for cls in _classes(config.get("tokenizer_class")):
        try:
            return cls.from_pretrained(name, revision=model.revision, local_files_only=True), ""
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for files it cannot read
            error = error or exc
    text = str(error).strip().splitlines()[0][:200] if error is not None and str(error).strip() else "?"
    return None, f"cannot read {name}'s tokenizer without torch ({text})"


def _classes(declared: Any) -> list:
    """The tokenizer class the files name, when it is a fast (tokenizers) one, then the generic one.
    Reading one by name from `transformers` imports only that tokenizer's module."""
    import transformers
    from transformers import PreTrainedTokenizerFast

    classes = []
    for candidate in (declared, declared.removesuffix("Fast")) if isinstance(declared, str) else ():
        try:
            cls = getattr(transformers, candidate, None)
        except Exception:  # noqa: BLE001 - a lazily imported module that cannot load here
            cls = None
        if isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerFast) and cls not in classes:
            classes.append(cls)
    if PreTrainedTokenizerFast not in classes:
        classes.append(PreTrainedTokenizerFast)
    return classes


def _cached(hub_id: str, revision: str | None) -> Path | None:
    """tokenizer_config.json of a hub id in the local Hugging Face cache; never the network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(hub_id, "tokenizer_config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a name the hub would refuse has no cached copy
        return None
    return Path(found) if isinstance(found, str) else None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # loading the tokenizer says what is wrong with it
        return {}
    return value if isinstance(value, dict) else {}
