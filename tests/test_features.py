"""The vision-feature cache build: parallel reading, unreadable files, a killed build, the disk check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from xray_train import features
from xray_train.errors import XrayTrainError
from xray_train.inputs import PixelLoader

from .conftest import REPO, padchest_overrides


def _fake_model():
    config = SimpleNamespace(mm_tokens_per_image=4, vision_config=SimpleNamespace(hidden_size=6))
    return SimpleNamespace(vision_tower=torch.nn.Linear(2, 2), config=config)


def _features_of(model, pixel_values, attention="default"):
    """A stand-in tower whose output depends on every image's own pixels (so a row mix-up shows)."""
    b = pixel_values.shape[0]
    cells = torch.nn.functional.adaptive_avg_pool2d(pixel_values.float().mean(1, keepdim=True), (4, 6))
    return cells.reshape(b, 4, 6) * torch.arange(1, 7.0)


def _films(tmp_path, n=9):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 4096 if i % 2 else 256, (int(rng.integers(30, 60)), 40))
        path = tmp_path / "films" / f"{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(arr.astype(np.uint16 if i % 2 else np.uint8)).save(path)
        paths.append(path)
    (tmp_path / "films" / "03.png").write_bytes(b"not a png")
    (tmp_path / "films" / "07.png").write_bytes(paths[1].read_bytes()[:100])
    return paths


@pytest.fixture
def fake_tower(monkeypatch):
    monkeypatch.setattr(features, "vision_fingerprint", lambda model: "fp")
    monkeypatch.setattr(features, "pooled_vision_features", _features_of)


def test_parallel_build_skips_unreadable_files_and_equals_a_serial_build(tmp_path, processor, fake_tower):
    paths = _films(tmp_path)
    loader = PixelLoader(processor)
    build = features.VisionFeatureCache.build_or_load
    serial = build(tmp_path / "serial", _fake_model(), paths, loader, {}, batch_size=4, workers=0, progress=False)
    parallel = build(tmp_path / "parallel", _fake_model(), paths, loader, {}, batch_size=4, workers=2, progress=False)

    assert sorted(Path(p).name for p in parallel.failed) == ["03.png", "07.png"]
    assert "cannot read image" in parallel.failed[str(paths[3])]
    assert parallel.failed.keys() == serial.failed.keys() and parallel.index == serial.index
    assert str(paths[3]) not in parallel and str(paths[7]) not in parallel
    assert (parallel.folder / "features.bin").read_bytes() == (serial.folder / "features.bin").read_bytes()
    for path in paths:
        if str(path) in parallel:
            expected = _features_of(None, loader(path)[None])[0]
            torch.testing.assert_close(parallel[path], expected, rtol=0, atol=0)


def test_build_refuses_to_start_without_room_on_the_disk(tmp_path, processor, fake_tower, monkeypatch):
    paths = _films(tmp_path, n=4)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9 - 50, free=50))
    root = tmp_path / "cache"
    with pytest.raises(XrayTrainError) as info:
        features.VisionFeatureCache.build_or_load(root, _fake_model(), paths, PixelLoader(processor), {}, progress=False)
    msg = str(info.value)
    # 4 images x 4 x 6 float32 = 384 bytes needed, 50 free.
    assert "needs 0.0 GB for 4 images" in msg and f"{root} has 0.0 GB free" in msg
    assert "XRAY_TRAIN_FEATURE_CACHE" in msg and "\n" not in msg
    assert list(root.iterdir()) == []  # nothing half-built is left behind


def test_row_size_is_the_pooled_tokens_times_the_vision_width():
    model = _fake_model()
    assert features.feature_row_bytes(model) == 4 * 6 * 4  # float32 tower
    model.vision_tower = model.vision_tower.to(torch.bfloat16)
    assert features.feature_row_bytes(model) == 4 * 6 * 2


# ---------------------------------------------------------------------------------------------
# `xray-train cache-features`, killed with SIGKILL halfway and run again

_KILL_AFTER = """
import os, signal, sys
import xray_train.features as features
real = features.pooled_vision_features
calls = [0]
def counted(model, pixel_values, attention="default"):
    calls[0] += 1
    if calls[0] > {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(model, pixel_values, attention)
features.pooled_vision_features = counted
from xray_train.cli import main
sys.argv = ["xray-train", *sys.argv[1:]]
main()
"""


def _cache_features(cache_root: Path, config_args: list[str], kill_after: int | None = None):
    env = dict(os.environ, XRAY_TRAIN_FEATURE_CACHE=str(cache_root), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO / "src"))
    if kill_after is None:
        cmd = [sys.executable, "-m", "xray_train.cli", "cache-features", *config_args]
    else:
        cmd = [sys.executable, "-c", _KILL_AFTER.format(kill_after=kill_after), "cache-features", *config_args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _only_cache(root: Path) -> Path:
    built = [p for p in root.iterdir() if not p.name.startswith(".")]
    assert len(built) == 1, list(root.iterdir())
    return built[0]


def test_cache_features_killed_midway_continues_and_gives_the_same_cache(tiny_model_dir, tmp_path):
    args = ["--config", str(REPO / "configs" / "demo" / "phase1.yaml")]
    for override in [f"model.base={tiny_model_dir}", *padchest_overrides(),
                     "training.feature_cache_batch_size=4", "data.decode_workers=2"]:
        args += ["--set", override]

    killed = _cache_features(tmp_path / "resumed", args, kill_after=3)
    assert killed.returncode == -9, killed.stderr[-2000:]
    partial = [p for p in (tmp_path / "resumed").iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1
    done = json.loads((partial[0] / "progress.json").read_text())["done"]
    # Killed while queueing the 4th batch of 4: the 2nd was recorded, the 3rd was with the writer.
    assert done in (8, 12)

    again = _cache_features(tmp_path / "resumed", args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"continuing the vision-feature cache build at image {done}" in again.stderr
    fresh = _cache_features(tmp_path / "fresh", args)
    assert fresh.returncode == 0, fresh.stderr[-2000:]

    resumed, clean = _only_cache(tmp_path / "resumed"), _only_cache(tmp_path / "fresh")
    assert resumed.name == clean.name
    assert (resumed / "features.bin").read_bytes() == (clean / "features.bin").read_bytes()
    meta = json.loads((resumed / "meta.json").read_text())
    assert meta == json.loads((clean / "meta.json").read_text()) and len(meta["index"]) > done


def test_compiled_vision_layers_give_transformers_features(tiny_model_dir):
    # training.compile_vision_cache: SigLIP's encoder layers compiled for the cache build (CPU, float32).
    from transformers import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).model.eval()
    size = model.config.vision_config.image_size
    pixels = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    reference = features.pooled_vision_features(model, pixels)
    compiled = features._vision_forward(model, compile_vision=True)
    torch.testing.assert_close(compiled(pixels), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(pixels[:1]), reference[:1], rtol=1e-5, atol=1e-5)


def test_a_build_for_a_gpu_keeps_one_host_thread_while_it_reads_and_a_cpu_build_keeps_them_all(
        tmp_path, processor, monkeypatch):
    # The reading workers need every core: this process only hands batches to the GPU (51.6 -> 69.8 films/s on a
    # 16-core host). A CPU runs the tower itself, with its threads.
    threads = torch.get_num_threads()
    with features.host_threads_for(torch.device("cuda")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads
    with pytest.raises(KeyError), features.host_threads_for(torch.device("cuda")):
        raise KeyError("a failed build")
    assert torch.get_num_threads() == threads
    with features.host_threads_for(torch.device("cpu")):
        assert torch.get_num_threads() == threads

    devices = []
    real = features.host_threads_for
    monkeypatch.setattr(features, "host_threads_for", lambda device: devices.append(device) or real(device))
    monkeypatch.setattr(features, "vision_fingerprint", lambda model: "fp")
    monkeypatch.setattr(features, "pooled_vision_features", _features_of)
    paths = [p for p in _films(tmp_path, 3) if p.name != "03.png"]
    features.VisionFeatureCache.build_or_load(tmp_path / "c", _fake_model(), paths, PixelLoader(processor), {},
                                              batch_size=2, progress=False)
    assert devices == [torch.device("cpu")]  # the tower's own device decides


def test_vision_attention_tries_its_kernel_first_and_gives_the_same_features(tiny_model_dir):
    # training.vision_attention: the SDPA kernel SigLIP's attention tries first. On a CPU the memory-efficient
    # kernel cannot run: held to it alone SDPA refuses, tried first it hands over to the next kernel.
    from transformers import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).model.eval()
    size = model.config.vision_config.image_size
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    reference = features.pooled_vision_features(model, pixels)
    for kernel in ("flash", "math", "efficient"):
        torch.testing.assert_close(features.pooled_vision_features(model, pixels, kernel), reference,
                                   rtol=1e-5, atol=1e-5)
    q = torch.rand(1, 2, 8, 8)
    with pytest.raises(RuntimeError, match="No viable backend"), features.vision_attention("efficient", only=True):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)


def test_the_configured_attention_reaches_a_builds_and_a_fills_forward(tmp_path, processor, monkeypatch):
    from xray_train.features import FeatureMode, open_feature_source

    used = []

    def forward(model, pixel_values, attention="default"):
        used.append(attention)
        return _features_of(model, pixel_values)

    monkeypatch.setattr(features, "vision_fingerprint", lambda model: "fp")
    monkeypatch.setattr(features, "pooled_vision_features", forward)
    paths, loader = [p for p in _films(tmp_path, 3) if p.name != "03.png"], PixelLoader(processor)
    features.VisionFeatureCache.build_or_load(tmp_path / "built", _fake_model(), paths, loader, {}, batch_size=2,
                                              progress=False, attention="cudnn")
    assert used and set(used) == {"cudnn"}

    used.clear()
    monkeypatch.setenv("XRAY_TRAIN_FEATURE_CACHE", str(tmp_path / "filled"))
    cfg = SimpleNamespace(training=SimpleNamespace(cache_vision_features=True, compile_vision_cache=False,
                                                   vision_attention="flash"))
    fill = open_feature_source(cfg, _fake_model(), loader, paths, fill=True)
    assert fill.mode is FeatureMode.FILLING
    fill.finish(_fake_model(), batch_size=2, workers=0)  # no step ran: every row made here
    assert fill.mode is FeatureMode.CACHED
    assert used and set(used) == {"flash"}


# ---------------------------------------------------------------------------------------------
# training.fill_cache_during_epoch: the steps fill the cache instead of a build before them


def _train_and_read(make_config, root: Path, out: Path, monkeypatch, *overrides: str) -> list[float]:
    from transformers import TrainerCallback

    from xray_train.train import run

    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    monkeypatch.setenv("XRAY_TRAIN_FEATURE_CACHE", str(root))
    # Two epochs: the first fills (or reads the built cache), the second reads rows either way.
    cfg = make_config("phase1", "training.max_steps=-1", "training.num_train_epochs=2", *overrides, output_dir=out)
    run(cfg, callbacks=[Losses()])
    return losses


def test_a_cache_filled_during_training_equals_a_built_one_and_trains_alike(make_config, tmp_path, monkeypatch):
    from xray_train.trainer import XrayTrainer

    built_losses = _train_and_read(make_config, tmp_path / "built", tmp_path / "out-built", monkeypatch)
    fills: list[tuple[float, list[int]]] = []  # (epoch, cache rows) of each step that made features
    real_fill = XrayTrainer.fill_features

    named: list[float] = []  # epochs of the steps whose cached rows came by number, gathered in the trainer
    workers: dict[int, set] = {}  # DataLoader workers of each epoch's steps

    def counted(self, model, inputs):
        if self.model.training:
            if "fill_rows" in inputs:
                fills.append((self.state.epoch, inputs["fill_rows"].tolist()))
            if "feature_rows" in inputs:
                named.append(self.state.epoch)
            loader = self.callback_handler.train_dataloader
            workers.setdefault(int(self.state.epoch), set()).add(loader.base_dataloader.num_workers)
        return real_fill(self, model, inputs)

    monkeypatch.setattr(XrayTrainer, "fill_features", counted)
    filled_losses = _train_and_read(make_config, tmp_path / "filled", tmp_path / "out-filled", monkeypatch,
                                    "training.fill_cache_during_epoch=true", "training.dataloader_num_workers=2")
    summary = json.loads((tmp_path / "out-filled" / "training_summary.json").read_text())
    # Every training image got its row from a step of the first epoch (the last batch's padding copies
    # made a few twice); the second epoch read them.
    assert len({row for _, rows in fills for row in rows}) == summary["data"]["train_examples_used"]
    assert all(epoch < 1 for epoch, _ in fills)
    # The second epoch read no image: it named its cached rows without DataLoader workers, and the training
    # process read them. The first epoch's workers read the images.
    assert any(epoch >= 1 for epoch in named)
    assert workers == {0: {2}, 1: {0}}
    built, filled = _only_cache(tmp_path / "built"), _only_cache(tmp_path / "filled")
    assert built.name == filled.name  # the same key: a rerun of either setting finds the other's cache
    assert not [p for p in (tmp_path / "filled").iterdir() if p.name.startswith(".")]  # finished, moved in place
    assert json.loads((filled / "meta.json").read_text()) == json.loads((built / "meta.json").read_text())
    a = np.fromfile(built / "features.bin", dtype=np.float32)
    b = np.fromfile(filled / "features.bin", dtype=np.float32)
    # SigLIP ran on batches of another size: equal up to float rounding.
    assert a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=1e-6) and np.abs(a).mean() > 0
    assert np.allclose(built_losses, filled_losses, rtol=1e-4) and len(built_losses) >= 4

    # A rerun with the same settings finds every feature cached: no workers, and the collator gathers the
    # rows, as in a run that built its cache first; the same losses.
    for seen in (fills, named, workers):
        seen.clear()
    rerun_losses = _train_and_read(make_config, tmp_path / "filled", tmp_path / "out-rerun", monkeypatch,
                                   "training.fill_cache_during_epoch=true", "training.dataloader_num_workers=2")
    assert not fills and not named and workers == {0: {0}, 1: {0}}
    assert np.allclose(built_losses, rerun_losses, rtol=1e-4)


def test_a_dataset_reads_images_until_every_feature_is_cached(tmp_path, fake_tower):
    from xray_train.features import CacheFill, FeatureMode, FeatureSource
    from xray_train.inputs import EncodedExample, TrainingDataset

    paths = [tmp_path / f"{i}.png" for i in range(4)]
    items = [EncodedExample(SimpleNamespace(image_path=p), [1, 2], [1, 2]) for p in paths[:3]]  # 3: validation
    assert TrainingDataset(items, FeatureSource.pixels(None)).reads_images()  # no cache: every epoch reads
    fill = CacheFill(tmp_path / "cache", "k", _fake_model(), paths)
    source = FeatureSource(FeatureMode.FILLING, SimpleNamespace(), fill)
    dataset = TrainingDataset(items, source)
    rows = torch.ones(2, 4, 6)
    fill.write([0, 1], rows)
    assert dataset.reads_images()  # a training image has no row yet
    fill.write([2, 3], rows)  # queued, not yet on the disk: flushed before the answer
    assert not dataset.reads_images()
    source.finish(_fake_model(), batch_size=2, workers=0)
    assert source.mode is FeatureMode.CACHED and not dataset.reads_images()


def test_a_fill_stopped_midway_keeps_the_rows_it_wrote_and_a_build_never_trusts_its_marks(tmp_path, fake_tower):
    from xray_train.features import FILLED_FILE, CacheFill, build_features

    paths = [tmp_path / f"{i}.png" for i in range(5)]
    fill = CacheFill(tmp_path / "cache", "k", _fake_model(), paths)
    rows = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6) + 1
    fill.write([4, 1], rows)
    fill.flush()
    fill._lock.close()  # the process is gone: its lock with it

    again = CacheFill(tmp_path / "cache", "k", _fake_model(), paths)
    assert [again.is_filled(r) for r in range(5)] == [False, True, False, False, True]
    assert torch.equal(again.rows([4, 1]), rows)
    again._lock.close()

    # A build in the same folder starts its rows afresh: the fill's marks are dropped with them.
    partial = tmp_path / "cache" / ".k.partial"
    loader = SimpleNamespace(prepare=lambda p: np.zeros((8, 8), np.uint8), normalize=lambda px, dtype: px[:, None].to(dtype))
    build_features(partial, _fake_model(), paths, loader, batch_size=2, workers=0, progress=False)
    assert not (partial / FILLED_FILE).exists()


def test_a_fill_that_waited_for_a_build_uses_the_finished_cache(tmp_path, fake_tower, monkeypatch):
    # `xray-train cache-features` finished the cache while the training run waited for its lock.
    from xray_train.features import FeatureMode, VisionFeatureCache, open_feature_source

    monkeypatch.setenv("XRAY_TRAIN_FEATURE_CACHE", str(tmp_path / "cache"))
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    loader = SimpleNamespace(preprocessing=lambda: {}, prepare=lambda p: np.zeros((8, 8), np.uint8),
                             normalize=lambda px, dtype: px[:, None].to(dtype))
    real_lock = features._lock

    def build_meanwhile(fh):  # the lock is granted only once the build is done
        if "partial" in fh.name and not features.feature_cache_root().joinpath("built").exists():
            features.feature_cache_root().joinpath("built").touch()
            VisionFeatureCache.build_or_load(features.feature_cache_root(), _fake_model(), paths, loader, {},
                                             batch_size=2, progress=False)
        real_lock(fh)

    monkeypatch.setattr(features, "_lock", build_meanwhile)
    cfg = SimpleNamespace(training=SimpleNamespace(cache_vision_features=True, compile_vision_cache=False,
                                                   vision_attention="default"))
    source = open_feature_source(cfg, _fake_model(), loader, paths, fill=True)
    assert source.mode is FeatureMode.CACHED and source.cached_images == 3


@pytest.mark.parametrize("compile_vision", [True, False])
def test_a_fill_compiles_the_tower_as_a_build_would(tmp_path, fake_tower, monkeypatch, compile_vision):
    # training.compile_vision_cache covers the cache however it is made: the steps that fill it run the same
    # compiled layers a build would.
    from xray_train.features import FeatureMode, open_feature_source

    monkeypatch.setenv("XRAY_TRAIN_FEATURE_CACHE", str(tmp_path / "cache"))
    compiled = []
    monkeypatch.setattr(features, "compile_vision_layers", compiled.append)
    model = _fake_model()
    loader = SimpleNamespace(preprocessing=lambda: {})
    cfg = SimpleNamespace(training=SimpleNamespace(cache_vision_features=True, compile_vision_cache=compile_vision,
                                                   vision_attention="default"))
    source = open_feature_source(cfg, model, loader, [tmp_path / "0.png"], fill=True)
    assert source.mode is FeatureMode.FILLING
    assert compiled == ([model] if compile_vision else [])
    source._cache._lock.close()


# ---------------------------------------------------------------------------------------------
# FeatureSource: what the dataset, the collator and the trainer ask, in each of its three modes


def _source_cfg(cache: bool = True):
    return SimpleNamespace(
        training=SimpleNamespace(cache_vision_features=cache, compile_vision_cache=False, vision_attention="default",
                                 feature_cache_batch_size=2),
        data=SimpleNamespace(decode_workers=0),
    )


def test_a_source_without_a_cache_gives_every_step_the_pixels(tmp_path, processor, monkeypatch):
    from xray_train.features import FeatureMode, open_feature_source

    monkeypatch.setenv("XRAY_TRAIN_FEATURE_CACHE", str(tmp_path / "cache"))
    paths, loader = _films(tmp_path, 3), PixelLoader(processor)
    source = open_feature_source(_source_cfg(cache=False), _fake_model(), loader, paths)
    assert source.mode is FeatureMode.NONE and source.folder is None and not (tmp_path / "cache").exists()
    assert set(source.image_inputs(paths[0])) == {"pixel_values"}
    assert torch.equal(source.image_inputs(paths[0])["pixel_values"], loader(paths[0]))
    assert all(p in source for p in paths) and source.reads_images(paths)
    assert not source.gathered_in_trainer(dataloader_workers=2, reads_images=True)
    with pytest.raises(RuntimeError, match="none feature source makes no rows"):
        source.make_rows(_fake_model(), torch.zeros(1, 8, 8, dtype=torch.uint8), [0])
    source.finish(_fake_model(), batch_size=2, workers=0)
    assert source.mode is FeatureMode.NONE


def test_a_finished_cache_source_names_rows_and_reads_no_image(tmp_path, processor, fake_tower, monkeypatch):
    from xray_train.collate import FeatureRef
    from xray_train.features import FeatureMode, open_feature_source

    monkeypatch.setenv("XRAY_TRAIN_FEATURE_CACHE", str(tmp_path / "cache"))
    paths, loader = _films(tmp_path, 5), PixelLoader(processor)  # 03.png is not an image
    source = open_feature_source(_source_cfg(), _fake_model(), loader, paths, progress=False)
    assert source.mode is FeatureMode.CACHED and source.folder.parent == tmp_path / "cache"
    assert paths[3] not in source and str(paths[3]) in source.failed and source.cached_images == 4
    ref = source.image_inputs(paths[1])["image_features"]
    assert isinstance(ref, FeatureRef) and ref.cache is source
    expected = _features_of(None, loader.normalize(torch.from_numpy(loader.prepare(paths[1])))[None])
    torch.testing.assert_close(source.rows([ref.row])[0], expected[0])
    assert not source.reads_images([p for p in paths if p in source])
    # Rows go by number from DataLoader workers only while images are read: otherwise the collator gathers.
    assert source.gathered_in_trainer(dataloader_workers=2, reads_images=True)
    assert not source.gathered_in_trainer(dataloader_workers=0, reads_images=True)
    assert not source.gathered_in_trainer(dataloader_workers=2, reads_images=False)


def test_a_filling_source_leaves_missing_rows_to_the_step_then_names_them(tmp_path, processor, fake_tower,
                                                                          monkeypatch):
    from xray_train.features import FeatureMode, open_feature_source

    monkeypatch.setenv("XRAY_TRAIN_FEATURE_CACHE", str(tmp_path / "cache"))
    paths, loader = _films(tmp_path, 3), PixelLoader(processor)
    source = open_feature_source(_source_cfg(), _fake_model(), loader, paths, fill=True)
    assert source.mode is FeatureMode.FILLING and not source.folder.exists()
    item = source.image_inputs(paths[2])
    assert set(item) == {"fill_pixels", "fill_row"} and source.reads_images(paths)
    assert torch.equal(item["fill_pixels"], torch.from_numpy(loader.prepare(paths[2])))
    made = source.make_rows(_fake_model(), item["fill_pixels"][None], [item["fill_row"]])
    # The step's row is the build's: the tower on the normalised image.
    torch.testing.assert_close(made, _features_of(None, loader.normalize(item["fill_pixels"][None])))
    assert source.reads_images(paths) and not source.reads_images(paths[2:])  # waits for the queued write
    assert set(source.image_inputs(paths[2])) == {"image_features"}  # on the disk: named from now on
    source.finish(_fake_model(), batch_size=2, workers=0)  # the rows no step made
    assert source.mode is FeatureMode.CACHED and source.folder.is_dir() and not source.reads_images(paths)
    torch.testing.assert_close(source.rows([source.image_inputs(paths[2])["image_features"].row]), made)
    again = open_feature_source(_source_cfg(), _fake_model(), loader, paths, fill=True)  # a rerun
    assert again.mode is FeatureMode.CACHED and again.folder == source.folder
