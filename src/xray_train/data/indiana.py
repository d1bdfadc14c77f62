"""Indiana University chest X-rays (OpenI / IU-Xray), Kaggle layout, as Phase-2 (box) data.

Inputs: ``data.reports_csv`` (``indiana_reports.csv``: uid, MeSH, Problems, image, indication, comparison,
findings, impression), ``data.projections_csv`` (``indiana_projections.csv``: uid, filename, projection)
and ``data.image_root`` (the ``images/images_normalized/`` folder). The two tables are joined on ``uid``;
the uid is never parsed out of a file name.

One Example per row of the projections table (one image). ``rows_total`` counts those rows.

Projection filter: rows whose projection (``Frontal`` / ``Lateral``) is listed in ``data.projections``
(default ``[Frontal]``) are kept; a list naming no Indiana value keeps ``Frontal``. Rows filtered out are
counted as ``filtered_projection`` (a filter, as in the PadChest reader, not an error: ``--strict`` does not
fail on them).

Findings come from MeSH (``xray_train.data.atlas``: term -> finding name, location qualifiers -> locations).
Boxes come from ``data.box_source``:

- ``mesh_atlas`` (default): WEAK boxes of fixed anatomical regions named by MeSH qualifiers (see atlas).
- ``box_file``: ``data.box_file`` (see ``boxfile``), keyed by ``filename`` or by ``uid`` (then the boxes
  apply to every kept image of that study); pixel files are normalised with each image's header size.

Targets: a ``normal`` study -> no findings, no boxes (Phase 2 answers "no localisable finding"). A study
whose MeSH is empty or ``No Indexing`` has unknown findings and is skipped (``no_mesh``). An abnormal
image for which no box could be found is skipped (``abnormal_without_box``) rather than trained to say
"no localisable finding" about a finding it has. Box-level problems are counted in
``notes["boxes_skipped"]``.

``group_id`` is the study uid: Indiana publishes no patient id, and one uid is one study of one patient.
"""

from __future__ import annotations

from collections import Counter

from xray_train.config import IndianaData
from xray_train.data import atlas
from xray_train.data.boxfile import BoxFile, image_size_or_reason, read_box_file, read_csv_table
from xray_train.data.records import Example, ReadResult, SkipCounter, resolve_under
from xray_train.errors import DataError

REPORT_COLUMNS = ("uid", "MeSH")
PROJECTION_COLUMNS = ("uid", "filename", "projection")
INDIANA_PROJECTIONS = ("Frontal", "Lateral")


def kept_projections(cfg: IndianaData) -> set[str]:
    """Indiana projection values to keep (see the module docstring for the rule)."""
    wanted = {p for p in cfg.projections if p in INDIANA_PROJECTIONS}
    return wanted or {"Frontal"}


def read(cfg: IndianaData) -> ReadResult:
    reports = read_csv_table(cfg.reports_csv, REPORT_COLUMNS, "data.reports_csv")
    projections = read_csv_table(cfg.projections_csv, PROJECTION_COLUMNS, "data.projections_csv")
    box_file: BoxFile | None = None
    if cfg.box_source == "box_file":
        if cfg.box_file is None:
            raise DataError("data.box_file: required when data.box_source is box_file")
        box_file = read_box_file(cfg.box_file, cfg.box_coords, cfg.strict)

    mesh_by_uid: dict[str, str] = {}
    for _, row in reports:
        mesh_by_uid.setdefault(row["uid"], row["MeSH"])

    keep = kept_projections(cfg)
    skip = SkipCounter(cfg.projections_csv, cfg.strict)
    box_skip = SkipCounter(cfg.box_file or "box_file", cfg.strict)
    filtered: Counter = Counter()
    examples: list[Example] = []
    used_keys: set[str] = set()

    for row_no, row in projections:
        uid, filename, projection = row["uid"], row["filename"], row["projection"]
        if projection not in keep:
            filtered["filtered_projection"] += 1
            continue
        if not uid or uid not in mesh_by_uid:
            skip("unknown_uid", row_no, f"uid={uid!r} not in {cfg.reports_csv}")
            continue
        mesh = mesh_by_uid[uid]
        path = resolve_under(cfg.image_root, filename)
        if path is None:
            skip("path_escape", row_no, filename)
            continue
        if not path.is_file():
            skip("missing_image", row_no, str(path))
            continue
        if not atlas.parse_mesh(mesh) and not atlas.is_normal(mesh):
            skip("no_mesh", row_no, f"uid={uid} MeSH={mesh!r}")
            continue
        findings = atlas.findings_from_mesh(mesh)
        if box_file is None:
            boxes = atlas.boxes_from_mesh(mesh)
        else:
            key = filename if box_file.key_column == "filename" else uid
            used_keys.add(key)
            boxes = []
            if key in box_file.by_key:
                size, reason = (None, "")
                if box_file.coords == "pixels":
                    size, reason = image_size_or_reason(path)
                    if size is None:
                        skip(reason, row_no, str(path))
                        continue
                w, h = size or (1, 1)
                boxes = box_file.boxes_for(key, w, h, box_skip)
        if findings and not boxes:
            skip("abnormal_without_box", row_no, f"uid={uid} MeSH={mesh!r}")
            continue
        examples.append(
            Example(
                image_path=path,
                image_id=filename,
                group_id=uid,
                findings=findings,
                boxes=boxes,
                source_row=row_no,
            )
        )

    skipped = skip.counts + filtered
    notes: dict = {
        "projections_kept": sorted(keep),
        "box_source": cfg.box_source,
        "boxes_skipped": dict(box_skip.counts),
    }
    if cfg.box_source == "mesh_atlas":
        notes["weak_boxes"] = "boxes derived from MeSH qualifiers via a fixed anatomical atlas"
    if box_file is not None:
        notes["box_file_rows"] = box_file.rows_total
        notes["boxes_skipped"] = dict(box_skip.counts + box_file.skipped)
        notes["box_keys_unmatched"] = len(set(box_file.by_key) - used_keys)
    return ReadResult(
        examples=examples, rows_total=len(projections), skipped=skipped, notes=notes, first_skipped=skip.first
    )
