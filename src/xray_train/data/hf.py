"""Any chest X-ray set that Hugging Face ``datasets`` loads (a Hub id, parquet, JSON lines, CSV, an image
folder with ``metadata.jsonl``) as Phase-1 and/or Phase-2 data, with the native readers' guarantees
(docs/your_data.md is the user's side of this).

Loading is ``load_dataset``'s own: a local folder as ``load_dataset(folder)`` reads it, a file or glob with
the builder of ``data.format`` (or of its suffix), anything else a Hub id pinned by ``data.revision``; remote
code is never run. Streamed or not, rows are read the same way (``iter`` in batches, only the mapped
columns), so both give the same examples in the same order.

The image column is cast to ``Image(decode=False)``: ``datasets`` would clip 16-bit films to 8 bits; the
project's one image path reads the file. Images on disk are used where they are; embedded bytes are written
once to ``$XRAY_TRAIN_CACHE/hf-images`` under their content hash, so every later step sees a file like any
other dataset's; text paths are relative to ``data.image_root`` (default: the source's folder).

Report text in the Phase-1 form is trained as the canonical report of its findings, like PadChest's; other
text verbatim (``Example.report``). Boxes go through the box tables' shared skeleton (``BoxedExamples``).
``data.split`` is divided by a hash of the patient id (``data.splits``); named held-out splits replace that
share. Rows are numbered from 1 through ``data.split``, then the validation, then the test split. Every row
is an example or counted by reason; a column that is not there stops the read, naming it and the columns
that are.

(Over 400 lines: one reader for every form ``datasets`` loads, with its column mapping, both phases' targets
and the rows' accounting; split by form, each part would repeat the mapping.)
"""

from __future__ import annotations

import hashlib
import os
import string
from pathlib import Path
from typing import Any

from xray_train.cache import cache_root
from xray_train.config import HfData
from xray_train.data.boxfile import BoxedExamples, RawBox, numbers, xywh_corners
from xray_train.data.records import Example, Finding, ReadResult, resolve_under
from xray_train.data.reports import canonical_findings, parse_report
from xray_train.data.splits import assign_split
from xray_train.errors import DataError
from xray_train.names import looks_like_local_path

#: Builder of a data file, by suffix (``data.format: auto``).
SUFFIX_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
DEFAULT_BOX_LABEL = "abnormality"
#: Rows handed over per batch: large enough to amortise the Arrow-to-Python conversion, small enough that
#: only this many rows' mapped columns are in memory at once.
BATCH_ROWS = 1024


# ---------------------------------------------------------------------------------------------
# Loading


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def hub_dataset_id(data: dict) -> str | None:
    """The Hub dataset id a ``dataset: hf`` data section (as a dict: a saved run's) reads, or None where
    ``data.source`` names local files. Decided from the text and ``data.format``, as ``_local`` decides it,
    so a card written on another machine than the run's names the same dataset."""
    source = str(data.get("source") or "")
    if data.get("dataset") != "hf" or not source:
        return None
    if data.get("format") == "hub":
        return source
    auto = data.get("format", "auto") == "auto"
    return source if auto and not _is_glob(source) and not looks_like_local_path(source) else None


def _local(cfg: HfData) -> Path | None:
    """The local folder or file of ``data.source`` (a glob: its fixed folder); None for a Hub id."""
    if cfg.format == "hub":
        return None
    if _is_glob(cfg.source):
        fixed = Path(cfg.source.split("*")[0].split("?")[0].split("[")[0]).expanduser()
        return fixed if fixed.is_dir() else fixed.parent
    path = Path(cfg.source).expanduser()
    if path.exists():
        return path
    if cfg.format != "auto" or looks_like_local_path(cfg.source):
        raise DataError(f"data.source: not found: {cfg.source}")
    return None


def _load(cfg: HfData, split: str):
    """``split`` of ``data.source`` as a ``Dataset`` (or an ``IterableDataset`` when streaming)."""
    import datasets

    local = _local(cfg)
    kwargs: dict[str, Any] = {"split": split, "streaming": cfg.streaming}
    if local is None:
        if not cfg.revision:
            raise DataError(f"data.revision: required for the Hub dataset {cfg.source} (pin the commit it comes from)")
        args: tuple = (cfg.source,)
        kwargs["revision"] = cfg.revision
    elif local.is_dir() and not _is_glob(cfg.source):
        args = (str(local),) if cfg.format == "auto" else (cfg.format,)
        if cfg.format != "auto":
            kwargs["data_dir"] = str(local)
    else:
        fmt = cfg.format if cfg.format != "auto" else SUFFIX_FORMATS.get(Path(cfg.source).suffix.lower())
        if fmt is None or fmt == "imagefolder":
            raise DataError(f"data.format: cannot tell how to read {cfg.source}; set it to parquet, json or csv")
        if split != cfg.split:
            raise DataError(
                f"data.source: {cfg.source} is one file set, so it has one split; to read {split!r}, point "
                "data.source at a folder whose file names say the split (train-*.parquet, test-*.parquet)"
            )
        args, kwargs["data_files"] = (fmt,), {split: cfg.source}
    try:
        return datasets.load_dataset(*args, **kwargs)
    except ValueError as exc:
        if "Unknown split" in str(exc):
            key = {cfg.split: "split", cfg.validation_split: "validation_split", cfg.test_split: "test_split"}[split]
            raise DataError(f"data.{key}: {cfg.source} has no split {split!r} ({exc})") from None
        raise DataError(f"data.source: cannot load {cfg.source} ({exc})") from None
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise DataError(f"data.source: cannot load {cfg.source} ({exc})") from None


# ---------------------------------------------------------------------------------------------
# Columns


def _unwrap(feature):
    """The item feature of a list feature (``List``, ``LargeList``, ``Sequence``), else the feature."""
    while hasattr(feature, "feature") and not isinstance(feature, dict):
        feature = feature.feature
    return feature


def _field(features, dotted: str, key: str):
    """The feature at ``dotted`` (``objects.bbox``); DataError naming the config key and what exists."""
    parts = dotted.split(".")
    if parts[0] not in features:
        raise DataError(f"data.{key}: no column {parts[0]!r} (columns: {', '.join(features)})")
    feature = features[parts[0]]
    for i, part in enumerate(parts[1:], start=1):
        inner = _unwrap(feature)
        if inner is None:
            return None  # a streamed set that declares no features: its fields are checked row by row
        if not isinstance(inner, dict) or part not in inner:
            where = ".".join(parts[:i])
            fields = ", ".join(inner) if isinstance(inner, dict) else "none"
            raise DataError(f"data.{key}: no field {part!r} in {where!r} (fields: {fields})")
        feature = inner[part]
    return feature


def _class_names(feature) -> list[str] | None:
    import datasets

    inner = _unwrap(feature)
    return list(inner.names) if isinstance(inner, datasets.ClassLabel) else None


def _value(row: dict, dotted: str):
    """``row["objects"]["bbox"]``; through a list of records, the field of each (``[{bbox, category}, ...]``)."""
    parts = dotted.split(".")
    value = row.get(parts[0])
    for part in parts[1:]:
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list):
            value = [item.get(part) if isinstance(item, dict) else None for item in value]
        else:
            return None
    return value


def _names(value, classes: list[str] | None) -> list[str] | None:
    """Finding or box names from text (``a; b``), a list, or ClassLabel ids; None when absent."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and classes is not None:
            out.append(classes[item] if 0 <= item < len(classes) else str(item))
        elif isinstance(item, str):
            out += [part.strip() for part in item.split(";") if part.strip()]
        elif item is not None:
            out.append(str(item))
    return out


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "\n".join(_text(v) for v in value if v is not None).strip()
    return str(value).strip()


class _Columns:
    """The mapped columns of one split, checked against its features, with their ClassLabel names."""

    def __init__(self, cfg: HfData, features):
        c = cfg.columns
        self.report = [c.report] if isinstance(c.report, str) else list(c.report or [])
        mapped = {"columns.image": c.image, "columns.labels": c.labels, "columns.boxes": c.boxes,
                  "columns.box_labels": c.box_labels, "columns.patient_id": c.patient_id}
        self.found = {key: _field(features, dotted, key) for key, dotted in mapped.items() if dotted}
        for name in self.report:
            _field(features, name, "columns.report")
        self.top = sorted({dotted.split(".")[0] for dotted in [*mapped.values(), *self.report] if dotted})
        self.label_names = _class_names(self.found.get("columns.labels"))
        self.box_label_names = _class_names(self.found.get("columns.box_labels"))
        self.image_is_feature = _is_image(self.found["columns.image"])
        if cfg.report_template is not None:
            self.template = cfg.report_template
        elif len(self.report) > 1:
            self.template = "\n".join(f"{name.split('.')[-1].upper()}: {{{name}}}" for name in self.report)
        else:
            self.template = None


def _is_image(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.Image)


def _features(ds) -> dict:
    """A split's features; a streamed set that does not declare them: its first row's plain columns."""
    if ds.features is not None:
        return ds.features
    first = next(iter(ds.take(1)), {})
    return {name: None for name in first}


# ---------------------------------------------------------------------------------------------
# Rows


class _Rows:
    """Turns rows into examples, counting every unusable one (the native readers' bookkeeping)."""

    def __init__(self, cfg: HfData, out: BoxedExamples):
        self.cfg = cfg
        self.out = out
        local = _local(cfg)
        self.folder = local if local is None or local.is_dir() else local.parent
        self.root = Path(cfg.image_root) if cfg.image_root is not None else self.folder
        self.rows = 0

    def image(self, value, row: int) -> tuple[Path | None, str]:
        """(image file, image id) of an image cell, or (None, "") with the row counted."""
        if isinstance(value, dict):
            data, name = value.get("bytes"), value.get("path")
            if not data and name and Path(name).is_absolute():
                # A file the builder found on disk (an image folder): used where it is.
                path = Path(name)
                if not path.is_file():
                    self.out.skip("missing_image", row, str(path))
                    return None, ""
                inside = self.folder is not None and path.is_relative_to(self.folder)
                return path, str(path.relative_to(self.folder)) if inside else path.name
            if data:
                path = self._embedded(data, name)
                return path, name or path.name
            value = name
        if not value:
            self.out.skip("missing_image", row)
            return None, ""
        if self.root is None:
            self.out.skip("missing_image", row, f"{value} (a text path needs data.image_root)")
            return None, ""
        path = resolve_under(self.root, str(value))
        if path is None:
            self.out.skip("path_escape", row, str(value))
            return None, ""
        if not path.is_file():
            self.out.skip("missing_image", row, str(path))
            return None, ""
        return path, str(value)

    def _embedded(self, data: bytes, name: str | None) -> Path:
        digest = hashlib.sha256(data).hexdigest()
        path = cache_root() / "hf-images" / digest[:2] / (digest + (Path(name).suffix.lower() if name else ""))
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_name(f"{path.name}.{os.getpid()}.partial")
            part.write_bytes(data)
            os.replace(part, path)  # content-addressed: a concurrent writer wrote the same bytes
        return path

    def report(self, row: dict, cols: _Columns) -> str | None:
        values = {name: _text(_value(row, name)) for name in cols.report}
        if not any(values.values()):
            return None
        if cols.template is None:
            return values[cols.report[0]]
        return _TEMPLATE.vformat(cols.template, (), values).strip()

    def add(self, row: dict, row_no: int, cols: _Columns, held_out: str | None) -> None:
        cfg, skip = self.cfg, self.out.skip
        path, image_id = self.image(_value(row, cfg.columns.image), row_no)
        if path is None:
            return
        group = image_id
        if cfg.columns.patient_id:
            group = _text(_value(row, cfg.columns.patient_id))
            if not group:
                skip("missing_patient_id", row_no, image_id)
                return
        report, findings = None, None
        if cfg.columns.labels:
            names = _names(_value(row, cfg.columns.labels), cols.label_names)
            if names is None:
                skip("missing_labels", row_no, image_id)
                return
            findings = [Finding(name) for name in names]
        if cols.report:
            text = self.report(row, cols)
            if not text:
                skip("empty_report", row_no, image_id)
                return
            parsed = parse_report(text)
            if parsed.well_formed:
                findings = parsed.findings
            else:
                report, findings = text, findings if findings is not None else parsed.findings
        if cfg.columns.boxes:
            example = self._boxed(row, row_no, cols, path, image_id, group, findings)
            if example is None:
                return
        else:
            example = Example(image_path=path, image_id=image_id, group_id=group, source_row=row_no)
            self.out.examples.append(example)
        if findings is not None:
            example.findings = findings
        example.report = report
        example.split = held_out or self._split(group)

    def _boxed(self, row, row_no, cols, path, image_id, group, findings) -> Example | None:
        cfg = self.cfg
        boxes = _value(row, cfg.columns.boxes)
        if boxes is None:
            self.out.skip("missing_boxes", row_no, image_id)
            return None
        labels = [DEFAULT_BOX_LABEL] * len(boxes)
        if cfg.columns.box_labels:
            labels = _names(_value(row, cfg.columns.box_labels), cols.box_label_names) or []
            if len(labels) != len(boxes):
                self.out.skip("box_labels_mismatch", row_no, f"{image_id}: {len(boxes)} boxes, {len(labels)} labels")
                return None
        if not boxes and findings and canonical_findings(findings):
            self.out.skip("abnormal_without_box", row_no, image_id)
            return None
        to_corners = xywh_corners if cfg.box_order == "xywh" else numbers
        raw = [
            RawBox(str(label), *to_corners(*((list(box) if isinstance(box, (list, tuple)) else []) + [None] * 4)[:4]),
                   row=row_no)
            for box, label in zip(boxes, labels)
        ]
        size = (1.0, 1.0) if cfg.box_coords == "normalized" else None
        return self.out.add(path, raw, row=row_no, image_id=image_id, group_id=group, key=image_id, size=size)

    def _split(self, group: str) -> str | None:
        """With a named held-out split, the patient split of ``data.split`` gives its share to training."""
        cfg = self.cfg
        if not (cfg.validation_split or cfg.test_split):
            return None  # ``split_examples`` divides by patient with the configured fractions
        val = 0.0 if cfg.validation_split else cfg.val_fraction
        test = 0.0 if cfg.test_split else cfg.test_fraction
        return assign_split(group, val, test, cfg.split_seed)


class _Template(string.Formatter):
    """``str.format`` whose fields are whole column names: ``{objects.text}`` is that column's text, not an
    attribute lookup."""

    def get_field(self, field_name, args, kwargs):
        return kwargs.get(field_name, ""), field_name


_TEMPLATE = _Template()


def read(cfg: HfData) -> ReadResult:
    out = BoxedExamples(cfg.source, cfg.strict)
    rows = _Rows(cfg, out)
    if cfg.image_root is not None and not Path(cfg.image_root).is_dir():
        raise DataError(f"data.image_root not found: {cfg.image_root}")
    per_split = {}
    for split, held_out in ((cfg.split, None), (cfg.validation_split, "validation"), (cfg.test_split, "test")):
        if split is None:
            continue
        ds = _load(cfg, split)
        cols = _Columns(cfg, _features(ds))
        if cols.image_is_feature:
            import datasets

            ds = ds.cast_column(cfg.columns.image, datasets.Image(decode=False))
        ds = ds.select_columns(cols.top)
        start = rows.rows
        for batch in ds.iter(batch_size=BATCH_ROWS):
            names = list(batch)
            for values in zip(*(batch[name] for name in names)):
                rows.rows += 1
                rows.add(dict(zip(names, values)), rows.rows, cols, held_out)
        per_split[split] = rows.rows - start
    out.rows_total = rows.rows
    notes: dict = {"source": cfg.source, "rows_per_split": per_split, "streaming": cfg.streaming}
    if cfg.revision:
        notes["revision"] = cfg.revision
    if cfg.columns.report:
        # Text in the Phase-1 form is trained as its canonical report; other text verbatim.
        verbatim = sum(ex.report is not None for ex in out.examples)
        notes["reports"] = {"structured": len(out.examples) - verbatim, "verbatim": verbatim}
    if not cfg.columns.patient_id:
        notes["patients"] = "no data.columns.patient_id: each image is its own patient"
    return out.result(**notes)
