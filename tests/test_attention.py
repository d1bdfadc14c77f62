"""training.split_image_attention: Gemma 3's image mask as two mask-free SDPA calls, same outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xray_train import attention
from xray_train.attention import IMPLEMENTATION, span_masks, split_image_attention
from xray_train.collate import Collator, PromptEncoder, image_span
from xray_train.config import RunConfig
from xray_train.gemma3 import decoder_layers, unwrap_gemma3
from xray_train.loss import targets_only_loss
from xray_train.model import build_training_model
from xray_train.resolve import resolve

from .conftest import SAMPLES


def dense_gemma_mask(length: int, span: tuple[int, int]) -> torch.Tensor:
    i = torch.arange(length)
    image = (i >= span[0]) & (i < span[1])
    return (i[:, None] >= i[None, :]) | (image[:, None] & image[None, :])


@pytest.mark.parametrize("span", [(3, 20), (0, 20), (3, 40), (10, 11)])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_split_attention_equals_the_dense_gemma_mask(span, kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 40, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, kv_heads, 40, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv_heads, 40, 16, dtype=torch.float64, requires_grad=True)
    rep = 4 // kv_heads
    dense = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=dense_gemma_mask(40, span), scale=0.3
    )
    split = split_image_attention(q, k, v, span, 0.3)
    torch.testing.assert_close(split, dense)
    grad = torch.randn_like(dense)
    for got, want in zip(torch.autograd.grad(split, (q, k, v), grad), torch.autograd.grad(dense, (q, k, v), grad), strict=True):
        torch.testing.assert_close(got, want)


def test_image_span_only_for_one_shared_block():
    img = 9
    same = torch.tensor([[1, 2, img, img, img, 5, 0], [1, 2, img, img, img, 5, 6]])
    assert image_span(same, img) == (2, 5)
    assert image_span(torch.tensor([[1, img, img, 5], [1, 2, img, img]]), img) is None  # different places
    assert image_span(torch.tensor([[1, img, 3, img], [1, img, 3, img]]), img) is None  # two blocks
    assert image_span(torch.tensor([[1, 2, 3]]), img) is None  # no image
    assert image_span(torch.tensor([[1, img, img], [1, img, 3]]), img) is None  # different lengths


def _config(tiny_model_dir, phase, split):
    data = (
        {"dataset": "padchest", "image_root": str(SAMPLES), "csv": str(SAMPLES / "x.csv")}
        if phase == "phase1"
        else {"dataset": "indiana", "image_root": str(SAMPLES)}
    )
    return resolve(RunConfig.model_validate({
        "phase": phase, "output_dir": "unused", "data": data, "lora": {"dropout": 0.0},
        "model": {"base": str(tiny_model_dir), "compute_dtype": "float32"},
        "training": {"split_image_attention": split},
    }))


def _cached_batch(model, processor, task):
    from xray_train.features import pooled_vision_features
    from xray_train.inputs import PixelLoader

    encoder = PromptEncoder(processor, "sys")
    images = sorted((SAMPLES / "indiana" / "images" / "images_normalized").glob("*-1001.dcm.png"))[:3]
    # Answers of different lengths: the batch is right-padded.
    answers = ["FINDINGS:\n- cardiomegaly: cardiac and more words here", "<loc0010><loc0020><loc0500><loc0600> nodule", "no"]
    loader = PixelLoader(processor)
    batch = Collator(encoder.ids)([dict(encoder.encode(task, a), pixel_values=loader(p)) for a, p in zip(answers, images, strict=True)])
    batch["image_features"] = pooled_vision_features(unwrap_gemma3(model).model, batch.pop("pixel_values"))
    return batch


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_training_loss_with_split_attention_matches_the_dense_mask(tiny_model_dir, processor, phase, monkeypatch):
    torch.manual_seed(0)
    dense_model, proc = build_training_model(_config(tiny_model_dir, phase, split=False))
    split_model, _ = build_training_model(_config(tiny_model_dir, phase, split=True))
    assert unwrap_gemma3(dense_model).config.get_text_config()._attn_implementation == "sdpa"
    assert unwrap_gemma3(split_model).config.get_text_config()._attn_implementation == IMPLEMENTATION
    # The vision tower keeps its own attention.
    assert unwrap_gemma3(split_model).config.vision_config._attn_implementation != IMPLEMENTATION
    with torch.no_grad():
        for (name, p), (other, q) in zip(dense_model.named_parameters(), split_model.named_parameters(), strict=True):
            assert name == other
            if "lora_B" in name:
                p.normal_(0, 0.02)
            if p.requires_grad:  # LoRA A starts random: the two models must hold the same adapter
                q.copy_(p)
    batch = _cached_batch(dense_model, proc, "report" if phase == "phase1" else "detect")
    assert batch["image_span"] is not None and batch["attention_mask"].min() == 0  # shared image, padded rows

    calls = []
    real = attention.split_image_attention
    monkeypatch.setattr(attention, "split_image_attention", lambda *a: calls.append(a[3]) or real(*a))

    def loss_and_grads(model):
        model.zero_grad(set_to_none=True)
        out = targets_only_loss(model, batch, chunk_rows=7, grad_in_forward=False)
        (out.loss_sum / out.n_tokens).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    dense, dense_grads = loss_and_grads(dense_model)
    assert not calls
    split, split_grads = loss_and_grads(split_model)
    n_layers = len(decoder_layers(split_model))
    assert calls == [batch["image_span"]] * n_layers
    torch.testing.assert_close(split.loss_sum, dense.loss_sum, rtol=1e-5, atol=1e-5)
    assert int(split.n_correct) == int(dense.n_correct)
    assert split_grads.keys() == dense_grads.keys()
    for name, grad in dense_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_span_masks_fall_back_to_dense_masks(tiny_model_dir):
    model, _ = build_training_model(_config(tiny_model_dir, "phase1", split=True))
    config = unwrap_gemma3(model).config
    window = config.get_text_config().sliding_window
    assert span_masks(config, (2, 18), window) == {"full_attention": (2, 18), "sliding_attention": (2, 18)}
    assert span_masks(config, None, 40) is None  # rows with their images at different places
    assert span_masks(config, (2, 18), window + 1) is None  # sliding layers would see less than global ones
    dense, _ = build_training_model(_config(tiny_model_dir, "phase1", split=False))
    assert span_masks(unwrap_gemma3(dense).config, (2, 18), 40) is None
