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
from xray_train.data.boxfile import csv_rows, image_size_or_reason, make_box, read_text
from xray_train.data.records import Box, Example, Finding, ReadResult, SkipCounter, resolve_under
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
    skip = SkipCounter(cfg.csv, cfg.strict)
    box_skip = SkipCounter(cfg.csv, cfg.strict)
    by_image: dict[str, list[tuple[int, list[str]]]] = {}
    for row_no, fields in rows:
        by_image.setdefault(fields[0].strip(), []).append((row_no, fields))

    examples = []
    for name, group in by_image.items():
        first_row = group[0][0]
        if not name:
            skip("empty_image_index", first_row)
            continue
        path = resolve_under(cfg.image_root, name)
        if path is None:
            skip("path_escape", first_row, name)
            continue
        if not path.is_file():
            skip("missing_image", first_row, str(path))
            continue
        size, reason = image_size_or_reason(path)
        if size is None:
            skip(reason, first_row, str(path))
            continue
        boxes: list[Box] = []
        for row_no, fields in group:
            fields = (fields + [""] * 6)[:6]
            label = nih_label(fields[1])
            try:
                x, y, w, h = (float(v) for v in fields[2:6])
            except ValueError:
                box_skip("box_nan", row_no, name)
                continue
            box, why = make_box(label, x, y, x + w, y + h, *size)
            if box is None:
                box_skip(why, row_no, name)
            elif box not in boxes:
                boxes.append(box)
        if not boxes:
            skip("no_valid_box", first_row, name)
            continue
        labels = list(dict.fromkeys(b.label for b in boxes))
        examples.append(
            Example(
                image_path=path,
                image_id=name,
                group_id=patient_id(name),
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
        notes={"csv_rows": len(rows), "boxes_skipped": dict(box_skip.counts)},
    )
