"""Where xray-train keeps files that outlive a run: the rebuilt tokenizer and the vision-feature cache."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("XRAY_TRAIN_CACHE", Path.home() / ".cache" / "xray-train"))


def feature_cache_root() -> Path:
    return Path(os.environ.get("XRAY_TRAIN_FEATURE_CACHE", cache_root() / "vision-features"))
