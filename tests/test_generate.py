"""Batched generation on the tiny 4-bit model wrapped by peft (LoRA + trainable loc rows + projector copy).

The check that matters is left padding: the report and detect prompts differ in length, so a mixed
batch pads; its answers must equal the answers generated one request at a time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xray_train.generate import Generation, Generator, Request

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
INDIANA = SAMPLES / "indiana" / "images" / "images_normalized"

_MODEL: dict = {}


@pytest.fixture
def peft_model(make_config):
    """A Phase-2 training model (4-bit base, LoRA, loc rows, projector copy) with non-zero LoRA B,
    built once per test process (no training needed to test generation)."""
    if "model" not in _MODEL:
        from xray_train.model import build_training_model

        from xray_train.resolve import resolve

        model, processor = build_training_model(resolve(make_config("phase2")))
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.05)  # fresh LoRA B is zero: make the adapter change the output
        model.eval()
        _MODEL["model"] = (model, processor)
    return _MODEL["model"]


def _images() -> list[Path]:
    """Three images of different sizes and bit depths (8-bit 240x300 and 120x150, 16-bit PadChest)."""
    padchest = sorted((SAMPLES / "padchest" / "images").rglob("*.png"))[0]
    return [INDIANA / "100_IM-4252-1001.dcm.png", INDIANA / "13_IM-4562-2001.dcm.png", padchest]


def test_model_under_test_has_every_peft_wrapper(peft_model):
    model, _ = peft_model
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"TrainableTokensWrapper", "ModulesToSaveWrapper", "Linear4bit"} <= kinds


def test_batch_answers_equal_one_by_one_answers(peft_model):
    from PIL import Image

    model, processor = peft_model
    images = _images()
    assert len({Image.open(p).size for p in images}) == 3
    generator = Generator(model, processor, "You are a radiologist.", max_new_tokens=10, batch_size=3)
    requests = [Request(images[0], "report"), Request(images[1], "detect"), Request(images[2], "report")]
    prompt_lengths = {len(generator.encoder.prompt_ids(r.task)) for r in requests}
    assert len(prompt_lengths) == 2, "the batch must actually need padding"

    batch = generator(requests, progress=False)
    single = [generator.generate_batch([r])[0] for r in requests]

    assert all(isinstance(g.text, str) and g.error is None for g in batch)
    assert all(1 <= g.n_new_tokens <= 10 for g in batch)
    assert [g.text for g in batch] == [g.text for g in single]
    assert [g.n_new_tokens for g in batch] == [g.n_new_tokens for g in single]


def test_more_requests_than_one_batch_keep_their_order(peft_model):
    """Images are read ahead batch by batch; every batch after the first must get its own pixels."""
    model, processor = peft_model
    images = _images()
    generator = Generator(model, processor, "sys", max_new_tokens=4, batch_size=2)
    requests = [Request(images[i % 3], "report" if i % 2 else "detect") for i in range(5)]

    batched = generator(requests, progress=False)
    single = [generator.generate_batch([r])[0] for r in requests]

    assert [g.error for g in batched] == [None] * 5
    assert [g.text for g in batched] == [g.text for g in single]


def test_batch_is_left_padded_with_image_token_types(peft_model):
    model, processor = peft_model
    generator = Generator(model, processor, "sys", max_new_tokens=2)
    requests = [Request(_images()[0], "report"), Request(_images()[0], "detect")]
    batch = generator.build_batch(requests)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for row, req in enumerate(requests):
        prompt = generator.encoder.prompt_ids(req.task)
        assert ids[row, -len(prompt):].tolist() == prompt  # every prompt ends at the last column
        assert mask[row].sum() == len(prompt) and mask[row, -1] == 1
        assert int(batch["token_type_ids"][row].sum()) == generator.encoder.image_seq_length


def test_unreadable_image_is_reported_not_fatal(peft_model, tmp_path):
    model, processor = peft_model
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    generator = Generator(model, processor, "sys", max_new_tokens=3)
    out = generator([Request(broken, "report"), Request(_images()[0], "report")], progress=False)
    assert out[0].text is None and "broken.png" in out[0].error
    assert isinstance(out[1].text, str) and out[1].error is None


def test_generate_is_greedy_and_keeps_no_scores(peft_model, monkeypatch):
    """Never ask generate for per-step scores/logits (each would be batch x 262k floats)."""
    model, processor = peft_model
    seen = {}
    real = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    Generator(model, processor, "sys", max_new_tokens=2)([Request(_images()[0], "detect")], progress=False)
    assert seen["do_sample"] is False and seen["use_cache"] is True
    assert not any(seen.get(k) for k in ("output_scores", "output_logits", "return_dict_in_generate"))
    tok = processor.tokenizer
    assert seen["eos_token_id"] == [tok.convert_tokens_to_ids("<end_of_turn>"), tok.eos_token_id]


def test_generation_result_defaults():
    assert Generation("x").finished and Generation("x").error is None
