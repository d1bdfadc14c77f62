"""Parallel image reading gives exactly the serial pixels, in order, with unreadable files reported."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from xray_train.data.images import prepare_image
from xray_train.data.loader import decode_workers, prepared_batches


def _prepare(path, size):
    return prepare_image(path, size).pixels


def _films(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        if i % 2:
            arr = rng.integers(0, 4096, (h, w)).astype(np.uint16)
        else:
            arr = rng.integers(0, 256, (h, w)).astype(np.uint8)
        path = tmp_path / f"{i}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(paths[1].read_bytes()[:200])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    paths.insert(2, truncated)
    paths.insert(6, empty)
    return paths


def _read(paths, workers):
    batches = list(prepared_batches(paths, functools.partial(_prepare, size=32), batch_size=3, workers=workers))
    pixels, failed = {}, {}
    for n, batch in enumerate(batches):
        # Indices are positions in `paths`; each batch holds the next 3 of them, in order.
        assert sorted([*batch.indices, *batch.failed]) == list(range(3 * n, min(3 * n + 3, len(paths))))
        if batch.pixels is not None:
            assert batch.pixels.dtype == torch.uint8 and batch.pixels.shape[1:] == (32, 32)
            pixels.update({i: batch.pixels[k].numpy() for k, i in enumerate(batch.indices)})
        failed.update(batch.failed)
    return pixels, failed


def test_parallel_reading_gives_the_serial_pixels_bit_for_bit(tmp_path):
    paths = _films(tmp_path)
    serial, serial_failed = _read(paths, workers=0)
    parallel, parallel_failed = _read(paths, workers=2)
    assert sorted(serial) == sorted(parallel) == [i for i in range(len(paths)) if i not in (2, 6)]
    for i, pixels in serial.items():
        np.testing.assert_array_equal(parallel[i], pixels)
        np.testing.assert_array_equal(pixels, prepare_image(paths[i], 32).pixels)
    # Unreadable files are reported at their positions, with the file named, and do not stop the rest.
    assert sorted(serial_failed) == sorted(parallel_failed) == [2, 6]
    assert "truncated.png" in parallel_failed[2] and "empty file" in parallel_failed[6]


def test_workers_default_to_the_cpus_and_respect_a_setting(monkeypatch):
    import xray_train.data.loader as loader

    monkeypatch.setattr(loader, "available_cpus", lambda: 16)
    assert decode_workers(None) == 16
    assert decode_workers(3) == 3
    monkeypatch.setattr(loader, "available_cpus", lambda: 1)
    assert decode_workers(None) == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_no_paths_reads_nothing(workers):
    assert list(prepared_batches([], functools.partial(_prepare, size=8), 4, workers)) == []



def _slow_first(done, seen, path):
    """Film 0 takes long, and records how many films were finished by the time it is."""
    import time

    if path.name == "0":
        time.sleep(1.5)
        seen.value = done.value
    with done.get_lock():
        done.value += 1
    return np.full((4, 4), int(path.name), dtype=np.uint8)


def test_a_slow_film_does_not_stop_the_other_workers(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    done, seen = ctx.Value("i", 0), ctx.Value("i", -1)
    paths = [tmp_path / str(i) for i in range(60)]
    batches = list(prepared_batches(paths, functools.partial(_slow_first, done, seen), 16, workers=2,
                                    prefetch_per_worker=2))
    pixels = torch.cat([b.pixels for b in batches])
    assert [i for b in batches for i in b.indices] == list(range(60)) and pixels[:, 0, 0].tolist() == list(range(60))
    # While film 0 decoded, the other worker went on through the films (1.5 s is time for all of them),
    # instead of stopping after the few handed out before film 0 was done.
    assert seen.value >= 40
