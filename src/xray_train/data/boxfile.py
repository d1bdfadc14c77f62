"""User box files and the box validation every box reader shares.

A box file is a CSV with a header ``filename,label,x_min,y_min,x_max,y_max`` (one box per row) or
``uid,label,...`` where a uid means "every selected image of that study". Coordinates are
``"pixels"`` of the ORIGINAL image (continuous edges: a box covering pixel columns 10..19 is
``x_min=10, x_max=20``) or ``"normalized"`` 0-1 values. Extra columns are ignored.

``make_box`` is the single place where a raw box becomes a ``Box`` normalised to the original image, or
is rejected with a reason (``box_nan``, ``box_inverted``, ``box_zero_area``, ``box_outside``). Boxes that
stick out of the image by at most ``EDGE_TOLERANCE`` (of the side) are clipped, since annotation tools
commonly overshoot by a pixel or two; beyond that the box is wrong for this image (e.g. drawn on a
different resolution) and is rejected.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xray_train.data.records import Box, Example, Finding, ReadResult, SkipCounter, resolve_under
from xray_train.errors import DataError

#: How far (fraction of width/height) a box may exceed the image before it is rejected instead of clipped.
EDGE_TOLERANCE = 0.02

BOX_COLUMNS = ("label", "x_min", "y_min", "x_max", "y_max")


def make_box(
    label: str,
    x_min: float,
    y_min: float,
    x_max: float,
    y_max: float,
    width: float = 1.0,
    height: float = 1.0,
) -> tuple[Box | None, str]:
    """Raw corners in units of (width, height) -> (Box normalised to [0, 1], "") or (None, reason).

    Pass width=height=1 for coordinates that are already normalised.
    """
    try:
        vals = [float(v) for v in (x_min, y_min, x_max, y_max)]
    except (TypeError, ValueError):
        return None, "box_nan"
    if any(math.isnan(v) or math.isinf(v) for v in vals):
        return None, "box_nan"
    if not (width > 0 and height > 0):
        return None, "box_outside"
    x0, y0, x1, y1 = vals[0] / width, vals[1] / height, vals[2] / width, vals[3] / height
    if x1 < x0 or y1 < y0:
        return None, "box_inverted"
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None, "box_zero_area"
    tol = EDGE_TOLERANCE
    if x0 < -tol or y0 < -tol or x1 > 1 + tol or y1 > 1 + tol:
        return None, "box_outside"
    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(1.0, x1), min(1.0, y1)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None, "box_outside"
    return Box(label.strip(), x0, y0, x1, y1), ""


@dataclass(frozen=True)
class RawBox:
    """One box row, corner coordinates as written (pixels or normalised)."""

    label: str
    x_min: float
    y_min: float
    x_max: float
    y_max: float
    row: int
    #: Who drew it, where the source says (VinDr's rad_id); "" otherwise.
    reader: str = ""


@dataclass
class BoxFile:
    """A parsed box file: rows grouped by key (a file name or a study uid)."""

    path: Path
    key_column: str  # "filename" or "uid"
    coords: str  # "pixels" or "normalized"
    by_key: dict[str, list[RawBox]] = field(default_factory=dict)
    rows_total: int = 0
    #: Rows unusable before any image is known (empty key/label, non-numeric coordinates).
    skipped: Counter = field(default_factory=Counter)

    def boxes_for(
        self, key: str, width: float | None, height: float | None, counter: SkipCounter | None = None
    ) -> list[Box]:
        """Validated, normalised boxes of one key; invalid ones are counted in ``counter`` by reason.

        ``width``/``height`` are the original image's size (ignored for normalised files).
        """
        out = []
        for raw in self.by_key.get(key, []):
            w, h = (1.0, 1.0) if self.coords == "normalized" else (width or 0.0, height or 0.0)
            box, reason = make_box(raw.label, raw.x_min, raw.y_min, raw.x_max, raw.y_max, w, h)
            if box is None:
                if counter is not None:
                    counter(reason, raw.row, f"{self.key_column}={key}")
                continue
            if box not in out:
                out.append(box)
        return out


def read_text(path: Path) -> io.StringIO:
    """A CSV file's text (UTF-8, optional BOM) ready for ``csv.reader``. Not UTF-8 -> a DataError naming
    the file and line: guessing another encoding would silently garble file names and labels."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save it as UTF-8") from None
    return io.StringIO(text, newline="")


def csv_rows(path: Path, fh):
    """``csv.reader`` whose format errors (e.g. a field over the csv module's size limit) name the file."""
    reader = csv.reader(fh)
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path} line {reader.line_num}: malformed CSV ({exc})") from None


def read_box_file(path: Path, coords: str = "pixels", strict: bool = False) -> BoxFile:
    """Parse a box file; missing file or columns -> DataError; bad rows counted (or raised if strict)."""
    path = Path(path)
    if coords not in {"pixels", "normalized"}:
        raise DataError(f"{path}: box coordinates must be 'pixels' or 'normalized', not {coords!r}")
    if not path.is_file():
        raise DataError(f"box file not found: {path}")
    counter = SkipCounter(path, strict)
    with read_text(path) as fh:
        rows = csv_rows(path, fh)
        header = [h.strip() for h in next(rows, [])]
        key_column = "filename" if "filename" in header else "uid" if "uid" in header else None
        if key_column is None:
            raise DataError(f"{path}: missing column 'filename' (or 'uid')")
        for col in BOX_COLUMNS:
            if col not in header:
                raise DataError(f"{path}: missing column {col!r}")
        result = BoxFile(path, key_column, coords)
        for row_no, fields in enumerate(rows, start=2):  # header is line 1
            if not fields:
                continue  # an empty line, as csv.DictReader skips it
            row = dict(zip(header, fields))
            result.rows_total += 1
            key = (row.get(key_column) or "").strip()
            label = (row.get("label") or "").strip()
            if not key:
                counter("empty_key", row_no)
                continue
            if not label:
                counter("empty_label", row_no, f"{key_column}={key}")
                continue
            try:
                vals = [float((row.get(c) or "").strip()) for c in BOX_COLUMNS[1:]]
            except ValueError:
                counter("box_nan", row_no, f"{key_column}={key}")
                continue
            result.by_key.setdefault(key, []).append(RawBox(label, *vals, row=row_no))
    result.skipped = counter.counts
    return result


# ---------------------------------------------------------------------------------------------
# Helpers shared by the box-source readers (indiana, nih, vindr, rsna, hf)


def read_csv_table(path: Path | None, required: tuple[str, ...], what: str) -> list[tuple[int, dict]]:
    """Rows of a headed CSV as (line number, {column: stripped text}); DataError if the file or a column
    is missing. Parsed with the csv module (not pandas) so ids like ``0001`` keep their leading zeros."""
    if path is None:
        raise DataError(f"{what}: required for this dataset")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    with read_text(path) as fh:
        reader = csv_rows(path, fh)
        header = [h.strip() for h in next(reader, [])]
        for col in required:
            if col not in header:
                raise DataError(f"{path}: missing column {col!r}")
        index = {name: i for i, name in enumerate(header) if name}
        rows = []
        for line_no, fields in enumerate(reader, start=2):
            if not any(f.strip() for f in fields):
                continue  # blank line, e.g. a trailing newline pair
            rows.append((line_no, {k: (fields[i].strip() if i < len(fields) else "") for k, i in index.items()}))
    return rows


def image_size_or_reason(path: Path) -> tuple[tuple[int, int] | None, str]:
    """(width, height) from the image header, or (None, "unreadable_image")."""
    from xray_train.data import images
    from xray_train.errors import XrayTrainError

    try:
        return images.read_image_size(path), ""
    except XrayTrainError:
        return None, "unreadable_image"


def find_image(root: Path, stem: str, suffixes: tuple[str, ...] = ("",)) -> tuple[Path | None, str]:
    """The first existing ``root/stem+suffix``; (None, "path_escape") or (None, "missing_image")."""
    for suffix in suffixes:
        path = resolve_under(root, stem + suffix)
        if path is None:
            return None, "path_escape"
        if path.is_file():
            return path, ""
    return None, "missing_image"


def grouped(rows: list[tuple[int, Any]], key: Callable[[Any], str]) -> dict[str, list[tuple[int, Any]]]:
    """Table rows by image (or patient) key, in first-seen order: several lines may box one image."""
    groups: dict[str, list[tuple[int, Any]]] = {}
    for row_no, row in rows:
        groups.setdefault(key(row), []).append((row_no, row))
    return groups


def numbers(*values) -> tuple[float, ...]:
    """Table cells as floats; a cell that is no number becomes NaN (``make_box`` counts it as box_nan)."""
    def num(value) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan

    return tuple(num(v) for v in values)


def xywh_corners(x, y, w, h) -> tuple[float, float, float, float]:
    """Top-left corner and size -> corners (NaN where a cell is no number)."""
    x, y, w, h = numbers(x, y, w, h)
    return x, y, x + w, y + h


class BoxedExamples:
    """The skeleton every box table's reader shares (NIH, VinDr, RSNA, Hugging Face sets): one Example per
    image, its raw boxes normalised with the image's header size and validated by ``make_box``.

    Rows that can't be used are counted by reason in ``skip`` (invalid boxes in ``box_skip``, reported as
    ``notes["boxes_skipped"]``). Boxes are grouped by ``RawBox.reader`` (the annotator, where the source names
    one) and the annotator who drew the most valid boxes is kept (ties: the smallest id in text order): with
    one annotator per image, that is every box. An image with raw boxes of which none is valid is skipped
    (``no_valid_box``) rather than taught to say "no localisable finding"; an image with no raw box is a
    normal example. Findings are the boxes' labels in first-seen order.
    """

    def __init__(self, source: Path | str, strict: bool):
        self.skip = SkipCounter(source, strict)
        self.box_skip = SkipCounter(source, strict)
        self.examples: list[Example] = []
        self.rows_total = 0

    def groups(self, rows: list[tuple[int, Any]], key: Callable[[Any], str], empty_reason: str):
        """``(key, first row, rows)`` per image, in first-seen order; the rows without a key are counted once
        as ``empty_reason``. Each group is one row of ``rows_total``."""
        by_key = grouped(rows, key)
        self.rows_total = len(by_key)
        for name, group in by_key.items():
            if not name:
                self.skip(empty_reason, group[0][0])
                continue
            yield name, group[0][0], group

    def locate(self, root: Path, stem: str, row: int, suffixes: tuple[str, ...] = ("",)) -> Path | None:
        """The image file ``root/stem+suffix`` (first found), or None with the row counted."""
        path, reason = find_image(root, stem, suffixes)
        if path is None:
            # The path that was looked for, which `data check` shows: the first candidate.
            self.skip(reason, row, stem if reason == "path_escape" else str(resolve_under(root, stem + suffixes[0])))
        return path

    def add(
        self, path: Path, raw: list[RawBox], *, row: int, image_id: str, group_id: str, key: str,
        size: tuple[float, float] | None = None,
    ) -> Example | None:
        """The example of ``path`` with the valid ones of ``raw`` (pixels of the original image, or
        ``size=(1, 1)`` for normalised coordinates; the header is read only when needed), or None if counted."""
        boxes: list[Box] = []
        if raw:
            if size is None:
                size, reason = image_size_or_reason(path)
                if size is None:
                    self.skip(reason, row, str(path))
                    return None
            per_reader: dict[str, list[Box]] = {}
            for r in raw:
                box, why = make_box(r.label, r.x_min, r.y_min, r.x_max, r.y_max, *size)
                if box is None:
                    self.box_skip(why, r.row, key)
                    continue
                kept = per_reader.setdefault(r.reader, [])
                if box not in kept:
                    kept.append(box)
            if not per_reader:
                self.skip("no_valid_box", row, key)
                return None
            boxes = per_reader[min(per_reader, key=lambda rad: (-len(per_reader[rad]), rad))]
        labels = list(dict.fromkeys(b.label for b in boxes))
        example = Example(
            image_path=path, image_id=image_id, group_id=group_id, findings=[Finding(lb) for lb in labels],
            boxes=boxes, source_row=row,
        )
        self.examples.append(example)
        return example

    def result(self, **notes) -> ReadResult:
        return ReadResult(
            examples=self.examples,
            rows_total=self.rows_total,
            skipped=self.skip.counts,
            first_skipped=self.skip.first,
            notes={**notes, "boxes_skipped": dict(self.box_skip.counts)},
        )
