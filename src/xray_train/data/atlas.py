"""Anatomical atlas of a frontal (PA/AP) chest film, and MeSH-qualifier -> box derivation for Indiana.

**These boxes are WEAK labels.** Indiana CXR has no bounding boxes: a MeSH entry such as
``Opacity/lung/base/left`` says *where* a finding is in words, and this module turns those words into the
box of a fixed, average anatomical region. The box is where such a finding usually is on an average adult
film, not where it is on this film; it can be much larger than the finding and, on a rotated, scoliotic or
very small/large thorax, partly wrong. Use them to teach the model the vocabulary of localisation, and
prefer a real box file (``data.box_source: box_file``) wherever one exists.

Coordinates are normalised to the ORIGINAL image, ``x`` left->right, ``y`` top->bottom, both in [0, 1].
Radiological convention: the film is viewed as if facing the patient, so the **patient's right is the
image's LEFT** (small x) and the patient's left is the image's right (large x). "right"/"left" below are
always the patient's.

Regions (``REGIONS``; a sided region has one box per side):

| region | patient's right (x_min, y_min, x_max, y_max) | patient's left (x_min, y_min, x_max, y_max) |
|---|---|---|
| lung (whole field) | 0.12, 0.14, 0.47, 0.78 | 0.53, 0.14, 0.88, 0.78 |
| upper zone / upper lobe | 0.12, 0.14, 0.47, 0.35 | 0.53, 0.14, 0.88, 0.35 |
| middle zone / middle lobe | 0.12, 0.35, 0.47, 0.57 | 0.53, 0.35, 0.88, 0.57 |
| lower zone / lower lobe | 0.12, 0.57, 0.47, 0.78 | 0.53, 0.57, 0.88, 0.78 |
| apex | 0.14, 0.10, 0.45, 0.24 | 0.55, 0.10, 0.86, 0.24 |
| base | 0.10, 0.60, 0.47, 0.82 | 0.53, 0.60, 0.90, 0.82 |
| hilum | 0.34, 0.33, 0.47, 0.52 | 0.53, 0.31, 0.66, 0.50 |
| costophrenic angle | 0.08, 0.68, 0.24, 0.86 | 0.76, 0.68, 0.92, 0.86 |
| diaphragm (hemidiaphragm) | 0.10, 0.66, 0.48, 0.84 | 0.52, 0.70, 0.90, 0.86 |
| lingula (left only) | - | 0.55, 0.45, 0.78, 0.68 |
| retrocardiac (midline) | 0.50, 0.55, 0.66, 0.78 | |
| heart / cardiac (midline) | 0.36, 0.45, 0.72, 0.80 | |
| mediastinum (midline) | 0.40, 0.08, 0.60, 0.50 | |
| aorta (midline) | 0.42, 0.12, 0.64, 0.55 | |
| spine / thoracic vertebrae (midline) | 0.44, 0.05, 0.56, 0.95 | |

How a MeSH string becomes boxes (``boxes_from_mesh``):

- Terms are split on ``;`` only (a term may contain a comma: ``Aorta, Thoracic/tortuous``); each term is
  ``Term/qualifier/...``. The finding name is the lower-cased term.
- Qualifiers are matched against the location vocabulary (``LOCATION_WORDS``); anything else (mild,
  moderate, severe, borderline, small, large, chronic, multiple, tortuous, ...) is not a location.
- A box is produced when a qualifier names a location, or when the term itself is an anatomical region
  (``Costophrenic Angle/blunted/left``, ``Spine/degenerative``, ``Aorta, Thoracic/tortuous``). A term with no
  location at all (``Cardiomegaly/borderline``) still yields a ``Finding`` but **no box**.
- Locations intersect: ``lung/base/left`` -> the left base; ``upper lobe/right`` -> right upper zone;
  ``lung/left`` -> the whole left lung field. ``lingula`` implies left; ``middle lobe`` without a side
  implies right (the left lung has no middle lobe). The most specific region named wins
  (costophrenic angle > hilum/apex/lingula > zone/base > lung).
- **Bilateral** (or a sided region with no side, e.g. ``Opacity/lung/base``) yields **two boxes, one per
  side, with the same label** rather than one union box: a union box of both lungs would cover the heart
  and mediastinum, i.e. mostly where the finding is not.
- ``normal`` (and ``No Indexing``) yield no findings and no boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

from xray_train.data.records import Box, Finding

Rect = tuple[float, float, float, float]

#: Sided regions: region -> (patient's right box, patient's left box); None where the side has none.
SIDED_REGIONS: dict[str, tuple[Rect | None, Rect | None]] = {
    "lung": ((0.12, 0.14, 0.47, 0.78), (0.53, 0.14, 0.88, 0.78)),
    "upper": ((0.12, 0.14, 0.47, 0.35), (0.53, 0.14, 0.88, 0.35)),
    "middle": ((0.12, 0.35, 0.47, 0.57), (0.53, 0.35, 0.88, 0.57)),
    "lower": ((0.12, 0.57, 0.47, 0.78), (0.53, 0.57, 0.88, 0.78)),
    "apex": ((0.14, 0.10, 0.45, 0.24), (0.55, 0.10, 0.86, 0.24)),
    "base": ((0.10, 0.60, 0.47, 0.82), (0.53, 0.60, 0.90, 0.82)),
    "hilum": ((0.34, 0.33, 0.47, 0.52), (0.53, 0.31, 0.66, 0.50)),
    "costophrenic angle": ((0.08, 0.68, 0.24, 0.86), (0.76, 0.68, 0.92, 0.86)),
    "diaphragm": ((0.10, 0.66, 0.48, 0.84), (0.52, 0.70, 0.90, 0.86)),
    "lingula": (None, (0.55, 0.45, 0.78, 0.68)),
}

#: Midline regions: one box, no side.
MIDLINE_REGIONS: dict[str, Rect] = {
    "retrocardiac": (0.50, 0.55, 0.66, 0.78),
    "heart": (0.36, 0.45, 0.72, 0.80),
    "mediastinum": (0.40, 0.08, 0.60, 0.50),
    "aorta": (0.42, 0.12, 0.64, 0.55),
    "spine": (0.44, 0.05, 0.56, 0.95),
}

#: Every region by name (sided ones as (right, left)), for docs and the atlas table in docs/recipe.md.
REGIONS: dict[str, object] = {**SIDED_REGIONS, **MIDLINE_REGIONS}

#: Location word (lower-case MeSH qualifier or anatomical term) -> canonical region or side.
LOCATION_WORDS: dict[str, str] = {
    "right": "right",
    "left": "left",
    "bilateral": "bilateral",
    "lung": "lung",
    "lungs": "lung",
    "pleura": "lung",
    "upper lobe": "upper",
    "middle lobe": "middle",
    "lower lobe": "lower",
    "apex": "apex",
    "base": "base",
    "hilum": "hilum",
    "costophrenic angle": "costophrenic angle",
    "diaphragm": "diaphragm",
    "lingula": "lingula",
    "retrocardiac": "retrocardiac",
    "heart": "heart",
    "cardiac": "heart",
    "mediastinum": "mediastinum",
    "aorta": "aorta",
    "spine": "spine",
    "thoracic vertebrae": "spine",
}

#: Terms that are themselves anatomy (so ``Spine/degenerative`` has a location). "lung" is excluded on
#: purpose: ``Lung/hyperdistention`` is a global finding and a two-lung box labelled "lung" teaches nothing.
_TERM_REGIONS = {w for w in LOCATION_WORDS if LOCATION_WORDS[w] not in {"right", "left", "bilateral", "lung"}}

# More specific regions win when a term names several (``lung/base/costophrenic angle``).
_SPECIFICITY = {
    "costophrenic angle": 4, "hilum": 3, "apex": 3, "lingula": 3, "retrocardiac": 3,
    "upper": 2, "middle": 2, "lower": 2, "base": 2, "diaphragm": 2,
    "heart": 1, "mediastinum": 1, "aorta": 1, "spine": 1, "lung": 0,
}

_NO_FINDING_TERMS = {"normal", "no indexing"}


@dataclass(frozen=True)
class MeshTerm:
    """One ``Term/qualifier/...`` entry: the finding name and the qualifiers that are locations."""

    name: str
    locations: tuple[str, ...]
    other_qualifiers: tuple[str, ...]


def _term_key(term: str) -> str:
    # "Aorta, Thoracic" -> "aorta": MeSH inverts compound names after a comma.
    return term.split(",")[0].strip().lower()


def parse_mesh(mesh: str) -> list[MeshTerm]:
    """Split a MeSH field into terms; ``normal`` / ``No Indexing`` / empty -> []."""
    terms = []
    for raw in (mesh or "").split(";"):
        parts = [p.strip() for p in raw.split("/")]
        name = parts[0].lower()
        if not name or name in _NO_FINDING_TERMS:
            continue
        quals = [q.lower() for q in parts[1:] if q]
        locs = tuple(q for q in quals if q in LOCATION_WORDS)
        other = tuple(q for q in quals if q not in LOCATION_WORDS)
        terms.append(MeshTerm(name, locs, other))
    return terms


def is_normal(mesh: str) -> bool:
    """True when the MeSH field says only ``normal``."""
    terms = [t.strip().lower() for t in (mesh or "").split(";") if t.strip()]
    return bool(terms) and all(t == "normal" for t in terms)


def findings_from_mesh(mesh: str) -> list[Finding]:
    """MeSH -> findings (term lower-cased, location qualifiers as locations); duplicates merged."""
    seen: dict[str, list[str]] = {}
    for term in parse_mesh(mesh):
        locs = seen.setdefault(term.name, [])
        locs.extend(loc for loc in term.locations if loc not in locs)
    return [Finding(name, tuple(locs)) for name, locs in seen.items()]


def region_boxes(region: str, side: str | None, label: str) -> list[Box]:
    """Boxes of one atlas region; side None or "bilateral" on a sided region -> one box per side."""
    if region in MIDLINE_REGIONS:
        return [Box(label, *MIDLINE_REGIONS[region])]
    right, left = SIDED_REGIONS[region]
    if side == "right":
        chosen = [right]
    elif side == "left":
        chosen = [left]
    else:
        chosen = [right, left]
    return [Box(label, *rect) for rect in chosen if rect is not None]


def term_boxes(term: MeshTerm) -> list[Box]:
    """The atlas boxes of one MeSH term (may be empty: no location named)."""
    words = list(term.locations)
    key = _term_key(term.name)
    if key in _TERM_REGIONS:
        words.append(key)
    if not words:
        return []
    canon = [LOCATION_WORDS[w] for w in words]
    sides = {c for c in canon if c in {"right", "left", "bilateral"}}
    regions = [c for c in canon if c in _SPECIFICITY]
    side = None if len(sides) != 1 or "bilateral" in sides else sides.pop()
    region = max(regions, key=lambda r: _SPECIFICITY[r]) if regions else "lung"
    if region == "lingula":
        side = "left"
    elif region == "middle" and side is None and "bilateral" not in canon:
        side = "right"
    return region_boxes(region, side, term.name)


def boxes_from_mesh(mesh: str) -> list[Box]:
    """WEAK boxes for a MeSH field, one or two per localisable term, duplicates removed, in term order."""
    out: list[Box] = []
    for term in parse_mesh(mesh):
        for box in term_boxes(term):
            if box not in out:
                out.append(box)
    return out
