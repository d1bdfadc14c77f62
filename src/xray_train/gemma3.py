"""Gemma 3's layout, in one place: where the decoder layers, the vision tower, the projector and the norms
live inside ``Gemma3ForConditionalGeneration`` (and the wrappers around it), and what makes a base one.

Every other module asks here instead of spelling out ``.model.language_model.layers``, so a transformers
release that moves a module is one edit. The accessors take the model at any level: a DDP/accelerate
wrapper, a ``PeftModel``, the ``Gemma3ForConditionalGeneration`` or its inner ``Gemma3Model``.
"""

from __future__ import annotations

from pathlib import Path

from xray_train.errors import XrayTrainError
from xray_train.names import looks_like_local_path

#: The transformers class every base must be (MedGemma is one; PaliGemma is not).
GEMMA3_CLASS = "Gemma3ForConditionalGeneration"


def unwrap_gemma3(model):
    """PeftModel / DDP wrappers -> the Gemma3ForConditionalGeneration inside (LoRA layers stay injected)."""
    inner = model
    while hasattr(inner, "module"):  # DDP / accelerate wrappers
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def gemma3_core(model):
    """The inner ``Gemma3Model`` (vision tower, projector, language model; no LM head)."""
    inner = unwrap_gemma3(model)
    return inner.model if hasattr(inner, "lm_head") else inner


def text_model(model):
    """The decoder stack (``Gemma3TextModel``: embeddings, layers, final norm)."""
    return gemma3_core(model).language_model


def decoder_layers(model):
    """The language model's decoder layers, in order."""
    return text_model(model).layers


def vision_tower(model):
    return gemma3_core(model).vision_tower


def vision_dtype(model):
    """The dtype the vision tower's weights (and so its pixel inputs) are in."""
    return next(vision_tower(model).parameters()).dtype


def vision_device(model):
    return next(vision_tower(model).parameters()).device


def vision_encoder_layers(model):
    """SigLIP's encoder layers (transformers 5 drops the ``vision_model`` level some versions have)."""
    tower = vision_tower(model)
    return getattr(tower, "vision_model", tower).encoder.layers


def active_projector(model):
    """The projector module actually in use (peft wraps a trainable copy in Phase 2)."""
    proj = gemma3_core(model).multi_modal_projector
    if hasattr(proj, "modules_to_save"):
        if getattr(proj, "disable_adapters", False):
            return proj.original_module
        name = proj.active_adapter
        name = name[0] if isinstance(name, (list, tuple)) else name
        return proj.modules_to_save[name]
    return proj


# ---------------------------------------------------------------------------------------------
# What makes a base


def local_config_file(base: str) -> Path | None:
    """``config.json`` of a local model directory, or None for a Hub id; a local path without one is an error."""
    if not looks_like_local_path(base):
        return None
    path = Path(base).expanduser() / "config.json"
    if not path.is_file():
        raise XrayTrainError(f"model.base: no config.json in local model directory {base}")
    return path


def require_gemma3(model, described: str) -> None:
    """``model`` must be a Gemma 3 image-text model; ``described`` says what was loaded ("X is", "the config
    describes")."""
    if type(model).__name__ != GEMMA3_CLASS:
        raise XrayTrainError(
            f"model.base: {described} a {type(model).__name__}, expected a Gemma 3 image-text model "
            f"({GEMMA3_CLASS}) such as google/medgemma-4b-it"
        )
