"""``xray_train.gemma3``: the layout accessors, and the residual-stream scaling that keeps float16 finite while
computing what the unmodified model computes (real Gemma 3 270M weights, and the tiny model's image path,
training, plain-peft loading and merging)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from xray_train.config import ModelConfig
from xray_train.gemma3 import (
    FP16_RESIDUAL_SCALE, POST_NORMS, ResidualScale, decoder_layers, gemma3_core, residual_scale_for,
    residual_scaled, scale_residual_stream, unwrap_gemma3, vision_dtype, vision_encoder_layers,
)

from .test_loss import _batch, _config, _perturb_lora

FP16_MAX = torch.finfo(torch.float16).max
#: A chest X-ray report turn in Gemma's chat format, repeated: 64 of its tokens already take Gemma 3 270M's
#: residual stream past float16's range.
REPORT = (
    "<start_of_turn>user\nYou are an expert radiologist. Describe the findings of this chest X-ray.<end_of_turn>\n"
    "<start_of_turn>model\nFindings: The heart size is normal. The mediastinal contours are within normal limits. "
    "There is no focal consolidation, pleural effusion or pneumothorax. "
) * 3


# ---------------------------------------------------------------------------------------------
# Layout


def test_the_accessors_find_the_modules_at_every_wrapping_level(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    for wrapped in (model, model.model):
        assert gemma3_core(wrapped) is model.model
        assert decoder_layers(wrapped) is model.model.language_model.layers
    assert type(unwrap_gemma3(peft_model)).__name__ == "Gemma3ForConditionalGeneration"
    assert len(decoder_layers(peft_model)) == model.config.text_config.num_hidden_layers
    assert vision_dtype(model) == torch.float32
    assert len(vision_encoder_layers(model)) == model.config.vision_config.num_hidden_layers


def test_residual_scale_default_and_its_checks():
    assert residual_scale_for("float16", None) == FP16_RESIDUAL_SCALE
    assert residual_scale_for("bfloat16", None) == 1 and residual_scale_for("float32", None) == 1
    assert residual_scale_for("bfloat16", 8) == 8 and residual_scale_for("float16", 1) == 1  # explicit wins
    with pytest.raises(ValueError, match="power of two"):
        ModelConfig(residual_scale=12)
    with pytest.raises(ValueError, match="power of two"):
        ResidualScale(torch.nn.Module(), 3)


# ---------------------------------------------------------------------------------------------
# Gemma 3 270M's real weights


@pytest.fixture(scope="module")
def gemma3_270m():
    """(float32 Gemma3ForCausalLM with the real 270M weights, [1, 64] token ids of a report)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xray_train.testing.standin import gemma3_270m_dir
    from xray_train.testing.tiny import reference_tokenizer_dir

    model = AutoModelForCausalLM.from_pretrained(str(gemma3_270m_dir()), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(reference_tokenizer_dir()))(REPORT, return_tensors="pt").input_ids
    assert ids.shape[1] >= 64
    return model, ids[:, :64]


@torch.no_grad()
def _run(model, ids):
    """(float32 logits, the largest |activation| any decoder layer writes into the residual stream)."""
    peaks = []

    def record(module, args, out):
        peaks.append((out[0] if isinstance(out, tuple) else out).float().abs().max())

    hooks = [layer.register_forward_hook(record) for layer in decoder_layers(model)]
    try:
        logits = model(input_ids=ids).logits.float()
    finally:
        for hook in hooks:
            hook.remove()
    return logits, float(torch.stack(peaks).max())


def test_scaling_computes_the_same_logits_on_real_weights_with_a_residual_stream_s_times_smaller(gemma3_270m):
    model, ids = gemma3_270m
    plain, plain_peak = _run(model, ids)
    assert plain_peak > FP16_MAX  # the fixture is worth something: this is what overflows in float16
    s = FP16_RESIDUAL_SCALE
    with residual_scaled(model, s):
        scaled, scaled_peak = _run(model, ids)
    assert float((scaled - plain).abs().max()) <= 1e-4
    assert scaled_peak == pytest.approx(plain_peak / s, rel=1e-5)
    # Without the eps scaling the pre-norms would not be exact: the test can tell.
    handle = scale_residual_stream(model, 4096)
    assert handle is not None
    for layer in decoder_layers(model):
        layer.input_layernorm.eps *= 4096**2
    try:
        wrong, _ = _run(model, ids)
    finally:
        for layer in decoder_layers(model):
            layer.input_layernorm.eps /= 4096**2
        handle.remove()
    assert float((wrong - plain).abs().max()) > 1e-3
    # remove() gives back the model it was given, bit for bit.
    again, _ = _run(model, ids)
    assert torch.equal(again, plain)


def test_float16_overflows_without_the_scaling_and_stays_finite_and_faithful_with_it(gemma3_270m):
    model, ids = gemma3_270m
    reference, _ = _run(model, ids)
    half = copy.deepcopy(model).to(torch.float16)
    plain, _ = _run(half, ids)
    assert not torch.isfinite(plain).all()

    scale_residual_stream(half, FP16_RESIDUAL_SCALE)
    norm = getattr(decoder_layers(half)[0], POST_NORMS[0])
    assert norm.weight.dtype == torch.float32  # float16 would round (1 + w) / s - 1 near -1
    scaled, peak = _run(half, ids)
    assert torch.isfinite(scaled).all() and peak < FP16_MAX / 4
    agree = (scaled.argmax(-1) == reference.argmax(-1)).float().mean()
    assert agree >= 0.9


# ---------------------------------------------------------------------------------------------
# The tiny model: images, training, loading with plain peft, merging


def test_image_tokens_are_scaled_like_text_whichever_path_brings_them(tiny_model_dir, processor):
    from xray_train.features import vision_fingerprint
    from xray_train.loss import targets_only_loss
    from xray_train.model import build_training_model

    model, proc = build_training_model(_config(tiny_model_dir, "phase2"))
    _perturb_lora(model)
    model.eval()
    batch, cached = _batch(model, proc, "detect")
    gemma = gemma3_core(model)
    fingerprint = vision_fingerprint(gemma)
    with torch.no_grad():
        pixels_plain = unwrap_gemma3(model)(**batch, use_cache=False).logits
        cached_plain = targets_only_loss(model, cached, chunk_rows=64, grad_in_forward=False)
        with residual_scaled(model, 16):
            pixels_scaled = unwrap_gemma3(model)(**batch, use_cache=False).logits
            cached_scaled = targets_only_loss(model, cached, chunk_rows=64, grad_in_forward=False)
            # The cache holds features from before the stream: its key (the tower's fingerprint) is unchanged.
            assert vision_fingerprint(gemma) == fingerprint
    torch.testing.assert_close(pixels_scaled, pixels_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached_scaled.loss_sum, cached_plain.loss_sum, rtol=1e-6, atol=1e-5)
    assert torch.equal(cached_scaled.n_correct, cached_plain.n_correct)


def test_a_float16_run_builds_a_scaled_model_whose_trainable_parts_are_the_bases(make_config, tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    from xray_train.gemma3 import PRE_NORMS, active_projector
    from xray_train.model import build_training_model
    from xray_train.resolve import resolve

    cfg = resolve(make_config("phase2", "model.compute_dtype=float16"))
    assert cfg.model.residual_scale == FP16_RESIDUAL_SCALE  # what the run directory records
    model, _ = build_training_model(cfg)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float16)
    s = FP16_RESIDUAL_SCALE
    for ours, theirs in zip(decoder_layers(model), decoder_layers(base), strict=True):
        for name in POST_NORMS:
            expected = (1.0 + getattr(theirs, name).weight.float()) / s - 1.0
            assert torch.equal(getattr(ours, name).weight, expected)
        for name in PRE_NORMS:
            assert getattr(ours, name).eps == getattr(theirs, name).eps / s**2
    # What trains and is saved starts from the base's own values: the projector copy and LoRA's inputs.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not [n for n in trainable if any(norm in n for norm in (*PRE_NORMS, *POST_NORMS, "language_model.norm"))]
    torch.testing.assert_close(active_projector(model).mm_input_projection_weight,
                               base.model.multi_modal_projector.mm_input_projection_weight.float(), rtol=0, atol=0)


_RUN: dict = {}


@pytest.fixture
def fp16_run(make_config, tmp_path_factory) -> Path:
    """A Phase-1 run trained with model.compute_dtype float16 (so with the scaling on), once per process."""
    if "dir" not in _RUN:
        from xray_train.train import run

        out = tmp_path_factory.mktemp("fp16-run") / "phase1"
        cfg = make_config("phase1", "model.compute_dtype=float16", output_dir=out)
        run(cfg, overwrite=True, echo=lambda *a: None)
        _RUN["dir"] = out
    return _RUN["dir"]


def test_an_adapter_trained_with_the_scaling_is_a_plain_adapter(fp16_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from xray_train.generate import Generator, Request
    from xray_train.model import load_adapter

    saved = yaml.safe_load((fp16_run / "xray_train_config.yaml").read_text())["model"]
    assert saved["compute_dtype"] == "float16" and saved["residual_scale"] == FP16_RESIDUAL_SCALE
    # The training precision, as load_adapter rebuilds it: scaled again, so float16 stays finite.
    ours, processor = load_adapter(fp16_run)
    post_norm = getattr(decoder_layers(ours)[0], POST_NORMS[0])
    assert post_norm.weight.dtype == torch.float32

    images = sorted((Path(__file__).parents[1] / "data" / "samples" / "indiana").rglob("*-1001.dcm.png"))[:2]
    requests = [Request(path, "report") for path in images]

    def greedy(model, proc):
        return [g.text for g in Generator(model, proc, "sys", max_new_tokens=12)(requests, progress=False)]

    assert all(greedy(ours, processor))
    # Plain transformers + peft, float32, the unmodified base: no xray-train code touches the model.
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, fp16_run).eval()
    plain_processor = AutoProcessor.from_pretrained(fp16_run)
    plain_tokens = greedy(plain, plain_processor)
    # The same adapter on the reparametrised float32 model: the same greedy tokens. (A random tiny model's
    # logits are near ties everywhere, so float16 and float32 tokens are not comparable; float16 is what the
    # real-weight tests above cover.)
    with residual_scaled(plain, FP16_RESIDUAL_SCALE):
        assert greedy(plain, plain_processor) == plain_tokens
    assert greedy(plain, plain_processor) == plain_tokens


def test_merging_a_run_trained_with_the_scaling_merges_into_the_unmodified_base(fp16_run, tiny_model_dir, tmp_path):
    from xray_train.merge import merge

    report = merge(fp16_run, tmp_path / "merged", echo=lambda *a: None)
    assert report["passed"] and report["dtype"] == "float16" and report["check_residual_scale"] == FP16_RESIDUAL_SCALE

    # The same run as if trained without the scaling (only the recorded setting differs).
    unscaled = tmp_path / "unscaled-run"
    shutil.copytree(fp16_run, unscaled, ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
    config = unscaled / "xray_train_config.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["model"]["residual_scale"] = 1
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    other = merge(unscaled, tmp_path / "merged-unscaled", echo=lambda *a: None)
    assert other["passed"] and other["check_residual_scale"] == 1

    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    expected = load_file(str(tmp_path / "merged-unscaled" / "model.safetensors"))
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in merged)
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    norms = [k for k in merged if k.endswith(tuple(f"{n}.weight" for n in POST_NORMS))]
    assert norms and all(torch.equal(merged[k], base[k].to(merged[k].dtype)) for k in norms)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "gemma3"
