from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from xray_train.data.images import (
    Geometry,
    ImageError,
    PreparedImage,
    load_grayscale,
    prepare_image,
    read_image_size,
    to_rgb,
    window_to_uint8,
)
from xray_train.data.records import Box
from xray_train.errors import XrayTrainError


def _ramp16(h=40, w=30) -> np.ndarray:
    # 12-bit values like PadChest (BitsStored 12): far above 255, so any 8-bit clipping shows.
    return (np.arange(h * w, dtype=np.uint32).reshape(h, w) * 4095 // (h * w - 1)).astype(np.uint16)


def _write_dicom(path, pixels: np.ndarray, photometric="MONOCHROME2", slope=None, intercept=None):
    from pydicom.dataset import FileMetaDataset
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# --- loading ------------------------------------------------------------------------------------


def test_8bit_png(tmp_path, png):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = load_grayscale(png(tmp_path / "a.png", arr))
    assert out.dtype == np.float32 and out.shape == (3, 4)
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_modes_keep_their_full_range(tmp_path, mode):
    arr = _ramp16()
    img = Image.fromarray(arr.astype(np.int32)).convert("I") if mode == "I" else Image.fromarray(arr)
    if mode == "I;16B":
        img = Image.frombytes("I;16B", img.size, arr.astype(">u2").tobytes())
    assert img.mode == mode
    # TIFF keeps every one of these modes as-is; PNG stores 16-bit grey (tested below).
    path = tmp_path / "a.tif"
    img.save(path)
    out = load_grayscale(path)
    np.testing.assert_array_equal(out, arr)


def test_16bit_png_is_not_clipped_to_8_bits(tmp_path, png):
    arr = _ramp16()
    out = load_grayscale(png(tmp_path / "a.png", arr))
    assert out.max() == 4095
    np.testing.assert_array_equal(out, arr)
    # The bug this guards against: convert("RGB") saturates everything above 255 to white.
    assert (window_to_uint8(out) == 255).mean() < 0.05


def test_rgb_and_rgba_become_luminance(tmp_path, png):
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full((2, 2, 1), 255, np.uint8)], axis=2)
    np.testing.assert_allclose(load_grayscale(png(tmp_path / "rgb.png", rgb)), gray, atol=1)
    np.testing.assert_allclose(load_grayscale(png(tmp_path / "rgba.png", rgba)), gray, atol=1)
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    assert load_grayscale(png(tmp_path / "red.png", red))[0, 0] == pytest.approx(76, abs=1)


def test_jpeg(tmp_path):
    path = tmp_path / "a.jpg"
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(path, quality=95)
    assert abs(float(load_grayscale(path).mean()) - 128) < 2


def test_dicom_rescale_is_applied(tmp_path):
    pixels = _ramp16(8, 6)
    path = _write_dicom(tmp_path / "a.dcm", pixels, slope=2, intercept=-100)
    np.testing.assert_allclose(load_grayscale(path), pixels.astype(np.float32) * 2 - 100)


def test_dicom_monochrome1_is_inverted(tmp_path):
    pixels = _ramp16(8, 6)
    mono2 = load_grayscale(_write_dicom(tmp_path / "m2.dcm", pixels))
    mono1 = load_grayscale(_write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"))
    # Darkest stored value is brightest on screen for MONOCHROME1.
    assert mono1[0, 0] == mono2.max() and mono1[-1, -1] == mono2.min()
    np.testing.assert_array_equal(window_to_uint8(mono1), 255 - window_to_uint8(mono2))


def test_dicom_without_suffix_is_detected_by_magic(tmp_path):
    path = _write_dicom(tmp_path / "a.dcm", _ramp16(8, 6))
    renamed = path.rename(tmp_path / "IM0001")
    assert load_grayscale(renamed).shape == (8, 6)


def test_read_image_size_from_header(tmp_path, png):
    assert read_image_size(png(tmp_path / "a.png", np.zeros((7, 11), np.uint8))) == (11, 7)
    assert read_image_size(png(tmp_path / "b.png", _ramp16(9, 5))) == (5, 9)
    assert read_image_size(_write_dicom(tmp_path / "c.dcm", _ramp16(8, 6))) == (6, 8)


@pytest.mark.parametrize(
    ("make", "cause"),
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"not an image at all"), "cannot identify"),
        (lambda p: None, "file not found"),
    ],
)
def test_unreadable_files_raise_image_error_naming_path_and_cause(tmp_path, make, cause):
    path = tmp_path / "broken.png"
    make(path)
    for fn in (load_grayscale, read_image_size):
        with pytest.raises(ImageError, match=cause) as info:
            fn(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
        assert isinstance(info.value, XrayTrainError)


def test_truncated_png_raises(tmp_path, png):
    path = png(tmp_path / "t.png", np.random.default_rng(0).integers(0, 65535, (64, 64), dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(ImageError, match=r"t\.png: cannot read image"):
        load_grayscale(path)


def test_truncated_dicom_raises(tmp_path):
    path = _write_dicom(tmp_path / "t.dcm", _ramp16(32, 32))
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(ImageError, match=r"t\.dcm"):
        load_grayscale(path)


# --- windowing ----------------------------------------------------------------------------------


def test_window_maps_percentiles_to_full_range():
    arr = np.linspace(0, 1000, 10001, dtype=np.float32).reshape(1, -1)
    out = window_to_uint8(arr)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert out[0, 5000] in (127, 128)


def test_window_ignores_outliers():
    arr = np.full((100, 100), 100.0, dtype=np.float32)
    arr[:, 50:] = 200.0
    arr[0, 0] = 1e9  # a burned-in marker must not crush the anatomy to black
    out = window_to_uint8(arr)
    assert out[50, 10] == 0 and out[50, 90] == 255


@pytest.mark.parametrize("value", [0.0, 7.0, 65535.0])
def test_constant_image_gives_zeros(value):
    out = window_to_uint8(np.full((5, 5), value, dtype=np.float32))
    assert out.dtype == np.uint8 and not out.any()


def test_window_is_nan_safe():
    arr = np.array([[np.nan, 0.0], [np.inf, 10.0]], dtype=np.float32)
    with np.errstate(all="raise"):
        out = window_to_uint8(arr)
    assert out[0, 0] == 0 and out[1, 1] == 255
    assert not window_to_uint8(np.full((3, 3), np.nan)).any()


def test_mostly_constant_image_still_shows_its_small_bright_region():
    arr = np.zeros((100, 100), dtype=np.float32)
    arr[0, :3] = 50.0  # 0.03 % of pixels: inside the 99.5th percentile's tail
    out = window_to_uint8(arr)
    assert out[0, 0] == 255 and out[50, 50] == 0


def test_large_image_window_is_deterministic():
    arr = np.random.default_rng(1).normal(1000, 200, (1500, 1500)).astype(np.float32)
    a, b = window_to_uint8(arr), window_to_uint8(arr.copy())
    np.testing.assert_array_equal(a, b)
    assert 120 < a.mean() < 135


# --- prepare ------------------------------------------------------------------------------------


def _bright_rectangle(w, h, x0, y0, x1, y1, dtype=np.uint16, hi=4000, lo=500):
    arr = np.full((h, w), lo, dtype=dtype)
    arr[y0:y1, x0:x1] = hi
    return arr


@pytest.mark.parametrize(("w", "h", "size"), [(300, 200, 64), (120, 360, 96), (50, 80, 200), (64, 64, 64)])
def test_box_lands_on_the_same_anatomy_after_prepare(tmp_path, png, w, h, size):
    x0, y0, x1, y1 = w // 5, h // 3, w // 2, h * 3 // 4
    path = png(tmp_path / "r.png", _bright_rectangle(w, h, x0, y0, x1, y1))
    prepared = prepare_image(path, size)
    assert prepared.pixels.shape == (size, size) and prepared.pixels.dtype == np.uint8
    assert prepared.geometry == Geometry(w, h, size)

    box = Box("mass", x0 / w, y0 / h, x1 / w, y1 / h)
    p = prepared.geometry.to_prepared(box)
    px0, py0, px1, py1 = p.x_min * size, p.y_min * size, p.x_max * size, p.y_max * size
    ys, xs = np.nonzero(prepared.pixels > 128)
    # every bright pixel lies inside the mapped box (1 px slack for resampling blur)
    assert xs.min() >= px0 - 1 and xs.max() <= px1 and ys.min() >= py0 - 1 and ys.max() <= py1
    # and the mapped box is bright inside (not shifted off the rectangle)
    inner = prepared.pixels[int(np.ceil(py0)) + 1 : int(py1) - 1, int(np.ceil(px0)) + 1 : int(px1) - 1]
    assert inner.size and inner.min() > 200


def test_padding_is_black_and_centred():
    arr = np.full((40, 100), 1000, dtype=np.uint16)
    arr[0, 0] = 0  # give the window a range so the image is white
    prepared = prepare_image(arr, 100)
    g = prepared.geometry
    assert (g.pad_left, g.pad_top) == (0, 30)
    assert not prepared.pixels[:30].any() and not prepared.pixels[70:].any()
    assert prepared.pixels[31:69, 1:].min() == 255


@given(
    w=st.integers(1, 5000),
    h=st.integers(1, 5000),
    size=st.integers(16, 1024),
    coords=st.tuples(*[st.floats(0, 1, allow_nan=False)] * 4),
)
@settings(max_examples=200, deadline=None)
def test_geometry_round_trip(w, h, size, coords):
    x_a, y_a, x_b, y_b = coords
    box = Box("x", min(x_a, x_b), min(y_a, y_b), max(x_a, x_b), max(y_a, y_b))
    g = Geometry(w, h, size)
    back = g.to_original(g.to_prepared(box))
    for a, b in zip((back.x_min, back.y_min, back.x_max, back.y_max), (box.x_min, box.y_min, box.x_max, box.y_max)):
        assert a == pytest.approx(b, abs=1e-9)
    assert back.label == box.label


def test_prepare_is_deterministic_and_path_equals_array(tmp_path, png):
    arr = np.random.default_rng(2).integers(0, 4096, (70, 50), dtype=np.uint16)
    path = png(tmp_path / "a.png", arr)
    a, b = prepare_image(path, 32), prepare_image(path, 32)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_array_equal(a.pixels, prepare_image(arr, 32).pixels)


def test_prepare_rgb_array_matches_gray():
    gray = np.random.default_rng(3).integers(0, 256, (20, 30), dtype=np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(prepare_image(rgb, 16).pixels, prepare_image(gray, 16).pixels)


def test_prepare_propagates_image_error(tmp_path):
    with pytest.raises(ImageError):
        prepare_image(tmp_path / "missing.png", 32)


def test_to_rgb_replicates_gray():
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4)
    img = to_rgb(pixels)
    assert img.mode == "RGB" and img.size == (4, 4)
    out = np.asarray(img)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], pixels)
    with pytest.raises(ValueError):
        to_rgb(pixels.astype(np.float32))


def test_prepared_image_dataclass():
    p = prepare_image(np.zeros((3, 5), np.uint8), 8)
    assert isinstance(p, PreparedImage) and not p.pixels.any()


# --- the integer fast path -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "high", "shape"),
    [
        (np.uint16, 4096, (1100, 1000)),  # above the percentile-sampling threshold: strided sample
        (np.uint16, 65536, (64, 48)),
        (np.uint8, 256, (1030, 1100)),
        (np.uint16, 3, (40, 30)),  # percentiles equal: the min/max fallback
        (np.uint16, 1, (20, 20)),  # constant
    ],
)
def test_integer_windowing_table_gives_the_float_paths_bytes(dtype, high, shape):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, high, shape).astype(dtype)
    fast = window_to_uint8(arr)
    assert fast.dtype == np.uint8 and fast.shape == shape
    np.testing.assert_array_equal(fast, window_to_uint8(arr.astype(np.float32)))


@pytest.mark.parametrize("bits", [8, 16])
def test_prepare_image_from_a_file_equals_the_float_reference_path(tmp_path, png, bits):
    # A noisy film larger than the percentile-sampling threshold, not square, shrunk by a non-integer ratio.
    rng = np.random.default_rng(bits)
    y, x = np.mgrid[0:1200, 0:1000]
    top = 4095 if bits == 16 else 255
    film = top * (0.3 + 0.4 * np.sin(x / 150.0) * np.cos(y / 200.0)) + rng.normal(0, top / 60, (1200, 1000))
    arr = np.clip(film, 0, top).astype(np.uint16 if bits == 16 else np.uint8)
    path = png(tmp_path / "film.png", arr)
    from xray_train.data.images import load_raw

    assert load_raw(path).dtype == arr.dtype  # decoded as integers: windowed through the table
    fast = prepare_image(path, 224)
    reference = prepare_image(load_grayscale(path), 224)  # float32 array: the arithmetic path
    np.testing.assert_array_equal(fast.pixels, reference.pixels)
    assert fast.geometry == reference.geometry
