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
from xray_train.data.boxfile import find_image, image_size_or_reason, make_box, read_csv_table
from xray_train.data.records import Box, Example, Finding, ReadResult, SkipCounter

COLUMNS = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")
NO_FINDING = "no finding"
SUFFIXES = (".png", ".dicom", ".dcm")
LABEL_MAP = {"ild": "interstitial lung disease"}


def vindr_label(raw: str) -> str:
    text = raw.strip().lower()
    return LABEL_MAP.get(text, text)


def read(cfg: VindrData) -> ReadResult:
    rows = read_csv_table(cfg.csv, COLUMNS, "data.csv")
    skip = SkipCounter(cfg.csv, cfg.strict)
    box_skip = SkipCounter(cfg.csv, cfg.strict)
    by_image: dict[str, list[tuple[int, dict]]] = {}
    for row_no, row in rows:
        by_image.setdefault(row["image_id"], []).append((row_no, row))

    examples = []
    for image_id, group in by_image.items():
        first_row = group[0][0]
        if not image_id:
            skip("empty_image_id", first_row)
            continue
        path, reason = find_image(cfg.image_root, image_id, SUFFIXES)
        if path is None:
            skip(reason, first_row, image_id)
            continue
        abnormal = [(n, r) for n, r in group if vindr_label(r["class_name"]) != NO_FINDING]
        boxes: list[Box] = []
        if abnormal:
            size, reason = image_size_or_reason(path)
            if size is None:
                skip(reason, first_row, str(path))
                continue
            per_reader: dict[str, list[Box]] = {}
            for row_no, row in abnormal:
                box, why = make_box(
                    vindr_label(row["class_name"]),
                    *(row[c] or "nan" for c in ("x_min", "y_min", "x_max", "y_max")),
                    *size,
                )
                if box is None:
                    box_skip(why, row_no, image_id)
                    continue
                reader_boxes = per_reader.setdefault(row.get("rad_id", ""), [])
                if box not in reader_boxes:
                    reader_boxes.append(box)
            if not per_reader:
                skip("no_valid_box", first_row, image_id)
                continue
            best = min(per_reader, key=lambda rad: (-len(per_reader[rad]), rad))
            boxes = per_reader[best]
        labels = list(dict.fromkeys(b.label for b in boxes))
        examples.append(
            Example(
                image_path=path,
                image_id=path.name,
                group_id=image_id,
                findings=[Finding(lb) for lb in labels],
                boxes=boxes,
                source_row=first_row,
            )
        )
    return ReadResult(
        examples=examples,
        rows_total=len(by_image),
        skipped=skip.counts,
        first_skipped=skip.first,
        notes={
            "csv_rows": len(rows),
            "boxes_skipped": dict(box_skip.counts),
            "radiologist_merge": "per image, all boxes of the radiologist with the most valid boxes",
        },
    )
