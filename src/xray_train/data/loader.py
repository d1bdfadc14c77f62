"""Images read in parallel worker processes, in order: the vision-feature cache build, evaluation and
prediction use it (training without the cache uses the Trainer's own DataLoader workers).

A 2000-3000 px 16-bit film takes about 0.1 s to decode and window on one core, so a single process caps
a cache build, or a GPU that waits for pixels, near 10 films/s; worker processes scale that with the
cores. Workers send the uint8 image (``PixelLoader.prepare``); it is normalised where it is used (on the
GPU for the cache), so 0.8 MB travels per film instead of 9.6 MB of float32 pixel values.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from xray_train.data.images import ImageError


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def decode_workers(setting: int | None, cpus: int | None = None) -> int:
    """Worker processes for reading images (``data.decode_workers``): the setting, or one per CPU this
    process may use (``cpus``, counted if not given); 0 (in-process) on one CPU."""
    if setting is not None:
        return setting
    cpus = available_cpus() if cpus is None else cpus
    return cpus if cpus > 1 else 0


@dataclass
class PreparedBatch:
    """One batch of ``paths`` read in order: the readable ones stacked, the others with their error."""

    indices: list[int]
    pixels: torch.Tensor | None  # uint8 [len(indices), S, S]
    failed: dict[int, str] = field(default_factory=dict)

    def relative_to(self, start: int) -> "PreparedBatch":
        """The same batch with indices counted from ``start`` (the batch's first position in ``paths``),
        for callers that index their own slice of the requests."""
        return PreparedBatch(
            indices=[i - start for i in self.indices],
            pixels=self.pixels,
            failed={i - start: err for i, err in self.failed.items()},
        )

    def pin_memory(self) -> "PreparedBatch":
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], prepare: Callable[[Path], np.ndarray]):
        self.paths = list(paths)
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, torch.from_numpy(np.ascontiguousarray(self.prepare(self.paths[index]))), None
        except ImageError as exc:
            return index, None, str(exc)


def _stack(items) -> PreparedBatch:
    ok = [(i, px) for i, px, _ in items if px is not None]
    return PreparedBatch(
        indices=[i for i, _ in ok],
        pixels=torch.stack([px for _, px in ok]) if ok else None,
        failed={i: err for i, px, err in items if px is None},
    )


def prepared_batches(
    paths: Sequence[Path],
    prepare: Callable[[Path], np.ndarray],
    batch_size: int,
    workers: int = 0,
    pin_memory: bool = False,
    prefetch_per_worker: int = 4,
) -> Iterator[PreparedBatch]:
    """``prepare`` every path, ``batch_size`` at a time, in order, by ``workers`` processes (0: this one).

    Indices are positions in ``paths``. Unreadable files (``ImageError``) come back in ``failed`` instead
    of stopping the iteration. Workers take one film at a time and keep ``prefetch_per_worker`` ready, so
    all of them are busy from the first batch on (a worker per batch would leave the GPU waiting for a whole
    batch's decoding at the start) and decoding overlaps with what the caller does with a batch. A film
    that takes long holds back only its own position: the films the other workers finish meanwhile wait
    here (0.8 MB each at 896 px).
    """
    if not paths:
        return
    workers = min(workers, len(paths))
    loader = torch.utils.data.DataLoader(
        _Files(paths, prepare),
        batch_size=None,  # one film per item; batches are assembled here, in order
        shuffle=False,
        num_workers=workers,
        prefetch_factor=prefetch_per_worker if workers else None,
        # Films take unequal times (their sizes differ by 2x): delivered in order, one slow film would hold
        # every worker's finished films and stop new ones being handed out. Out of order, each finished film
        # frees its worker for the next; they are put back in order here.
        in_order=False,
    )
    pending: list = []
    early: dict[int, tuple] = {}  # films finished before an earlier one, by position
    wanted = 0
    for item in loader:
        early[item[0]] = item
        while wanted in early:
            pending.append(early.pop(wanted))
            wanted += 1
            if len(pending) == batch_size:
                yield _batch(pending, pin_memory)
                pending = []
    if pending:
        yield _batch(pending, pin_memory)


def read_ahead(
    items: Sequence, image_of: Callable, prepare: Callable[[Path], np.ndarray], batch_size: int, workers: int = 0
) -> Iterator[tuple[Sequence, PreparedBatch]]:
    """``(chunk, prepared)`` for consecutive ``batch_size`` chunks of ``items``, with the images of the chunk
    (``image_of(item)``) read by ``workers`` processes ahead of the caller. The prepared batch's indices
    count within its chunk, so ``chunk[i]`` is the item of pixel row ``i``'s index."""
    images = prepared_batches([image_of(item) for item in items], prepare, batch_size, workers)
    for start, prepared in zip(range(0, len(items), batch_size), images):
        yield items[start : start + batch_size], prepared.relative_to(start)


def _batch(items, pin_memory: bool) -> PreparedBatch:
    batch = _stack(items)
    # Pinned memory makes the copy to the GPU asynchronous.
    return batch.pin_memory() if pin_memory else batch
