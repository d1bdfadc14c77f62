"""PNG plots for evaluation reports and the model card.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas directly, never through
``pyplot``: no global figure state, no dependence on the user's configured backend (a headless
training box with ``MPLBACKEND=TkAgg`` would otherwise fail), and safe from worker threads.
Each file is rendered to memory and written atomically, so a crash never leaves a half PNG that the
Hub upload would then publish.

Empty input is not an error: an evaluation with no scored boxes or a run with no logged loss still
gets a (labelled "no data") image, because a missing plot should not fail the run that produced it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path

from typing import TYPE_CHECKING

from xray_train.outputs import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_BARS = 40
#: File names ``xray-train evaluate`` should use; ``hub.stage_upload`` publishes these and the loss curve only.
F1_BARS = "f1_bars.png"
IOU_HISTOGRAM = "iou_histogram.png"


def _figure(figsize: tuple[float, float]) -> "Figure":
    # Imported here so `import xray_train.hub` (which needs only the file names) stays light.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: "Figure", path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _no_data(fig: "Figure", title: str, message: str) -> None:
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=12)
    ax.set_axis_off()


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def plot_f1_bars(per_finding: Mapping, path: Path, title: str = "F1 per finding") -> Path:
    """Horizontal F1 bars, most frequent findings first (``metrics.finding_scores()["per_finding"]``).

    Values may be metric dicts (``f1`` and optionally ``support``) or plain F1 floats. At most
    ``MAX_BARS`` findings by support are drawn; the title says how many were left out.
    """
    return _save(f1_bars_figure(per_finding, title), path)


def f1_bars_figure(per_finding: Mapping, title: str = "F1 per finding") -> "Figure":
    rows, predicted = [], 0
    for name, value in (per_finding or {}).items():
        if isinstance(value, Mapping):
            f1, support = value.get("f1"), value.get("support")
            predicted += value.get("predicted") or 0
        else:
            f1, support = value, None
        if _finite(f1):
            rows.append((str(name), float(f1), support if isinstance(support, int) else None))
    if not rows:
        fig = _figure((7, 2))
        _no_data(fig, title, "no findings to plot")
        return fig
    if all(f == 0 for _, f, _ in rows):
        # Zero-length bars would look like a broken chart: say what happened instead.
        fig = _figure((7, 2.4))
        why = "no findings predicted" if predicted == 0 else "no predicted finding matched a reference"
        _no_data(fig, title, f"{why}\n(F1 is 0 for all {len(rows)} reference findings)")
        return fig
    fig = _figure((7, 2 + 0.28 * min(len(rows), MAX_BARS)))
    rows.sort(key=lambda r: (-(r[2] or 0), r[0]))
    shown = rows[:MAX_BARS]
    ax = fig.add_subplot()
    labels = [f"{n} (n={s})" if s is not None else n for n, _, s in shown]
    ax.barh(range(len(shown)), [f for _, f, _ in shown], color="#3b75af")
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    left_out = len(rows) - len(shown)
    ax.set_title(title + (f" (top {len(shown)} by support; {left_out} more not shown)" if left_out else ""))
    ax.grid(axis="x", alpha=0.3)
    return fig


def plot_iou_histogram(ious: list[float], path: Path, title: str = "Best same-label IoU per reference box") -> Path:
    """Histogram of per-reference-box IoUs (``metrics.box_scores()["ious"]``), 0.5 marked."""
    values = [min(1.0, max(0.0, float(v))) for v in (ious or []) if _finite(v)]
    fig = _figure((6, 4))
    if not values:
        _no_data(fig, title, "no reference boxes to plot")
        return _save(fig, path)
    ax = fig.add_subplot()
    ax.hist(values, bins=[i / 20 for i in range(21)], color="#3b75af", edgecolor="white")
    ax.axvline(0.5, color="#c0392b", linestyle="--", label="IoU 0.5")
    missed = sum(v == 0.0 for v in values)
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU")
    ax.set_ylabel("reference boxes")
    ax.set_title(f"{title}\n{len(values)} boxes, {missed} with no overlapping prediction")
    ax.legend()
    return _save(fig, path)


def plot_loss_curve(log_history: list[dict], path: Path, title: str = "Loss") -> Path:
    """Training and evaluation loss against step from a HF Trainer ``state.log_history``.

    Entries with ``loss`` are training logs, with ``eval_loss`` evaluation logs; the final summary entry
    (``train_loss``) and non-finite values (a diverged step) are skipped rather than breaking the axis.
    """
    train, evals = [], []
    for entry in log_history or []:
        if not isinstance(entry, Mapping) or not _finite(entry.get("step")):
            continue
        if _finite(entry.get("loss")):
            train.append((entry["step"], float(entry["loss"])))
        if _finite(entry.get("eval_loss")):
            evals.append((entry["step"], float(entry["eval_loss"])))
    fig = _figure((7, 4))
    if not train and not evals:
        _no_data(fig, title, "no loss was logged")
        return _save(fig, path)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*sorted(train)), label="train", color="#3b75af", linewidth=1.2)
    if evals:
        ax.plot(*zip(*sorted(evals)), label="eval", color="#e67e22", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
