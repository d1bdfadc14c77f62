"""NIH ChestX-ray14 boxes (``BBox_List_2017.csv``) as Phase-2 data.

The file's header is ``Image Index,Finding Label,Bbox [x,y,w,h],,,``: the bracketed name itself contains
commas, so the table is read positionally (first six fields, trailing empty ones ignored) after checking
the first two names and that a ``Bbox`` column follows. ``x, y`` are the top-left corner, ``w, h`` the size,
in pixels of the 1024x1024 PNG; each image's real header size is used for normalisation all the same.

One Example per image (several lines may box the same image): ``rows_total`` counts distinct images and
``notes["csv_rows"]`` the lines. Every image in this file is abnormal, so an image whose boxes are all
invalid is skipped (``no_valid_box``) instead of becoming a "no localisable finding" example. Invalid boxes
are counted in ``notes["boxes_skipped"]``.

``group_id`` is the patient id parsed from NIH's ``{patient:08d}_{followup:03d}.png`` name: this file has
no patient column and that naming is NIH's documented scheme (the only reader allowed to parse names).
Labels are lower-cased and mapped to PadChest's wording where they differ (``Effusion`` ->
``pleural effusion``, ``Infiltrate``/``Infiltration`` -> ``infiltrates``).
"""

from __future__ import annotations

from pathlib import Path

from xray_train.config import NihData
from xray_train.data.boxfile import BoxedExamples, RawBox, csv_rows, read_text, xywh_corners
from xray_train.data.records import ReadResult
from xray_train.errors import DataError

LABEL_MAP = {"effusion": "pleural effusion", "infiltrate": "infiltrates", "infiltration": "infiltrates"}


def nih_label(raw: str) -> str:
    text = raw.strip().lower()
    return LABEL_MAP.get(text, text)


def patient_id(image_index: str) -> str:
    """``00013118_008.png`` -> ``00013118``; a name without ``_`` is its own group."""
    stem = Path(image_index).stem
    return stem.split("_", 1)[0] if "_" in stem else stem


def _read_rows(path: Path) -> list[tuple[int, list[str]]]:
    if path is None:
        raise DataError("data.csv: required for data.dataset=nih (BBox_List_2017.csv)")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.csv not found: {path}")
    with read_text(path) as fh:
        reader = csv_rows(path, fh)
        header = [h.strip() for h in next(reader, [])]
        for i, name in enumerate(("Image Index", "Finding Label")):
            if len(header) <= i or header[i] != name:
                raise DataError(f"{path}: missing column {name!r}")
        if len(header) < 3 or not header[2].startswith("Bbox"):
            raise DataError(f"{path}: missing column 'Bbox [x,y,w,h]'")
        return [(n, f) for n, f in enumerate(reader, start=2) if any(x.strip() for x in f)]


def read(cfg: NihData) -> ReadResult:
    rows = _read_rows(cfg.csv)
    out = BoxedExamples(cfg.csv, cfg.strict)
    for name, first_row, group in out.groups(rows, lambda fields: fields[0].strip(), "empty_image_index"):
        path = out.locate(cfg.image_root, name, first_row)
        if path is None:
            continue
        raw = [
            RawBox(nih_label(fields[1]), *xywh_corners(*fields[2:6]), row=row_no)
            for row_no, fields in ((n, (f + [""] * 6)[:6]) for n, f in group)
        ]
        # Every image of this file is abnormal: all its boxes invalid is no_valid_box, never a normal example.
        out.add(path, raw, row=first_row, image_id=name, group_id=patient_id(name), key=name)
    return out.result(csv_rows=len(rows))
