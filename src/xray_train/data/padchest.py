"""PadChest reader: the BIMCV 36-column labels CSV (plain or .gz) -> Phase-1 examples.

Findings come from ``Labels`` (the de-duplicated label set); their locations come from
``LabelsLocalizationsBySentence``, where ``loc ...`` items qualify the run of findings just before them
(per sentence for Physician rows, one flat list for RNN rows). Label handling:

- ``normal``: alone -> a normal study (no findings); next to other findings it is dropped (it then only
  says some structure is normal).
- ``unchanged``: dropped. It compares with a prior study the model never sees, so it is not visible in
  the image. A row labelled *only* ``unchanged`` is skipped (``only_unchanged``): the prior study may
  have had findings, so calling it normal would teach false negatives.
- ``exclude`` / ``suboptimal study`` (``data.drop_labels``): the row is skipped (``dropped_label``).
- ``''`` labels are dropped; a row with no label left is skipped (``empty_labels``, 777 rows in the real
  file); ``nan`` label cells (103 rows) are skipped (``missing_labels``).
- Leading spaces stripped, names lower-cased, ``loc supraspisnous`` -> ``supraspinous``.

Skip reasons, checked in this order (one per row): filtered_projection, filtered_method, pediatric,
missing_labels, unparsable_labels, empty_labels, dropped_label, only_unchanged, missing_image_id,
path_escape, missing_image. ``read(cfg, require_images=False)`` skips the existence check (label-only
use, e.g. the real CSV without its images). Image pixels are never opened here.
"""

from __future__ import annotations

import ast
import re
import zlib
from functools import lru_cache
from pathlib import Path

import pandas as pd

from xray_train.config import PadchestData
from xray_train.data.records import Example, Finding, ReadResult, SkipCounter, resolve_under
from xray_train.data.reports import normalize_location, normalize_name
from xray_train.errors import DataError

REQUIRED_COLUMNS = (
    "ImageID",
    "ImageDir",
    "PatientID",
    "Projection",
    "MethodLabel",
    "Pediatric",
    "Labels",
    "LabelsLocalizationsBySentence",
)
OPTIONAL_COLUMNS = ("StudyID", "Localizations")

#: Misspellings present in the released CSV, after ``normalize_location``.
LOCATION_FIXES = {"supraspisnous": "supraspinous"}
UNCHANGED = "unchanged"
NORMAL = "normal"
_MISSING_CELLS = {"", "nan", "none", "null"}
_LAYOUT_PROBES = 200


class _Unparsable(ValueError):
    pass


def _convert(node: ast.AST):
    if isinstance(node, (ast.List, ast.Tuple)):
        return tuple(_convert(e) for e in node.elts)
    if isinstance(node, ast.Constant) and (isinstance(node.value, str) or node.value is None):
        return node.value
    # A few sentence lists hold a bare ``nan`` element (pandas wrote a float NaN into the list).
    if isinstance(node, ast.Name) and node.id in ("nan", "None", "NaN"):
        return None
    raise _Unparsable(f"unexpected {type(node).__name__}")


@lru_cache(maxsize=65536)
def parse_list_cell(text: str) -> tuple:
    """A Python-list string -> nested tuple of str/None, via ``ast`` (never eval).

    Cached: the same label strings repeat across thousands of rows.
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError) as exc:
        raise _Unparsable(str(exc)) from None
    value = _convert(tree.body)
    if not isinstance(value, tuple):
        raise _Unparsable("not a list")
    return value


def _norm_location(text: str) -> str:
    loc = normalize_location(text)
    return LOCATION_FIXES.get(loc, loc)


def _sequences(sentences: tuple) -> list[list[str]]:
    """Nested (Physician) -> one sequence per sentence; flat (RNN) -> a single sequence."""
    if any(isinstance(s, tuple) for s in sentences):
        return [[t for t in s if isinstance(t, str)] if isinstance(s, tuple) else [s] for s in sentences if s]
    return [[t for t in sentences if isinstance(t, str)]]


def _match_label(name: str, labels: dict[str, list[str]]) -> str | None:
    """Sentence items can be more specific than the label ("pleural effusion left side")."""
    if name in labels:
        return name
    best = None
    for label in labels:
        if name.startswith(label + " ") and (best is None or len(label) > len(best)):
            best = label
    return best


def attach_locations(labels: list[str], sentences: tuple) -> list[Finding]:
    """Give each label the locations that follow it in ``LabelsLocalizationsBySentence``.

    Within a sequence, ``loc`` items qualify the run of findings since the previous ``loc`` item
    (``['alveolar pattern', 'interstitial pattern', 'loc bilateral']`` -> both are bilateral).
    Sentence findings that are not in ``labels`` (e.g. ``normal`` in an abnormal study) are ignored.
    """
    located: dict[str, list[str]] = {label: [] for label in labels}
    for seq in _sequences(sentences):
        run: list[str] = []
        after_loc = False
        for item in seq:
            if normalize_name(item).startswith("loc "):
                loc = _norm_location(item)
                for label in run:
                    if loc and loc not in located[label]:
                        located[label].append(loc)
                after_loc = True
                continue
            if after_loc:
                run = []
                after_loc = False
            label = _match_label(normalize_name(item), located)
            if label is not None and label not in run:
                run.append(label)
    return [Finding(label, tuple(locs)) for label, locs in located.items()]


@lru_cache(maxsize=65536)
def _findings_for(labels: tuple[str, ...], raw_sentences: str) -> tuple[tuple[Finding, ...], bool]:
    """(findings, sentence cell parsed). Cached: label/sentence pairs repeat across many rows."""
    ok = True
    try:
        sentences = () if raw_sentences.strip().lower() in _MISSING_CELLS else parse_list_cell(raw_sentences)
    except _Unparsable:
        sentences, ok = (), False
    return tuple(attach_locations(list(labels), sentences)), ok


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: PadChest CSV not found")
    # A real CSV parser: labelCUIS cells contain newlines. Everything as text so "None"/"nan" stay literal.
    try:
        header = pd.read_csv(path, nrows=0, dtype=str)
        missing = [c for c in REQUIRED_COLUMNS if c not in header.columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}")
        usecols = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in header.columns]
        return pd.read_csv(path, usecols=usecols, dtype=str, keep_default_na=False, na_filter=False)
    except DataError:
        raise
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot parse PadChest CSV ({' '.join(str(exc).split())})") from None


def _relative(layout: str, image_dir: str, image_id: str) -> str:
    return f"{image_dir}/{image_id}" if layout == "nested" else image_id


_PLAIN_PART = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9_.\-]+$")


def _image_path(root: Path, resolved_root: Path, relative: str) -> Path | None:
    """``resolve_under`` for anything unusual; plain names (every real PadChest row) are joined
    lexically: they cannot leave the root, and a realpath per row would double the read time and
    reject a root whose sub-folders the user symlinked to another disk."""
    parts = relative.split("/")
    if all(_PLAIN_PART.match(p) for p in parts):
        return resolved_root.joinpath(*parts)
    return resolve_under(root, relative)


def detect_layout(root: Path, image_dirs: list[str], image_ids: list[str]) -> tuple[str, str]:
    """Probe evenly spaced rows for ``root/ImageDir/ImageID`` vs ``root/ImageID``."""
    n = len(image_ids)
    step = max(1, n // _LAYOUT_PROBES)
    hits = {"nested": 0, "flat": 0}
    probes = 0
    resolved_root = root.resolve()
    for i in range(0, n, step):
        probes += 1
        for layout in hits:
            path = _image_path(root, resolved_root, _relative(layout, image_dirs[i].strip(), image_ids[i].strip()))
            if path is not None and path.is_file():
                hits[layout] += 1
    layout = "flat" if hits["flat"] > hits["nested"] else "nested"
    how = f"auto: {hits['nested']} nested / {hits['flat']} flat hits in {probes} probed rows"
    if not any(hits.values()):
        how += " (no image found; assuming the official nested layout)"
    return layout, how


def read(cfg: PadchestData, require_images: bool = True) -> ReadResult:
    """Read PadChest per ``cfg``; every row is an example or counted in ``skipped``.

    ``require_images=False`` skips the per-row existence check (label-only use, e.g. inspecting the
    CSV without the 1 TB of images); paths that escape the image root are still rejected.
    """
    if cfg.csv is None:
        raise DataError("data.csv: required for data.dataset=padchest")
    csv = Path(cfg.csv)
    table = _read_table(csv)
    skip = SkipCounter(csv, strict=cfg.strict)
    root = Path(cfg.image_root)
    resolved_root = root.resolve()
    cols = {c: table[c].tolist() for c in table.columns}
    rows_total = len(table)

    notes: dict = {"csv": str(csv), "images_checked": require_images}
    if cfg.image_layout == "auto":
        layout, how = detect_layout(root, cols["ImageDir"], cols["ImageID"])
        notes["image_layout_detection"] = how
    else:
        layout = cfg.image_layout
    notes["image_layout"] = layout

    projections = {p.strip() for p in cfg.projections}
    methods = {m.strip() for m in cfg.method_labels}
    drop = {normalize_name(x) for x in cfg.drop_labels}
    study_ids = cols.get("StudyID")
    examples: list[Example] = []

    for i in range(rows_total):
        row = i + 1  # 1-based data row (the header is row 0)
        if cols["Projection"][i].strip() not in projections:
            skip("filtered_projection", row, cols["Projection"][i])
            continue
        if cols["MethodLabel"][i].strip() not in methods:
            skip("filtered_method", row, cols["MethodLabel"][i])
            continue
        if not cfg.include_pediatric and cols["Pediatric"][i].strip().upper() == "PED":
            skip("pediatric", row)
            continue
        raw_labels = cols["Labels"][i]
        if raw_labels.strip().lower() in _MISSING_CELLS:
            skip("missing_labels", row, f"Labels={raw_labels!r}")
            continue
        try:
            parsed = parse_list_cell(raw_labels)
        except _Unparsable as exc:
            skip("unparsable_labels", row, f"Labels: {exc}")
            continue
        labels: list[str] = []
        for item in parsed:
            name = normalize_name(item) if isinstance(item, str) else ""
            if name and name not in labels:
                labels.append(name)
        if not labels:
            skip("empty_labels", row, f"Labels={raw_labels!r}")
            continue
        if drop.intersection(labels):
            skip("dropped_label", row, ", ".join(sorted(drop.intersection(labels))))
            continue
        labels = [name for name in labels if name != UNCHANGED]
        if not labels:
            skip("only_unchanged", row)
            continue
        if NORMAL in labels:
            # Normal + real findings: "normal" only qualifies some other structure.
            labels = [name for name in labels if name != NORMAL]

        findings, located = _findings_for(tuple(labels), cols["LabelsLocalizationsBySentence"][i])

        image_id = cols["ImageID"][i].strip()
        image_dir = cols["ImageDir"][i].strip()
        if not image_id or (layout == "nested" and image_dir.lower() in _MISSING_CELLS):
            skip("missing_image_id", row, f"ImageID={image_id!r} ImageDir={image_dir!r}")
            continue
        path = _image_path(root, resolved_root, _relative(layout, image_dir, image_id))
        if path is None:
            skip("path_escape", row, image_id)
            continue
        if require_images and not path.is_file():
            skip("missing_image", row, str(path))
            continue

        group = cols["PatientID"][i].strip()
        if not group:
            # Without a patient id, the study is the widest group we can be sure of.
            study = study_ids[i].strip() if study_ids else ""
            group = f"study:{study}" if study else f"image:{image_id}"
        if not located:
            # The labels are fine; only their locations are lost, so the row is kept.
            notes["rows_without_locations"] = notes.get("rows_without_locations", 0) + 1
        examples.append(
            Example(image_path=path, image_id=image_id, group_id=group, findings=list(findings), source_row=row)
        )

    return ReadResult(
        examples=examples, rows_total=rows_total, skipped=skip.counts, notes=notes, first_skipped=skip.first
    )
