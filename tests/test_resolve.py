"""resolve(): every "auto" setting becomes the value the run uses, from the phase, the device and the base."""

from __future__ import annotations

import pytest
import yaml

from xray_train import memory
from xray_train.config import RunConfig, dump_config
from xray_train.errors import XrayTrainError
from xray_train.gemma3 import FP16_RESIDUAL_SCALE
from xray_train.resolve import COMPILE_VISION_MIN_IMAGES, RESOLVED_KEYS, Device, require_resolved, resolve, unresolved

CPU = Device(cuda=False, native_bf16=False, name="CPU", cpu_count=6)
H200 = Device(cuda=True, native_bf16=True, name="NVIDIA H200", cpu_count=16, compute_capability=(9, 0),
              total_memory_gb=150.0, memory_gb=149.0)
# The cards of docs/small_gpus.md, as torch describes them (memory: what a process finds free at start-up).
T4 = Device(cuda=True, native_bf16=False, name="Tesla T4", cpu_count=4, compute_capability=(7, 5),
            total_memory_gb=15.8, memory_gb=15.0)
P100 = Device(cuda=True, native_bf16=False, name="Tesla P100-PCIE-16GB", cpu_count=4, compute_capability=(6, 0),
              total_memory_gb=17.1, memory_gb=16.0)
L4 = Device(cuda=True, native_bf16=True, name="NVIDIA L4", cpu_count=8, compute_capability=(8, 9),
            total_memory_gb=23.7, memory_gb=22.0)
H100 = Device(cuda=True, native_bf16=True, name="NVIDIA H100 80GB HBM3", cpu_count=16, compute_capability=(9, 0),
              total_memory_gb=85.0, memory_gb=84.0)


def _cfg(phase="phase1", **training) -> RunConfig:
    data = (
        {"dataset": "padchest", "image_root": "/data/pc", "csv": "/data/pc/x.csv"}
        if phase == "phase1"
        else {"dataset": "indiana", "image_root": "/data/iu"}
    )
    return RunConfig.model_validate({"phase": phase, "output_dir": "out", "data": data, "training": training})


def test_a_plain_config_leaves_every_resolved_setting_auto():
    # head_grad_in_forward is asked for (true) and only resolved off where the phase cannot do it.
    assert set(unresolved(_cfg())) == set(RESOLVED_KEYS) - {"training.head_grad_in_forward"}
    with pytest.raises(XrayTrainError, match="not resolved"):
        require_resolved(_cfg())


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_on_a_gpu_every_speed_lever_is_on(phase):
    cfg = resolve(_cfg(phase), H200, image_size=896, images=COMPILE_VISION_MIN_IMAGES)
    assert unresolved(cfg) == []
    t = cfg.training
    assert t.bf16 is True and t.fp16 is False and cfg.model.compute_dtype == "bfloat16"
    assert t.torch_compile is True and t.dequantize_in_graph is True and t.compile_vision_cache is True
    # A big card holds the whole effective batch with every layer's activations: nothing recomputes.
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.effective_batch_size) == (16, 1, 16)
    assert t.gradient_checkpointing is False and t.checkpoint_layers == 0
    # The steps fill the cache: DataLoader workers read the images alongside them, one per CPU.
    assert t.fill_cache_during_epoch is True and t.dataloader_num_workers == H200.cpu_count
    assert t.eval_steps == t.save_steps and t.projector_learning_rate == t.learning_rate
    assert cfg.data.image_size == 896
    # Phase 2 trains the <loc> rows of the tied head: the in-forward head gradient needs a frozen head.
    assert t.head_grad_in_forward is (phase == "phase1")
    assert cfg.model.add_loc_tokens is cfg.model.train_projector is (phase == "phase2")


def _depth(t) -> int:
    if not t.gradient_checkpointing:
        return 0
    return memory.DECODER_LAYERS if t.checkpoint_layers == "all" else t.checkpoint_layers


# docs/small_gpus.md's table: precision, compile and the memory choice per card.
CARDS = {
    "T4": (T4, "float16", False, True, True),
    "P100": (P100, "float16", False, True, False),
    "L4": (L4, "bfloat16", True, False, True),
    "H100": (H100, "bfloat16", True, False, True),
}


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
@pytest.mark.parametrize("card", list(CARDS))
def test_each_card_gets_its_documented_precision_compile_and_memory(card, phase, caplog):
    device, dtype, bf16, fp16, compiles = CARDS[card]
    with caplog.at_level("INFO", logger="xray_train"):
        cfg = resolve(_cfg(phase), device, image_size=896, images=COMPILE_VISION_MIN_IMAGES)
    t = cfg.training
    assert (cfg.model.compute_dtype, t.bf16, t.fp16) == (dtype, bf16, fp16)
    # fp16 cards run Gemma 3's residual stream rescaled (xray_train.gemma3), bf16 ones unmodified.
    assert cfg.model.residual_scale == (FP16_RESIDUAL_SCALE if fp16 else 1)
    assert t.torch_compile is t.dequantize_in_graph is t.compile_vision_cache is compiles
    if not compiles:  # one line says why, naming the card
        assert any("compute capability 6.0: torch.compile is off" in r.message for r in caplog.records)
    # The effective batch is kept: every card here holds the whole batch of 16 in one micro-batch...
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.effective_batch_size) == (16, 1, 16)
    # ...with the fewest checkpointed layers that keep the modelled peak under the card's memory.
    depth, budget = _depth(t), device.memory_gb - memory.HEADROOM_GB
    assert memory.peak_gb(phase, 16, depth) <= budget
    assert depth == 0 or memory.peak_gb(phase, 16, depth - 1) > budget
    if device.memory_gb < 30:
        assert depth > 0  # 16 GB and 24 GB cards checkpoint; the large ones need not
    assert any("micro-batch 16 x 1 accumulation" in r.message for r in caplog.records)
    assert resolve(cfg, device) == cfg  # the resolved config records what ran: resolving again changes nothing


def test_a_smaller_card_checkpoints_more_layers():
    depths = [_depth(resolve(_cfg(), d, image_size=896).training) for d in (T4, L4, H100)]
    assert depths[0] > depths[1] > depths[2] == 0


def test_too_little_memory_for_the_whole_batch_splits_it_into_accumulated_micro_batches():
    small = Device(cuda=True, native_bf16=False, name="Small GPU", cpu_count=2, compute_capability=(7, 5),
                   total_memory_gb=12.0, memory_gb=memory.peak_gb("phase1", 8, 34) + memory.HEADROOM_GB + 0.1)
    t = resolve(_cfg(), small, image_size=896).training
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.effective_batch_size) == (8, 2, 16)
    assert t.checkpoint_layers == "all"
    wide = resolve(_cfg(effective_batch_size=48), T4, image_size=896).training
    assert wide.per_device_train_batch_size * wide.gradient_accumulation_steps == 48


def test_an_explicit_batch_that_does_not_fit_names_the_largest_that_does():
    fits = memory.largest_batch("phase1", T4.memory_gb - memory.HEADROOM_GB, memory.DECODER_LAYERS)
    with pytest.raises(XrayTrainError, match=(
        rf"training.per_device_train_batch_size: {fits + 1} does not fit Tesla T4's 15.0 GB in phase1 .*"
        rf"the largest that fits is {fits} "
    )):
        resolve(_cfg(per_device_train_batch_size=fits + 1), T4, image_size=896)
    t = resolve(_cfg(per_device_train_batch_size=fits), T4, image_size=896).training
    assert t.per_device_train_batch_size == fits and t.checkpoint_layers == "all"
    assert t.gradient_accumulation_steps == 1 and t.effective_batch_size == fits  # as written
    # An explicit depth is kept: the largest batch is then the one that fits at that depth.
    shallow = memory.largest_batch("phase1", T4.memory_gb - memory.HEADROOM_GB, 4)
    with pytest.raises(XrayTrainError, match=rf"the largest that fits is {shallow} "):
        resolve(_cfg(per_device_train_batch_size=shallow + 1, checkpoint_layers=4), T4, image_size=896)


def test_explicit_precision_and_compile_still_win_or_are_refused():
    t4_fp32 = resolve(_cfg(fp16=False).model_copy(update={"model": _cfg().model.model_copy(
        update={"compute_dtype": "float32"})}), T4, image_size=896)
    assert (t4_fp32.model.compute_dtype, t4_fp32.training.fp16, t4_fp32.training.bf16) == ("float32", False, False)
    with pytest.raises(XrayTrainError, match=r"training.bf16: Tesla T4 has no native bf16; set model.compute_dtype"):
        resolve(_cfg(bf16=True), T4, image_size=896)
    with pytest.raises(XrayTrainError, match=r"training.torch_compile: Tesla P100-PCIE-16GB has compute capability "
                                             r"6.0; torch.compile's Triton kernels need 7.0"):
        resolve(_cfg(torch_compile=True), P100, image_size=896)
    h100_fp16 = resolve(_cfg(fp16=True), H100, image_size=896)
    assert (h100_fp16.model.compute_dtype, h100_fp16.training.fp16, h100_fp16.training.bf16) == ("float16", True, False)
    assert resolve(_cfg(torch_compile=False), T4, image_size=896).training.dequantize_in_graph is False


def test_two_gpus_share_the_effective_batch():
    pair = Device(**{**T4.__dict__, "processes": 2})
    t = resolve(_cfg(), pair, image_size=896).training
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.effective_batch_size) == (8, 1, 16)
    assert _depth(t) < _depth(resolve(_cfg(), T4, image_size=896).training)  # half the batch: fewer recompute


def test_on_cpu_nothing_compiles_or_checkpoints():
    cfg = resolve(_cfg(), CPU, image_size=64, images=10 * COMPILE_VISION_MIN_IMAGES)
    t = cfg.training
    assert (t.bf16, t.fp16, t.torch_compile, t.dequantize_in_graph, t.gradient_checkpointing) == (False,) * 5
    assert cfg.model.compute_dtype == "bfloat16"
    # No memory to plan for: the whole effective batch is one micro-batch; an explicit one steps alone.
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps) == (16, 1)
    explicit = resolve(_cfg(per_device_train_batch_size=4), CPU, image_size=64).training
    assert (explicit.per_device_train_batch_size, explicit.gradient_accumulation_steps) == (4, 1)
    assert t.checkpoint_layers == 0 and t.compile_vision_cache is False
    assert cfg.data.decode_workers == 6  # images for the cache, evaluation and prediction: one reader per CPU
    no_cache = resolve(_cfg(cache_vision_features=False), CPU, image_size=64).training
    assert no_cache.dataloader_num_workers == 6  # pixels are decoded in worker processes
    one_cpu = Device(cuda=False, native_bf16=False, name="CPU", cpu_count=1)
    assert resolve(_cfg(), one_cpu, image_size=64).data.decode_workers == 0  # read in-process


def test_a_cache_built_before_the_steps_is_read_without_workers():
    """Cached rows gathered in worker processes cost inter-process copies (+30 % step time measured)."""
    built_first = resolve(_cfg(fill_cache_during_epoch=False), H200, image_size=896).training
    assert built_first.dataloader_num_workers == 0
    no_cache = resolve(_cfg(cache_vision_features=False, fill_cache_during_epoch=False), H200, image_size=896)
    assert no_cache.training.dataloader_num_workers == H200.cpu_count  # pixels still need readers


def test_the_vision_cache_compiles_only_for_enough_images():
    """Compiling SigLIP costs more than it saves below COMPILE_VISION_MIN_IMAGES images."""
    few = resolve(_cfg(), H200, image_size=896, images=COMPILE_VISION_MIN_IMAGES - 1)
    assert few.training.compile_vision_cache is False
    assert resolve(_cfg(), H200, image_size=896).training.compile_vision_cache is False  # no cache to build
    asked = resolve(_cfg(compile_vision_cache=True), H200, image_size=896, images=1)
    assert asked.training.compile_vision_cache is True


def test_explicit_settings_win_and_resolving_twice_changes_nothing():
    cfg = resolve(
        _cfg(checkpoint_layers="all", torch_compile=False, dataloader_num_workers=3, projector_learning_rate=1e-3),
        H200, image_size=896,
    )
    t = cfg.training
    assert t.checkpoint_layers == "all" and t.torch_compile is False and t.dequantize_in_graph is False
    assert t.gradient_checkpointing is True
    assert t.dataloader_num_workers == 3 and t.projector_learning_rate == 1e-3
    assert resolve(cfg, CPU) == cfg  # nothing left to decide, not even by another device


def test_the_saved_resolved_config_reads_back_as_saved():
    """The run dir's copy validates as it was written, including pairs a user may not write (in-graph
    NF4 asked for on a CPU run, where compile resolved off)."""
    cfg = resolve(_cfg(dequantize_in_graph=True), CPU, image_size=64)
    assert cfg.training.dequantize_in_graph is True and cfg.training.torch_compile is False
    saved = RunConfig.model_validate(yaml.safe_load(dump_config(cfg)), context={"saved": True})
    assert saved == cfg


def test_bf16_is_refused_where_only_emulated():
    bf16_compute = _cfg().model_copy(update={"model": _cfg().model.model_copy(update={"compute_dtype": "bfloat16"})})
    with pytest.raises(XrayTrainError, match="bfloat16 is only emulated on Tesla T4"):
        resolve(bf16_compute, T4, image_size=896)


def test_image_size_is_read_from_the_base_processor(tiny_model_dir):
    cfg = _cfg().model_copy(update={"model": _cfg().model.model_copy(update={"base": str(tiny_model_dir)})})
    assert resolve(cfg, CPU).data.image_size == 64  # the tiny model's processor


# Two ranks over gloo: each describes its own card (rank 0 a T4, rank 1 a 24 GB card) and resolves the same config.
_RANK_SCRIPT = """
import json, os, sys
from dataclasses import replace
from xray_train.config import RunConfig
from xray_train.resolve import Device, resolve
cfg = RunConfig.model_validate({"phase": "phase1", "output_dir": "out",
    "data": {"dataset": "padchest", "image_root": "/data/pc", "csv": "/data/pc/x.csv"}})
detected = Device.detect()
card = json.loads(sys.argv[1])[int(os.environ["RANK"])]
mine = Device(cuda=True, native_bf16=False, name=card[0], cpu_count=2, compute_capability=(7, 5),
              total_memory_gb=card[1] + 0.8, memory_gb=card[1], processes=detected.processes)
t = resolve(cfg, mine, image_size=896).training
cpu = resolve(cfg, detected, image_size=896).training
print("RESOLVED " + json.dumps({"processes": detected.processes, "gpu": [t.per_device_train_batch_size,
      t.gradient_accumulation_steps, t.effective_batch_size, t.checkpoint_layers],
      "cpu": [cpu.per_device_train_batch_size, cpu.gradient_accumulation_steps, cpu.effective_batch_size]}))
"""


def test_two_ranks_resolve_the_same_effective_batch_over_gloo(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cards = json.dumps([["Tesla T4", 15.0], ["NVIDIA L4", 22.0]])
    src = str(Path(__file__).resolve().parents[1] / "src")
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ACCELERATE_USE_CPU": "true",
               "OMP_NUM_THREADS": "1", "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, cards], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    seen = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
        seen.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESOLVED "))[9:]))
    assert seen[0] == seen[1]  # the same micro-batch, accumulation, effective batch and depth on both ranks
    assert seen[0]["processes"] == 2
    assert seen[0]["cpu"] == [8, 1, 16]  # CPU ranks: each takes its half of the effective batch
    batch, accumulation, effective, depth = seen[0]["gpu"]
    assert batch * accumulation * 2 == effective == 16
    # Both ranks planned for the smaller card: what one T4 of a pair would choose alone.
    t4_pair = Device(cuda=True, native_bf16=False, name="Tesla T4", cpu_count=2, compute_capability=(7, 5),
                     total_memory_gb=15.8, memory_gb=15.0, processes=2)
    alone = resolve(_cfg(), t4_pair, image_size=896).training
    assert [batch, accumulation, effective, depth] == [
        alone.per_device_train_batch_size, alone.gradient_accumulation_steps, alone.effective_batch_size,
        alone.checkpoint_layers]
    l4_pair = Device(**{**t4_pair.__dict__, "memory_gb": 22.0})
    assert resolve(_cfg(), l4_pair, image_size=896).training.checkpoint_layers != depth  # the cards differ alone


@pytest.fixture
def h100(monkeypatch):
    """torch.cuda as an H100 reports itself; records the memory fraction the process is capped at."""
    import torch

    caps = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (84.0e9, 85.0e9))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: caps.append((f, d)))
    for name in ("XRAY_TRAIN_EMULATE_NO_BF16", "XRAY_TRAIN_MEMORY_CAP_GB", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return caps


def test_the_switches_make_a_big_gpu_choose_what_a_t4_would(h100, monkeypatch):
    plain = Device.detect()
    assert (plain.native_bf16, plain.compute_capability, plain.memory_gb) == (True, (9, 0), 84.0)
    assert h100 == []  # no cap asked for: the whole GPU
    monkeypatch.setenv("XRAY_TRAIN_EMULATE_NO_BF16", "1")
    monkeypatch.setenv("XRAY_TRAIN_MEMORY_CAP_GB", "15")
    emulated = Device.detect()
    assert emulated.native_bf16 is False and "XRAY_TRAIN_EMULATE_NO_BF16" in emulated.name
    assert emulated.memory_gb == 15.0
    assert h100 == [(pytest.approx(15.0 / 85.0), 0)]  # the process is capped at start-up
    seen = resolve(_cfg(), emulated, image_size=896)
    t4 = resolve(_cfg(), Device(**{**T4.__dict__, "compute_capability": (9, 0)}), image_size=896)
    assert seen.model.compute_dtype == "float16" and seen.training.fp16 is True
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "checkpoint_layers", "torch_compile")
    assert [getattr(seen.training, k) for k in keys] == [getattr(t4.training, k) for k in keys]


@pytest.mark.parametrize("value", ["lots", "0", "-3"])
def test_a_bad_memory_cap_is_one_line(h100, monkeypatch, value):
    monkeypatch.setenv("XRAY_TRAIN_MEMORY_CAP_GB", value)
    with pytest.raises(XrayTrainError, match=rf"XRAY_TRAIN_MEMORY_CAP_GB: expected a number of GB > 0, got '{value}'"):
        Device.detect()
