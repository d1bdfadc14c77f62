"""Property tests: no CSV row or image file, however broken, crashes a reader.

Every reader gets tables built from hostile cells (broken list syntax, NaN/inf/negative/huge numbers,
inverted and out-of-image boxes, path escapes, empty and odd unicode text) pointing at hostile images
(zero-byte, truncated, 1x1, a header claiming a gigapixel image), written with or without a BOM.
Each row must end up either as a valid example or counted under a skip reason, so that
``len(examples) + sum(skipped) == rows_total``; whole-file problems (not UTF-8) must be a one-line
``DataError`` naming the file. Anything else (an unhandled exception) fails the test.
"""

from __future__ import annotations

import csv
import io
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from xray_train.config import data_config
from xray_train.data import indiana, nih, padchest, rsna, vindr
from xray_train.data.boxfile import read_box_file
from xray_train.errors import DataError

SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.arange(width * height) % 251).astype(np.uint8).reshape(height, width)).save(buf, "PNG")
    return buf.getvalue()


def _claims_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with an IHDR that claims another size (a decompression bomb's header)."""
    ihdr = bytearray(png[8:33])  # length(4) type(4) data(13) crc(4)
    ihdr[8:16] = struct.pack(">II", width, height)
    ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])))
    return png[:8] + bytes(ihdr) + png[33:]


#: image stem -> file bytes. Stems double as uids / patient ids / image ids in the tables.
IMAGES = {
    "good_a": _png_bytes(64, 48),
    "good_b": _png_bytes(40, 90),
    "tiny": _png_bytes(1, 1),
    "thin": _png_bytes(1, 300),
    "zero": b"",
    "truncated": _png_bytes(64, 64)[:60],
    "not_png": b"this is a text file, not an image\n",
    "bomb": _claims_size(_png_bytes(8, 8), 100_000, 100_000),
}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for stem, data in IMAGES.items():
        (root / f"{stem}.png").write_bytes(data)
    (root / "0").mkdir()
    (root / "0" / "good_a.png").write_bytes(IMAGES["good_a"])
    # A file outside the root that escaping paths would reach.
    (root.parent / "outside.png").write_bytes(IMAGES["good_a"])
    return root


STEMS = [*IMAGES, "missing", "../outside", "/etc/passwd", "..", "", " good_a ", "0/../good_a"]
stems = st.sampled_from(STEMS)
junk = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
numbers = st.one_of(
    st.sampled_from(["", "nan", "NaN", "inf", "-inf", "-5", "0", "1e9", "0x10", "1,5", " 7 "]),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
    st.integers(-50, 2000).map(str),
)
list_cells = st.one_of(
    st.sampled_from([
        "['nodule']", "['normal']", "['unchanged']", "['exclude']", "[]", "['']", "nan", "", "None",
        "['nodule', 'loc left']", "['nodule'", "nodule]", "[['a'], 'b']", "[1, 2]", "['a' 'b']", "{'a': 1}",
        "[" * 300 + "]" * 300, "['\u00e9panchement']", "__import__('os')", "['a', nan]", "[None]",
    ]),
    junk,
)


def _write_csv(path: Path, header: list[str], rows: list[list[str]], bom: bool, latin1: bool) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    if bom:
        data = b"\xef\xbb\xbf" + data
    if latin1 and rows:
        data += "caf\u00e9".encode("latin-1") + b"," * (len(header) - 1) + b"\n"  # 0xe9: invalid UTF-8
    path.write_bytes(data)


def _rows_accounted(result) -> None:
    assert len(result.examples) + sum(result.skipped.values()) == result.rows_total, result.skipped


def _paths_inside(result, root: Path) -> None:
    for ex in result.examples:
        assert ex.image_path.resolve().is_relative_to(root.resolve()), ex.image_path
        assert ex.image_path.is_file()
        for box in ex.boxes or []:
            assert 0.0 <= box.x_min < box.x_max <= 1.0 and 0.0 <= box.y_min < box.y_max <= 1.0, box


def _check(read, root: Path, latin1: bool):
    """Run a reader: it must account for every row or, for a non-UTF-8 file only, refuse it clearly."""
    try:
        result = read()
    except DataError as exc:
        assert latin1, f"unexpected DataError: {exc}"
        assert "\n" not in str(exc) and ".csv" in str(exc)
        return None
    _rows_accounted(result)
    _paths_inside(result, root)
    return result


def _tmpdir(root: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=root.parent))


# ---------------------------------------------------------------------------------------------
# PadChest

PADCHEST_HEADER = ["", *padchest.REQUIRED_COLUMNS, "StudyID"]


@SETTINGS
@given(
    rows=st.lists(
        st.tuples(stems, st.sampled_from(["", "0", "nan", "..", "/"]), st.sampled_from(["PA", "AP", "L", ""]),
                  st.sampled_from(["Physician", "RNN_model", ""]), st.sampled_from(["No", "PED", ""]),
                  list_cells, list_cells, junk),
        max_size=8,
    ),
    layout=st.sampled_from(["auto", "flat", "nested"]),
    bom=st.booleans(),
    latin1=st.booleans(),
)
def test_padchest_reader_never_crashes(image_root, rows, layout, bom, latin1):
    table = [
        [str(i), f"{stem}.png" if stem else "", image_dir, junk_id, projection, method, ped, labels, sentences, junk_id]
        for i, (stem, image_dir, projection, method, ped, labels, sentences, junk_id) in enumerate(rows)
    ]
    path = _tmpdir(image_root) / "padchest.csv"
    _write_csv(path, PADCHEST_HEADER, table, bom, latin1)
    cfg = data_config(dataset="padchest", csv=path, image_root=image_root, image_layout=layout)
    result = _check(lambda: padchest.read(cfg), image_root, latin1)
    if result is not None:  # pandas decodes the stray latin-1 line leniently: one more row, accounted for
        assert result.rows_total == len(rows) + (latin1 and bool(rows))


# ---------------------------------------------------------------------------------------------
# Indiana (+ box file)


@SETTINGS
@given(
    projections=st.lists(st.tuples(st.sampled_from(["1", "2", "", "9"]), stems,
                                   st.sampled_from(["Frontal", "Lateral", "", "PA"])), max_size=8),
    mesh=st.lists(st.one_of(st.sampled_from(["normal", "No Indexing", "", "Cardiomegaly/mild",
                                             "Opacity/lung/base/left", "Nodule/right;Effusion/bilateral"]), junk),
                  min_size=2, max_size=2),
    boxes=st.lists(st.tuples(stems, junk, numbers, numbers, numbers, numbers), max_size=8),
    box_source=st.sampled_from(["mesh_atlas", "box_file"]),
    coords=st.sampled_from(["pixels", "normalized"]),
    bom=st.booleans(),
    latin1=st.booleans(),
)
def test_indiana_reader_never_crashes(image_root, projections, mesh, boxes, box_source, coords, bom, latin1):
    d = _tmpdir(image_root)
    _write_csv(d / "reports.csv", ["uid", "MeSH", "Problems"], [["1", mesh[0], ""], ["2", mesh[1], ""]], bom, False)
    _write_csv(d / "projections.csv", ["uid", "filename", "projection"],
               [[uid, f"{stem}.png" if stem else "", proj] for uid, stem, proj in projections], False, latin1)
    _write_csv(d / "boxes.csv", ["filename", "label", "x_min", "y_min", "x_max", "y_max"],
               [[f"{stem}.png", label, *vals] for stem, label, *vals in boxes], bom, False)
    cfg = data_config(
        dataset="indiana", reports_csv=d / "reports.csv", projections_csv=d / "projections.csv",
        image_root=image_root, box_source=box_source, box_file=d / "boxes.csv", box_coords=coords,
        projections=["Frontal"],
    )
    result = _check(lambda: indiana.read(cfg), image_root, latin1)
    if result is not None:
        # A row whose every cell is empty is a blank line (spreadsheet exports write ",,"), not a record.
        blank = sum(1 for uid, stem, proj in projections if not (uid or stem or proj))
        assert result.rows_total == len(projections) - blank


@SETTINGS
@given(boxes=st.lists(st.tuples(stems, junk, numbers, numbers, numbers, numbers), max_size=10),
       key=st.sampled_from(["filename", "uid"]), bom=st.booleans(), latin1=st.booleans())
def test_box_file_never_crashes(image_root, boxes, key, bom, latin1):
    path = _tmpdir(image_root) / "boxes.csv"
    _write_csv(path, [key, "label", "x_min", "y_min", "x_max", "y_max"],
               [[stem, label, *vals] for stem, label, *vals in boxes], bom, latin1)
    try:
        bf = read_box_file(path)
    except DataError:
        assert latin1
        return
    kept = sum(len(v) for v in bf.by_key.values())
    assert kept + sum(bf.skipped.values()) == bf.rows_total == len(boxes)
    for k in bf.by_key:
        for box in bf.boxes_for(k, 64, 48):
            assert 0.0 <= box.x_min < box.x_max <= 1.0 and 0.0 <= box.y_min < box.y_max <= 1.0


# ---------------------------------------------------------------------------------------------
# NIH, VinDr, RSNA


@SETTINGS
@given(rows=st.lists(st.tuples(stems, junk, numbers, numbers, numbers, numbers), max_size=10),
       bom=st.booleans(), latin1=st.booleans())
def test_nih_reader_never_crashes(image_root, rows, bom, latin1):
    path = _tmpdir(image_root) / "bbox.csv"
    _write_csv(path, ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", ""],
               [[f"{stem}.png" if stem else "", label, *vals, "", ""] for stem, label, *vals in rows], bom, latin1)
    cfg = data_config(dataset="nih", csv=path, image_root=image_root)
    _check(lambda: nih.read(cfg), image_root, latin1)


@SETTINGS
@given(rows=st.lists(st.tuples(stems, st.one_of(st.just("No finding"), junk), st.sampled_from(["R1", "R2", ""]),
                               numbers, numbers, numbers, numbers), max_size=10),
       bom=st.booleans(), latin1=st.booleans())
def test_vindr_reader_never_crashes(image_root, rows, bom, latin1):
    path = _tmpdir(image_root) / "train.csv"
    _write_csv(path, ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"],
               [[stem, name, "0", rad, *vals] for stem, name, rad, *vals in rows], bom, latin1)
    cfg = data_config(dataset="vindr", csv=path, image_root=image_root)
    _check(lambda: vindr.read(cfg), image_root, latin1)


@SETTINGS
@given(rows=st.lists(st.tuples(stems, numbers, numbers, numbers, numbers, st.sampled_from(["0", "1", "", "2"])),
                     max_size=10),
       bom=st.booleans(), latin1=st.booleans())
def test_rsna_reader_never_crashes(image_root, rows, bom, latin1):
    path = _tmpdir(image_root) / "labels.csv"
    _write_csv(path, ["patientId", "x", "y", "width", "height", "Target"], [list(r) for r in rows], bom, latin1)
    cfg = data_config(dataset="rsna", csv=path, image_root=image_root)
    _check(lambda: rsna.read(cfg), image_root, latin1)


# ---------------------------------------------------------------------------------------------
# Path escapes, one explicit case per reader (the property tests above also draw them)

ESCAPES = ["../outside.png", "/etc/passwd", "0/../../outside.png"]


def test_padchest_rejects_escaping_paths(image_root):
    path = _tmpdir(image_root) / "p.csv"
    rows = [[str(i), name, "", "pat", "PA", "Physician", "No", "['nodule']", "[]", "s"] for i, name in enumerate(ESCAPES)]
    rows.append(["9", "good_a.png", "", "pat", "PA", "Physician", "No", "['nodule']", "[]", "s"])
    _write_csv(path, PADCHEST_HEADER, rows, False, False)
    result = padchest.read(data_config(dataset="padchest", csv=path, image_root=image_root, image_layout="flat"))
    assert [ex.image_id for ex in result.examples] == ["good_a.png"]
    assert result.skipped["path_escape"] == len(ESCAPES)


def test_indiana_rejects_escaping_paths(image_root):
    d = _tmpdir(image_root)
    _write_csv(d / "r.csv", ["uid", "MeSH"], [["1", "normal"]], False, False)
    _write_csv(d / "p.csv", ["uid", "filename", "projection"], [["1", n, "Frontal"] for n in ESCAPES], False, False)
    cfg = data_config(dataset="indiana", reports_csv=d / "r.csv", projections_csv=d / "p.csv", image_root=image_root)
    result = indiana.read(cfg)
    assert result.examples == [] and result.skipped["path_escape"] == len(ESCAPES)


@pytest.mark.parametrize("reader,header,row", [
    (nih, ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"], lambda n: [n, "Mass", "1", "1", "5", "5"]),
    (vindr, ["image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max"],
     lambda n: [n.removesuffix(".png"), "Nodule", "R1", "1", "1", "5", "5"]),
    (rsna, ["patientId", "x", "y", "width", "height", "Target"],
     lambda n: [n.removesuffix(".png"), "1", "1", "5", "5", "1"]),
])
def test_box_readers_reject_escaping_paths(image_root, reader, header, row):
    path = _tmpdir(image_root) / "t.csv"
    _write_csv(path, header, [row(n) for n in ESCAPES], False, False)
    result = reader.read(data_config(dataset=reader.__name__.rsplit(".", 1)[-1], csv=path, image_root=image_root))
    assert result.examples == []
    assert result.skipped["path_escape"] == len(ESCAPES)
