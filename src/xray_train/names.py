"""Telling names apart: a Hub id from a local folder, a near miss from the names it was meant to be, and
the layer names LoRA adapts inside the language model (the same pattern for peft and for the check that
runs before loading)."""

from __future__ import annotations

import difflib
from pathlib import Path

#: Matches q_proj/v_proj (or whatever ``lora.target_modules`` names) inside the language model only.
LANGUAGE_MODEL_SCOPE = r".*language_model.*\.({names})$"


def looks_like_local_path(name: str) -> bool:
    """A hub id is ``org/name``; anything else (./x, /x, ~/x, a/b/c, an existing folder) is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists()


def did_you_mean(name: str, known) -> str:
    """`` (did you mean learning_rate?)`` for a near miss among ``known``, else ``""``."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def target_modules_regex(names: list[str]) -> str:
    """The pattern peft is given for ``lora.target_modules``: those layers of the language model only."""
    return LANGUAGE_MODEL_SCOPE.format(names="|".join(sorted(set(names))))
