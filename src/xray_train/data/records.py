"""Records shared by every dataset reader, the trainer, evaluation and prediction.

Coordinates convention (used everywhere in the project):
- A ``Box`` is stored **normalised to the original image** (x and y in [0, 1] of the original width and
  height, before any padding or resizing). Readers convert pixel box files with the image's size.
- ``data.images.Geometry`` maps those to the prepared (padded, square, resized) image the model sees,
  and back, so targets, metrics and drawn boxes agree.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Finding:
    """One finding and the locations that qualify it, e.g. ("pleural effusion", ("left", "basal"))."""

    name: str
    locations: tuple[str, ...] = ()


@dataclass(frozen=True)
class Box:
    """A labelled box, normalised to the original image: 0 <= x_min < x_max <= 1, same for y."""

    label: str
    x_min: float
    y_min: float
    x_max: float
    y_max: float


@dataclass
class Example:
    """One training / evaluation example: an image and what the model should say about it."""

    image_path: Path
    #: The image's file name as the dataset names it; the only identifier that may reach outputs.
    image_id: str
    #: Patient (or study) identifier used only to group the train/validation/test split.
    #: Never written to any output, log or cache key in clear text.
    group_id: str
    #: Phase-1 ground truth (empty list = normal study).
    findings: list[Finding] = field(default_factory=list)
    #: Phase-2 ground truth; None when the source has no boxes (Phase-1 data).
    boxes: list[Box] | None = None
    #: 1-based row number in the source table, for error messages.
    source_row: int = 0
    #: Phase-1 target text as the source writes it, trained verbatim; None: the report built from ``findings``.
    report: str | None = None
    #: The split the source puts it in (a dataset's own held-out splits); None: by the patient hash.
    split: str | None = None


@dataclass
class ReadResult:
    """What a reader returns: usable examples plus every skipped row counted by reason.

    Invariant: ``len(examples) + sum(skipped.values()) == rows_total``.
    """

    examples: list[Example]
    rows_total: int
    skipped: Counter = field(default_factory=Counter)
    #: Reader-specific notes for ``data check`` (e.g. which image layout was detected).
    notes: dict = field(default_factory=dict)
    #: reason -> (row, detail) of its first skipped row, e.g. the path a missing image was looked for at.
    first_skipped: dict = field(default_factory=dict)


#: Skip reasons that are the configured selection or the documented target policy, not faults in the data:
#: every real PadChest CSV has lateral views, so ``--strict`` must not fail on them.
FILTER_REASONS = frozenset({
    "filtered_projection",  # data.projections
    "filtered_method",  # data.method_labels
    "pediatric",  # data.include_pediatric
    "dropped_label",  # data.drop_labels
    "only_unchanged",  # a comparison with a prior film: nothing to learn from this image alone
    "no_mesh",  # Indiana marks unindexed studies "No Indexing": their findings are unknown
    "abnormal_without_box",  # the box source has no box for this finding
})


class SkipCounter:
    """Counts unusable rows by reason and keeps the first row of each. Under ``strict`` a row that is
    unreadable or malformed is an error naming file and row; intended filters (``FILTER_REASONS``) are
    only counted."""

    def __init__(self, source: Path | str, strict: bool = False):
        self.source = str(source)
        self.strict = strict
        self.counts: Counter = Counter()
        self.first: dict[str, tuple[int, str]] = {}

    def __call__(self, reason: str, row: int, detail: str = "") -> None:
        if self.strict and reason not in FILTER_REASONS:
            from xray_train.errors import DataError

            extra = f" ({detail})" if detail else ""
            raise DataError(f"{self.source} row {row}: {reason}{extra} [--strict]")
        self.counts[reason] += 1
        self.first.setdefault(reason, (row, detail))


@functools.lru_cache(maxsize=64)
def _resolved(root: Path) -> Path:
    # A reader asks once per row with the same root: resolving it (a stat per path component) once.
    return Path(root).resolve()


def resolve_under(root: Path, relative: str) -> Path | None:
    """``root / relative`` if it stays inside ``root``; None for absolute paths or ``..`` escapes."""
    if not relative or Path(relative).is_absolute() or relative.startswith(("/", "\\")):
        return None
    candidate = (root / relative).resolve()
    try:
        candidate.relative_to(_resolved(root))
    except ValueError:
        return None
    return candidate
