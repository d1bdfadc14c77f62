"""``dataset: hf``: parquet, JSON-lines and image-folder sets built here (nothing is fetched), read with the
native readers' guarantees, and carried through check, training, evaluation and prediction."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray_train.config import ConfigError, data_config, load_config
from xray_train.data.check import check_dataset
from xray_train.data.images import prepare_image
from xray_train.data.registry import read_dataset
from xray_train.data.reports import format_report
from xray_train.data.records import Finding
from xray_train.errors import DataError

datasets = pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[2]
CATEGORIES = ["nodule", "pleural effusion", "cardiomegaly"]


@pytest.fixture(autouse=True)
def _private_caches(tmp_path, monkeypatch):
    """The Arrow cache of ``datasets`` and the embedded-image folder go under tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("XRAY_TRAIN_CACHE", str(tmp_path / "xray-cache"))


def film(i: int, wide: bool = True) -> np.ndarray:
    """A 16-bit (or 8-bit) film with a bright disc; sizes differ so pixel boxes need each header."""
    h, w = 60 + 4 * (i % 3), 80 - 2 * (i % 4)
    yy, xx = np.mgrid[:h, :w]
    base = (xx * 7 + yy * 3 + i * 11).astype(np.float64)
    base[(yy - h // 2) ** 2 + (xx - w // 3) ** 2 < 80] += 400
    return (base * 40).astype(np.uint16) if wide else (base % 256).astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def report(findings: list[str]) -> str:
    return format_report([Finding(f) for f in findings])


#: One good row per kind of example, then one broken row per skip reason (what breaks, reason).
GOOD = [
    # findings, boxes xywh pixels, categories, patient
    (["nodule"], [[10, 10, 20, 15]], [0], "p1"),
    (["pleural effusion", "nodule"], [[5, 30, 30, 20], [40, 5, 10, 10]], [1, 0], "p2"),
    ([], [], [], "p3"),
    (["cardiomegaly"], [[20, 20, 30, 25]], [2], "p1"),
    ([], [], [], "p4"),
    (["nodule"], [[50, 40, 8, 8]], [0], "p5"),
]
BROKEN = ["missing_image", "unreadable_image", "missing_patient_id", "empty_report", "missing_boxes",
          "box_labels_mismatch", "no_valid_box", "abnormal_without_box"]


def rows(image_of) -> list[dict]:
    """Good rows then one row per entry of BROKEN; ``image_of(i, arr_or_None)`` gives the image cell."""
    out = []
    for i, (findings, boxes, cats, patient) in enumerate(GOOD):
        out.append({"image": image_of(i, film(i, wide=i % 2 == 0)), "findings": "; ".join(findings) or "normal",
                    "impression": "", "report": report(findings), "labels": [CATEGORIES.index(f) for f in findings],
                    "objects": {"bbox": boxes, "category": cats}, "patient": patient})
    base = {"findings": "nodule", "impression": "", "report": report(["nodule"]), "labels": [0],
            "objects": {"bbox": [[10, 10, 5, 5]], "category": [0]}, "patient": "p9"}
    for j, reason in enumerate(BROKEN):
        i = len(GOOD) + j
        arr = {"missing_image": None, "unreadable_image": b"not a png"}.get(reason, film(i))
        row = {**json.loads(json.dumps(base)), "image": image_of(i, arr)}
        if reason == "missing_patient_id":
            row["patient"] = None
        elif reason == "empty_report":
            row.update(report="", findings="", impression=None)
        elif reason == "missing_boxes":
            row["objects"] = {"bbox": None, "category": None}
        elif reason == "box_labels_mismatch":
            row["objects"] = {"bbox": [[1, 1, 5, 5], [2, 2, 5, 5]], "category": [0]}
        elif reason == "no_valid_box":
            row["objects"] = {"bbox": [[500, 500, 10, 10]], "category": [0]}  # outside the image
        elif reason == "abnormal_without_box":
            row["objects"] = {"bbox": [], "category": []}
        out.append(row)
    return out


def features(image_feature) -> "datasets.Features":
    return datasets.Features({
        "image": image_feature,
        "findings": datasets.Value("string"),
        "impression": datasets.Value("string"),
        "report": datasets.Value("string"),
        "labels": datasets.List(datasets.ClassLabel(names=CATEGORIES)),
        "objects": {"bbox": datasets.List(datasets.List(datasets.Value("float32"))),
                    "category": datasets.List(datasets.ClassLabel(names=CATEGORIES))},
        "patient": datasets.Value("string"),
    })


@pytest.fixture
def parquet_set(tmp_path) -> Path:
    """Hub-style parquet: images embedded as bytes (``Image`` feature), COCO boxes with a ClassLabel."""
    def image_of(i, arr):
        if arr is None:
            return None
        return {"bytes": arr if isinstance(arr, bytes) else png_bytes(arr), "path": f"film{i}.png"}

    folder = tmp_path / "pq"
    folder.mkdir()
    datasets.Dataset.from_list(rows(image_of), features=features(datasets.Image())).to_parquet(
        folder / "train-00000-of-00001.parquet")
    return folder


@pytest.fixture
def jsonl_set(tmp_path) -> Path:
    """JSON lines with image paths as text relative to the file, the report as several columns."""
    folder = tmp_path / "js"
    (folder / "images").mkdir(parents=True)

    def image_of(i, arr):
        name = f"images/film{i}.png"
        if arr is not None:
            (folder / name).write_bytes(arr if isinstance(arr, bytes) else png_bytes(arr))
        return name

    with open(folder / "data.jsonl", "w") as fh:
        for row in rows(image_of):
            row["labels"] = [CATEGORIES[k] for k in row["labels"]]
            row["objects"]["category"] = (
                None if row["objects"]["category"] is None else [CATEGORIES[k] for k in row["objects"]["category"]])
            fh.write(json.dumps(row) + "\n")
    return folder / "data.jsonl"


@pytest.fixture
def imagefolder_set(tmp_path) -> Path:
    """An image folder with metadata.jsonl (MedGemma's fine-tuning notebook's layout)."""
    folder = tmp_path / "imf"
    (folder / "train").mkdir(parents=True)
    meta = []
    for i, row in enumerate(rows(lambda i, arr: arr)):
        arr = row.pop("image")
        name = f"film{i}.png"
        if arr is None:
            continue  # an image folder lists the files it has: no row without an image
        (folder / "train" / name).write_bytes(arr if isinstance(arr, bytes) else png_bytes(arr))
        row["labels"] = [CATEGORIES[k] for k in row["labels"]]
        cats = row["objects"]["category"]
        row["objects"]["category"] = None if cats is None else [CATEGORIES[k] for k in cats]
        meta.append({"file_name": name, **row})
    with open(folder / "train" / "metadata.jsonl", "w") as fh:
        fh.writelines(json.dumps(m) + "\n" for m in meta)
    return folder


def hf(source, **fields):
    """The data section of an hf set shaped like ``rows``: COCO boxes in pixels, report + labels + patient."""
    columns = {"report": "report", "labels": "labels", "boxes": "objects.bbox", "box_labels": "objects.category",
               "patient_id": "patient", **fields.pop("columns", {})}
    return data_config(dataset="hf", source=str(source), columns=columns, val_fraction=0.2, test_fraction=0.2,
                       **fields)


def expected_skips(*absent: str) -> dict:
    return {reason: 1 for reason in BROKEN if reason not in absent}


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "imagefolder"])
def test_every_row_is_an_example_or_counted_by_reason(kind, request):
    source = request.getfixturevalue(f"{kind}_set")
    result = read_dataset(hf(source))
    # An image folder has no row for a missing file; the garbage PNG is found unreadable reading its header.
    assert result.skipped == expected_skips(*(["missing_image"] if kind == "imagefolder" else []))
    assert len(result.examples) + sum(result.skipped.values()) == result.rows_total
    assert len(result.examples) == len(GOOD)
    for ex, (findings, boxes, cats, patient) in zip(result.examples, GOOD):
        assert [f.name for f in ex.findings] == findings and ex.report is None  # structured: canonical target
        assert [b.label for b in ex.boxes] == [CATEGORIES[c] for c in cats]
        w, h = Image.open(ex.image_path).size
        for box, (x, y, bw, bh) in zip(ex.boxes, boxes):
            assert (box.x_min, box.y_min, box.x_max, box.y_max) == pytest.approx((x / w, y / h, (x + bw) / w, (y + bh) / h))
        assert ex.group_id == patient
    assert result.notes["boxes_skipped"] == {"box_outside": 1}
    assert result.notes["reports"] == {"structured": len(GOOD), "verbatim": 0}
