"""GPU-only levers give the same loss and LoRA gradients as the plain path (bf16 tolerance).

Compiled code and patched layers last for the whole process, so each variant runs in its own process
and writes its loss and gradients; the test compares them. Skipped without CUDA (CI has none); run on a GPU
host with ``pytest tests/gpu``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WORKER = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from xray_train.collate import Collator, PromptEncoder, batch_to
from xray_train.config import RunConfig, TrainingSection
from xray_train.resolve import resolve
from xray_train.features import pooled_vision_features
from xray_train.inputs import PixelLoader
from xray_train.gemma3 import decoder_layers, unwrap_gemma3
from xray_train.loss import targets_only_loss, full_logits_loss
from xray_train.model import build_training_model, compile_decoder_layers

base, samples, out, variant = sys.argv[1:5]
# Phase 2 (trainable projector and loc rows) unless the lever is Phase 1's (a frozen LM head).
phase = "phase1" if variant.startswith("phase1") else "phase2"
root = Path(samples).parent
data = ({"dataset": "padchest", "image_root": str(root), "csv": str(root / "x.csv")} if phase == "phase1"
        else {"dataset": "indiana", "image_root": samples})
cfg = resolve(RunConfig.model_validate({
    "phase": phase, "output_dir": "unused", "lora": {"dropout": 0.0},
    "model": {"base": base, "compute_dtype": "bfloat16"},
    # The plain path: every lever that build_training_model would switch on with CUDA stays off here.
    "training": {"torch_compile": False, "gradient_checkpointing": False, "dequantize_in_graph": False},
    "data": data,
}))
model, proc = build_training_model(cfg)
CHUNK = TrainingSection().head_chunk_rows
torch.manual_seed(0)
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.02)
enc = PromptEncoder(proc, "sys")
images = sorted(Path(samples).rglob("*-1001.dcm.png"))[:4]
answers = ["<loc0010><loc0020><loc0500><loc0600> nodule", "no localisable finding",
           "<loc0100><loc0200><loc0700><loc0900> mass ; <loc0300><loc0100><loc0400><loc0300> nodule", "no localisable finding"]
task = "detect" if phase == "phase2" else "report"
if phase == "phase1":
    answers = ["FINDINGS:\n- cardiomegaly: cardiac", "FINDINGS:\n- no finding", "FINDINGS:\n- nodule: left, apical",
               "FINDINGS:\n- pleural effusion: right, costophrenic angle"]
items = [dict(enc.encode(task, a), pixel_values=PixelLoader(proc)(p)) for a, p in zip(answers, images)]
batch = batch_to(Collator(enc.ids)(items), "cuda")
batch["image_features"] = pooled_vision_features(unwrap_gemma3(model).model, batch.pop("pixel_values"))


def measure(fn, name):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        res = fn(model, batch)
        loss = res.loss_sum / res.n_tokens
    loss.backward()
    grads = {n: p.grad.float().cpu().contiguous() for n, p in model.named_parameters() if p.grad is not None}
    save_file(grads, str(Path(out) / f"{variant}-{name}.safetensors"))
    Path(out, f"{variant}-{name}.json").write_text(json.dumps({"loss": loss.item(), "n": int(res.n_tokens)}))


# The reference and the lever run in one process on the same weights: the plain HF path first, then
# the lever switched on in place (compile wraps the layers).
measure(full_logits_loss, "plain")
if variant == "compile":
    compile_decoder_layers(model)
elif variant in ("in_graph_dequant", "compile_in_graph_dequant"):
    from xray_train.nf4 import dequantize_in_graph
    assert dequantize_in_graph(decoder_layers(model).modules()) > 0
    if variant == "compile_in_graph_dequant":
        compile_decoder_layers(model)
elif variant == "compile_checkpoint_some":
    from xray_train.model import keep_activations_except
    compile_decoder_layers(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    keep_activations_except(model, 1)
    model.train()  # checkpointing is active in training mode only (dropout is 0)
if variant == "phase1_head_grad_in_forward":
    measure(lambda m, b: targets_only_loss(m, b, CHUNK, grad_in_forward=True), "lever")
else:
    measure(lambda m, b: targets_only_loss(m, b, CHUNK, grad_in_forward=False), "lever")
"""


# "targets" and "phase1_head_grad_in_forward" run the split image attention (on by default) on the GPU's kernels.
ALL_VARIANTS = ["targets", "compile", "compile_checkpoint_some", "in_graph_dequant", "compile_in_graph_dequant",
                "phase1_head_grad_in_forward"]
# Each variant is a process with its own compile; XRAY_GPU_EQUIVALENCE=a,b runs a subset when GPU time is short.
VARIANTS = [v for v in os.environ.get("XRAY_GPU_EQUIVALENCE", ",".join(ALL_VARIANTS)).split(",") if v in ALL_VARIANTS]


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_model_dir):
    from .. import conftest

    out = tmp_path_factory.mktemp("gpu-equivalence")
    samples = conftest.SAMPLES / "indiana"
    for variant in VARIANTS:
        proc = subprocess.run(
            [sys.executable, "-c", WORKER, str(tiny_model_dir), str(samples), str(out), variant],
            capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _load(out: Path, variant: str):
    from safetensors.torch import load_file

    return json.loads((out / f"{variant}.json").read_text()), load_file(str(out / f"{variant}.safetensors"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_lever_matches_plain_loss_and_gradients(results, variant):
    plain_meta, plain = _load(results, f"{variant}-plain")
    meta, grads = _load(results, f"{variant}-lever")
    assert meta["n"] == plain_meta["n"]
    assert meta["loss"] == pytest.approx(plain_meta["loss"], rel=1e-2)
    assert grads.keys() == plain.keys()
    for name, ref in plain.items():
        cos = torch.nn.functional.cosine_similarity(grads[name].flatten(), ref.flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))
