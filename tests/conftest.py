"""Fixtures shared across the suite: the tiny MedGemma-shaped model, its processor, the sample data and
small run configs pointing at them. Everything heavy is built once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"

# CI explores the same property-test examples on every run (a failure there is reproducible locally
# with CI=1); local runs keep exploring new ones.
try:  # hypothesis is a dev dependency; a GPU host running only tests/gpu may lack it
    from hypothesis import settings as _hypothesis_settings
except ImportError:
    _hypothesis_settings = None
if _hypothesis_settings is not None:
    _hypothesis_settings.register_profile("ci", derandomize=True, deadline=None)
    if os.environ.get("CI"):
        _hypothesis_settings.load_profile("ci")

# Tests never reach the Hub; anything that tries fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


#: Fixtures that build or train a model: a test using one (directly or through another fixture) is slow.
MODEL_FIXTURES = {"tiny_model_dir", "learned", "gemma3_270m"}


def pytest_collection_modifyitems(items):
    """Every test that builds, trains or runs a model is ``slow``: ``pytest -m "not slow"`` is the quick
    subset (configs, data readers, metrics, plots, CLI parsing), with nothing to mark by hand."""
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Gemma3ForConditionalGeneration with MedGemma's structure and the real tokenizer."""
    from xray_train.testing.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-medgemma")


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def feature_cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("feature-cache")
    os.environ["XRAY_TRAIN_FEATURE_CACHE"] = str(path)
    return path


@pytest.fixture
def sample_copy(tmp_path) -> Path:
    """A private copy of data/samples that a test may damage."""
    dest = tmp_path / "samples"
    shutil.copytree(SAMPLES, dest)
    return dest


def benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def padchest_overrides(root: Path = SAMPLES) -> list[str]:
    return [
        f"data.csv={root / 'padchest' / 'PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv'}",
        f"data.image_root={root / 'padchest' / 'images'}",
    ]


def indiana_overrides(root: Path = SAMPLES) -> list[str]:
    base = root / "indiana"
    return [
        f"data.reports_csv={base / 'indiana_reports.csv'}",
        f"data.projections_csv={base / 'indiana_projections.csv'}",
        f"data.image_root={base / 'images' / 'images_normalized'}",
        f"data.box_file={base / 'boxes.csv'}",
    ]


@pytest.fixture
def make_config(tiny_model_dir, tmp_path, feature_cache_dir):
    """``make_config("phase1", "training.max_steps=4", ...)`` -> a validated RunConfig on the tiny model
    and sample data, writing under tmp_path. Small steps, no workers, no loggers: fast on CPU."""
    from xray_train.config import load_config

    def build(phase: str, *overrides: str, output_dir: Path | None = None, samples: Path = SAMPLES):
        name = "phase1" if phase == "phase1" else "phase2"
        data = padchest_overrides(samples) if phase == "phase1" else indiana_overrides(samples)
        out = output_dir or tmp_path / name
        base = [
            f"model.base={tiny_model_dir}",
            f"output_dir={out}",
            "training.max_steps=4",
            "training.save_steps=2",
            "training.eval_steps=2",
            "training.logging_steps=1",
            "training.report_to=[none]",
            "training.dataloader_num_workers=0",
        ]
        return load_config(REPO / "configs" / "demo" / f"{name}.yaml", base + data + list(overrides))

    return build
