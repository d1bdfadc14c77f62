"""Every speed lever gives the same loss and LoRA gradients as the plain HF path (4-bit tiny base, CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch

from xray_train.collate import IGNORE_INDEX, Collator, PromptEncoder
from xray_train.config import RunConfig, TrainingSection
from xray_train.features import pool_vision_outputs, pooled_vision_features
from xray_train.inputs import PixelLoader
from xray_train.gemma3 import decoder_layers, unwrap_gemma3
from xray_train.loss import full_logits_loss, targets_only_loss
from xray_train.model import build_training_model
from xray_train.resolve import resolve

from .conftest import SAMPLES


def _config(tiny_model_dir, phase, **training):
    data = (
        {"dataset": "padchest", "image_root": str(SAMPLES), "csv": str(SAMPLES / "x.csv")}
        if phase == "phase1"
        else {"dataset": "indiana", "image_root": str(SAMPLES)}
    )
    return resolve(RunConfig.model_validate(
        {
            "phase": phase,
            "output_dir": "unused",
            "model": {"base": str(tiny_model_dir), "compute_dtype": "float32"},
            "lora": {"dropout": 0.0},
            "data": data,
            "training": training,
        }
    ))


#: The LM-head chunk of training.head_chunk_rows' default.
CHUNK = TrainingSection().head_chunk_rows


def _batch(model, processor, task):
    encoder = PromptEncoder(processor, "sys")
    images = sorted((SAMPLES / "indiana" / "images" / "images_normalized").glob("*-1001.dcm.png"))[:3]
    loader = PixelLoader(processor)
    answers = ["FINDINGS:\n- cardiomegaly: cardiac", "<loc0010><loc0020><loc0500><loc0600> nodule", "no localisable finding"]
    items = [dict(encoder.encode(task, a), pixel_values=loader(p)) for a, p in zip(answers, images)]
    batch = Collator(encoder.ids)(items)
    gemma = unwrap_gemma3(model).model
    cached = dict(batch)
    cached.pop("pixel_values")
    cached["image_features"] = pooled_vision_features(gemma, batch["pixel_values"])
    return batch, cached


def _perturb_lora(model):
    # Fresh LoRA B is zero, which would make every LoRA-A gradient zero and the test weak.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)


def _grads(model, loss_out):
    model.zero_grad(set_to_none=True)
    (loss_out.loss_sum / loss_out.n_tokens).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_fast_path_matches_plain_hf_loss_and_gradients(tiny_model_dir, processor, phase):
    model, proc = build_training_model(_config(tiny_model_dir, phase))
    _perturb_lora(model)
    task = "report" if phase == "phase1" else "detect"
    batch, cached = _batch(model, proc, task)

    plain = full_logits_loss(model, batch)  # HF forward with pixels and full logits
    plain_grads = _grads(model, plain)
    for fast_batch in (batch, cached):  # targets-only head, with pixels and with cached features
        fast = targets_only_loss(model, fast_batch, chunk_rows=7, grad_in_forward=False)  # odd chunks exercise the chunking
        assert int(fast.n_tokens) == int(plain.n_tokens)
        assert int(fast.n_correct) == int(plain.n_correct)
        torch.testing.assert_close(fast.loss_sum, plain.loss_sum, rtol=1e-5, atol=1e-4)
        fast_grads = _grads(model, fast)
        assert fast_grads.keys() == plain_grads.keys()
        for name, grad in plain_grads.items():
            torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    lora_grads = [g for n, g in plain_grads.items() if "lora_A" in n]
    assert lora_grads and all(g.abs().sum() > 0 for g in lora_grads)
    if phase == "phase2":
        # The projector and the loc rows learn through the cached-feature path too.
        assert any("multi_modal_projector" in n for n in plain_grads)
        assert any("trainable_tokens_delta" in n for n in plain_grads)


def test_plain_loss_equals_hf_builtin_loss(tiny_model_dir, processor):
    """Our reference itself: token-mean CE over supervised positions is what HF computes with labels."""
    model, proc = build_training_model(_config(tiny_model_dir, "phase1"))
    batch, _ = _batch(model, proc, "report")
    ours = full_logits_loss(model, batch)
    hf = unwrap_gemma3(model)(**batch, use_cache=False).loss
    torch.testing.assert_close(ours.loss_sum / ours.n_tokens, hf, rtol=1e-5, atol=1e-5)


def test_cached_pooling_equals_the_projector(tiny_model_dir, processor):
    model, proc = build_training_model(_config(tiny_model_dir, "phase1"))
    gemma = unwrap_gemma3(model).model
    pixels = torch.stack([PixelLoader(proc)(p) for p in sorted((SAMPLES / "indiana").rglob("*-1001.dcm.png"))[:2]])
    with torch.no_grad():
        vision = gemma.vision_tower(pixel_values=pixels).last_hidden_state
        expected = gemma.multi_modal_projector(vision)
        from xray_train.features import project_pooled

        got = project_pooled(gemma.multi_modal_projector, pool_vision_outputs(gemma.multi_modal_projector, vision))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("checkpoint_layers", [None, 1])
def test_checkpointing_all_or_some_layers_matches_no_checkpointing(tiny_model_dir, processor, checkpoint_layers):
    from xray_train.model import enable_checkpointing, keep_activations_except

    model, proc = build_training_model(_config(tiny_model_dir, "phase1"))
    _perturb_lora(model)
    _, cached = _batch(model, proc, "report")
    model.train()
    plain = targets_only_loss(model, cached, CHUNK, grad_in_forward=False)
    plain_grads = _grads(model, plain)

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated transformers name on the way
        enable_checkpointing(model)
    layers = decoder_layers(model)
    chosen = list(range(len(layers)))
    if checkpoint_layers is not None:
        chosen = keep_activations_except(model, checkpoint_layers)
    assert [i for i, layer in enumerate(layers) if layer.gradient_checkpointing] == chosen
    assert len(chosen) == (checkpoint_layers if checkpoint_layers is not None else len(layers))

    recomputed = []
    hooks = [layer.mlp.register_forward_hook(lambda *a, i=i: recomputed.append(i)) for i, layer in enumerate(layers)]
    ckpt = targets_only_loss(model, cached, CHUNK, grad_in_forward=False)
    ckpt_grads = _grads(model, ckpt)
    for h in hooks:
        h.remove()
    # Checkpointed layers run their forward twice (the second time in backward); the others once.
    assert sorted(i for i in set(recomputed) if recomputed.count(i) == 2) == chosen
    torch.testing.assert_close(ckpt.loss_sum, plain.loss_sum)
    assert ckpt_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointed_layers_are_spread_over_the_stack():
    from xray_train.model import checkpointed_layer_indices

    assert checkpointed_layer_indices(34, 34) == list(range(34))
    assert checkpointed_layer_indices(34, 0) == []
    assert checkpointed_layer_indices(34, 50) == list(range(34))
    half = checkpointed_layer_indices(34, 17)
    assert len(half) == 17 and half[0] == 0 and max(b - a for a, b in zip(half, half[1:])) == 2
    assert len(checkpointed_layer_indices(34, 22)) == 22


@pytest.mark.parametrize("chunk_rows", [7, 1000])
def test_head_gradient_made_in_forward_matches_the_recomputing_path(tiny_model_dir, processor, chunk_rows):
    """training.head_grad_in_forward: same loss, accuracy count and gradients as checkpointed chunks."""
    model, proc = build_training_model(_config(tiny_model_dir, "phase1"))
    _perturb_lora(model)
    _, cached = _batch(model, proc, "report")
    model.train()
    recomputed = targets_only_loss(model, cached, chunk_rows=chunk_rows, grad_in_forward=False)
    recomputed_grads = _grads(model, recomputed)
    grad_modes = []
    head = unwrap_gemma3(model).lm_head
    hook = head.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    fused = targets_only_loss(model, cached, chunk_rows=chunk_rows, grad_in_forward=True)
    fused_grads = _grads(model, fused)
    hook.remove()
    # The head ran once per chunk, with no autograd graph, and not again in backward.
    assert grad_modes == [False] * -(-int(fused.n_tokens) // chunk_rows)
    assert int(fused.n_correct) == int(recomputed.n_correct)
    torch.testing.assert_close(fused.loss_sum, recomputed.loss_sum, rtol=1e-5, atol=1e-4)
    assert fused_grads.keys() == recomputed_grads.keys()
    for name, grad in recomputed_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_head_gradient_in_forward_keeps_the_recomputing_path_for_a_trainable_head(tiny_model_dir, processor):
    """Phase 2 trains the <loc> rows of the tied head: the fused path (frozen head only) must not be used."""
    model, proc = build_training_model(_config(tiny_model_dir, "phase2"))
    _perturb_lora(model)
    _, cached = _batch(model, proc, "detect")
    plain_grads = _grads(model, targets_only_loss(model, cached, CHUNK, grad_in_forward=False))
    asked = _grads(model, targets_only_loss(model, cached, CHUNK, grad_in_forward=True))
    assert any("trainable_tokens_delta" in n for n in asked)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(asked[name], grad, msg=name)


def test_label_free_padding_rows_change_neither_loss_nor_gradients(tiny_model_dir, processor):
    # training.pad_last_batch fills a short batch with copies whose labels are all ignored.
    model, proc = build_training_model(_config(tiny_model_dir, "phase1"))
    _perturb_lora(model)
    _, short = _batch(model, proc, "report")
    encoder = PromptEncoder(proc, "sys")
    rows = [{"input_ids": ids.tolist(), "labels": labels.tolist()} for ids, labels in
            zip(short["input_ids"], short["labels"])]
    padding = [{**rows[0], "labels": [IGNORE_INDEX] * len(rows[0]["labels"])}] * 2
    padded = Collator(encoder.ids)(rows + padding)
    padded["image_features"] = torch.cat([short["image_features"], short["image_features"][:1].repeat(2, 1, 1)])
    reference = targets_only_loss(model, short, CHUNK, grad_in_forward=False)
    reference_grads = _grads(model, reference)
    out = targets_only_loss(model, padded, CHUNK, grad_in_forward=False)
    assert int(out.n_tokens) == int(reference.n_tokens) and int(out.n_correct) == int(reference.n_correct)
    torch.testing.assert_close(out.loss_sum, reference.loss_sum, rtol=1e-5, atol=1e-5)
    grads = _grads(model, out)
    assert grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)



def _features_batch(model, processor, answers, seed):
    from xray_train.features import feature_row_shape

    encoder = PromptEncoder(processor, "sys")
    batch = Collator(encoder.ids)([encoder.encode("report", a) for a in answers])
    generator = torch.Generator().manual_seed(seed)
    shape = (len(answers), *feature_row_shape(unwrap_gemma3(model).model))
    batch["image_features"] = torch.randn(shape, generator=generator)
    return batch


def test_compiled_layers_take_every_sequence_length_with_one_compile(tiny_model_dir, processor):
    """training.torch_compile: batches of other lengths reuse the first step's graphs (the sequence length
    is compiled as a dynamic size), with the eager path's loss and gradients; evaluation compiles nothing."""
    from xray_train.model import compile_decoder_layers
    from xray_train.train import compile_count
    from xray_train.trainer import evaluation_context

    model, proc = build_training_model(_config(tiny_model_dir, "phase1"))
    _perturb_lora(model)
    model.train()
    answers = ["FINDINGS:\n- cardiomegaly: cardiac", "no finding", "IMPRESSION: normal"]
    batches = [_features_batch(model, proc, [a * (1 + i) for a in answers], seed=i) for i in range(3)]
    lengths = {b["input_ids"].shape[1] for b in batches}
    assert len(lengths) == 3  # three different padded lengths
    window = unwrap_gemma3(model).config.get_text_config().sliding_window
    assert max(lengths) <= window  # the split-attention path (the default), as in a MedGemma batch
    eager = [(out := targets_only_loss(model, b, CHUNK, grad_in_forward=False), _grads(model, out)) for b in batches]
    with torch.no_grad():
        model.eval()
        eager_eval = targets_only_loss(model, batches[0], CHUNK, grad_in_forward=False).loss_sum
        model.train()

    compile_decoder_layers(model, backend="eager")  # dynamo's graphs and guards, nothing generated
    before = compile_count()
    for i, (batch, (plain, plain_grads)) in enumerate(zip(batches, eager)):
        out = targets_only_loss(model, batch, CHUNK, grad_in_forward=False)
        grads = _grads(model, out)
        if i == 0:
            first = compile_count()
            assert first > before
        assert compile_count() == first, f"batch {i} (length {batch['input_ids'].shape[1]}) recompiled"
        torch.testing.assert_close(out.loss_sum, plain.loss_sum, rtol=1e-5, atol=1e-5)
        assert grads.keys() == plain_grads.keys()
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    model.eval()
    with evaluation_context():
        evaluated = targets_only_loss(model, batches[0], CHUNK, grad_in_forward=False).loss_sum
    model.train()
    assert compile_count() == first
    torch.testing.assert_close(evaluated, eager_eval)
