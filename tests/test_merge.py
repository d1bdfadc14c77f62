"""``xray_train.merge``: LoRA, projector copy and loc rows all land in a standalone model that reloads with
plain transformers and agrees with base + adapter. The adapter's LoRA B, projector and loc rows are
perturbed first, so a merge that dropped any of them would be visible."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_evaluate import trained_adapters
from xray_train.errors import XrayTrainError
from xray_train.merge import MERGE_CHECK, check_serving, merge
from xray_train.outputs import DIR_MODE, FILE_MODE
from xray_train.run_dir import ADAPTER_WEIGHTS

PERTURBED = ("lora_B", "multi_modal_projector", "trainable_tokens_delta")


@pytest.fixture
def perturbed_adapter(make_config, tmp_path_factory, tmp_path) -> Path:
    src = trained_adapters(make_config, tmp_path_factory)["phase2"]
    dest = tmp_path / "adapter"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
    state = load_file(str(dest / ADAPTER_WEIGHTS))
    gen = torch.Generator().manual_seed(0)
    for key, value in state.items():
        if any(p in key for p in PERTURBED):
            state[key] = value + 0.05 * torch.randn(value.shape, generator=gen).to(value.dtype)
    assert {p for p in PERTURBED if any(p in k for k in state)} == set(PERTURBED)
    save_file(state, str(dest / ADAPTER_WEIGHTS))
    return dest


def test_merge_lands_every_component_and_agrees(perturbed_adapter, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "merged"
    report = merge(perturbed_adapter, out, echo=lambda *a: None)

    assert report["passed"] and report["dtype"] == "float32"  # the demo/tiny config computes in float32
    assert all(v > 1e-3 for v in report["adapter_change_from_base"].values())  # the merge is not a no-op
    assert all(w["ok"] and w["tensors"] > 0 for w in report["weights"].values())
    assert report["logits"]["argmax_agreement"] == 1.0 and report["logits"]["max_abs_diff"] < 1e-4
    assert report["logits"]["samples"] == ["report", "detect"]
    assert report["serving"] == {"architectures": ["Gemma3ForConditionalGeneration"], "vocab_size": 263232,
                                 "embedding_rows": 263232, "loc_tokens": 1024, "passed": True}
    assert json.loads((out / MERGE_CHECK).read_text()) == json.loads(json.dumps(report))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no staging left behind
    # Shared like anything else written under the umask (mkdtemp and safetensors make 0700 / 0600).
    assert out.stat().st_mode & 0o777 == DIR_MODE
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {FILE_MODE}

    # Independent of merge's own check: read the adapter file and the merged model directly.
    state = load_file(str(perturbed_adapter / ADAPTER_WEIGHTS))
    cfg = json.loads((perturbed_adapter / "adapter_config.json").read_text())
    base = AutoModelForImageTextToText.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32)
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(out)
    assert merged.config.get_text_config().use_cache is True
    assert json.loads((out / "config.json").read_text()).get("use_cache", True) is True

    loc_ids = processor.tokenizer.convert_tokens_to_ids(["<loc0000>", "<loc1023>"])
    assert loc_ids[1] - loc_ids[0] == 1023 and max(loc_ids) < merged.get_input_embeddings().weight.shape[0]
    (rows_key,) = [k for k in state if "trainable_tokens_delta" in k]
    indices = cfg["trainable_token_indices"]["embed_tokens"]
    emb = merged.get_input_embeddings().weight[indices]
    torch.testing.assert_close(emb, state[rows_key].float())
    torch.testing.assert_close(merged.get_output_embeddings().weight[indices], state[rows_key].float())

    proj = merged.model.multi_modal_projector.mm_input_projection_weight
    (proj_key,) = [k for k in state if k.endswith("multi_modal_projector.mm_input_projection_weight")]
    torch.testing.assert_close(proj, state[proj_key].float())

    scale = cfg["lora_alpha"] / cfg["r"]
    layer = "model.language_model.layers.0.self_attn.q_proj"
    a = state[f"base_model.model.{layer}.lora_A.weight"].float()
    b = state[f"base_model.model.{layer}.lora_B.weight"].float()
    delta = merged.get_submodule(layer).weight - base.get_submodule(layer).weight
    torch.testing.assert_close(delta, scale * b @ a, atol=1e-5, rtol=1e-4)
    assert not any("vision" in n and "lora" in n for n, _ in merged.named_parameters())


def test_merge_check_catches_a_merge_that_drops_the_adapter(perturbed_adapter, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    # unload() returns the base without folding anything in: exactly the bug the check exists for.
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
    out = tmp_path / "merged"
    with pytest.raises(XrayTrainError, match="does not match base"):
        merge(perturbed_adapter, out, echo=lambda *a: None)
    report = json.loads((out / MERGE_CHECK).read_text())
    assert report["passed"] is False
    # (peft's unload keeps the trained projector copy, so only these two are lost.)
    assert not report["weights"]["lora"]["ok"] and not report["weights"]["loc_rows"]["ok"]


def test_merge_refuses_unsafe_output_dirs(make_config, tmp_path_factory, tmp_path):
    adapter = trained_adapters(make_config, tmp_path_factory)["phase1"]
    with pytest.raises(XrayTrainError, match="must not be the adapter dir"):
        merge(adapter, adapter / "merged")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(XrayTrainError, match="--overwrite"):
        merge(adapter, busy)
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(XrayTrainError, match="not an adapter dir"):
        merge(tmp_path, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Serving checks on the saved files


def _break(out: Path, how: str) -> str:
    """Damage a merged checkpoint the way a serving engine would trip over; return the expected error."""
    if how == "vocab_size":
        config = json.loads((out / "config.json").read_text())
        config["text_config"]["vocab_size"] -= 64
        (out / "config.json").write_text(json.dumps(config))
        return "vocab_size is 263168 but the embedding has 263232 rows"
    if how == "loc_tokens":
        tok = json.loads((out / "tokenizer.json").read_text())
        tok["added_tokens"] = [t for t in tok["added_tokens"] if not t["content"].startswith("<loc")]
        (out / "tokenizer.json").write_text(json.dumps(tok))
        return "lacks 1024 of the 1024 <loc> tokens"
    if how == "architectures":
        config = json.loads((out / "config.json").read_text())
        config["architectures"] = ["Gemma3ForCausalLM"]
        (out / "config.json").write_text(json.dumps(config))
        return "expected \\['Gemma3ForConditionalGeneration'\\]"
    if how == "chat_template":
        (out / "chat_template.jinja").unlink()
        return "no chat template"
    if how == "processor":
        (out / "processor_config.json").unlink()
        return "no image processor settings"
    raise ValueError(how)


def merged_copy(make_config, tmp_path_factory, dest: Path) -> Path:
    """A private copy of the Phase-2 adapter merged once per test process."""
    shared = tmp_path_factory.getbasetemp() / "shared-merged"
    if not (shared / MERGE_CHECK).is_file():
        merge(trained_adapters(make_config, tmp_path_factory)["phase2"], shared, overwrite=True, echo=lambda *a: None)
    return Path(shutil.copytree(shared, dest))


@pytest.mark.parametrize("how", ["vocab_size", "loc_tokens", "architectures", "chat_template", "processor"])
def test_check_serving_refuses_a_broken_checkpoint_in_one_line(make_config, tmp_path_factory, tmp_path, how):
    out = merged_copy(make_config, tmp_path_factory, tmp_path / "merged")
    assert check_serving(out, expect_loc=True)["passed"]
    expected = _break(out, how)
    with pytest.raises(XrayTrainError, match=expected) as err:
        check_serving(out, expect_loc=True)
    assert "\n" not in str(err.value)


def test_check_serving_needs_loc_tokens_only_when_the_adapter_trained_them(make_config, tmp_path_factory, tmp_path):
    out = merged_copy(make_config, tmp_path_factory, tmp_path / "merged")
    _break(out, "loc_tokens")
    assert check_serving(out, expect_loc=False)["loc_tokens"] == 0
