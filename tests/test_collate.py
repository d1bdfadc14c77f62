"""Label masks are built from token ids on the expanded sequence: only the answer is supervised."""

from __future__ import annotations

import torch

from xray_train.collate import IGNORE_INDEX, Collator, PromptEncoder, describe_supervision
from xray_train.data.loc import LOC_TOKENS
from xray_train.model import add_loc_tokens


def supervised_ids(encoded):
    return [i for i, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]


def test_supervised_tokens_decode_to_exactly_the_answer(processor):
    encoder = PromptEncoder(processor, "You are a radiologist.")
    answer = "FINDINGS:\n- cardiomegaly: cardiac\nLOCATIONS: cardiac\nIMPRESSION: cardiomegaly."
    encoded = encoder.encode("report", answer)
    sup = supervised_ids(encoded)
    assert sup[-1] == encoder.ids.end_of_turn
    assert processor.tokenizer.decode(sup[:-1]) == answer
    # Labels equal inputs where supervised: the shift happens in the loss, not here.
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(encoded["input_ids"], encoded["labels"]))


def test_prompt_image_and_control_tokens_are_never_targets(processor):
    encoder = PromptEncoder(processor, "sys")
    encoded = encoder.encode("report", "FINDINGS:\n- no significant abnormality")
    ids = torch.tensor(encoded["input_ids"])
    labels = torch.tensor(encoded["labels"])
    for special in (encoder.ids.image, encoder.ids.boi, encoder.ids.eoi, encoder.ids.bos, encoder.ids.start_of_turn):
        assert (labels[ids == special] == IGNORE_INDEX).all()
    assert int((ids == encoder.ids.image).sum()) == processor.image_seq_length
    # The image is expanded exactly as the processor expands <start_of_image>.
    text = processor.tokenizer.decode(encoded["input_ids"])
    assert processor.full_image_sequence in text
    assert text.startswith("<bos><start_of_turn>user\nsys\n\n")
    assert "<start_of_turn>model\n" in text


def test_prompt_matches_the_chat_template(processor):
    """The hand-built prompt is the Gemma chat format the processor's template produces."""
    encoder = PromptEncoder(processor, "SYS")
    templated = processor.apply_chat_template(
        [
            {"role": "system", "content": [{"type": "text", "text": "SYS"}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "TASK"}]},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    ours = "<bos>" + encoder.prompt_text("report").replace(processor.full_image_sequence, "<start_of_image>")
    assert ours.replace(encoder_task(encoder), "TASK") == templated


def encoder_task(encoder):
    from xray_train.collate import TASK_PROMPTS

    return TASK_PROMPTS["report"]


def test_collator_pads_right_and_masks_padding(processor):
    encoder = PromptEncoder(processor, "sys")
    short = encoder.encode("report", "A.")
    long = encoder.encode("report", "A much longer answer with several more words in it.")
    items = [dict(short, pixel_values=torch.zeros(3, 4, 4)), dict(long, pixel_values=torch.ones(3, 4, 4))]
    batch = Collator(encoder.ids, pad_to_multiple_of=8)(items)
    n = len(short["input_ids"])
    assert batch["input_ids"].shape[1] % 8 == 0
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][0, n:] == 0).all() and (batch["attention_mask"][0, :n] == 1).all()
    assert torch.equal(batch["token_type_ids"], (batch["input_ids"] == encoder.ids.image).long())
    assert batch["pixel_values"].shape == (2, 3, 4, 4)


def test_loc_tokens_are_single_supervised_tokens(processor):
    import copy

    proc = copy.deepcopy(processor)
    ids = add_loc_tokens(proc.tokenizer)
    assert ids == sorted(ids) and len(set(ids)) == 1024
    assert proc.tokenizer("<loc0123>", add_special_tokens=False).input_ids == [ids[123]]
    encoder = PromptEncoder(proc, "sys")
    encoded = encoder.encode("detect", "<loc0001><loc0002><loc0003><loc0004> nodule")
    assert supervised_ids(encoded)[:4] == [ids[1], ids[2], ids[3], ids[4]]
    # Added loc tokens survive decoding with special tokens skipped (generation output).
    assert encoder.decode_answer(supervised_ids(encoded)) == "<loc0001><loc0002><loc0003><loc0004> nodule"
    # Idempotent: a second call (e.g. reloading a Phase-2 processor) changes nothing.
    assert add_loc_tokens(proc.tokenizer) == ids
    assert LOC_TOKENS[123] == "<loc0123>"


def test_describe_supervision_marks_only_the_answer(processor):
    encoder = PromptEncoder(processor, "sys")
    runs = describe_supervision(encoder, encoder.encode("report", "Answer text."))
    supervised = "".join(text for text, sup in runs if sup)
    assert supervised == "Answer text.<end_of_turn>"
    assert any(text.startswith("<image_soft_token> x") for text, _ in runs)


def test_a_batch_mixing_cached_rows_and_images_still_to_fill_keeps_each_in_its_place(monkeypatch):
    from types import SimpleNamespace

    from xray_train.collate import FeatureRef, SpecialIds
    from xray_train.trainer import XrayTrainer

    table = torch.arange(5 * 2 * 3, dtype=torch.float32).reshape(5, 2, 3)  # cache rows: 2 tokens x 3 wide
    cache = SimpleNamespace(rows=lambda rows: table[rows])
    ids = SpecialIds(bos=2, pad=0, start_of_turn=105, end_of_turn=106, boi=255999, eoi=256000, image=262144)
    tokens = {"input_ids": [2, 262144, 262144, 7], "labels": [-100, -100, -100, 7]}
    items = [
        {**tokens, "fill_pixels": torch.full((4, 4), 10, dtype=torch.uint8), "fill_row": 3},
        {**tokens, "image_features": FeatureRef(cache, 1)},
        {**tokens, "fill_pixels": torch.full((4, 4), 20, dtype=torch.uint8), "fill_row": 0},
    ]
    batch = Collator(ids)(items)
    assert batch["fill_rows"].tolist() == [3, 0] and batch["fill_positions"].tolist() == [0, 2]
    # Not a tensor: the Trainer leaves the cache rows on the host, so writing them needs no wait for the GPU.
    assert not isinstance(batch["fill_rows"], torch.Tensor)
    assert batch["feature_positions"].tolist() == [1] and torch.equal(batch["image_features"], table[[1]])

    # The step makes the missing rows (here: from the pixel value), hands them to the cache and gives the
    # loss one tensor in the batch's order.
    written = []
    fake = SimpleNamespace(
        _pixel_loader=SimpleNamespace(normalize=lambda px, dtype: px.to(dtype)),
        _feature_fill=SimpleNamespace(write=lambda rows, feats: written.append((rows.tolist(), feats.clone())),
                                     attention="default"),
        _feature_rows_from=cache,
    )
    fake.gather_features = lambda inputs: XrayTrainer.gather_features(fake, inputs)
    model = SimpleNamespace(vision_tower=torch.nn.Linear(1, 1))  # the inner Gemma3Model, as far as the step asks
    monkeypatch.setattr("xray_train.features.pooled_vision_features", lambda gemma, px, attention="default": px[:, :2, :3].float())
    out = XrayTrainer.fill_features(fake, model, batch)
    assert "fill_pixels" not in out and out["image_features"].shape == (3, 2, 3)
    assert (out["image_features"][0] == 10).all() and (out["image_features"][2] == 20).all()
    assert torch.equal(out["image_features"][1], table[1])
    assert written[0][0] == [3, 0] and torch.equal(written[0][1], out["image_features"][[0, 2]])

    # A collator in DataLoader workers names the cached rows instead of gathering them; the trainer gathers
    # them in its own process, and the loss gets the same tensor.
    by_number = Collator(ids, gather_features=False)(items)
    assert "image_features" not in by_number and by_number["feature_rows"].tolist() == [1]
    assert not isinstance(by_number["feature_rows"], torch.Tensor)
    here = XrayTrainer.fill_features(fake, model, by_number)
    assert "feature_rows" not in here and torch.equal(here["image_features"], out["image_features"])
