"""`<locNNNN>` box tokens, PaliGemma / big_vision convention.

A box is ``<locYMIN><locXMIN><locYMAX><locXMAX> label``; several boxes are joined by `` ; ``.
Coordinates are normalised to the *prepared* image (after pad-to-square and resize), y before x.

Binning: ``bin = round(v * 1023)`` clipped to [0, 1023]; decoding: ``v = bin / 1023``. This is
big_vision's convention (community parsers that divide by 1024 are off by up to 0.1 %); ``<loc1024>``
is never emitted and is clipped to 1023 when parsed.
"""

from __future__ import annotations

import re

from xray_train.data.records import Box

NUM_LOC_TOKENS = 1024
LOC_TOKENS: list[str] = [f"<loc{i:04d}>" for i in range(NUM_LOC_TOKENS)]
NO_BOX_ANSWER = "no localisable finding"
BOX_SEPARATOR = " ; "

_BOX_RE = re.compile(r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})>\s*([^;<]*)")


def to_bin(value: float) -> int:
    """Normalised coordinate -> loc bin in [0, 1023]."""
    if value != value:  # NaN
        raise ValueError("coordinate is NaN")
    return min(NUM_LOC_TOKENS - 1, max(0, round(value * (NUM_LOC_TOKENS - 1))))


def from_bin(index: int) -> float:
    """Loc bin -> normalised coordinate; out-of-range bins (e.g. 1024) are clipped."""
    return min(NUM_LOC_TOKENS - 1, max(0, index)) / (NUM_LOC_TOKENS - 1)


def encode_box(box: Box) -> str:
    """One box (normalised to the prepared image) -> ``<loc..>x4 label``."""
    ids = (to_bin(box.y_min), to_bin(box.x_min), to_bin(box.y_max), to_bin(box.x_max))
    return "".join(LOC_TOKENS[i] for i in ids) + " " + box.label


def encode_boxes(boxes: list[Box]) -> str:
    """Boxes -> the Phase-2 answer; no boxes -> the explicit "no localisable finding" answer."""
    if not boxes:
        return NO_BOX_ANSWER
    return BOX_SEPARATOR.join(encode_box(b) for b in boxes)


def decode_boxes(text: str) -> list[Box]:
    """Parse every well-formed ``<loc>x4 label`` group in generated text (tolerant of junk between).

    Boxes whose min exceeds max are reordered rather than dropped, so a model that swaps corners
    is scored on IoU instead of silently losing the box.
    """
    boxes = []
    for match in _BOX_RE.finditer(text):
        y0, x0, y1, x1 = (from_bin(int(g)) for g in match.groups()[:4])
        label = match.group(5).strip()
        boxes.append(Box(label, min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    return boxes
