"""RSNA Pneumonia Detection boxes (``stage_2_train_labels.csv``) as Phase-2 data.

Columns ``patientId,x,y,width,height,Target``: ``Target`` 1 rows carry one box each (top-left x, y and
size in pixels of the 1024x1024 image; a patient may have several rows), ``Target`` 0 rows have empty
coordinates and mean no lung opacity -> an example with no boxes. Boxes are labelled ``pneumonia`` (RSNA's
"lung opacity" suggestive of pneumonia). Images are ``{patientId}.dcm`` or ``.png`` (first found); sizes
come from the image header (read only for images with boxes).

One Example per patient image: ``rows_total`` counts distinct patientIds, ``notes["csv_rows"]`` the lines,
``notes["boxes_skipped"]`` invalid boxes. A patient with Target 1 but no valid box is skipped
(``no_valid_box``). ``group_id`` is the patientId (one image per patient).
"""

from __future__ import annotations

from xray_train.config import RsnaData
from xray_train.data.boxfile import find_image, image_size_or_reason, make_box, read_csv_table
from xray_train.data.records import Box, Example, Finding, ReadResult, SkipCounter

COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
LABEL = "pneumonia"
SUFFIXES = (".dcm", ".png")


def read(cfg: RsnaData) -> ReadResult:
    rows = read_csv_table(cfg.csv, COLUMNS, "data.csv")
    skip = SkipCounter(cfg.csv, cfg.strict)
    box_skip = SkipCounter(cfg.csv, cfg.strict)
    by_patient: dict[str, list[tuple[int, dict]]] = {}
    for row_no, row in rows:
        by_patient.setdefault(row["patientId"], []).append((row_no, row))

    examples = []
    for pid, group in by_patient.items():
        first_row = group[0][0]
        if not pid:
            skip("empty_patient_id", first_row)
            continue
        targets = {r["Target"] for _, r in group}
        if not targets <= {"0", "1"}:
            skip("bad_target", first_row, f"patientId={pid} Target={sorted(targets)}")
            continue
        path, reason = find_image(cfg.image_root, pid, SUFFIXES)
        if path is None:
            skip(reason, first_row, pid)
            continue
        positive = [(n, r) for n, r in group if r["Target"] == "1"]
        boxes: list[Box] = []
        if positive:
            size, reason = image_size_or_reason(path)
            if size is None:
                skip(reason, first_row, str(path))
                continue
            for row_no, row in positive:
                try:
                    x, y, w, h = (float(row[c] or "nan") for c in ("x", "y", "width", "height"))
                except ValueError:
                    box_skip("box_nan", row_no, pid)
                    continue
                box, why = make_box(LABEL, x, y, x + w, y + h, *size)
                if box is None:
                    box_skip(why, row_no, pid)
                elif box not in boxes:
                    boxes.append(box)
            if not boxes:
                skip("no_valid_box", first_row, pid)
                continue
        examples.append(
            Example(
                image_path=path,
                image_id=path.name,
                group_id=pid,
                findings=[Finding(LABEL)] if boxes else [],
                boxes=boxes,
                source_row=first_row,
            )
        )
    return ReadResult(
        examples=examples,
        rows_total=len(by_patient),
        skipped=skip.counts,
        first_skipped=skip.first,
        notes={"csv_rows": len(rows), "boxes_skipped": dict(box_skip.counts)},
    )
