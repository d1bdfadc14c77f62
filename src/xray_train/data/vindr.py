"""VinDr-CXR boxes (``train.csv``) as Phase-2 data.

Columns ``image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max``; coordinates are pixels of the
original DICOM. Images are ``{image_id}.png``, ``.dicom`` or ``.dcm`` under ``data.image_root`` (first
found, in that order). Boxes are normalised with the found file's header size, so a PNG must be a full-
resolution conversion: a downscaled PNG set would put boxes outside the image (counted ``box_outside``).

Several radiologists (usually 3) annotate each training image, independently, so their boxes overlap and
disagree. Merge rule, deliberately simple: **keep all boxes of one radiologist per image, the one who drew
the most valid boxes** (ties: the smallest ``rad_id`` in text order). One reader's boxes are internally
consistent (no triple-stacked duplicates for the model to imitate), and taking the most thorough reader
favours sensitivity. An image where no radiologist drew a box (all ``No finding``) is an example with no
boxes. When ``rad_id`` is absent (e.g. a consensus file) all rows count as one reader.

One Example per image: ``rows_total`` counts distinct images, ``notes["csv_rows"]`` the lines, and
``notes["boxes_skipped"]`` the boxes that failed validation (whoever drew them). An image with findings
but no valid box is skipped (``no_valid_box``).
``group_id`` is the image id: VinDr publishes no patient id and has one image per study.
"""

from __future__ import annotations

from xray_train.config import VindrData
from xray_train.data.boxfile import BoxedExamples, RawBox, numbers, read_csv_table
from xray_train.data.records import ReadResult

COLUMNS = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")
NO_FINDING = "no finding"
SUFFIXES = (".png", ".dicom", ".dcm")
LABEL_MAP = {"ild": "interstitial lung disease"}


def vindr_label(raw: str) -> str:
    text = raw.strip().lower()
    return LABEL_MAP.get(text, text)


def read(cfg: VindrData) -> ReadResult:
    rows = read_csv_table(cfg.csv, COLUMNS, "data.csv")
    out = BoxedExamples(cfg.csv, cfg.strict)
    for image_id, first_row, group in out.groups(rows, lambda row: row["image_id"], "empty_image_id"):
        path = out.locate(cfg.image_root, image_id, first_row, SUFFIXES)
        if path is None:
            continue
        raw = [
            RawBox(vindr_label(r["class_name"]), *numbers(*(r[c] for c in ("x_min", "y_min", "x_max", "y_max"))),
                   row=n, reader=r.get("rad_id", ""))
            for n, r in group if vindr_label(r["class_name"]) != NO_FINDING
        ]
        out.add(path, raw, row=first_row, image_id=path.name, group_id=image_id, key=image_id)
    return out.result(csv_rows=len(rows),
        radiologist_merge="per image, all boxes of the radiologist with the most valid boxes",
    )
