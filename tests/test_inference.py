"""``xray_train.inference``: the fast decode path gives the same greedy tokens as plain ``generate``.

The model is a Phase-2 training model on the *unquantised* tiny base (the ``merged`` path's layout): LoRA
with non-zero B, a projector copy and ``<loc>`` rows scaled up so the random model writes ``<loc>``
tokens, which makes ``model.loc_decode: expected`` change answers. The reference is one plain ``generate``
call per request (batch 1, LoRA unmerged, no sorting).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from xray_train.config import ModelConfig
from xray_train.generate import Generator, Request, Variant, rate_text
from xray_train.inference import (
    CPU_ROWS,
    InferencePlan,
    adapter_enabled,
    kv_bytes_per_token,
    lora_merged,
    plan_inference,
    rows_that_fit,
)

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
INDIANA = SAMPLES / "indiana" / "images" / "images_normalized"
GB = 1024**3

_MODEL: dict = {}


@pytest.fixture
def model16(make_config):
    """Phase-2 model on the unquantised (float32) tiny base, built once per test process."""
    if "model" not in _MODEL:
        from xray_train.model import build_training_model
        from xray_train.resolve import resolve

        model, processor = build_training_model(resolve(make_config("phase2", "model.load_in_4bit=false")))
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.05)
                elif "trainable_tokens_delta" in name:
                    param.mul_(40.0)  # loud <loc> rows: the tied head then often picks a <loc> token
        model.eval()
        _MODEL["model"] = (model, processor)
    return _MODEL["model"]


def _requests() -> list[Request]:
    padchest = sorted((SAMPLES / "padchest" / "images").rglob("*.png"))[0]
    images = [INDIANA / "100_IM-4252-1001.dcm.png", INDIANA / "13_IM-4562-2001.dcm.png", padchest]
    # Interleaved tasks (two prompt lengths), more requests than one automatic batch.
    return [Request(images[i % 3], "detect" if i % 3 else "report") for i in range(CPU_ROWS + 3)]


def _plain(model, processor, requests, loc_decode):
    plain = Generator(model, processor, "sys", max_new_tokens=12, batch_size=1, loc_decode=loc_decode,
                      merge_lora=False, sort_by_length=False)
    return [plain.generate_batch([r])[0] for r in requests]


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("loc_decode", ["argmax", "expected"])
def test_fast_path_gives_plain_generate_tokens(model16, loc_decode, monkeypatch):
    model, processor = model16
    requests = _requests()
    reference = _plain(model, processor, requests, loc_decode)
    before = _weights(model)
    merged_during, batch_rows = [], []
    real = model.generate

    def spy(**kwargs):
        from peft.tuners.lora import LoraLayer

        merged_during.append(all(m.merged for m in model.modules() if isinstance(m, LoraLayer)))
        batch_rows.append(kwargs["input_ids"].shape[0])
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    fast = Generator(model, processor, "sys", max_new_tokens=12, batch_size=None, loc_decode=loc_decode)(
        requests, progress=False)

    assert merged_during and all(merged_during)  # the LoRA really was merged while generating
    assert batch_rows == [CPU_ROWS, len(requests) - CPU_ROWS]
    assert [g.text for g in fast] == [g.text for g in reference]
    assert [g.n_new_tokens for g in fast] == [g.n_new_tokens for g in reference]
    # The test is only worth something if the answers hold <loc> tokens for the expected rule to move.
    assert sum("<loc" in g.text for g in fast) >= 3
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base's bits are back


@pytest.mark.parametrize("shared", [False, True])
def test_static_kv_cache_gives_plain_generate_tokens(model16, shared):
    model, processor = model16
    requests = _requests()
    reference = _plain(model, processor, requests, "expected")
    seen = []
    real = model.generate

    def spy(**kwargs):
        seen.append(kwargs.get("cache_implementation"))
        return real(**kwargs)

    generator = Generator(model, processor, "sys", max_new_tokens=12, batch_size=None, loc_decode="expected",
                          decode_cache="static")
    model.generate = spy
    try:
        if shared:
            fast = generator.answer(requests, [Variant("adapter")], progress=False, on_batch=lambda *a: None)["adapter"]
        else:
            fast = generator(requests, progress=False)
    finally:
        del model.generate
    assert seen and set(seen) == {"static"}
    assert [g.text for g in fast] == [g.text for g in reference]
    assert sum("<loc" in g.text for g in fast) >= 3


def test_expected_loc_rule_changes_answers_here(model16):
    """The fixture's <loc> answers are ones the ``expected`` rule decodes differently (else the test above
    would not show the rule is kept)."""
    model, processor = model16
    requests = [r for r in _requests() if r.task == "detect"][:3]
    argmax = _plain(model, processor, requests, "argmax")
    expected = _plain(model, processor, requests, "expected")
    assert [g.text for g in argmax] != [g.text for g in expected]


def test_baseline_under_disable_adapter_is_not_merged_and_matches_plain(model16):
    model, processor = model16
    requests = _requests()[:4]
    with model.disable_adapter():
        assert not adapter_enabled(model)
        reference = _plain(model, processor, requests, "argmax")
        fast = Generator(model, processor, "sys", max_new_tokens=12, batch_size=None)(requests, progress=False)
    assert [g.text for g in fast] == [g.text for g in reference]
    assert adapter_enabled(model)


@pytest.mark.parametrize("loc_decode", ["argmax", "expected"])
def test_adapter_and_base_from_one_siglip_pass_give_plain_generate_tokens(model16, loc_decode, monkeypatch):
    """evaluate's way: each batch answered by the adapter, then the base, from one SigLIP encoding per film."""
    model, processor = model16
    requests = _requests()
    with _projector_copy_moved(model):
        _one_siglip_pass(model, processor, requests, loc_decode)


def test_one_siglip_pass_fills_the_image_rows_before_the_fp16_residual_scale(model16):
    """The image rows enter the residual stream like the token rows, divided by the scale with them."""
    from xray_train.gemma3 import residual_scaled

    model, processor = model16
    with _projector_copy_moved(model), residual_scaled(model, 16):
        _one_siglip_pass(model, processor, _requests()[:4], "argmax")


@contextmanager
def _projector_copy_moved(model):
    """The adapter's projector copy made unlike the base's, so answers show which one projected the image."""
    from xray_train.gemma3 import active_projector

    projector = active_projector(model)
    with model.disable_adapter():
        assert active_projector(model) is not projector
    weight = projector.mm_input_projection_weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(-1.0)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def _one_siglip_pass(model, processor, requests, loc_decode):
    from xray_train.gemma3 import vision_tower

    adapter_reference = _plain(model, processor, requests, loc_decode)
    with model.disable_adapter():
        base_reference = _plain(model, processor, requests, loc_decode)
    films_encoded, hooked = [], []

    def on_batch(label, indices, image_inputs):
        hooked.append((label, indices, image_inputs["image_features"].shape[0], adapter_enabled(model)))

    tower = vision_tower(model)
    handle = tower.register_forward_hook(lambda m, args, kwargs, out: films_encoded.append(
        kwargs["pixel_values"].shape[0]), with_kwargs=True)
    try:
        generator = Generator(model, processor, "sys", max_new_tokens=12, batch_size=None, loc_decode=loc_decode)
        answers = generator.answer(
            requests, [Variant("adapter"), Variant("base model", model.disable_adapter)], progress=False,
            on_batch=on_batch)
    finally:
        handle.remove()

    assert [g.text for g in answers["adapter"]] == [g.text for g in adapter_reference]
    assert [g.text for g in answers["base model"]] == [g.text for g in base_reference]
    assert [g.text for g in answers["adapter"]] != [g.text for g in answers["base model"]]
    assert sum(films_encoded) == len(requests)  # once per film, not once per film and model
    # The hook sees each batch in each model's state, with every request exactly once per model.
    batches = -(-len(requests) // generator.rows)
    assert [(label, on) for label, _, _, on in hooked] == [("adapter", True), ("base model", False)] * batches
    for label in ("adapter", "base model"):
        seen = [i for lab, indices, rows, _ in hooked if lab == label for i in indices]
        assert sorted(seen) == list(range(len(requests)))
        assert sum(rows for lab, _, rows, _ in hooked if lab == label) == len(requests)


def test_shared_path_reports_unreadable_films_under_every_model(model16, tmp_path):
    model, processor = model16
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    requests = [Request(broken, "report"), *_requests()[:2]]
    answers = Generator(model, processor, "sys", max_new_tokens=3).answer(
        requests, [Variant("adapter"), Variant("base model", model.disable_adapter)], progress=False)
    for label in ("adapter", "base model"):
        assert answers[label][0].text is None and "broken.png" in answers[label][0].error
        assert all(isinstance(g.text, str) for g in answers[label][1:])


def test_lora_merged_restores_the_base_bit_for_bit(model16):
    model, _ = model16
    before = _weights(model)
    with lora_merged(model) as merged:
        assert merged
        changed = [k for k, v in model.state_dict().items() if "base_layer" in k and not torch.equal(v, before[k])]
        assert changed  # the q/v weights hold W + BA inside
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lora_merged_leaves_a_4bit_base_alone(make_config):
    from tests.test_generate import _MODEL as FOUR_BIT  # the 4-bit model test_generate builds

    if "model" not in FOUR_BIT:
        from xray_train.model import build_training_model
        from xray_train.resolve import resolve

        FOUR_BIT["model"] = build_training_model(resolve(make_config("phase2")))
    model, _ = FOUR_BIT["model"]
    with lora_merged(model) as merged:
        assert merged is False


# ---------------------------------------------------------------------------------------------
# Choosing the path and the batch


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**kw)


def test_plan_takes_merged_only_where_the_16bit_copy_fits_twice():
    n = 4_300_000_000  # MedGemma-4B's parameters: 8.6 GB in bf16
    assert plan_inference(_cfg(), free=78 * GB, n_params=n).weights == "merged"
    small = plan_inference(_cfg(), free=15 * GB, n_params=n)
    assert small.weights == "4bit" and "do not fit" in small.reason
    assert plan_inference(_cfg(), free=None, n_params=n).weights == "4bit"  # CPU: the training layout
    assert plan_inference(_cfg(inference="merged"), free=1 * GB, n_params=n).weights == "merged"
    assert plan_inference(_cfg(inference="4bit"), free=200 * GB, n_params=n).weights == "4bit"
    assert plan_inference(_cfg(load_in_4bit=False, inference="4bit"), free=None).weights == "merged"
    assert InferencePlan("merged", "x").description.startswith("16-bit")


def test_rows_that_fit_grow_with_free_memory_and_are_capped(model16):
    model, _ = model16
    per_token = kv_bytes_per_token(model)
    text = model.get_base_model().config.get_text_config()
    assert per_token == 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 4
    few = rows_that_fit(model, 600, free=3 * GB)
    assert 1 <= few < rows_that_fit(model, 600, free=6 * GB) <= 256
    assert rows_that_fit(model, 600, free=1000 * GB) == 256
    assert rows_that_fit(model, 600, free=None) == CPU_ROWS


def test_rate_text():
    assert rate_text(None) == "-- films/s"
    assert rate_text(3.14159) == "3.14 films/s" and rate_text(31.4) == "31 films/s"


def test_progress_bar_shows_rate_and_eta():
    from io import StringIO

    from rich.console import Console

    from xray_train.generate import progress_bar

    out = StringIO()
    console = Console(file=out, width=160, force_terminal=False)
    with progress_bar(True, console) as bar:
        handle = bar.add_task("Generating", total=10)
        bar.advance(handle, 5)
    text = out.getvalue()
    assert "films/s" in text and "ETA" in text and "5/10" in text


@pytest.mark.parametrize("mode, weights, loaded", [("merged", "merged", "Linear"), ("auto", "4bit", "Linear4bit")])
def test_evaluate_loads_the_planned_weights_and_says_which(make_config, tmp_path_factory, tmp_path, mode, weights,
                                                           loaded):
    """``evaluate`` without a model picks the path (on a CPU ``auto`` keeps the 4-bit training layout)."""
    from tests.test_evaluate import trained_adapters
    from xray_train.evaluate import evaluate

    adapter = trained_adapters(make_config, tmp_path_factory)["phase1"]
    said = []
    results = evaluate(adapter, make_config("phase1", f"model.inference={mode}"), max_samples=2, baseline=False,
                       out_dir=tmp_path, max_new_tokens=3, progress=False, echo=said.append)
    assert results["generation"]["weights"] == weights and results["generation"]["batch_size"] == CPU_ROWS
    line = next(s for s in said if s.startswith("Inference on the"))
    assert ("16-bit" in line) == (weights == "merged")
    assert results["n_examples"] == 2
    from xray_train.inference import load_for_inference

    model, _, plan = load_for_inference(adapter, make_config("phase1", f"model.inference={mode}").model)
    q = model.get_base_model().model.language_model.layers[0].self_attn.q_proj.base_layer
    assert plan.weights == weights and type(q).__name__ == loaded


def test_parameter_count_reads_the_config_and_counts_a_tied_head_once(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    from xray_train.inference import parameter_count

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert parameter_count(str(tiny_model_dir)) == sum(p.numel() for p in model.parameters())
