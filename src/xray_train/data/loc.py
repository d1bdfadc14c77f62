"""`<locNNNN>` box tokens, PaliGemma / big_vision convention.

A box is ``<locYMIN><locXMIN><locYMAX><locXMAX> label``; several boxes are joined by `` ; ``.
Coordinates are normalised to the *prepared* image (after pad-to-square and resize), y before x.

Binning: ``bin = round(v * 1023)`` clipped to [0, 1023]; decoding: ``v = bin / 1023``. This is
big_vision's convention (community parsers that divide by 1024 are off by up to 0.1 %); ``<loc1024>``
is never emitted and is clipped to 1023 when parsed.

``data.box_format: text`` writes the same box as four plain integers 0-999 (Qwen2-VL style, no added
tokens): ``YMIN XMIN YMAX XMAX label``, ``v = int / 999``. :func:`decode_boxes` reads either format.
"""

from __future__ import annotations

import re

from xray_train.data.records import Box

NUM_LOC_TOKENS = 1024
LOC_TOKENS: list[str] = [f"<loc{i:04d}>" for i in range(NUM_LOC_TOKENS)]
NO_BOX_ANSWER = "no localisable finding"
BOX_SEPARATOR = " ; "
BOX_FORMATS = ("loc", "text")
#: Largest plain-text coordinate (``data.box_format: text``).
TEXT_MAX = 999

_BOX_RE = re.compile(r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})>\s*([^;<]*)")
_TEXT_BOX_RE = re.compile(r"(?<![\d<])(\d{1,3}) (\d{1,3}) (\d{1,3}) (\d{1,3}) +([^;<\d\s][^;<]*)")
#: One well-formed box of either format (the whole item, as ``detect_answer_well_formed`` checks it).
BOX_ITEM_RE = re.compile(r"(?:(?:<loc\d{4}>){4}\s*|(?:\d{1,3} ){4} *)[^;<\s\d][^;<]*")


def to_bin(value: float) -> int:
    """Normalised coordinate -> loc bin in [0, 1023]."""
    if value != value:  # NaN
        raise ValueError("coordinate is NaN")
    return min(NUM_LOC_TOKENS - 1, max(0, round(value * (NUM_LOC_TOKENS - 1))))


def from_bin(index: int) -> float:
    """Loc bin -> normalised coordinate; out-of-range bins (e.g. 1024) are clipped."""
    return min(NUM_LOC_TOKENS - 1, max(0, index)) / (NUM_LOC_TOKENS - 1)


def to_text_value(value: float) -> int:
    """Normalised coordinate -> plain-text integer in [0, 999]."""
    if value != value:
        raise ValueError("coordinate is NaN")
    return min(TEXT_MAX, max(0, round(value * TEXT_MAX)))


def encode_box(box: Box, box_format: str = "loc") -> str:
    """One box (normalised to the prepared image) -> ``<loc..>x4 label`` or ``Y X Y X label``."""
    coords = (box.y_min, box.x_min, box.y_max, box.x_max)
    if box_format == "text":
        return " ".join(str(to_text_value(v)) for v in coords) + " " + box.label
    if box_format != "loc":
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, not {box_format!r}")
    return "".join(LOC_TOKENS[to_bin(v)] for v in coords) + " " + box.label


def encode_boxes(boxes: list[Box], box_format: str = "loc") -> str:
    """Boxes -> the Phase-2 answer; no boxes -> the explicit "no localisable finding" answer."""
    if not boxes:
        return NO_BOX_ANSWER
    return BOX_SEPARATOR.join(encode_box(b, box_format) for b in boxes)


def decode_boxes(text: str) -> list[Box]:
    """Parse every well-formed box group in generated text (tolerant of junk between), either format.

    ``<loc>x4 label`` groups when the text has any, else plain-text ``Y X Y X label`` groups. Boxes whose
    min exceeds max are reordered rather than dropped, so a model that swaps corners is scored on IoU
    instead of silently losing the box.
    """
    boxes = []
    matches = list(_BOX_RE.finditer(text))
    scale = from_bin
    if not matches:
        matches = list(_TEXT_BOX_RE.finditer(text))
        scale = lambda v: min(v, TEXT_MAX) / TEXT_MAX  # noqa: E731
    for match in matches:
        y0, x0, y1, x1 = (scale(int(g)) for g in match.groups()[:4])
        label = match.group(5).strip()
        boxes.append(Box(label, min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    return boxes
