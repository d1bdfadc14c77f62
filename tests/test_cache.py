"""Where the caches go: a test run keeps every one of them in its temporary folder (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from xray_train.cache import cache_root, feature_cache_root


def test_a_test_run_keeps_every_cache_in_its_temporary_folder(tmp_path_factory):
    run_tmp = tmp_path_factory.getbasetemp().parent
    home_cache = Path.home() / ".cache"
    for folder in (cache_root(), feature_cache_root()):
        assert folder.is_relative_to(run_tmp), folder
        assert not folder.is_relative_to(home_cache), folder


def test_subprocesses_of_a_test_inherit_the_temporary_caches(tmp_path_factory):
    code = "from xray_train.cache import cache_root, feature_cache_root; print(cache_root()); print(feature_cache_root())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                         check=True).stdout.split()
    assert [Path(p) for p in out] == [cache_root(), feature_cache_root()]


def test_outside_tests_the_cache_is_the_users(monkeypatch, tmp_path):
    monkeypatch.delenv("XRAY_TRAIN_CACHE")
    monkeypatch.delenv("XRAY_TRAIN_FEATURE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "xray-train"
    assert feature_cache_root() == cache_root() / "vision-features"
    monkeypatch.setenv("XRAY_TRAIN_CACHE", str(tmp_path))
    assert feature_cache_root() == tmp_path / "vision-features"


def test_third_party_caches_are_temporary_too():
    import tempfile

    for name in ("MPLCONFIGDIR", "HF_HOME"):
        assert Path(os.environ[name]).is_relative_to(tempfile.gettempdir()), name
