"""``xray-train data check``: read a dataset, optionally decode every image, summarise as JSON.

The summary carries counts only (no patient identifiers); unreadable images are listed by image id.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from xray_train.config import DataConfig
from xray_train.data.images import ImageError, load_grayscale
from xray_train.data.records import Example, ReadResult, SkipCounter
from xray_train.data.registry import read_dataset
from xray_train.data.splits import split_examples
from xray_train.errors import DataError

#: How many unreadable images are named in the summary (the count is always complete).
MAX_LISTED_UNREADABLE = 20
#: Skip reasons whose first row is shown with its detail: the path that was looked for. Other details can
#: hold study ids, which never reach an output.
PATH_REASONS = ("missing_image", "path_escape")


def _source(cfg: DataConfig):
    """The file a dataset's errors name: its CSV (Indiana: the reports CSV; hf: its source), else the image folder."""
    return getattr(cfg, "csv", None) or getattr(cfg, "reports_csv", None) or getattr(cfg, "source", None) or cfg.image_root


def looked_for(result: ReadResult) -> dict[str, str]:
    """``{"missing_image": "row 2: /data/images/0001.png"}``: where the first skipped image was looked for."""
    return {
        reason: f"row {row}: {detail}" for reason, (row, detail) in result.first_skipped.items()
        if reason in PATH_REASONS and detail
    }


def why_unusable(result: ReadResult) -> str:
    """Why a read gave no example, in one line: the skip counts and where missing images were looked for."""
    if not result.rows_total:
        return "it has no data rows"
    counts = ", ".join(f"{reason}={n}" for reason, n in result.skipped.most_common())
    where = "; ".join(f"first {reason} at {detail}" for reason, detail in looked_for(result).items())
    return f"all {result.rows_total} rows skipped ({counts}){'; ' + where if where else ''}"


def read_for_training(cfg: DataConfig) -> ReadResult:
    """Read the dataset, before any weight is loaded: a ``DataError`` naming the source when no example is
    usable, or none is left for training after the patient split."""
    result = read_dataset(cfg)
    source = _source(cfg)
    if not result.examples:
        raise DataError(f"{source}: no usable examples: {why_unusable(result)}; see `xray-train data check`")
    splits = split_examples(result.examples, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    if not splits["train"]:
        raise DataError(
            f"{source}: none of the {len(result.examples)} usable examples is left for training after the "
            f"patient split (data.val_fraction={cfg.val_fraction}, data.test_fraction={cfg.test_fraction}); "
            "add data or lower the fractions"
        )
    return result


def _try_open(example: Example) -> str | None:
    try:
        load_grayscale(example.image_path)
    except ImageError as exc:
        return str(exc)
    return None


def _open_all(examples: list[Example], progress: bool, workers: int) -> list[str | None]:
    # PNG/zlib decoding releases the GIL, so threads give a real speed-up on many-core machines.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_try_open, examples)
        if not progress:
            return list(results)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("opening images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        out = []
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task("images", total=len(examples))
            for result in results:
                out.append(result)
                bar.advance(task)
        return out


def check_dataset(
    cfg: DataConfig, open_images: bool = True, progress: bool = True, workers: int | None = None
) -> dict:
    """Read ``cfg``'s dataset and return a JSON-able summary.

    With ``open_images`` every image is decoded; unreadable ones move from the examples to
    ``skipped["unreadable_image"]`` (under ``cfg.strict`` the first one raises ``DataError``).
    Invariant: ``examples + sum(skipped.values()) == rows_total``.
    """
    result = read_dataset(cfg)
    examples = result.examples
    skipped = Counter(result.skipped)
    unreadable: list[dict] = []
    if open_images and examples:
        workers = workers or min(8, os.cpu_count() or 1)
        errors = _open_all(examples, progress, workers)
        skip = SkipCounter(_source(cfg), strict=cfg.strict)
        kept = []
        for example, error in zip(examples, errors):
            if error is None:
                kept.append(example)
                continue
            skip("unreadable_image", example.source_row, error)
            if len(unreadable) < MAX_LISTED_UNREADABLE:
                unreadable.append({"image_id": example.image_id, "error": error})
        skipped.update(skip.counts)
        examples = kept

    labels: Counter = Counter()
    locations: Counter = Counter()
    normal = 0
    for ex in examples:
        if not ex.findings:
            normal += 1
        for finding in ex.findings:
            labels[finding.name] += 1
            locations.update(finding.locations)

    splits = split_examples(examples, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    summary: dict = {
        "dataset": cfg.dataset,
        "rows_total": result.rows_total,
        "examples": len(examples),
        "skipped": dict(sorted(skipped.items())),
        "normal_studies": normal,
        "labels": dict(labels.most_common()),
        "locations": dict(locations.most_common()),
        "splits": {name: len(items) for name, items in splits.items()},
        "images_opened": bool(open_images),
        "notes": {k: v for k, v in result.notes.items()},
    }
    if looked_for(result):
        summary["looked_for"] = looked_for(result)
    if unreadable:
        summary["unreadable_images"] = unreadable
    box_examples = [ex for ex in examples if ex.boxes is not None]
    if box_examples:
        box_labels = Counter(box.label for ex in box_examples for box in ex.boxes)
        summary["boxes_total"] = sum(box_labels.values())
        summary["box_labels"] = dict(box_labels.most_common())
        summary["examples_without_boxes"] = sum(1 for ex in box_examples if not ex.boxes)
    return summary
