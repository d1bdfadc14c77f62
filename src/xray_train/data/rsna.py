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
from xray_train.data.boxfile import BoxedExamples, RawBox, read_csv_table, xywh_corners
from xray_train.data.records import ReadResult

COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
LABEL = "pneumonia"
SUFFIXES = (".dcm", ".png")


def read(cfg: RsnaData) -> ReadResult:
    rows = read_csv_table(cfg.csv, COLUMNS, "data.csv")
    out = BoxedExamples(cfg.csv, cfg.strict)
    for pid, first_row, group in out.groups(rows, lambda row: row["patientId"], "empty_patient_id"):
        targets = {r["Target"] for _, r in group}
        if not targets <= {"0", "1"}:
            out.skip("bad_target", first_row, f"patientId={pid} Target={sorted(targets)}")
            continue
        path = out.locate(cfg.image_root, pid, first_row, SUFFIXES)
        if path is None:
            continue
        raw = [
            RawBox(LABEL, *xywh_corners(*(r[c] for c in ("x", "y", "width", "height"))), row=n)
            for n, r in group if r["Target"] == "1"
        ]
        out.add(path, raw, row=first_row, image_id=path.name, group_id=pid, key=pid)
    return out.result(csv_rows=len(rows))
