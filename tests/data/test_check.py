from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from xray_train.config import DataConfig
from xray_train.data import check as check_module
from xray_train.data.check import check_dataset
from xray_train.data.records import Box, Example, Finding, ReadResult
from xray_train.errors import DataError


def _dataset(padchest, **cfg):
    rows = [
        padchest.row(0, PatientID="secret-patient-a", **padchest.PHYSICIAN),
        padchest.row(1, PatientID="secret-patient-b", **padchest.RNN),
        padchest.row(2, PatientID="secret-patient-a"),
        padchest.row(3, PatientID="secret-patient-c", Labels="nan"),
        padchest.row(4, PatientID="secret-patient-d", Projection="L"),
    ]
    return rows, padchest.build(rows, **cfg)


def _invariant(summary):
    assert summary["examples"] + sum(summary["skipped"].values()) == summary["rows_total"]


def test_summary_counts(padchest):
    _, cfg = _dataset(padchest)
    summary = check_dataset(cfg, progress=False)
    _invariant(summary)
    assert summary["dataset"] == "padchest"
    assert summary["rows_total"] == 5 and summary["examples"] == 3
    assert summary["skipped"] == {"missing_labels": 1, "filtered_projection": 1}
    assert summary["labels"]["cardiomegaly"] == 1 and summary["labels"]["pulmonary fibrosis"] == 1
    assert summary["normal_studies"] == 1
    # counted per (finding, location) pair: basal qualifies two findings of one study
    assert summary["locations"]["basal"] == 2 and summary["locations"]["basal bilateral"] == 1
    assert sum(summary["splits"].values()) == 3 and set(summary["splits"]) == {"train", "validation", "test"}
    assert summary["notes"]["image_layout"] == "nested"
    assert "boxes_total" not in summary


def test_summary_is_json_and_has_no_patient_ids(padchest):
    _, cfg = _dataset(padchest)
    text = json.dumps(check_dataset(cfg, progress=True))
    assert "secret-patient" not in text


def test_unreadable_images_move_to_skipped(padchest):
    rows, cfg = _dataset(padchest)
    broken = next(padchest.image_root.rglob(rows[1]["ImageID"]))
    broken.write_bytes(broken.read_bytes()[:20])  # truncated PNG
    empty = next(padchest.image_root.rglob(rows[2]["ImageID"]))
    empty.write_bytes(b"")
    summary = check_dataset(cfg, progress=False, workers=2)
    _invariant(summary)
    assert summary["examples"] == 1
    assert summary["skipped"]["unreadable_image"] == 2
    listed = {item["image_id"] for item in summary["unreadable_images"]}
    assert listed == {rows[1]["ImageID"], rows[2]["ImageID"]}
    assert "cardiomegaly" not in summary["labels"]  # the RNN row's labels left with its image


def test_without_opening_images_broken_files_are_not_noticed(padchest):
    rows, cfg = _dataset(padchest)
    next(padchest.image_root.rglob(rows[1]["ImageID"])).write_bytes(b"")
    summary = check_dataset(cfg, open_images=False, progress=False)
    assert summary["examples"] == 3 and "unreadable_image" not in summary["skipped"]
    assert summary["images_opened"] is False


def test_strict_unreadable_image_raises_naming_the_row(padchest):
    rows = [padchest.row(0), padchest.row(1)]
    cfg = padchest.build(rows, strict=True)
    next(padchest.image_root.rglob(rows[1]["ImageID"])).write_bytes(b"junk")
    with pytest.raises(DataError, match=r"row 2: unreadable_image"):
        check_dataset(cfg, progress=False)


def test_box_datasets_report_box_counts(tmp_path, monkeypatch, png):
    image = png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    examples = [
        Example(image, "a.png", "g1", boxes=[Box("nodule", 0.1, 0.1, 0.2, 0.2), Box("mass", 0, 0, 1, 1)]),
        Example(image, "b.png", "g2", boxes=[Box("nodule", 0.3, 0.3, 0.4, 0.4)]),
        Example(image, "c.png", "g3", findings=[Finding("nodule")], boxes=[]),
    ]
    result = ReadResult(examples=examples, rows_total=4, skipped=Counter({"bad_box": 1}))
    monkeypatch.setattr(check_module, "read_dataset", lambda cfg: result)
    cfg = DataConfig(dataset="nih", csv=tmp_path / "x.csv", image_root=tmp_path)
    summary = check_dataset(cfg, progress=False)
    _invariant(summary)
    assert summary["boxes_total"] == 3
    assert summary["box_labels"] == {"nodule": 2, "mass": 1}
    assert summary["examples_without_boxes"] == 1
