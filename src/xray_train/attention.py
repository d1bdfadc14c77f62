"""Gemma 3's training attention without a mask tensor (``training.split_image_attention``).

Gemma 3 attends causally over text and bidirectionally inside an image block. transformers builds that
as a dense ``[batch, 1, seq, seq]`` boolean mask in every forward (a dozen small host-launched ops at
which the GPU waits) and, because SDPA has no grouped-query support with a mask, copies K/V to every
query head and keeps the copies for backward (~0.9 GB at MedGemma-4B shapes, batch 16).

In a training batch every row has the same prompt, so the image block sits at the same ``[start, end)``
in every row, and padding is on the right. The mask is then two mask-free SDPA calls:

- causal attention over the whole sequence (right for every text query);
- for the image block's queries, attention over every key up to the block's end (what precedes the
  block and the whole block), which replaces those rows of the first call.

Right padding needs no mask: a padded key comes after every real token of its row, so causality
hides it from every real query (the image block's queries stop at ``end``). Padded queries' outputs
are garbage; as in the dense path they are ignored: they carry no label and no real query sees them.
``tests/test_attention.py`` checks outputs and gradients against the dense-mask path.

The attention kernels themselves are no faster (``benchmarks/bench_kernels.py``: 0.85 ms with the dense
mask, 0.88 ms split, per layer at batch 16 on an H100); the step is (+3.9 %,
``benchmarks/results/train_speed.md``), from the mask that is not built and the K/V that are not copied.

The loss passes the span as the "attention mask" (a tuple of ints, a constant to ``torch.compile``)
to layers whose attention implementation is ``xray_sdpa``; any tensor or ``None`` mask goes to
transformers' own SDPA path unchanged, so generation is untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Name under which the split attention is registered with transformers.
IMPLEMENTATION = "xray_sdpa"


def split_image_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, span: tuple[int, int], scale: float | None
) -> torch.Tensor:
    """Attention of ``query`` [b, h, s, d] over ``key``/``value`` [b, h_kv, s, d] with Gemma 3's image mask.

    ``span`` = ``(start, end)`` of the image block, the same in every row. Returns [b, h, s, d].
    """
    start, end = span
    gqa = query.shape[1] != key.shape[1]
    causal = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=gqa)
    image = F.scaled_dot_product_attention(
        query[:, :, start:end], key[:, :, :end], value[:, :, :end], scale=scale, enable_gqa=gqa
    )
    return torch.cat((causal[:, :, :start], image, causal[:, :, end:]), dim=2)


def xray_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention interface: split attention for a span "mask", transformers' SDPA otherwise."""
    if isinstance(attention_mask, tuple):
        if dropout:
            raise ValueError("split image attention has no attention dropout (Gemma 3 uses none)")
        out = split_image_attention(query, key, value, attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> str:
    """Make ``xray_sdpa`` a transformers attention implementation (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
        sdpa_mask,
    )

    AttentionInterface.register(IMPLEMENTATION, xray_sdpa_forward)
    if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    return IMPLEMENTATION


def use_split_attention(model) -> None:
    """Route the language model's attention through :func:`xray_sdpa_forward` (vision tower untouched)."""
    register()
    text_config = model.config.get_text_config()
    text_config._attn_implementation = IMPLEMENTATION


def span_masks(config, span: tuple[int, int] | None, seq_len: int) -> dict | None:
    """The per-layer-type "masks" that route a batch through :func:`split_image_attention`, or None.

    None (use transformers' dense masks) unless the language model runs ``xray_sdpa``, the batch has one
    shared image span, and the sequence fits the sliding window (then sliding layers see what global
    layers see).
    """
    text = config.get_text_config()
    if span is None or text._attn_implementation != IMPLEMENTATION:
        return None
    window = getattr(text, "sliding_window", None)
    if window is not None and seq_len > window:
        return None
    return {"full_attention": span, "sliding_attention": span}
