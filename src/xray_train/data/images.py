"""The one image path for training, evaluation and prediction.

load -> window to 8 bits -> pad to square -> resize. ``Geometry`` records the pad and scale so boxes go
through exactly the same transform as the pixels (and back, for drawing and metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from xray_train.data.records import Box
from xray_train.errors import XrayTrainError


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


# ---------------------------------------------------------------------------------------------
# Loading, windowing, padding, resizing


class ImageError(XrayTrainError):
    """An image file that cannot be read; the message names the path and the cause."""


_UINT16_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
_PIL_WIDE_MODES = {*_UINT16_MODES, "I", "F"}
# Integer images are windowed through a table of every possible value: one gather instead of a
# chain of float passes over ~5 M pixels, and the same arithmetic, so the same bytes.
_LUT_DTYPES = (np.uint8, np.uint16)
_DICOM_SUFFIXES = {".dcm", ".dicom"}
# Percentiles are estimated on a strided subsample above this many pixels: a 4k x 4k radiograph then
# costs ~1 M samples instead of 17 M, and the stride is fixed so the result stays deterministic.
_MAX_WINDOW_SAMPLES = 1 << 20


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _fail(path: Path, cause: object) -> ImageError:
    text = " ".join(str(cause).split()) or type(cause).__name__
    return ImageError(f"{path}: cannot read image ({text})")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise _fail(path, "file not found")
    if path.stat().st_size == 0:
        raise _fail(path, "empty file")


def read_image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) from the file header only; pixels are not decoded."""
    path = Path(path)
    _check_file(path)
    try:
        if _is_dicom(path):
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Columns), int(ds.Rows)
        with Image.open(path) as img:
            return img.size
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
        raise _fail(path, exc) from None


def _rgb_to_luminance(arr: np.ndarray) -> np.ndarray:
    # ITU-R 601-2 weights, the same ones PIL's convert("L") uses, so array and file inputs agree.
    rgb = arr[..., :3].astype(np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _load_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    if samples > 1:
        return _rgb_to_luminance(arr)
    arr = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    if str(getattr(ds, "PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        # MONOCHROME1 stores bright as low values; flip within the image's own range.
        arr = arr.max() + arr.min() - arr
    return arr


def _load_pil(path: Path) -> np.ndarray:
    """uint8 or uint16 for 8/16-bit grey files (windowed through a lookup table), float32 otherwise."""
    with Image.open(path) as img:
        img.load()  # decode now so truncated files fail here, not later
        if img.mode in _UINT16_MODES:
            # Never convert("RGB"/"L") a 16-bit image: PIL clips it to 8 bits instead of scaling.
            return np.asarray(img).astype(np.uint16, copy=False)  # big-endian files -> native order
        if img.mode in _PIL_WIDE_MODES:
            return np.asarray(img, dtype=np.float32)
        if img.mode != "L":
            img = img.convert("L")  # RGB(A), P, 1, LA, CMYK -> luminance
        return np.asarray(img)


def load_raw(path: Path | str) -> np.ndarray:
    """Decode an image to a 2-D array of raw intensities, in the file's own integer type where it has one
    (uint8, uint16) so windowing can use a lookup table, else float32. No windowing."""
    path = Path(path)
    _check_file(path)
    try:
        arr = _load_dicom(path) if _is_dicom(path) else _load_pil(path)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
        raise _fail(path, exc) from None
    if arr.ndim == 3:
        arr = arr[..., 0] if arr.shape[-1] == 1 else _rgb_to_luminance(arr)
    if arr.ndim != 2 or arr.size == 0:
        raise _fail(path, f"expected a 2-D image, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def load_grayscale(path: Path | str) -> np.ndarray:
    """Decode an image to a float32 HxW array of raw intensities (no windowing).

    8/16-bit PNG and JPEG through PIL, colour converted to luminance; DICOM through pydicom with the
    modality LUT (rescale slope/intercept) applied and MONOCHROME1 inverted.
    """
    return load_raw(path).astype(np.float32, copy=False)


def window_to_uint8(arr: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Map the [low_pct, high_pct] percentile range linearly onto 0..255.

    Robust to a few saturated pixels (burned-in labels, collimator edges). NaN/inf pixels become 0
    and are ignored for the percentiles; a constant image gives all zeros. uint8/uint16 input is mapped
    through a lookup table built with the float path's own arithmetic, so both give the same bytes.
    """
    arr = np.asarray(arr)
    integer = arr.dtype in _LUT_DTYPES
    if not integer:
        arr = arr.astype(np.float32, copy=False)
    sample = arr
    if arr.size > _MAX_WINDOW_SAMPLES:
        stride = int(np.ceil(np.sqrt(arr.size / _MAX_WINDOW_SAMPLES)))
        sample = arr[::stride, ::stride] if arr.ndim == 2 else arr.ravel()[:: stride * stride]
    sample = sample.astype(np.float32).ravel() if integer else sample[np.isfinite(sample)]
    if sample.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = np.percentile(sample, [low_pct, high_pct])
    if not hi > lo:
        # Mostly one value (e.g. a black frame around a small bright region): fall back to min/max.
        lo, hi = float(sample.min()), float(sample.max())
        if not hi > lo:
            return np.zeros(arr.shape, dtype=np.uint8)
    if integer:
        table = _window_map(np.arange(np.iinfo(arr.dtype).max + 1, dtype=np.float32), lo, hi)
        return _look_up(table, arr)
    return _window_map(arr, lo, hi)


# numpy widens a take's indices to int64 first; a band of rows at a time keeps that copy in the CPU's cache
# (a 2500 px film's gather: 6 ms instead of 12).
_LOOKUP_ROWS = 64


def _look_up(table: np.ndarray, arr: np.ndarray) -> np.ndarray:
    out = np.empty(arr.shape, dtype=table.dtype)
    if arr.ndim != 2:
        return np.take(table, arr, out=out)
    for top in range(0, arr.shape[0], _LOOKUP_ROWS):
        np.take(table, arr[top : top + _LOOKUP_ROWS], out=out[top : top + _LOOKUP_ROWS])
    return out


def _window_map(arr: np.ndarray, lo, hi) -> np.ndarray:
    """The windowing arithmetic, shared by the float path and the integer lookup table."""
    finite = np.isfinite(arr)
    scaled = (np.where(finite, arr, lo) - lo) * np.float32(255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """The image exactly as the model sees it, and how it maps back to the original."""

    #: uint8, shape (size, size)
    pixels: np.ndarray
    geometry: Geometry


def _as_gray_array(source: np.ndarray) -> np.ndarray:
    arr = np.asarray(source)
    if arr.ndim == 3:
        arr = arr[..., 0] if arr.shape[-1] == 1 else _rgb_to_luminance(arr)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"expected a 2-D (or HxWxC) image array, got shape {arr.shape}")
    return arr if arr.dtype in _LUT_DTYPES else arr.astype(np.float32, copy=False)


def prepare_image(source: Path | str | np.ndarray, size: int) -> PreparedImage:
    """load -> window to uint8 -> pad centred to a black square -> resize to ``size`` x ``size``.

    The single preprocessing path of training, evaluation and prediction. The padding offsets are
    ``Geometry.pad_left`` / ``pad_top``, so boxes mapped with ``Geometry.to_prepared`` land on the
    same pixels.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    arr = _as_gray_array(source) if isinstance(source, np.ndarray) else load_raw(source)
    height, width = arr.shape
    geometry = Geometry(orig_width=width, orig_height=height, size=size)
    gray = window_to_uint8(arr)
    side = geometry.side
    canvas = np.zeros((side, side), dtype=np.uint8)
    canvas[geometry.pad_top : geometry.pad_top + height, geometry.pad_left : geometry.pad_left + width] = gray
    if side != size:
        # Area averaging when shrinking (no aliasing of fine lines/wires), bilinear when enlarging.
        resample = Image.Resampling.BOX if side > size else Image.Resampling.BILINEAR
        canvas = np.asarray(Image.fromarray(canvas).resize((size, size), resample=resample))
    return PreparedImage(pixels=np.ascontiguousarray(canvas, dtype=np.uint8), geometry=geometry)


def to_rgb(pixels: np.ndarray) -> Image.Image:
    """uint8 HxW gray -> 3-channel PIL image (gray replicated) for the HF image processor."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxW array, got {pixels.dtype} {pixels.shape}")
    return Image.fromarray(np.repeat(pixels[:, :, None], 3, axis=2))
