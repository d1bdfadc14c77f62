"""resolve(): every "auto" setting becomes the value the run uses, from the phase, the device and the base."""

from __future__ import annotations

import pytest
import yaml

from xray_train.config import DEFAULT_CHECKPOINT_LAYERS, RunConfig, dump_config
from xray_train.errors import XrayTrainError
from xray_train.resolve import COMPILE_VISION_MIN_IMAGES, RESOLVED_KEYS, Device, require_resolved, resolve, unresolved

CPU = Device(cuda=False, native_bf16=False, name="CPU", cpu_count=6)
H200 = Device(cuda=True, native_bf16=True, name="NVIDIA H200", cpu_count=16)


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
    assert t.bf16 is True and t.torch_compile is True and t.dequantize_in_graph is True
    assert t.compile_vision_cache is True
    assert t.gradient_checkpointing is True and t.checkpoint_layers == DEFAULT_CHECKPOINT_LAYERS[phase]
    # The steps fill the cache: DataLoader workers read the images alongside them, one per CPU.
    assert t.fill_cache_during_epoch is True and t.dataloader_num_workers == H200.cpu_count
    assert t.eval_steps == t.save_steps and t.projector_learning_rate == t.learning_rate
    assert cfg.data.image_size == 896
    # Phase 2 trains the <loc> rows of the tied head: the in-forward head gradient needs a frozen head.
    assert t.head_grad_in_forward is (phase == "phase1")
    assert cfg.model.add_loc_tokens is cfg.model.train_projector is (phase == "phase2")


def test_on_cpu_nothing_compiles_or_checkpoints():
    cfg = resolve(_cfg(), CPU, image_size=64, images=10 * COMPILE_VISION_MIN_IMAGES)
    t = cfg.training
    assert (t.bf16, t.torch_compile, t.dequantize_in_graph, t.gradient_checkpointing) == (False,) * 4
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
    t4 = Device(cuda=True, native_bf16=False, name="Tesla T4", cpu_count=4)
    with pytest.raises(XrayTrainError, match="bfloat16 is only emulated on Tesla T4"):
        resolve(_cfg(), t4, image_size=896)


def test_image_size_is_read_from_the_base_processor(tiny_model_dir):
    cfg = _cfg().model_copy(update={"model": _cfg().model.model_copy(update={"base": str(tiny_model_dir)})})
    assert resolve(cfg, CPU).data.image_size == 64  # the tiny model's processor
