"""Model building: QLoRA on the language model only, Phase 2 continues Phase 1, loc rows only."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from xray_train.config import RunConfig, dump_config
from xray_train.errors import XrayTrainError
from xray_train.model import (
    build_training_model,
    check_phase1_dir,
    continue_adapter,
    loc_token_ids,
    target_modules_regex,
)
from xray_train.resolve import resolve
from xray_train.run_dir import RESOLVED_CONFIG
from xray_train.testing.tiny import lora_module_names

from .conftest import SAMPLES


def config(tiny_model_dir, phase, training=None, **model):
    data = (
        {"dataset": "padchest", "image_root": str(SAMPLES), "csv": str(SAMPLES / "x.csv")}
        if phase == "phase1"
        else {"dataset": "indiana", "image_root": str(SAMPLES)}
    )
    return resolve(RunConfig.model_validate(
        {"phase": phase, "output_dir": "unused", "model": {"base": str(tiny_model_dir), **model}, "data": data,
         "training": training or {}}
    ))


@pytest.fixture(scope="module")
def phase1_model(tiny_model_dir):
    return build_training_model(config(tiny_model_dir, "phase1"))


def test_base_is_4bit_gemma3_and_lora_only_on_language_model_q_v(phase1_model):
    import bitsandbytes as bnb

    model, _ = phase1_model
    names = lora_module_names(model)
    assert names and all(".language_model." in n for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
    vision_q = [m for n, m in model.named_modules() if "vision_tower" in n and n.endswith("q_proj")]
    assert vision_q and not any(hasattr(m, "lora_A") for m in vision_q)
    lm_linear = [m for n, m in model.named_modules() if "language_model.layers.0.mlp.gate_proj" in n]
    assert isinstance(lm_linear[0], bnb.nn.Linear4bit)
    assert lm_linear[0].weight.quant_state.nested  # double quantisation
    assert type(model.get_base_model()).__name__ == "Gemma3ForConditionalGeneration"


def test_phase1_trains_only_lora(phase1_model):
    model, processor = phase1_model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert loc_token_ids(processor.tokenizer) is None


def test_target_regex_excludes_vision_names():
    import re

    pattern = re.compile(target_modules_regex(["v_proj", "q_proj"]))
    assert pattern.fullmatch("model.language_model.layers.3.self_attn.q_proj")
    assert not pattern.fullmatch("model.vision_tower.vision_model.encoder.layers.3.self_attn.q_proj")
    assert not pattern.fullmatch("model.language_model.layers.3.self_attn.k_proj")


def test_phase2_continues_phase1_lora_and_trains_projector_and_loc_rows_only(tiny_model_dir, phase1_model, tmp_path):
    phase1, _ = phase1_model
    with torch.no_grad():  # a "trained" Phase-1 adapter: non-zero B, distinctive A
        for name, p in phase1.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p))
    state = {k: v.contiguous() for k, v in phase1.state_dict().items() if "lora_" in k}
    peft_state = {}
    from peft.utils import get_peft_model_state_dict

    peft_state = get_peft_model_state_dict(phase1)
    phase1_dir = tmp_path / "phase1"
    phase1_dir.mkdir()
    save_file({k: v.contiguous() for k, v in peft_state.items()}, phase1_dir / "adapter_model.safetensors")
    phase1.peft_config["default"].save_pretrained(phase1_dir)
    cfg1 = config(tiny_model_dir, "phase1")
    (phase1_dir / RESOLVED_CONFIG).write_text(dump_config(cfg1))

    cfg2 = config(tiny_model_dir, "phase2")
    check_phase1_dir(phase1_dir, cfg2)
    model, processor = build_training_model(cfg2, resume_from=phase1_dir)
    continued = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(continued) == len(state)
    for key, value in state.items():
        torch.testing.assert_close(continued[key].float(), value.float(), msg=key)

    ids = loc_token_ids(processor.tokenizer)
    assert ids is not None and len(ids) == 1024
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("multi_modal_projector.modules_to_save" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    delta = [p for n, p in trainable.items() if "trainable_tokens_delta" in n]
    assert len(delta) == 1 and delta[0].shape[0] == 1024  # only the loc rows, no full embedding copy
    emb = model.get_input_embeddings()
    assert emb.weight.shape[0] > max(ids) if hasattr(emb, "weight") else True
    # Gradients reach exactly the loc rows: a loss on a loc id moves the delta, frozen rows have no grad.
    base_embedding = model.get_base_model().model.language_model.embed_tokens.token_adapter.base_layer.weight
    assert not base_embedding.requires_grad
    out = model(input_ids=torch.tensor([[2, ids[5], ids[7]]]))
    out.logits[0, -1, ids[9]].backward()
    grad = delta[0].grad
    assert grad is not None and grad[5].abs().sum() > 0 and grad[7].abs().sum() > 0


def test_resume_refuses_a_dir_that_is_not_phase1_output(tiny_model_dir, tmp_path):
    cfg2 = config(tiny_model_dir, "phase2")
    with pytest.raises(XrayTrainError, match="not a Phase-1 output dir"):
        check_phase1_dir(tmp_path, cfg2)


def test_continue_adapter_refuses_mismatched_rank(tiny_model_dir, tmp_path):
    model, _ = build_training_model(config(tiny_model_dir, "phase1"))
    wrong = {
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64),
    }
    save_file(wrong, tmp_path / "adapter_model.safetensors")
    with pytest.raises(Exception):
        continue_adapter(model, tmp_path)


def test_missing_local_base_is_one_clear_error(tmp_path):
    from xray_train.config import ModelConfig
    from xray_train.model import load_base

    with pytest.raises(XrayTrainError, match="no config.json"):
        load_base(ModelConfig(base=str(tmp_path / "nowhere")))


@pytest.mark.parametrize(("overrides", "expected"), [
    ({}, [False, False]),  # default: on with CUDA only
    ({"gradient_checkpointing": True, "checkpoint_layers": 1}, [True, False]),
    ({"gradient_checkpointing": True, "checkpoint_layers": "all"}, [True, True]),
    ({"gradient_checkpointing": True, "checkpoint_layers": 0}, [False, False]),
])
def test_checkpointing_config_reaches_the_decoder_layers(tiny_model_dir, overrides, expected):
    from xray_train.gemma3 import decoder_layers

    model, _ = build_training_model(config(tiny_model_dir, "phase1", training=overrides))
    layers = decoder_layers(model)
    assert [bool(layer.gradient_checkpointing) for layer in layers] == expected


def test_ordinal_loc_init_makes_neighbouring_bins_alike_and_survives_save_and_load(tiny_model_dir, tmp_path):
    from xray_train.gemma3 import unwrap_gemma3
    from xray_train.model import load_adapter, loc_token_ids

    cfg = config(tiny_model_dir, "phase2")  # ordinal is the default
    model, processor = build_training_model(cfg)
    ids = loc_token_ids(processor.tokenizer)
    rows = unwrap_gemma3(model).get_input_embeddings().weight[ids].detach().float()
    rows = rows - rows.mean(0)
    sim = torch.nn.functional.cosine_similarity(rows[500:501], rows, dim=1)
    assert sim[500] > sim[504] > sim[516] > sim[540].abs()
    assert sim[540:].abs().max() < 0.5  # far bins are not alike

    mean_model, _ = build_training_model(config(tiny_model_dir, "phase2", loc_token_init="mean"))
    mean_rows = unwrap_gemma3(mean_model).get_input_embeddings().weight[ids].detach()
    assert torch.equal(mean_rows[0], mean_rows[1000])  # the plain init: every bin the same row

    # The trained rows travel in the adapter: a load (which resizes with the plain init) gets them back.
    out = tmp_path / "adapter"
    model.save_pretrained(out, save_embedding_layers=False)
    processor.save_pretrained(out)
    (out / RESOLVED_CONFIG).write_text(dump_config(cfg))
    loaded, _ = load_adapter(out)
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    layer = next(m for m in loaded.modules() if isinstance(m, TrainableTokensLayer))
    merged = layer.get_merged_weights(layer.active_adapters)[ids].detach().float()
    expected = unwrap_gemma3(model).get_input_embeddings().weight[ids].detach().float()
    torch.testing.assert_close(merged, expected)


def test_numbers_loc_init_adds_the_base_embedding_of_each_bins_number(tiny_model_dir):
    """'numbers': ordinal code + the base's own rows of the bin's digits (0-999), leading digit first."""
    from xray_train.gemma3 import unwrap_gemma3
    from xray_train.model import loc_token_ids

    ordinal, processor = build_training_model(config(tiny_model_dir, "phase2", loc_token_init="ordinal"))
    numbers, _ = build_training_model(config(tiny_model_dir, "phase2", loc_token_init="numbers"))
    tok = processor.tokenizer
    ids = loc_token_ids(tok)
    weight = unwrap_gemma3(numbers).get_input_embeddings().weight.detach().float()
    real = weight[: min(ids)]
    diff = weight[ids] - unwrap_gemma3(ordinal).get_input_embeddings().weight.detach().float()[ids]
    digit = {d: real[tok.convert_tokens_to_ids(d)] for d in "0123456789"}
    # Bin 512 is the number 500 ("5", "0", "0"), weighted 4:2:1.
    expected_512 = (4 * digit["5"] + 2 * digit["0"] + digit["0"]) / 7 - real.mean(0)
    # Equal up to the bf16 rounding of the stored rows.
    assert torch.nn.functional.cosine_similarity(diff[512], expected_512, dim=0) > 0.999
    assert abs(float(diff[512].norm() / expected_512.norm()) - 1) < 0.01
    # Bins whose numbers share the leading digit start closer than bins far apart.
    d = lambda a, b: float((diff[a] - diff[b]).norm())  # noqa: E731
    assert d(520, 530) < d(520, 1000)
