"""Remove credentials from what is published: secret-looking keys and values in configs and summaries,
and the token itself from any message."""

from __future__ import annotations

import re
from typing import Any

# Key names that hold credentials (``add_loc_tokens`` and ``pad_token`` must NOT match).
_SECRET_KEY = re.compile(
    r"^(?:.*[_-])?(?:token|secret|password|passwd|api[_-]?key|apikey|credentials?|authorization|auth)$"
    r"|secret|password|passwd|api[_-]?key|credential",
    re.IGNORECASE,
)
_PUBLIC_TOKEN_KEYS = re.compile(r"^(?:pad|bos|eos|unk|sep|cls|mask|image|boi|eoi|start|end)_token$", re.IGNORECASE)
# Values that look like credentials whatever their key: HF, OpenAI, GitHub, AWS, W&B, bearer headers.
SECRET_VALUE = re.compile(
    r"hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}"
    r"|Bearer\s+\S{8,}"
)


def scrub(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    return SECRET_VALUE.sub("***", text)


def _is_secret_key(key: Any) -> bool:
    key = str(key)
    return bool(_SECRET_KEY.search(key)) and not _PUBLIC_TOKEN_KEYS.match(key)


def _is_secret_value(value: Any) -> bool:
    return isinstance(value, str) and bool(SECRET_VALUE.search(value))


def sanitise(obj: Any) -> Any:
    """A copy with secret-looking keys and values removed (dict entries dropped, list items filtered)."""
    if isinstance(obj, dict):
        return {k: sanitise(v) for k, v in obj.items() if not _is_secret_key(k) and not _is_secret_value(v)}
    if isinstance(obj, list):
        return [sanitise(v) for v in obj if not _is_secret_value(v)]
    return obj
