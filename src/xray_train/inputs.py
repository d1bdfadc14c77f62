"""Examples -> model inputs: targets, pixels (or cached features), token ids. Shared by train, evaluate
and predict so the three can never preprocess differently."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xray_train.collate import IGNORE_INDEX, PHASE_TASK, PromptEncoder
from xray_train.data.images import Geometry, ImageError, prepare_image, read_image_size, to_rgb
from xray_train.data.loc import encode_boxes
from xray_train.data.records import Example
from xray_train.data.reports import format_report

logger = logging.getLogger(__name__)

#: Bump when prepare_image's behaviour changes: it is part of the vision-feature cache key.
PREPROCESSING_VERSION = 1


def processor_image_size(processor) -> int:
    return image_processor_size(processor.image_processor)


def image_processor_size(image_processor) -> int:
    size = image_processor.size
    height = getattr(size, "height", None) or (size.get("height") if hasattr(size, "get") else size)
    return int(height)


def build_target(example: Example, phase: str, box_format: str = "loc") -> str:
    """Phase 1: the structured report. Phase 2: boxes in the prepared image's coordinates
    (``box_format``: ``loc`` tokens or plain ``text`` integers)."""
    if phase == "phase1":
        return example.report if example.report is not None else format_report(example.findings)
    boxes = example.boxes or []
    if boxes:
        width, height = read_image_size(example.image_path)
        geometry = Geometry(width, height, 0)
        boxes = [geometry.to_prepared(b) for b in boxes]
    return encode_boxes(boxes, box_format)


class PixelLoader:
    """Image file -> normalised ``pixel_values`` [3, S, S] through the project's one preprocessing path.

    ``prepare(path)`` gives the uint8 square image (``prepare_image``); ``normalize`` turns uint8 images into
    the processor's ``pixel_values``. The processor's rescale/normalise is a function of the pixel value
    alone, so it is read once into a 256-entry table per channel and applied by indexing (on the GPU too,
    where only the uint8 image has to travel). The table is checked against the processor on a ramp of
    every value; a processor that also moves pixels (resizing to another size) keeps its own path.
    """

    def __init__(self, processor, image_size: int | None = None):
        self.image_processor = processor.image_processor
        self.size = image_size or processor_image_size(processor)
        self._table: torch.Tensor | None = None
        self._table_checked = False

    def preprocessing(self) -> dict:
        ip = self.image_processor
        return {
            "version": PREPROCESSING_VERSION,
            "size": self.size,
            "mean": list(ip.image_mean),
            "std": list(ip.image_std),
            "rescale": float(ip.rescale_factor),
        }

    def prepare(self, path: Path) -> np.ndarray:
        """uint8 (S, S): the image exactly as the model sees it, before normalisation."""
        pixels = prepare_image(path, self.size).pixels
        return pixels if pixels.flags.writeable else pixels.copy()

    def _processor(self, pixels: np.ndarray) -> torch.Tensor:
        out = self.image_processor(images=to_rgb(pixels), return_tensors="pt", do_pan_and_scan=False)
        return out["pixel_values"][0]

    def table(self) -> torch.Tensor | None:
        """[channels, 256] float32 values of every uint8 level, or None where the processor is not per-pixel."""
        if not self._table_checked:
            self._table_checked = True
            ramp = (np.arange(self.size * self.size) % 256).astype(np.uint8).reshape(self.size, self.size)
            reference = self._processor(ramp)
            if tuple(reference.shape[-2:]) == (self.size, self.size):
                flat = reference.flatten(1)
                table = flat[:, : min(256, flat.shape[1])]
                if table.shape[1] == 256 and torch.equal(table[:, torch.from_numpy(ramp).long()], reference):
                    self._table = table.contiguous()
        return self._table

    def normalize(self, pixels: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """uint8 [..., S, S] (on any device) -> ``pixel_values`` [..., C, S, S], as the processor gives them."""
        table = self.table()
        if table is None:
            flat = pixels.reshape(-1, *pixels.shape[-2:]).cpu().numpy()
            out = torch.stack([self._processor(p) for p in flat]).to(pixels.device)
            out = out.reshape(*pixels.shape[:-2], *out.shape[1:])
        elif pixels.device.type == "cpu":
            # numpy indexes with the uint8 values directly (torch would first widen them to int64).
            values, index = table.numpy(), pixels.numpy()
            out = np.empty((*index.shape[:-2], len(values), *index.shape[-2:]), dtype=values.dtype)
            for channel, row in enumerate(values):
                np.take(row, index, out=out[..., channel, :, :])
            out = torch.from_numpy(out)
        else:
            out = table.to(pixels.device)[:, pixels.long()].movedim(0, -3)
        return out if dtype is None else out.to(dtype)

    def __call__(self, path: Path) -> torch.Tensor:
        return self.normalize(torch.from_numpy(self.prepare(path)))


@dataclass
class EncodedExample:
    example: Example
    input_ids: list[int]
    labels: list[int]


def encode_examples(
    examples: list[Example], phase: str, encoder: PromptEncoder, max_length: int, box_format: str = "loc"
) -> tuple[list[EncodedExample], Counter]:
    """Tokenise every example's target; those that cannot be used are counted by reason."""
    task = PHASE_TASK[phase]
    prompt_len = len(encoder.prompt_ids(task))
    if prompt_len >= max_length:
        from xray_train.errors import XrayTrainError

        raise XrayTrainError(
            f"training.max_length: {max_length} leaves no room for an answer after the {prompt_len}-token "
            "prompt (images are never truncated)"
        )
    skipped: Counter = Counter()
    encoded = []
    for ex in examples:
        try:
            target = build_target(ex, phase, box_format)
        except ImageError as exc:
            logger.warning("skipping %s: %s", ex.image_id, exc)
            skipped["unreadable_image"] += 1
            continue
        ids = encoder.encode(task, target)
        if len(ids["input_ids"]) > max_length:
            skipped["too_long"] += 1
            continue
        encoded.append(EncodedExample(ex, ids["input_ids"], ids["labels"]))
    return encoded, skipped


class TrainingDataset(torch.utils.data.Dataset):
    """Encoded examples with their image as the run's ``features.FeatureSource`` gives it: cached features
    (fast path), or freshly prepared pixels."""

    def __init__(self, items: list[EncodedExample], features):
        # Images the cache could not read are dropped up front, counted in the run summary.
        self.items = [it for it in items if it.example.image_path in features]
        self.features = features
        # Shared memory: DataLoader workers mark failures where the main process can count them.
        self._unreadable = torch.zeros(max(1, len(items)), dtype=torch.bool).share_memory_()
        self._padding = 0

    def pad_to_multiple(self, multiple: int) -> None:
        """Append label-free copies of the first examples until the length is a multiple of ``multiple``
        (the per-step batch over all processes), so no batch is short. A copy has no supervised token: it
        adds nothing to the loss or its gradient, only a row of the same shape."""
        self._padding = (-len(self.items)) % multiple if self.items else 0

    @property
    def unreadable(self) -> int:
        """Images that failed to load during training (each replaced by the next example)."""
        return int(self._unreadable.sum())

    def __len__(self) -> int:
        return len(self.items) + self._padding

    def reads_images(self) -> bool:
        """Whether an epoch over it would read an image file: not once every image's features are cached
        (a finished cache, or one the steps have filled)."""
        return self.features.reads_images([it.example.image_path for it in self.items])

    def lengths(self) -> list[int]:
        return [len(it.input_ids) for it in self.items + self.items[: self._padding]]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)  # iteration protocol: without it `for x in dataset` never ends
        if index >= len(self.items):
            real = self[index - len(self.items)]
            return {**real, "labels": [IGNORE_INDEX] * len(real["labels"])}
        for attempt in range(len(self.items)):
            item = self.items[(index + attempt) % len(self.items)]
            try:
                image = self.features.image_inputs(item.example.image_path)
            except ImageError as exc:
                # A file that broke after the data check must not end an epoch: use the next example.
                self._unreadable[(index + attempt) % len(self.items)] = True
                logger.warning("unreadable image, using the next example instead: %s", exc)
                continue
            return {"input_ids": item.input_ids, "labels": item.labels, **image}
        raise ImageError("no readable image left in the dataset")
