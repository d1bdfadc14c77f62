"""Gemma 3's layout, in one place: where the decoder layers, the vision tower, the projector and the norms
live inside ``Gemma3ForConditionalGeneration`` (and the wrappers around it), and what makes a base one.

Every other module asks here instead of spelling out ``.model.language_model.layers``, so a transformers
release that moves a module is one edit. The accessors take the model at any level: a DDP/accelerate
wrapper, a ``PeftModel``, the ``Gemma3ForConditionalGeneration`` or its inner ``Gemma3Model``.
"""

from __future__ import annotations

import contextlib
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
    """The decoder stack (``Gemma3TextModel``: embeddings, layers, final norm), also of a text-only Gemma 3
    (``Gemma3ForCausalLM``)."""
    core = gemma3_core(model)
    return getattr(core, "language_model", core)


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


# ---------------------------------------------------------------------------------------------
# float16 that cannot overflow: the residual stream scaled by 1/s, exactly

#: ``model.residual_scale`` when null and the residual stream is float16 (a power of two, so scaling is
#: exact). Large enough that Gemma 3's residual stream stays far inside float16's range, small enough that
#: values near zero keep their precision; ``tests/test_gemma3.py`` measures both on real weights.
FP16_RESIDUAL_SCALE = 16

#: Norms that read the residual stream (scale-invariant but for their eps) and norms that write into it.
PRE_NORMS = ("input_layernorm", "pre_feedforward_layernorm")
POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


def residual_scale_for(compute_dtype: str, residual_scale: int | None) -> int:
    """The residual scale a run uses: ``model.residual_scale`` if set, else ``FP16_RESIDUAL_SCALE`` for a
    float16 residual stream (``model.compute_dtype: float16``) and 1 (off) otherwise. Pure: ``resolve``
    records its value, and loading an adapter from a run directory asks it again."""
    if residual_scale is not None:
        return residual_scale
    return FP16_RESIDUAL_SCALE if compute_dtype == "float16" else 1


class ResidualScale:
    """The residual stream of a Gemma 3 decoder divided by ``scale``, computing the same function.

    Gemma 3 multiplies its token embeddings by sqrt(hidden size) and its post-attention and post-feed-forward
    norms have large weights, so the residual stream grows layer by layer past float16's 65,504. Dividing
    everything that enters the stream by ``s`` divides the whole stream by ``s``:

    - the embeddings and image soft tokens enter through the text model's ``inputs_embeds``: scaled by 1/s
      there, in one place, whatever made them (token ids, pixels, cached vision features);
    - a post-norm writes ``(1 + w) * normed(x)`` into the stream, so ``w -> (1 + w) / s - 1``, kept in
      float32 (in float16 the new weights, close to -1, would lose the digits that matter);
    - the pre-norms and the final norm read ``h / s``: RMSNorm is scale-invariant but for its eps, so
      ``eps -> eps / s**2`` makes them exact; the final norm hands the LM head the unscaled states.

    Only base weights that nothing trains change (LoRA on q/v reads the pre-norms' outputs; the projector
    and the ``<loc>`` rows sit before the entry), so an adapter trained like this is the same adapter as one
    trained without. ``remove()`` restores the model exactly (the original tensors are kept).
    """

    def __init__(self, model, scale: int):
        if scale < 1 or scale & (scale - 1):
            raise ValueError(f"the residual scale must be a power of two >= 1, not {scale}")
        import torch

        self.scale = scale
        stream = text_model(model)
        self._saved: list[tuple] = []
        with torch.no_grad():
            for layer in stream.layers:
                for name in PRE_NORMS:
                    self._set_eps(getattr(layer, name), getattr(layer, name).eps / scale**2)
                for name in POST_NORMS:
                    norm = getattr(layer, name)
                    self._saved.append((norm, "weight", norm.weight.data))
                    norm.weight.data = (1.0 + norm.weight.data.float()) / scale - 1.0
            self._set_eps(stream.norm, stream.norm.eps / scale**2)
        self._hook = stream.register_forward_pre_hook(self._scale_entering, with_kwargs=True)

    def _set_eps(self, norm, eps: float) -> None:
        self._saved.append((norm, "eps", norm.eps))
        norm.eps = eps

    def _scale_entering(self, stream, args, kwargs):
        if args:  # Gemma3TextModel(input_ids, ...) called positionally
            if len(args) > 1:
                raise TypeError("a residual-scaled Gemma 3 text model takes its inputs as keyword arguments")
            kwargs = {**kwargs, "input_ids": args[0]}
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = stream.embed_tokens(kwargs["input_ids"])
        return (), {**kwargs, "input_ids": None, "inputs_embeds": embeds * (1.0 / self.scale)}

    def remove(self) -> None:
        self._hook.remove()
        for module, name, value in reversed(self._saved):
            if name == "weight":
                module.weight.data = value
            else:
                setattr(module, name, value)
        self._saved.clear()


def scale_residual_stream(model, scale: int) -> ResidualScale | None:
    """Divide ``model``'s residual stream by ``scale`` (:class:`ResidualScale`); None when ``scale`` is 1."""
    return ResidualScale(model, scale) if scale != 1 else None


@contextlib.contextmanager
def residual_scaled(model, scale: int):
    """``model`` with its residual stream divided by ``scale`` inside the block, restored after it."""
    handle = scale_residual_stream(model, scale)
    try:
        yield model
    finally:
        if handle is not None:
            handle.remove()
