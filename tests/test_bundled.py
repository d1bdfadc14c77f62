"""``xray_train.bundled``: a non-editable install carries the shipped configs and sample data, and the
demo configs find their data in the installed layout (``pip install .`` then ``xray-train demo``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from xray_train.bundled import CONFIGS, SAMPLES

REPO = Path(__file__).resolve().parents[1]


def test_bundled_paths_are_the_repository_folders():
    assert (CONFIGS / "demo" / "phase1.yaml").read_bytes() == (REPO / "configs" / "demo" / "phase1.yaml").read_bytes()
    assert sorted(p.relative_to(SAMPLES) for p in SAMPLES.rglob("*")) == sorted(
        p.relative_to(REPO / "data" / "samples") for p in (REPO / "data" / "samples").rglob("*")
    )


@pytest.mark.slow  # a pip subprocess
def test_the_wheel_carries_configs_and_samples_where_the_demo_configs_look(tmp_path):
    tree = tmp_path / "tree"  # only what a build reads: nothing is written into the checkout
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    for name in ("src", "configs", "data"):
        shutil.copytree(REPO / name, tree / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp_path / "dist"), str(tree)],
        check=True, timeout=300, capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("xray_train-*.whl")
    shipped = [p for folder in ("configs", "data/samples") for p in (REPO / folder).rglob("*") if p.is_file()]
    expected = {f"xray_train/bundled/{p.relative_to(REPO).as_posix()}" for p in shipped}
    with zipfile.ZipFile(wheel) as zf:
        assert expected <= set(zf.namelist())
        zf.extractall(tmp_path / "installed")

    from xray_train.config import load_config
    from xray_train.data.registry import read_dataset

    configs = tmp_path / "installed" / "xray_train" / "bundled" / "configs" / "demo"
    assert not (configs.parent.is_symlink() or configs.is_symlink())  # copies, not links into a checkout
    for name in ("phase1", "phase2"):
        cfg = load_config(configs / f"{name}.yaml", check_model=False)
        assert str(tmp_path / "installed") in str(cfg.data.image_root)
        assert read_dataset(cfg.data).examples  # the sample data is there and readable
