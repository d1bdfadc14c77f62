"""Fail fast and clearly: config and path problems are listed together, each naming its key, exit 2, no
traceback, in the time it takes to import the CLI (no model is loaded). NaN losses stop the run with
the step and the last good checkpoint; precision settings are refused with a reason on GPUs that
cannot run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from xray_train.config import ConfigError, RunConfig, load_config
from xray_train.errors import XrayTrainError
from xray_train.run_dir import ADAPTER_WEIGHTS, DONE_MARKER

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
PADCHEST_CSV = SAMPLES / "padchest" / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
# The real check is that no weights were loaded; the time bound only catches gross regressions on a busy CI box.
FAST_S = 20.0


def xray_train(*args: str, cwd: Path = REPO) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="300")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "xray_train.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)
    return proc, time.monotonic() - started


def assert_clean_failure(proc: subprocess.CompletedProcess, elapsed: float) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "Loading weights" not in proc.stderr, "failed only after loading the model"
    assert elapsed < FAST_S, f"took {elapsed:.1f}s"
    err = " ".join(proc.stderr.split())
    assert err.startswith("error: "), proc.stderr
    return err


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def good_phase1(tmp_path: Path, tiny: Path | str = "google/medgemma-4b-it") -> dict:
    return {
        "phase": "phase1",
        "output_dir": str(tmp_path / "out"),
        "model": {"base": str(tiny)},
        "data": {"dataset": "padchest", "csv": str(PADCHEST_CSV), "image_root": str(SAMPLES / "padchest" / "images")},
    }


def test_every_config_problem_reported_at_once_by_the_cli(tmp_path):
    cfg = good_phase1(tmp_path, tmp_path / "no-such-model")
    cfg["colour"] = "blue"  # unknown top-level key
    cfg["data"].update(dataset="indiana", csv=str(tmp_path / "nope.csv"), image_root=str(tmp_path / "no-images"))
    cfg["data"]["val_fraction"] = 1.5  # out of range
    cfg["training"] = {
        "max_steps": "many",  # wrong type
        "learning_rate": -1,  # out of range
        "lerning_rate": 3e-4,  # typo: unknown key
        "bf16": True,
        "fp16": True,  # conflicting options (in a section that also has schema errors)
    }
    proc, elapsed = xray_train("phase1", "--config", str(write_config(tmp_path / "bad.yaml", cfg)))
    err = assert_clean_failure(proc, elapsed)
    expected = [
        "colour: unknown key",
        "training.lerning_rate: unknown key",
        "training.max_steps: Input should be a valid integer",
        "(got 'many')",
        "training.learning_rate: Input should be greater than 0",
        "data.val_fraction: Input should be less than 1",
        "training.fp16: bf16 and fp16 are mutually exclusive",
        "data.dataset: phase1 trains on report targets",
        f"data.image_root: not found: {tmp_path / 'no-images'}",
        "data.reports_csv: required for data.dataset=indiana",
        f"model.base: local model directory not found: {tmp_path / 'no-such-model'}",
    ]
    for text in expected:
        assert text in err, (text, err)


def test_set_errors_name_their_keys(tmp_path):
    path = write_config(tmp_path / "ok.yaml", good_phase1(tmp_path))
    proc, elapsed = xray_train(
        "phase1", "-c", str(path), "--set", "training.learning_rate=fast", "--set", "lora.r=0",
        "--set", "training.warmup=5",
    )  # fmt: skip
    err = assert_clean_failure(proc, elapsed)
    assert "training.learning_rate: Input should be a valid number" in err and "[from --set]" in err
    assert "lora.r: Input should be greater than 0 (got 0) [from --set]" in err
    assert "training.warmup: unknown key (did you mean warmup_steps?) [from --set]" in err
    proc, elapsed = xray_train("phase1", "-c", str(path), "--set", "nokey", "--set", "=1", "--set", "phase.x=1")
    err = assert_clean_failure(proc, elapsed)
    assert "'nokey': expected dotted.key=value" in err and "'=1': empty key" in err
    assert "phase.x: phase is a value, not a section" in err


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("data.csv", "missing.csv", "data.csv: not found: {tmp}/missing.csv"),
        ("data.image_root", "no-images", "data.image_root: not found: {tmp}/no-images"),
        ("model.base", "no-model", "model.base: local model directory not found: {tmp}/no-model"),
    ],
)
def test_missing_paths_are_one_line_naming_the_path(tmp_path, key, value, expected):
    path = write_config(tmp_path / "c.yaml", good_phase1(tmp_path))
    proc, elapsed = xray_train("phase1", "-c", str(path), "--set", f"{key}={tmp_path / value}")
    err = assert_clean_failure(proc, elapsed)
    assert expected.format(tmp=tmp_path) in err
    assert proc.stderr.strip().count("\n") == 0 or len(proc.stderr.strip().splitlines()) == 1


def test_config_problems_in_python_list_every_key(tmp_path):
    raw = good_phase1(tmp_path)
    raw["training"] = {"bf16": True, "fp16": True, "report_to": ["tensorboard", "comet"], "bogus": 1}
    raw["model"]["compute_dtype"] = "bfloat16"
    path = write_config(tmp_path / "c.yaml", raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert "training.bogus: unknown key" in problems
    assert any(p.startswith("training.fp16: bf16 and fp16") for p in problems)
    assert any(p.startswith("training.report_to: unknown logger(s) ['comet']") for p in problems)
    # Once the schema is clean, the cross-section rule is reported by the model validator with its key.
    raw["training"] = {"fp16": True}
    with pytest.raises(ConfigError, match=r"training\.fp16: fp16 autocast over model\.compute_dtype=bfloat16"):
        load_config(write_config(tmp_path / "c2.yaml", raw))
    raw["phase"] = "phase2"
    raw["training"] = {}
    with pytest.raises(ConfigError, match=r"data\.dataset: phase2 trains on boxes"):
        load_config(write_config(tmp_path / "c3.yaml", raw))


def test_resume_dir_errors_are_clear_and_fast(tmp_path, tiny_model_dir):
    # A local base: a Hub base that cannot be reached offline would be reported first.
    phase2 = {
        "phase": "phase2",
        "output_dir": str(tmp_path / "p2"),
        "model": {"base": str(tiny_model_dir)},
        "data": {
            "dataset": "indiana",
            "reports_csv": str(SAMPLES / "indiana" / "indiana_reports.csv"),
            "projections_csv": str(SAMPLES / "indiana" / "indiana_projections.csv"),
            "image_root": str(SAMPLES / "indiana" / "images" / "images_normalized"),
        },
    }
    path = write_config(tmp_path / "p2.yaml", phase2)
    proc, elapsed = xray_train("phase2", "-c", str(path), "--resume", str(tmp_path / "gone"))
    assert f"--resume: directory not found: {tmp_path / 'gone'}" in assert_clean_failure(proc, elapsed)

    not_phase1 = tmp_path / "random"
    not_phase1.mkdir()
    (not_phase1 / "notes.txt").write_text("hi")
    proc, elapsed = xray_train("phase2", "-c", str(path), "--resume", str(not_phase1))
    assert f"--resume: {not_phase1} holds no finished Phase-1 run" in assert_clean_failure(proc, elapsed)

    # A Phase-2 output is not a Phase-1 output.
    p2_out = tmp_path / "old-p2"
    p2_out.mkdir()
    (p2_out / DONE_MARKER).write_text(json.dumps({"phase": "phase2", "global_steps": 3}))
    proc, elapsed = xray_train("phase2", "-c", str(path), "--resume", str(p2_out))
    assert "holds a phase2 run, expected a phase1 output dir" in assert_clean_failure(proc, elapsed)


def test_config_for_the_other_phase_is_refused(tmp_path, tiny_model_dir):
    path = write_config(tmp_path / "c.yaml", good_phase1(tmp_path, tiny_model_dir))
    proc, elapsed = xray_train("phase2", "-c", str(path))
    assert "phase is phase1; run `xray-train phase1`" in assert_clean_failure(proc, elapsed)


# ---------------------------------------------------------------------------------------------
# Mixed precision on the GPUs people actually have (torch.cuda monkeypatched)


def _cfg(tmp_path, **training) -> RunConfig:
    raw = good_phase1(tmp_path)
    raw["training"] = training
    compute = training.pop("compute_dtype", None)
    if compute:
        raw["model"]["compute_dtype"] = compute
    return RunConfig.model_validate(raw)


@pytest.fixture
def gpu(monkeypatch):
    """``gpu("bf16")`` / ``gpu("fp16-only")`` / ``gpu(None)`` (CPU): what torch.cuda reports."""
    import torch

    def set_kind(kind):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: kind is not None)
        native = kind == "bf16"
        # torch reports emulated bf16 as supported unless asked for native support only.
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation
        )
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")

    return set_kind


def test_mixed_precision_choices(tmp_path, gpu):
    from xray_train.resolve import Device
    from xray_train.resolve import mixed_precision as choose

    def mixed_precision(cfg):
        return choose(cfg, Device.detect())

    gpu("bf16")
    assert mixed_precision(_cfg(tmp_path)) == (True, False)  # default: bf16 where native
    assert mixed_precision(_cfg(tmp_path, compute_dtype="float16", fp16=True)) == (False, True)
    assert mixed_precision(_cfg(tmp_path, bf16=False)) == (False, False)

    gpu("fp16-only")  # T4 / V100: bf16 only emulated
    assert mixed_precision(_cfg(tmp_path, compute_dtype="float16", fp16=True)) == (False, True)
    assert mixed_precision(_cfg(tmp_path, compute_dtype="float32", fp16=True)) == (False, True)
    assert mixed_precision(_cfg(tmp_path, compute_dtype="float32")) == (False, False)
    assert mixed_precision(_cfg(tmp_path)) == (False, True)  # default: fp16 autocast, float16 compute
    with pytest.raises(XrayTrainError, match=r"model\.compute_dtype: bfloat16 is only emulated on Tesla T4.*training\.fp16=true"):
        mixed_precision(_cfg(tmp_path, compute_dtype="bfloat16"))
    with pytest.raises(XrayTrainError, match=r"training\.bf16: Tesla T4 has no native bf16"):
        mixed_precision(_cfg(tmp_path, compute_dtype="float16", bf16=True))

    gpu(None)
    with pytest.raises(XrayTrainError, match=r"training\.fp16: fp16 autocast needs a CUDA GPU"):
        mixed_precision(_cfg(tmp_path, compute_dtype="float16", fp16=True))
    assert mixed_precision(_cfg(tmp_path)) == (False, False)


def test_precision_refused_before_the_model_loads(tmp_path, monkeypatch, gpu):
    import xray_train.model as model
    from xray_train import train

    def no_load(*a, **k):
        raise AssertionError("model loaded before the precision check")

    monkeypatch.setattr(model, "build_training_model", no_load)
    gpu("fp16-only")
    with pytest.raises(XrayTrainError, match="only emulated"):
        train.run(_cfg(tmp_path, compute_dtype="bfloat16"))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Non-finite loss guard (one short real run with a loss that turns NaN at step 3)


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_last_good_checkpoint(make_config, monkeypatch):
    import torch

    from xray_train import train, trainer
    from xray_train.loss import targets_only_loss

    calls = {"n": 0}

    def poisoned(model, batch, *args):
        out = targets_only_loss(model, batch, *args)
        calls["n"] += 1
        if calls["n"] == 3:  # third training micro-batch = step 3 (batch 4, no accumulation)
            out.loss_sum = out.loss_sum * torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(trainer, "targets_only_loss", poisoned)
    cfg = make_config("phase1", "training.eval_strategy=no")
    with pytest.raises(XrayTrainError) as info:
        train.run(cfg, echo=lambda *a: None)
    msg = str(info.value)
    assert "loss became nan at step 3" in msg
    assert f"Last good checkpoint: {cfg.output_dir / 'checkpoint-2'}" in msg
    assert "\n" not in msg
    out = cfg.output_dir
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoint-4").exists()
    assert not (out / DONE_MARKER).exists() and not (out / ADAPTER_WEIGHTS).exists()


# ---------------------------------------------------------------------------------------------
# An image that breaks after the data check (pixels read per step) is skipped, not fatal


@pytest.mark.slow
def test_image_unreadable_during_training_is_skipped_and_counted(make_config, sample_copy, caplog):
    import logging

    from xray_train import train

    images = sorted((sample_copy / "padchest" / "images").rglob("*.png"))
    for path in images[5:]:  # keep a few readable; the rest break after the reader saw them exist
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    cfg = make_config(
        "phase1", "training.cache_vision_features=false", "training.max_steps=2", "training.eval_strategy=no",
        samples=sample_copy,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        train.run(cfg, echo=lambda *a: None)
    summary = json.loads((cfg.output_dir / "training_summary.json").read_text())
    assert summary["data"]["unreadable_during_training"] > 0
    assert summary["global_steps"] == 2
    assert "unreadable image, using the next example instead" in caplog.text
    assert (cfg.output_dir / DONE_MARKER).is_file()
