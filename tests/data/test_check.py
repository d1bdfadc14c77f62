from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from xray_train.config import data_config
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
    cfg = data_config(dataset="nih", csv=tmp_path / "x.csv", image_root=tmp_path)
    summary = check_dataset(cfg, progress=False)
    _invariant(summary)
    assert summary["boxes_total"] == 3
    assert summary["box_labels"] == {"nodule": 2, "mass": 1}
    assert summary["examples_without_boxes"] == 1


# ---------------------------------------------------------------------------------------------
# `xray-train data check` on the command line


@pytest.fixture
def data_check(tmp_path, monkeypatch, capsys):
    """``data_check(*sets, strict=False)`` -> (exit code, stdout, stderr) of the installed entry point."""
    import sys
    from pathlib import Path

    from xray_train import cli

    config = Path(__file__).resolve().parents[2] / "configs" / "demo" / "phase1.yaml"

    def run(*sets: str, strict: bool = False):
        args = ["xray-train", "data", "check", "--config", str(config), "--json", str(tmp_path / "summary.json")]
        for text in sets:
            args += ["--set", text]
        monkeypatch.setattr(sys, "argv", args + (["--strict"] if strict else []))
        monkeypatch.setenv("COLUMNS", "300")
        with pytest.raises(SystemExit) as exc:
            cli.main()
        out = capsys.readouterr()
        return exc.value.code or 0, out.out, " ".join(out.err.split())

    return run


def test_data_check_fails_when_nothing_is_usable_and_shows_where_it_looked(tmp_path, data_check):
    empty = tmp_path / "images"
    empty.mkdir()
    code, out, err = data_check(f"data.image_root={empty}")
    assert code == 2 and "error: no usable examples in 48 rows of padchest" in err
    # Where the first missing image was looked for, so a wrong image_root or layout is obvious.
    assert f"first missing_image: row 1: {empty}/" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["examples"] == 0 and summary["looked_for"]["missing_image"].startswith(f"row 1: {empty}/")


def test_data_check_fails_on_a_header_only_csv(tmp_path, padchest, data_check):
    csv = padchest.write_csv(tmp_path / "header.csv", [])
    code, _, err = data_check(f"data.csv={csv}")
    assert code == 2 and "no usable examples in 0 rows" in err


def test_strict_passes_intended_filters_and_fails_on_malformed_rows(tmp_path, padchest, data_check):
    # The bundled sample has lateral views (filtered_projection), as every real PadChest CSV does.
    code, out, err = data_check(strict=True)
    assert code == 0, (out, err)
    assert json.loads((tmp_path / "summary.json").read_text())["skipped"] == {"filtered_projection": 11}

    rows = [padchest.row(0), padchest.row(1, Projection="L"), padchest.row(2, Labels="['a', 'b'"),
            padchest.row(3, Labels="['exclude']"), padchest.row(4, Labels="['unchanged']")]  # fmt: skip
    cfg = padchest.build(rows)
    data = [f"data.csv={cfg.csv}", f"data.image_root={cfg.image_root}"]
    code, _, err = data_check(*data, strict=True)
    assert code == 2 and "padchest.csv row 3: unparsable_labels" in err and "Traceback" not in err
    code, _, _ = data_check(*data)
    assert code == 0
    assert json.loads((tmp_path / "summary.json").read_text())["skipped"] == {
        "filtered_projection": 1, "unparsable_labels": 1, "dropped_label": 1, "only_unchanged": 1,
    }  # fmt: skip


@pytest.mark.parametrize("config, source_key", [("phase1", "csv"), ("phase2", "reports_csv")])
def test_an_unusable_dataset_is_named_by_its_own_source_file(tmp_path, config, source_key):
    """Each dataset's data class has its own fields: the error names that dataset's CSV."""
    from tests.conftest import REPO
    from xray_train.config import load_config
    from xray_train.data.check import read_for_training

    empty = tmp_path / "images"
    empty.mkdir()
    cfg = load_config(REPO / "configs" / "demo" / f"{config}.yaml", [f"data.image_root={empty}"], check_model=False)
    with pytest.raises(DataError) as err:
        read_for_training(cfg.data)
    source = getattr(cfg.data, source_key)
    assert str(err.value).startswith(f"{source}: no usable examples: all ") and "missing_image" in str(err.value)
