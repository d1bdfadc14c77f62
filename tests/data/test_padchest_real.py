"""The PadChest reader on the real 160,861-row labels CSV.

The CSV ships inside the ``torchxrayvision==1.5.7`` wheel (29 MB, never committed). A test run reaches no
network: the wheel is fetched at install time, like every other test dependency, into
``$XRAY_TRAIN_TEST_DATA`` (default ``.test-data/`` at the repository root):

    python -m pip download --no-deps torchxrayvision==1.5.7 -d .test-data

(``.ci/run`` does this before ``pytest``). It cannot be a dev extra: installing torchxrayvision pulls
torchvision and scikit-image, and an extra cannot ask for ``--no-deps``. Without the wheel these tests are
skipped with that command as the reason, unless ``CI`` is set, where a missing wheel is a failure. The
CSV is read out of the wheel into this run's temporary folder.
"""

from __future__ import annotations

import os
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from xray_train.config import data_config
from xray_train.data import padchest as reader

REPO = Path(__file__).resolve().parents[2]
WHEEL = "torchxrayvision-1.5.7-py3-none-any.whl"
MEMBER = "torchxrayvision/data/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
FETCH = "python -m pip download --no-deps torchxrayvision==1.5.7 -d {folder}"
ROWS = 160_861
ALL_PROJECTIONS = ["PA", "L", "AP_horizontal", "AP", "COSTAL", "EXCLUDE", "UNK"]


def test_data_dir() -> Path:
    return Path(os.environ.get("XRAY_TRAIN_TEST_DATA") or REPO / ".test-data")


test_data_dir.__test__ = False  # a helper, not a test


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"real PadChest CSV unavailable in CI: {reason}")
    pytest.skip(f"real PadChest CSV unavailable: {reason}")


def extract_csv(folder: Path, dest: Path) -> Path:
    """The labels CSV read out of the torchxrayvision wheel in ``folder`` into ``dest``; skips (fails in CI)
    naming the command that fetches the wheel when it is not there."""
    wheel = folder / WHEEL
    if not wheel.is_file():
        _unavailable(f"{wheel} not found; fetch it once with `{FETCH.format(folder=folder)}`")
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(MEMBER)
    except (zipfile.BadZipFile, KeyError) as exc:
        _unavailable(f"{wheel}: {exc}")
    target = dest / Path(MEMBER).name
    target.write_bytes(data)
    return target


@pytest.fixture(scope="module")
def real_csv(tmp_path_factory) -> Path:
    return extract_csv(test_data_dir(), tmp_path_factory.mktemp("padchest"))


def test_missing_wheel_skips_naming_the_command_that_fetches_it(tmp_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as info:
        extract_csv(tmp_path / "empty", tmp_path)
    message = str(info.value)
    assert WHEEL in message and "pip download --no-deps torchxrayvision==1.5.7 -d" in message
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="unavailable in CI"):
        extract_csv(tmp_path / "empty", tmp_path)


@pytest.fixture(scope="module")
def everything(real_csv, tmp_path_factory):
    """Every projection, method and label kept: only the label quirks are skipped."""
    cfg = data_config(
        dataset="padchest",
        csv=real_csv,
        image_root=tmp_path_factory.mktemp("no_images"),
        projections=ALL_PROJECTIONS,
        drop_labels=[],
    )
    return reader.read(cfg, require_images=False)


def test_record_count_and_invariant(everything):
    assert everything.rows_total == ROWS
    assert len(everything.examples) + sum(everything.skipped.values()) == ROWS


def test_label_quirk_rows(everything):
    # 103 literal-nan rows, 777 rows whose only label is '' (3,041 rows have '' next to real labels),
    # 3,705 rows whose only non-empty label is 'unchanged'.
    assert everything.skipped == {"missing_labels": 103, "empty_labels": 777, "only_unchanged": 3705}
    assert "rows_without_locations" not in everything.notes


def test_label_counts_are_plausible(everything):
    counts = Counter(f.name for e in everything.examples for f in e.findings)
    normal = sum(1 for e in everything.examples if not e.findings)
    assert normal > 45_000 and normal > 2 * counts.most_common(1)[0][1]  # normal is by far the most common
    top = [name for name, _ in counts.most_common(10)]
    assert top[:3] == ["copd signs", "cardiomegaly", "aortic elongation"]
    for name in ("pleural effusion", "scoliosis", "pneumonia", "interstitial pattern", "infiltrates"):
        assert name in top
    assert 14_000 < counts["cardiomegaly"] < 16_000
    # special labels never reach the findings; names are clean
    assert not {"normal", "unchanged", ""} & set(counts)
    assert all(name == name.strip().lower() and "  " not in name for name in counts)
    assert counts["exclude"] > 1000 and counts["suboptimal study"] > 1000  # kept because drop_labels=[]


def test_locations_are_attached_and_clean(everything):
    locations = Counter(loc for e in everything.examples for f in e.findings for loc in f.locations)
    assert {"right", "left", "cardiac", "pleural", "bilateral"} <= {name for name, _ in locations.most_common(8)}
    assert "supraspisnous" not in locations and locations["supraspinous"] >= 1
    assert not any(loc.startswith("loc") for loc in locations)
    with_locations = sum(1 for e in everything.examples if any(f.locations for f in e.findings))
    assert with_locations > 50_000


def test_patients_group_examples(everything):
    groups = {e.group_id for e in everything.examples}
    assert 60_000 < len(groups) < len(everything.examples)


def test_default_config_with_an_empty_image_root(real_csv, tmp_path):
    cfg = data_config(dataset="padchest", csv=real_csv, image_root=tmp_path)
    result = reader.read(cfg)
    assert result.rows_total == ROWS and not result.examples
    assert sum(result.skipped.values()) == ROWS
    # Projections other than PA/AP/AP_horizontal: 49,579 L + 630 COSTAL + 11 EXCLUDE + 8 UNK.
    assert result.skipped["filtered_projection"] == 50_228
    assert result.skipped["dropped_label"] > 2000
    assert result.skipped["missing_image"] > 100_000
    assert result.notes["image_layout"] == "nested"
