"""Deterministic synthetic chest films with findings of known geometry.

(Over 400 lines: the film, each finding's drawing and each dataset's file layout are one fixture.)

Used by the committed sample data (``scripts/make_sample_data.py``), the demo, tests and the
"does it learn to localise" benchmark. Nothing here is a real patient or a realistic radiograph: it is a
cartoon with the right *layout* (dark lungs, bright mediastinum/spine/heart, diaphragm domes, rib arcs,
noise; patient's right on the image left) and findings whose box is known exactly.

Findings (0-3 per film), each with a box that is the exact bounding box of the pixels it changed:

- ``nodule``: small bright blob in a lung zone;  ``mass``: a larger blob;
- ``consolidation``: hazy, textured opacity confined to a lung zone;
- ``pleural effusion``: fluid filling a lung base with a meniscus rising laterally (blunted costophrenic
  angle);
- ``cardiomegaly``: the heart shadow enlarged; its box is the whole enlarged heart.

Determinism: everything is drawn from the ``numpy.random.Generator`` passed in, in a fixed order, so the
same seed gives the same bytes; a different seed gives unseen positions and sizes.

Layout writers produce the real schemas: ``write_padchest`` (all 36 PadChest columns, nested ``ImageDir``
folders, 16-bit PNGs with 12 significant bits, PA/AP/L/EXCLUDE rows, PED rows, patients with several
studies, PadChest's quirks) and ``write_indiana`` (Kaggle ``indiana_reports.csv`` +
``indiana_projections.csv`` + 8-bit PNGs + an exact pixel ``boxes.csv``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from xray_train.data.records import Box

FINDING_KINDS = ("nodule", "mass", "consolidation", "pleural effusion", "cardiomegaly")
ZONES = ("upper", "middle", "lower")

# Film intensities on a 0-1 scale (bright = dense, MONOCHROME2).
_BACKGROUND, _TISSUE, _LUNG_DROP, _SPINE, _HEART, _RIB = 0.05, 0.42, 0.24, 0.16, 0.50, 0.05
# Per-pixel quantum noise in output grey levels: visible, yet low enough that the committed PNGs stay small.
_NOISE_LEVELS = {16: 3.0, 8: 0.7}


class SyntheticFinding(NamedTuple):
    """A drawn finding: PadChest label, PadChest localisations (``loc ...``), exact box."""

    label: str
    locations: tuple[str, ...]
    box: Box


@dataclass
class SyntheticFilm:
    pixels: np.ndarray  # (height, width); uint16 with 12 significant bits, or uint8
    findings: list[SyntheticFinding]
    mesh_terms: list[str] = field(default_factory=list)  # Indiana MeSH term per finding, same order


# ---------------------------------------------------------------------------------------------
# Specification (all randomness) and rendering (none)


@dataclass(frozen=True)
class FindingSpec:
    kind: str
    side: str  # "right" | "left" (patient's) | "" for cardiomegaly
    zone: str  # "upper" | "middle" | "lower" | "" for effusion/cardiomegaly
    params: tuple[float, ...]


@dataclass(frozen=True)
class FilmSpec:
    shift_x: float
    shift_y: float
    lung_scale: float
    heart: tuple[float, float, float, float]  # cx, cy, rx, ry (normalised)
    rib_phase: float
    noise_seed: int
    findings: tuple[FindingSpec, ...]


def _lung_geometry(spec: FilmSpec, side: str) -> tuple[float, float, float, float]:
    """cx, cy, rx, ry of one lung ellipse; patient's right lung is on the image left."""
    cx = (0.295 if side == "right" else 0.705) + spec.shift_x
    return cx, 0.46 + spec.shift_y, 0.175 * spec.lung_scale, 0.32 * spec.lung_scale


def _dome(spec: FilmSpec, side: str, x: np.ndarray) -> np.ndarray:
    """y of the diaphragm dome: highest mid-lung, lowest laterally (the costophrenic angle)."""
    cx, cy, rx, ry = _lung_geometry(spec, side)
    top = cy + ry * (0.72 if side == "right" else 0.80)
    return top + 0.10 * ((x - cx) / rx) ** 2


def _zone_bounds(spec: FilmSpec, side: str, zone: str) -> tuple[float, float]:
    cx, cy, rx, ry = _lung_geometry(spec, side)
    top, bottom = cy - ry, cy + ry * 0.85
    k = ZONES.index(zone)
    third = (bottom - top) / 3
    return top + k * third, top + (k + 1) * third


def sample_spec(
    rng: np.random.Generator,
    n_findings: int | None = None,
    kinds: tuple[str, ...] = FINDING_KINDS,
    blob_radius: tuple[float, float] | None = None,
) -> FilmSpec:
    """Draw the anatomy jitter and 0-3 findings (or exactly ``n_findings``).

    ``kinds`` restricts which findings are drawn; ``blob_radius`` replaces the nodule and mass radius
    range (a fraction of the film's shorter side). With the defaults the draws are exactly those of the
    committed sample data.
    """
    unknown = set(kinds) - set(FINDING_KINDS)
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {FINDING_KINDS}, got {kinds}")
    # Each (kind, side[, zone]) appears once per film, which caps how many findings a kind list allows.
    distinct = sum({"cardiomegaly": 1, "pleural effusion": 2}.get(k, 6) for k in set(kinds))
    if n_findings is not None and n_findings > distinct:
        raise ValueError(f"{n_findings} findings asked for, but {kinds} allow at most {distinct} per film")
    shift_x, shift_y = rng.uniform(-0.015, 0.015, size=2)
    lung_scale = rng.uniform(0.94, 1.04)
    heart = (0.545 + shift_x + rng.uniform(-0.01, 0.01), 0.64 + shift_y, rng.uniform(0.12, 0.145),
             rng.uniform(0.10, 0.12))
    rib_phase = rng.uniform(0, 0.03)
    noise_seed = int(rng.integers(0, 2**31 - 1))
    n = int(rng.choice(4, p=[0.3, 0.35, 0.25, 0.1])) if n_findings is None else n_findings
    findings: list[FindingSpec] = []
    used: set[tuple[str, str]] = set()
    while len(findings) < n:
        kind = str(rng.choice(kinds))
        side = str(rng.choice(["right", "left"])) if kind != "cardiomegaly" else ""
        zone = str(rng.choice(ZONES)) if kind in ("nodule", "mass", "consolidation") else ""
        key = (kind, side) if kind in ("pleural effusion", "cardiomegaly") else (kind, side + zone)
        if key in used:
            continue
        used.add(key)
        if kind in ("nodule", "mass"):
            low, high = blob_radius or ((0.012, 0.022) if kind == "nodule" else (0.045, 0.07))
            r = rng.uniform(low, high)
            params = (rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), r, rng.uniform(0.18, 0.26))
        elif kind == "consolidation":
            params = (rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.06, 0.11),
                      rng.uniform(0.05, 0.08), rng.uniform(0.14, 0.2), float(rng.integers(0, 2**31 - 1)))
        elif kind == "pleural effusion":
            params = (rng.uniform(0.03, 0.09), rng.uniform(0.03, 0.07))
        else:
            params = (rng.uniform(1.3, 1.5), rng.uniform(1.12, 1.25))
        findings.append(FindingSpec(kind, side, zone, params))
    # Draw order matters for overlaps only; keep the heart first so blobs sit on top of it.
    order = {"cardiomegaly": 0, "pleural effusion": 1, "consolidation": 2, "mass": 3, "nodule": 4}
    findings.sort(key=lambda f: order[f.kind])
    return FilmSpec(shift_x, shift_y, lung_scale, heart, rib_phase, noise_seed, tuple(findings))


def _ellipse(X, Y, cx, cy, rx, ry):
    return ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2


def _lung_mask(spec: FilmSpec, side: str, X, Y) -> np.ndarray:
    cx, cy, rx, ry = _lung_geometry(spec, side)
    inside = _ellipse(X, Y, cx, cy, rx, ry) < 1.0
    medial = X < 0.47 + spec.shift_x if side == "right" else X > 0.53 + spec.shift_x
    return inside & medial & (Y < _dome(spec, side, X))


def _box_of(mask: np.ndarray, label: str) -> Box | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    return Box(label, float(xs.min() / w), float(ys.min() / h), float((xs.max() + 1) / w), float((ys.max() + 1) / h))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int = 8) -> np.ndarray:
    """Low-frequency texture in [0, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(coarse).resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


_PADCHEST_ZONE = {
    ("right", "upper"): "loc right upper lobe", ("right", "middle"): "loc middle lobe",
    ("right", "lower"): "loc right lower lobe", ("left", "upper"): "loc left upper lobe",
    ("left", "middle"): "loc lingula", ("left", "lower"): "loc left lower lobe",
}
_MESH_ZONE = {
    ("right", "upper"): "lung/upper lobe/right", ("right", "middle"): "lung/middle lobe/right",
    ("right", "lower"): "lung/lower lobe/right", ("left", "upper"): "lung/upper lobe/left",
    ("left", "middle"): "lingula/left", ("left", "lower"): "lung/lower lobe/left",
}


def _describe(f: FindingSpec) -> tuple[tuple[str, ...], str]:
    """(PadChest localisations, Indiana MeSH term) of a finding."""
    if f.kind in ("nodule", "mass", "consolidation"):
        return (_PADCHEST_ZONE[(f.side, f.zone)],), f"{f.kind.capitalize()}/{_MESH_ZONE[(f.side, f.zone)]}"
    if f.kind == "pleural effusion":
        return (f"loc {f.side}", "loc costophrenic angle"), f"Pleural Effusion/{f.side}/small"
    return ("loc cardiac",), "Cardiomegaly/mild"


def render_film(spec: FilmSpec, size: tuple[int, int], bit_depth: int = 16) -> SyntheticFilm:
    """Render a spec at ``size=(width, height)``; pure function of its arguments."""
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, not {bit_depth}")
    w, h = size
    X, Y = np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h)
    rng = np.random.default_rng(spec.noise_seed)
    img = np.full((h, w), _BACKGROUND, dtype=np.float64)
    body = _ellipse(X, Y, 0.5 + spec.shift_x, 0.55 + spec.shift_y, 0.47, 0.58) < 1
    img[body] = _TISSUE
    lungs = {s: _lung_mask(spec, s, X, Y) for s in ("right", "left")}
    lung_any = lungs["right"] | lungs["left"]
    img -= _LUNG_DROP * lung_any
    # Rib arcs: posterior ribs descend laterally; drawn only over the lungs, where they show.
    for k in range(9):
        y0 = 0.13 + spec.shift_y + spec.rib_phase + 0.075 * k
        curve = y0 + 0.09 * ((X - 0.5 - spec.shift_x) / 0.4) ** 2
        img += _RIB * (np.abs(Y - curve) < 0.007) * lung_any
    img += _SPINE * (np.abs(X - 0.5 - spec.shift_x) < 0.045) * body
    cx, cy, rx, ry = spec.heart
    cardio = [f for f in spec.findings if f.kind == "cardiomegaly"]
    base_heart = _ellipse(X, Y, cx, cy, rx, ry) < 1
    heart = base_heart
    findings: list[SyntheticFinding] = []
    mesh: list[str] = []
    if cardio:
        sx, sy = cardio[0].params
        heart = _ellipse(X, Y, cx, cy, rx * sx, ry * sy) < 1
    img = np.where(heart, np.maximum(img, _HEART), img)
    texture = _smooth_noise(rng, (h, w))

    for f in spec.findings:
        change = np.zeros((h, w), dtype=np.float64)
        if f.kind == "cardiomegaly":
            mask = heart
        elif f.kind in ("nodule", "mass"):
            lcx, lcy, lrx, lry = _lung_geometry(spec, f.side)
            y_lo, y_hi = _zone_bounds(spec, f.side, f.zone)
            u, v, r, amp = f.params
            bx = lcx - 0.6 * lrx + u * 1.2 * lrx
            by = y_lo + v * (y_hi - y_lo)
            # Radius in pixels of the shorter side so the blob is round on a non-square film.
            d2 = ((X - bx) * w) ** 2 + ((Y - by) * h) ** 2
            rad = r * min(w, h)
            prof = np.clip(1 - d2 / rad**2, 0, None)
            change = amp * np.sqrt(prof)
            mask = prof > 0
        elif f.kind == "consolidation":
            lcx, lcy, lrx, lry = _lung_geometry(spec, f.side)
            y_lo, y_hi = _zone_bounds(spec, f.side, f.zone)
            u, v, erx, ery, amp, _ = f.params
            ecx = lcx - 0.5 * lrx + u * lrx
            ecy = y_lo + v * (y_hi - y_lo)
            zone = (Y >= y_lo) & (Y < y_hi) & lungs[f.side]
            prof = np.clip(1 - _ellipse(X, Y, ecx, ecy, erx, ery), 0, None) * zone
            change = amp * prof**0.5 * (0.6 + 0.4 * texture)
            mask = prof > 0
        else:  # pleural effusion: fluid up to a meniscus that rises towards the lateral chest wall
            lcx, lcy, lrx, lry = _lung_geometry(spec, f.side)
            depth, rise = f.params
            lateral = np.clip((lcx - X) / lrx if f.side == "right" else (X - lcx) / lrx, -1, 1)
            level = _dome(spec, f.side, lcx) - depth - rise * (lateral + 1) / 2
            mask = lungs[f.side] & (Y > level)
            # Fluid is about as dense as soft tissue: raise to that level, never above (heart overlap).
            change = np.clip(_TISSUE - 0.03 - img, 0, None) * mask
        if f.kind != "cardiomegaly":
            img = img + change
        box = _box_of(mask & (change > 0) if f.kind != "cardiomegaly" else mask, f.kind)
        if box is None:  # a blob that fell entirely outside the film at this resolution
            continue
        locs, term = _describe(f)
        findings.append(SyntheticFinding(f.kind, locs, box))
        mesh.append(term)

    top = 4095 if bit_depth == 16 else 255
    img += rng.normal(0, _NOISE_LEVELS[bit_depth] / top, size=(h, w)) + 0.02 * (texture - 0.5)
    pixels = np.clip(np.rint(img * top), 0, top).astype(np.uint16 if bit_depth == 16 else np.uint8)
    return SyntheticFilm(pixels, findings, mesh)


def generate_film(
    rng: np.random.Generator, size: tuple[int, int] = (512, 624), bit_depth: int = 16,
    n_findings: int | None = None, kinds: tuple[str, ...] = FINDING_KINDS,
    blob_radius: tuple[float, float] | None = None,
) -> SyntheticFilm:
    """A frontal film with 0-3 findings (or ``n_findings``); ``size`` is (width, height).
    ``kinds`` and ``blob_radius`` as in ``sample_spec``."""
    return render_film(sample_spec(rng, n_findings, kinds, blob_radius), size, bit_depth)


def generate_lateral(rng: np.random.Generator, size: tuple[int, int], bit_depth: int = 16) -> np.ndarray:
    """A crude lateral view (no findings): only so layouts have lateral images for filters to drop."""
    w, h = size
    X, Y = np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h)
    img = np.full((h, w), _BACKGROUND)
    body = _ellipse(X, Y, 0.5, 0.55, 0.42, 0.58) < 1
    img[body] = _TISSUE
    img -= _LUNG_DROP * (_ellipse(X, Y, 0.5 + rng.uniform(-0.02, 0.02), 0.45, 0.3, 0.3) < 1)
    img += _SPINE * (np.abs(X - 0.8) < 0.05) * body
    top = 4095 if bit_depth == 16 else 255
    img += rng.normal(0, _NOISE_LEVELS[bit_depth] / top, size=(h, w))
    return np.clip(np.rint(img * top), 0, top).astype(np.uint16 if bit_depth == 16 else np.uint8)


def save_png(pixels: np.ndarray, path: Path, compress_level: int = 9) -> None:
    """Grayscale PNG, 16-bit for uint16 arrays (12 significant bits stay as values < 4096).
    ``compress_level`` 9 keeps committed samples small; benchmarks write faster with 1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # fromarray infers I;16 for uint16 and L for uint8 (its ``mode`` argument is deprecated).
    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint16 if pixels.dtype == np.uint16 else np.uint8))
    img.save(path, format="PNG", optimize=False, compress_level=compress_level)


# ---------------------------------------------------------------------------------------------
# PadChest layout

PADCHEST_COLUMNS = [
    "", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
    "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric", "Modality_DICOM",
    "Manufacturer_DICOM", "PhotometricInterpretation_DICOM", "PixelRepresentation_DICOM",
    "PixelAspectRatio_DICOM", "SpatialResolution_DICOM", "BitsStored_DICOM", "WindowCenter_DICOM",
    "WindowWidth_DICOM", "Rows_DICOM", "Columns_DICOM", "XRayTubeCurrent_DICOM", "Exposure_DICOM",
    "ExposureInuAs_DICOM", "ExposureTime", "RelativeXRayExposure_DICOM", "ReportID", "Report", "MethodLabel",
    "Labels", "Localizations", "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS",
]
PADCHEST_CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"

_LABEL_CUI = {"nodule": "C0034079", "mass": "C0577559", "consolidation": "C0521530",
              "pleural effusion": "C0032227", "cardiomegaly": "C0018800"}
_LOC_CUI = {"loc right upper lobe": "C1261074", "loc middle lobe": "C0225757", "loc right lower lobe": "C0225758",
            "loc left upper lobe": "C0225730", "loc lingula": "C0225731", "loc left lower lobe": "C0225732",
            "loc left": "C0443246", "loc right": "C0444532", "loc costophrenic angle": "C0230151",
            "loc cardiac": "C1522601"}
_REPORT_ES = {"nodule": "nodul pulmonar", "mass": "mas pulmonar", "consolidation": "consolidacion",
              "pleural effusion": "derram pleural", "cardiomegaly": "cardiomegali"}
_IMAGE_DIRS = [*range(0, 51), 54]
# Sizes are (width, height); non-square like real films, small so the committed samples stay small.
PADCHEST_SIZES = ((256, 312), (240, 296), (272, 320), (288, 288))
INDIANA_SIZES = ((256, 312), (256, 296), (240, 300))


def _digits(rng: np.random.Generator, n: int) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, size=n))


def _alnum(rng: np.random.Generator, n: int) -> str:
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(chars[i] for i in rng.integers(0, len(chars), size=n))


def _cuis(codes: list[str]) -> str:
    # numpy-array repr: space separated, no commas, wrapped after 6 items with a newline.
    if not codes:
        return "[]"
    parts = [f"'{c}'" for c in codes]
    lines = [" ".join(parts[i:i + 6]) for i in range(0, len(parts), 6)]
    return "[" + "\n ".join(lines) + "]"


def _pylist(items: list[str]) -> str:
    return "[" + ", ".join(f"'{i}'" for i in items) + "]"


def write_padchest(out_dir: Path | str, n: int = 48, seed: int = 0, compress_level: int = 9, **findings) -> Path:
    """Write ``n`` images in the real PadChest layout under ``out_dir``; returns the CSV path.

    ``out_dir/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (all 36 columns, the real header with
    its empty first name) and ``out_dir/images/{ImageDir}/{ImageID}``. Frontal images (PA/AP/
    AP_horizontal) carry the drawn findings; a study may also have a lateral (L) image; a few images are
    EXCLUDE or from PED patients; some patients have several studies. Quirks reproduced: leading spaces
    in some labels, nested ``LabelsLocalizationsBySentence`` for Physician rows and flat for RNN rows,
    numpy-repr ``labelCUIS`` with a newline for long lists, the literal ``None`` in DICOM columns.
    ``findings`` (``n_findings``, ``kinds``, ``blob_radius``) go to ``generate_film``.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    rows: list[list] = []
    patients: list[tuple[str, float, str, bool]] = []
    image_no = 0
    study_no = 0
    while image_no < n:
        # Some studies belong to an existing patient (follow-up films); every 4th one at least, so even a
        # small layout exercises patient-grouped splitting.
        if patients and (study_no % 4 == 3 or rng.random() < 0.2):
            pid, birth, sex, ped = patients[int(rng.integers(0, len(patients)))]
        else:
            # A couple of PED patients are forced so the pediatric filter always has rows to act on.
            ped = len(patients) in (3, 8) or rng.random() < 0.03
            pid, sex = _digits(rng, 38), str(rng.choice(["M", "F"]))
            birth = float(rng.integers(2004, 2012) if ped else rng.integers(1925, 1990))
            patients.append((pid, birth, sex, ped))
        study_no += 1
        study_id = _digits(rng, 39)
        date = f"20{int(rng.integers(9, 16)):02d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
        report_id = str(4000000 + int(rng.integers(0, 999999)))
        physician = rng.random() < 0.4
        frontal_proj = str(rng.choice(["PA", "PA", "PA", "AP", "AP_horizontal"]))
        if study_no % 12 == 5:  # a few EXCLUDE rows, deterministically
            frontal_proj = "EXCLUDE"
        size = PADCHEST_SIZES[int(rng.integers(0, len(PADCHEST_SIZES)))]
        film = generate_film(rng, size=size, bit_depth=16, **findings)
        views = [(frontal_proj, film.pixels)]
        if image_no + 1 < n and rng.random() < 0.25:
            views.append(("L", generate_lateral(rng, size, 16)))

        labels = list(dict.fromkeys(f.label for f in film.findings)) or ["normal"]
        by_label: dict[str, list[str]] = {}
        for f in film.findings:
            locs = by_label.setdefault(f.label, [])
            locs.extend(loc for loc in f.locations if loc not in locs)
        all_locs = list(dict.fromkeys(loc for ls in by_label.values() for loc in ls))
        # Leading-space quirk: the real file has it on ~40k labels, mostly after the first one.
        shown = [(" " + lb) if i > 0 and rng.random() < 0.4 else lb for i, lb in enumerate(labels)]
        if physician:
            nested = [[s, *by_label.get(lb, [])] for s, lb in zip(shown, labels)]
            by_sentence = "[" + ", ".join(_pylist(s) for s in nested) + "]"
        else:
            by_sentence = _pylist([x for s, lb in zip(shown, labels) for x in (s, *by_label.get(lb, []))])
        report = " " + " . ".join(_REPORT_ES.get(lb, "sin hallazg patolog") for lb in labels) + " ."
        cuis = _cuis([_LABEL_CUI[lb] for lb in labels if lb in _LABEL_CUI]
                     + (["C0034079", "C0018800", "C0032227", "C0521530"] if len(labels) >= 3 else []))

        for proj, pixels in views:
            h, w = pixels.shape
            image_id = f"{study_id}_{_alnum(rng, 6)}.png"
            image_dir = _IMAGE_DIRS[int(rng.integers(0, len(_IMAGE_DIRS)))]
            save_png(pixels, out / "images" / str(image_dir) / image_id, compress_level)
            view_pos = {"PA": "POSTEROANTERIOR", "L": "LATERAL", "AP": "ANTEROPOSTERIOR",
                        "AP_horizontal": "ANTEROPOSTERIOR", "EXCLUDE": "OBLICUA"}[proj]
            philips = rng.random() < 0.5
            rows.append([
                len(rows), image_id, image_dir, date, study_id, pid, f"{birth:.1f}", sex, view_pos, proj,
                "Manual review of DICOM fields" if rng.random() < 0.9 else "resnet-50.t7",
                "PED" if ped else "No", "DX" if philips else "CR",
                "PhilipsMedicalSystems" if philips else "ImagingDynamicsCompanyLtd", "MONOCHROME2", 0,
                "['1', '1']" if philips else "None", "0.143" if philips else "None", 12,
                "2047.0" if philips else str(int(rng.integers(1900, 2600))),
                "4095.0" if philips else str(int(rng.integers(1500, 2800))), h, w,
                int(rng.choice([160, 250, 320, 400])), int(rng.integers(2, 12)), int(rng.integers(2, 12)) * 1000,
                str(int(rng.choice([5, 10, 25]))) if rng.random() < 0.7 else "None",
                f"{rng.uniform(-1.5, -0.8):.2f}" if rng.random() < 0.8 else "None",
                report_id, report, "Physician" if physician else "RNN_model", _pylist(shown),
                _pylist(all_locs), by_sentence, cuis, _cuis([_LOC_CUI[x] for x in all_locs if x in _LOC_CUI]),
            ])
            image_no += 1
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / PADCHEST_CSV_NAME
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(PADCHEST_COLUMNS)
        writer.writerows(rows)
    return csv_path


# ---------------------------------------------------------------------------------------------
# Indiana layout

INDIANA_REPORT_COLUMNS = ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"]
INDIANA_PROJECTION_COLUMNS = ["uid", "filename", "projection"]
BOX_FILE_COLUMNS = ["filename", "label", "x_min", "y_min", "x_max", "y_max"]

def _indiana_text(film: SyntheticFilm) -> tuple[str, str]:
    sentences = []
    kinds = {f.label for f in film.findings}
    sentences.append("The heart is enlarged." if "cardiomegaly" in kinds else "The heart is normal in size.")
    for f in film.findings:
        where = " ".join(loc.removeprefix("loc ") for loc in f.locations)
        if f.label in ("nodule", "mass", "consolidation"):
            sentences.append(f"There is a {f.label} in the {where}.")
        elif f.label == "pleural effusion":
            sentences.append(f"Small {where.split()[0]} pleural effusion with blunting of the costophrenic angle.")
    if not film.findings:
        sentences.append("The lungs are clear. No pneumothorax or pleural effusion.")
        return " ".join(sentences), "No acute cardiopulmonary disease."
    return " ".join(sentences), " ".join(s for s in sentences[1:]) or "Cardiomegaly."


def write_indiana(
    out_dir: Path | str, n: int = 48, seed: int = 0, compress_level: int = 9, **findings
) -> dict[str, Path]:
    """Write ``n`` frontal images (plus laterals for some studies) in Indiana's Kaggle layout.

    Returns the paths: ``reports_csv``, ``projections_csv``, ``image_root`` and ``box_file`` (exact pixel
    boxes of the drawn findings, continuous pixel edges, one row per finding, frontal images only).
    ``findings`` (``n_findings``, ``kinds``, ``blob_radius``) go to ``generate_film``.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    image_root = out / "images" / "images_normalized"
    reports, projections, boxes = [], [], []
    uid = 0
    for _ in range(n):
        uid += int(rng.integers(1, 4))  # real uids have gaps
        size = INDIANA_SIZES[int(rng.integers(0, len(INDIANA_SIZES)))]
        film = generate_film(rng, size=size, bit_depth=8, **findings)
        im = 4000 + int(rng.integers(1, 999))
        frontal = f"{uid}_IM-{im:04d}-1001.dcm.png"
        save_png(film.pixels, image_root / frontal, compress_level)
        projections.append([uid, frontal, "Frontal"])
        if rng.random() < 0.5:
            lateral = f"{uid}_IM-{im:04d}-2001.dcm.png"
            save_png(generate_lateral(rng, (size[0] // 2, size[1] // 2), 8), image_root / lateral, compress_level)
            projections.append([uid, lateral, "Lateral"])
        h, w = film.pixels.shape
        for f in film.findings:
            b = f.box
            boxes.append([frontal, f.label, round(b.x_min * w), round(b.y_min * h), round(b.x_max * w),
                          round(b.y_max * h)])
        mesh = ";".join(film.mesh_terms) or "normal"
        problems = ";".join(dict.fromkeys(t.split("/")[0] for t in film.mesh_terms)) or "normal"
        findings_text, impression = _indiana_text(film)
        age = int(rng.integers(25, 85))
        reports.append([uid, mesh, problems, "Xray Chest PA and Lateral",
                        f"{age}-year-old XXXX with chest pain.", "None.", findings_text, impression])
    for name, header, rows in (
        ("indiana_reports.csv", INDIANA_REPORT_COLUMNS, reports),
        ("indiana_projections.csv", INDIANA_PROJECTION_COLUMNS, projections),
        ("boxes.csv", BOX_FILE_COLUMNS, boxes),
    ):
        with (out / name).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
    return {
        "reports_csv": out / "indiana_reports.csv",
        "projections_csv": out / "indiana_projections.csv",
        "image_root": image_root,
        "box_file": out / "boxes.csv",
    }


# ---------------------------------------------------------------------------------------------
# Learning benchmark layout


def write_benchmark(
    out_dir: Path | str, n_train: int, n_test: int, seed_train: int, seed_test: int, workers: int = 1,
    n_phase1: int | None = None, compress_level: int = 9, **findings
) -> dict[str, Path]:
    """Train and held-out data for ``benchmarks/bench_learning.py`` and ``tests/test_learning.py``.

    ``train/padchest`` (Phase 1) and ``train/indiana`` (Phase 2, exact ``boxes.csv``) are drawn from
    ``seed_train`` (PadChest from ``seed_train + 1``, so its films are not Indiana's); ``test/indiana`` from
    ``seed_test``, so held-out positions and sizes were never seen. ``findings`` (``n_findings``, ``kinds``,
    ``blob_radius``) apply to all three. Returns ``padchest_csv``, ``padchest_images``, ``train`` and
    ``test`` (the latter two: ``write_indiana``'s path dicts). ``workers`` > 1 writes the three sets in
    parallel processes (same files: each set has its own seed). ``n_phase1`` PadChest films (default
    ``n_train``); ``compress_level`` of the PNGs.
    """
    if seed_test in (seed_train, seed_train + 1):
        raise ValueError("seed_test must differ from seed_train and seed_train + 1: test films would repeat training ones")
    out = Path(out_dir)
    jobs = {
        "padchest_csv": (write_padchest, out / "train" / "padchest", n_phase1 or n_train, seed_train + 1),
        "train": (write_indiana, out / "train" / "indiana", n_train, seed_train),
        "test": (write_indiana, out / "test" / "indiana", n_test, seed_test),
    }
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the caller may hold torch threads, which a forked child must not inherit.
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {k: pool.submit(fn, path, n=n, seed=seed, compress_level=compress_level, **findings)
                       for k, (fn, path, n, seed) in jobs.items()}
            written = {k: f.result() for k, f in futures.items()}
    else:
        written = {k: fn(path, n=n, seed=seed, compress_level=compress_level, **findings)
                   for k, (fn, path, n, seed) in jobs.items()}
    return written | {"padchest_images": written["padchest_csv"].parent / "images"}
