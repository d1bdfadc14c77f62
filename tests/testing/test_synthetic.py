import csv
import dataclasses
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray_train.testing import synthetic as S

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "data" / "samples"


def _film(seed, **kw):
    return S.generate_film(np.random.default_rng(seed), **kw)


def test_same_seed_same_bytes_different_seed_differs():
    a, b = _film(7, size=(96, 120)), _film(7, size=(96, 120))
    assert a.pixels.tobytes() == b.pixels.tobytes() and a.findings == b.findings
    c = _film(8, size=(96, 120))
    assert c.pixels.tobytes() != a.pixels.tobytes()
    boxes = lambda f: [x.box for x in f.findings]  # noqa: E731
    assert boxes(_film(1, n_findings=3, size=(96, 120))) != boxes(_film(2, n_findings=3, size=(96, 120)))


def test_bit_depths_and_shape():
    f16 = _film(3, size=(64, 80), bit_depth=16)
    assert f16.pixels.shape == (80, 64) and f16.pixels.dtype == np.uint16
    assert f16.pixels.max() < 4096 and f16.pixels.max() > 1024  # 12 significant bits, actually used
    f8 = _film(3, size=(64, 80), bit_depth=8)
    assert f8.pixels.dtype == np.uint8
    with pytest.raises(ValueError):
        _film(3, bit_depth=12)


@pytest.mark.parametrize("seed", range(12))
def test_each_box_contains_exactly_what_its_finding_changed(seed):
    spec = S.sample_spec(np.random.default_rng(seed), n_findings=3)
    size = (160, 200)
    base = S.render_film(dataclasses.replace(spec, findings=()), size).pixels.astype(int)
    for f in spec.findings:
        film = S.render_film(dataclasses.replace(spec, findings=(f,)), size)
        (drawn,) = film.findings
        assert drawn.label == f.kind
        diff = film.pixels.astype(int) - base
        ys, xs = np.nonzero(diff)
        assert len(xs) > 0, f
        b = drawn.box
        w, h = size
        # boxes are exact pixel edges; round() only removes float noise (0.56 * 200 = 112.00000000000001)
        x0, y0, x1, y1 = round(b.x_min * w), round(b.y_min * h), round(b.x_max * w), round(b.y_max * h)
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1, f
        # the box is tight: its edges are within 2 px of the changed pixels
        assert xs.min() - x0 <= 2 and x1 - 1 - xs.max() <= 2 and ys.min() - y0 <= 2 and y1 - 1 - ys.max() <= 2, f
        if f.kind in ("nodule", "mass"):
            y, x = np.unravel_index(np.argmax(diff), diff.shape)
            assert x0 <= x < x1 and y0 <= y < y1
        assert 0 <= b.x_min < b.x_max <= 1 and 0 <= b.y_min < b.y_max <= 1
    # with all findings, every changed pixel is inside some box
    film = S.render_film(spec, size)
    diff = film.pixels.astype(int) != base
    inside = np.zeros_like(diff)
    for d in film.findings:
        b = d.box
        w, h = size
        inside[round(b.y_min * h):round(b.y_max * h), round(b.x_min * w):round(b.x_max * w)] = True
    assert not (diff & ~inside).any()


def test_findings_land_where_the_label_says():
    for seed in range(30):
        for f in _film(seed, size=(100, 120), n_findings=3).findings:
            cx = (f.box.x_min + f.box.x_max) / 2
            if "loc right" in " ".join(f.locations) or f.locations == ("loc middle lobe",):
                assert cx < 0.5, f  # patient's right = image left
            if "loc left" in " ".join(f.locations) or f.locations == ("loc lingula",):
                assert cx > 0.5, f


def test_padchest_layout_has_the_real_schema(tmp_path):
    csv_path = S.write_padchest(tmp_path, n=14, seed=5)
    with csv_path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == S.PADCHEST_COLUMNS and len(rows[0]) == 36 and rows[0][0] == ""
    assert csv_path.read_text().startswith(",ImageID,ImageDir,")
    body = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert len(body) == 14
    for r in body:
        img = Image.open(tmp_path / "images" / r["ImageDir"] / r["ImageID"])
        assert img.mode == "I;16" and img.size == (int(r["Columns_DICOM"]), int(r["Rows_DICOM"]))
        assert r["ImageID"].startswith(r["StudyID"])
        nested = r["LabelsLocalizationsBySentence"].startswith("[[")
        assert nested == (r["MethodLabel"] == "Physician")
    assert {"L"} <= {r["Projection"] for r in body}
    assert len({r["PatientID"] for r in body}) < len({r["StudyID"] for r in body})


def test_indiana_layout_has_the_real_schema_and_exact_boxes(tmp_path):
    paths = S.write_indiana(tmp_path, n=10, seed=4)
    with paths["reports_csv"].open(newline="") as fh:
        reports = list(csv.DictReader(fh))
    with paths["projections_csv"].open(newline="") as fh:
        projections = list(csv.DictReader(fh))
    with paths["box_file"].open(newline="") as fh:
        boxes = list(csv.DictReader(fh))
    assert list(reports[0]) == S.INDIANA_REPORT_COLUMNS and list(projections[0]) == ["uid", "filename", "projection"]
    assert boxes and list(boxes[0]) == ["filename", "label", "x_min", "y_min", "x_max", "y_max"]
    assert {p["projection"] for p in projections} == {"Frontal", "Lateral"}
    mesh = {r["uid"]: r["MeSH"] for r in reports}
    for p in projections:
        img = Image.open(paths["image_root"] / p["filename"])
        assert img.mode == "L"
    for b in boxes:
        uid = next(p["uid"] for p in projections if p["filename"] == b["filename"])
        assert b["label"] in mesh[uid].lower()
        w, h = Image.open(paths["image_root"] / b["filename"]).size
        assert 0 <= int(b["x_min"]) < int(b["x_max"]) <= w and 0 <= int(b["y_min"]) < int(b["y_max"]) <= h


def _digest(folder: Path) -> dict[str, str]:
    # PNGs are compared by decoded pixels: zlib builds may differ in bytes, never in pixels.
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = np.asarray(Image.open(p)).tobytes() if p.suffix == ".png" else p.read_bytes()
            out[str(p.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def test_committed_samples_are_what_the_script_generates(tmp_path):
    spec = importlib.util.spec_from_file_location("make_sample_data", REPO / "scripts" / "make_sample_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.make_samples(tmp_path)
    for name in ("padchest", "indiana"):
        assert _digest(SAMPLES / name) == _digest(tmp_path / name), f"run scripts/make_sample_data.py ({name})"
