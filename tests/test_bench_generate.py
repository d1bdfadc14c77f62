"""The generation benchmark's pieces: its adapter is one peft loads with every LoRA tensor non-zero, and its
summary compares the rows it has."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO, benchmark

bench = benchmark("bench_generate")


def test_made_adapter_loads_with_non_zero_lora(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from xray_train.model import load_adapter
    from xray_train.testing.tiny import lora_module_names

    adapter = bench.make_adapter(tiny_model_dir, tmp_path / "adapter")
    state = load_file(str(adapter / "adapter_model.safetensors"))
    model, _ = load_adapter(adapter, base=str(tiny_model_dir), load_in_4bit=False)
    names = lora_module_names(model)
    assert names and all("language_model" in n and n.endswith(("q_proj", "v_proj")) for n in names)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(state) == 2 * len(names)
    assert all(v.abs().max() > 0 for v in loaded.values())  # B too: peft would start it at zero
    for key, value in state.items():
        own = key.replace(".weight", ".default.weight")
        torch.testing.assert_close(loaded[own].float(), value)


def test_summary_ratios_and_projection():
    rows = [
        {"name": "xray-train evaluate generation, adapter only (16-bit merged, 256 rows)", "films_per_s": 30.0},
        {"name": "xray-train evaluate generation, adapter + baseline (16-bit merged, 256 rows)", "films_per_s": 15.0,
         "answers_per_s": 30.0},
        {"name": "notebook (bf16 base, adapter merged, batched generate, batch 64)", "films_per_s": 6.0},
        {"name": "model card batch 1 (4-bit base + peft generate)", "films_per_s": 0.2},
        {"name": "xray-train evaluate generation, adapter only, static KV cache (16-bit merged, static KV cache, "
                 "256 rows)", "films_per_s": 45.0},
    ]
    out = bench.summary(rows)
    assert out["evaluate_vs_notebook"] == 5.0 and out["evaluate_vs_model_card_batch_1"] == 150.0
    assert out["static_kv_cache_vs_dynamic"] == 1.5
    assert out["projection"]["minutes_for_10k_films_with_baseline"] == round(20_000 / 30.0 / 60, 1)
    assert bench.summary(rows[2:4]) == {}


def test_xray_rows_time_the_adapter_then_evaluates_one_pass_with_the_baseline(tiny_model_dir, tmp_path):
    from xray_train.model import load_adapter

    adapter = bench.make_adapter(tiny_model_dir, tmp_path / "adapter")
    model, processor = load_adapter(adapter, base=str(tiny_model_dir), load_in_4bit=False)
    films = sorted((REPO / "data" / "samples" / "padchest" / "images").rglob("*.png"))[:3]
    finished = []
    rows = bench.xray_rows(model, processor, films, 3, "sys", True, "tiny", batch_size=2,
                           done=lambda r: finished.append(len(r)))
    assert [r["answers"] for r in rows] == [3, 6] and finished == [1]
    # min_new_tokens forces every answer to the full length, so the token rate is films x length / time.
    assert all(r["new_tokens_per_s"] == pytest.approx(r["answers"] * 3 / r["seconds"], rel=0.02) for r in rows)
    assert all(r["first_answer_s"] is not None and r["first_answer_s"] <= r["seconds"] for r in rows)
