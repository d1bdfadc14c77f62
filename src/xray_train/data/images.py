"""The one image path for training, evaluation and prediction.

load -> window to 8 bits -> pad to square -> resize. ``Geometry`` records the pad and scale so boxes go
through exactly the same transform as the pixels (and back, for drawing and metrics).
"""

from __future__ import annotations

from dataclasses import dataclass

from xray_train.data.records import Box


@dataclass(frozen=True)
class Geometry:
    """Original image (width x height) padded centred to a square of side max(w, h), then resized to size."""

    orig_width: int
    orig_height: int
    size: int

    @property
    def side(self) -> int:
        return max(self.orig_width, self.orig_height)

    @property
    def pad_left(self) -> int:
        return (self.side - self.orig_width) // 2

    @property
    def pad_top(self) -> int:
        return (self.side - self.orig_height) // 2

    def to_prepared(self, box: Box) -> Box:
        """Box normalised to the original image -> box normalised to the prepared square image."""
        s, w, h = self.side, self.orig_width, self.orig_height
        return Box(
            box.label,
            (box.x_min * w + self.pad_left) / s,
            (box.y_min * h + self.pad_top) / s,
            (box.x_max * w + self.pad_left) / s,
            (box.y_max * h + self.pad_top) / s,
        )

    def to_original(self, box: Box) -> Box:
        """Inverse of ``to_prepared``, clipped to the original image (a predicted box may cover padding)."""
        s, w, h = self.side, self.orig_width, self.orig_height

        def clip(v: float) -> float:
            return min(1.0, max(0.0, v))

        return Box(
            box.label,
            clip((box.x_min * s - self.pad_left) / w),
            clip((box.y_min * s - self.pad_top) / h),
            clip((box.x_max * s - self.pad_left) / w),
            clip((box.y_max * s - self.pad_top) / h),
        )
