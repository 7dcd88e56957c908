"""Keeping hub tokens out of everything peftcli writes or prints.

Tokens belong in the environment (HF_TOKEN), which the hub client reads on its own; no recipe key
takes one. Should a token still reach a recipe value (a `--set` typo, a pasted URL), `redact`
replaces it before the value lands in recipe.yaml, report.md, a model card or an error line.
"""

from __future__ import annotations

import os
import re

TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN")
# Hugging Face user/org access tokens: "hf_" followed by a long run of letters and digits.
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")
REDACTED = "<redacted>"


def redact(text: str) -> str:
    for name in TOKEN_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 8:
            text = text.replace(value, REDACTED)
    return TOKEN_PATTERN.sub(REDACTED, text)
