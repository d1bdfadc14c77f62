"""Nothing lost: finished runs are not overwritten without --overwrite, and a full disk (while caching
vision features, saving checkpoints or the final outputs) is one clear error naming the path that
leaves earlier outputs intact and the output dir resumable rather than looking finished."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from xray_train import features, train
from xray_train.config import RunConfig
from xray_train.errors import XrayTrainError
from xray_train.resolve import resolve
from xray_train.run_dir import (
    ADAPTER_WEIGHTS,
    DONE_MARKER,
    LINEAGE,
    RESOLVED_CONFIG,
    SUMMARY,
)
from xray_train.outputs import atomic_write_text, disk_full_as_error

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"


def enospc(path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def phase1_raw(out: Path) -> dict:
    return {
        "phase": "phase1",
        "output_dir": str(out),
        "data": {
            "dataset": "padchest",
            "csv": str(SAMPLES / "padchest" / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"),
            "image_root": str(SAMPLES / "padchest" / "images"),
        },
    }


def finished_dir(out: Path) -> Path:
    out.mkdir(parents=True)
    (out / ADAPTER_WEIGHTS).write_bytes(b"precious")
    (out / DONE_MARKER).write_text(json.dumps({"phase": "phase1", "global_steps": 10}))
    return out


def test_finished_dir_is_not_overwritten_without_overwrite(tmp_path, tiny_model_dir):
    out = finished_dir(tmp_path / "out")
    config = tmp_path / "c.yaml"
    # A local base: a Hub base that cannot be reached offline would be reported first.
    config.write_text(yaml.safe_dump(phase1_raw(out) | {"model": {"base": str(tiny_model_dir)}}))
    proc = subprocess.run(
        [sys.executable, "-m", "xray_train.cli", "phase1", "-c", str(config)],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="300"),
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds a finished phase1 run; pass --overwrite" in " ".join(proc.stderr.split())
    assert (out / ADAPTER_WEIGHTS).read_bytes() == b"precious"

    # --overwrite means start over: the old run goes, nothing is resumed from it.
    cfg = resolve(RunConfig.model_validate(phase1_raw(out)), image_size=896)
    (out / "checkpoint-10").mkdir()
    assert train.prepare_output_dir(cfg, overwrite=True) is None
    # Only the new run's resolved config and lineage are there: nothing of the old run survives.
    assert out.is_dir() and sorted(p.name for p in out.iterdir()) == [RESOLVED_CONFIG, LINEAGE]


def test_unfinished_dir_is_resumed_not_refused(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)  # no completion marker: moved aside, fresh start
    cfg = resolve(RunConfig.model_validate(phase1_raw(out)), image_size=896)
    assert train.prepare_output_dir(cfg, overwrite=False) is None
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 3 and names[0].startswith("incomplete-checkpoint-2-") and names[1:] == [RESOLVED_CONFIG, LINEAGE]


# ---------------------------------------------------------------------------------------------
# Vision-feature cache


class _Loader:
    def prepare(self, path):
        return np.zeros((8, 8), dtype=np.uint8)

    def normalize(self, pixels, dtype=None):
        return pixels.float().unsqueeze(-3).expand(*pixels.shape[:-2], 3, *pixels.shape[-2:])


def _fake_model():
    config = SimpleNamespace(mm_tokens_per_image=4, vision_config=SimpleNamespace(hidden_size=6))
    return SimpleNamespace(vision_tower=torch.nn.Linear(2, 2), config=config)


def test_disk_full_while_caching_features_is_a_clear_error(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    earlier = root / "0123earlier"
    earlier.mkdir(parents=True)
    (earlier / "meta.json").write_text("{}")
    monkeypatch.setattr(features, "vision_fingerprint", lambda model: "fp")
    monkeypatch.setattr(features, "pooled_vision_features", lambda model, px, attention="default": torch.ones(px.shape[0], 4, 6))

    def full(fd, offset, length):
        raise enospc(root)

    monkeypatch.setattr(os, "posix_fallocate", full)
    model = _fake_model()
    images = [tmp_path / f"{i}.png" for i in range(3)]
    with pytest.raises(XrayTrainError) as info:
        features.VisionFeatureCache.build_or_load(root, model, images, _Loader(), {"v": 1}, progress=False)
    msg = str(info.value)
    assert f"cannot write the vision-feature cache in {root}" in msg and "No space left on device" in msg
    assert "training.cache_vision_features=false" in msg
    assert sorted(p.name for p in root.iterdir()) == ["0123earlier"]  # no half-built cache left behind
    assert (earlier / "meta.json").read_text() == "{}"

    # With room on the disk the same call builds a usable cache.
    monkeypatch.undo()
    monkeypatch.setattr(features, "vision_fingerprint", lambda model: "fp")
    monkeypatch.setattr(features, "pooled_vision_features", lambda model, px, attention="default": torch.ones(px.shape[0], 4, 6))
    cache = features.VisionFeatureCache.build_or_load(root, model, images, _Loader(), {"v": 1}, progress=False)
    assert cache[images[1]].shape == (4, 6)


def test_damaged_feature_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "vision_fingerprint", lambda model: "fp")
    monkeypatch.setattr(features, "pooled_vision_features", lambda model, px, attention="default": torch.ones(px.shape[0], 4, 6))
    model = _fake_model()
    images = [tmp_path / f"{i}.png" for i in range(3)]
    cache = features.VisionFeatureCache.build_or_load(tmp_path / "c", model, images, _Loader(), {}, progress=False)
    (cache.folder / "features.bin").write_bytes(b"\0" * 10)  # truncated on disk
    again = features.VisionFeatureCache.build_or_load(tmp_path / "c", model, images, _Loader(), {}, progress=False)
    assert again[images[2]].shape == (4, 6)


# ---------------------------------------------------------------------------------------------
# Checkpoints and final outputs


def test_disk_full_inside_the_trainer_names_the_path():
    # torch.save reports a full disk as a RuntimeError; safetensors and json as OSError.
    with pytest.raises(XrayTrainError, match=r"disk full while writing /out/checkpoint-4/x; free space"):
        with disk_full_as_error("/out", advice="free space and rerun"):
            raise enospc("/out/checkpoint-4/x")
    with pytest.raises(XrayTrainError, match=r"disk full while writing /out$"):
        with disk_full_as_error("/out"):
            raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: file write failed")
    with pytest.raises(ValueError):  # anything else passes through untouched
        with disk_full_as_error("/out"):
            raise ValueError("not a disk problem")


class _FakeModel:
    def __init__(self, fail: bool):
        self.fail = fail

    def save_pretrained(self, folder, **kwargs):
        (Path(folder) / ADAPTER_WEIGHTS).write_bytes(b"new-half")
        if self.fail:
            raise enospc(Path(folder) / ADAPTER_WEIGHTS)
        (Path(folder) / "adapter_config.json").write_text("{}")

    def parameters(self):
        return iter([torch.nn.Parameter(torch.zeros(2))])


def _save(out: Path, fail_model: bool):
    cfg = resolve(RunConfig.model_validate(phase1_raw(out)), image_size=896)  # save_outputs gets a resolved run
    trainer = SimpleNamespace(
        model=_FakeModel(fail_model),
        state=SimpleNamespace(global_step=4, log_history=[{"loss": 1.0, "step": 1}]),
        accelerator=SimpleNamespace(num_processes=1),
    )
    data = train.PreparedData([], [], {"rows_total": 3})
    with disk_full_as_error(out, advice="training finished and its checkpoints are kept"):
        train.save_outputs(cfg, trainer, SimpleNamespace(save_pretrained=lambda d: None), data, {}, 1.0,
                           SimpleNamespace(unreadable=0))  # fmt: skip


def _earlier_outputs(out: Path) -> None:
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / ADAPTER_WEIGHTS).write_bytes(b"checkpoint")
    atomic_write_text(out / RESOLVED_CONFIG, "phase: phase1\n")


def test_disk_full_while_saving_the_adapter_keeps_checkpoints(tmp_path):
    out = tmp_path / "out"
    _earlier_outputs(out)
    with pytest.raises(XrayTrainError) as info:
        _save(out, fail_model=True)
    assert f"disk full while writing {out}/.final-" in str(info.value)
    assert "checkpoints are kept" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", RESOLVED_CONFIG]  # staging removed
    assert (out / "checkpoint-4" / ADAPTER_WEIGHTS).read_bytes() == b"checkpoint"


def test_disk_full_while_writing_the_summary_never_looks_finished(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _earlier_outputs(out)
    real = train.atomic_write_json

    def full_for_summary(path, obj):
        if Path(path).name == SUMMARY:
            raise enospc(path)
        real(path, obj)

    monkeypatch.setattr(train, "atomic_write_json", full_for_summary)
    with pytest.raises(XrayTrainError, match=f"disk full while writing {out / SUMMARY}"):
        _save(out, fail_model=False)
    assert not (out / DONE_MARKER).exists()  # so the next run resumes and rewrites everything
    monkeypatch.undo()
    _save(out, fail_model=False)
    assert json.loads((out / DONE_MARKER).read_text())["global_steps"] == 4
    assert (out / ADAPTER_WEIGHTS).read_bytes() == b"new-half"


def test_atomic_write_keeps_the_old_file_when_the_disk_fills(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")

    def full(fd):
        raise enospc(target)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600
