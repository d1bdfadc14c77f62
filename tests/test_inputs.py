"""One image path for training, evaluation and prediction, and the table-based normalisation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from xray_train.collate import IGNORE_INDEX, PromptEncoder
from xray_train.data.images import prepare_image, to_rgb
from xray_train.data.loader import prepared_batches
from xray_train.features import FeatureSource
from xray_train.generate import Generator, Request
from xray_train.inputs import EncodedExample, PixelLoader, TrainingDataset

from .conftest import SAMPLES

INDIANA = SAMPLES / "indiana" / "images" / "images_normalized"
PADCHEST = SAMPLES / "padchest" / "images"


def _images():
    return sorted(INDIANA.glob("*.png"))[:3] + sorted(PADCHEST.rglob("*.png"))[:3]  # 8-bit and 16-bit films


def _processor_pixels(processor, path, size):
    prepared = prepare_image(path, size).pixels
    return processor.image_processor(images=to_rgb(prepared), return_tensors="pt", do_pan_and_scan=False)[
        "pixel_values"
    ][0]


def test_table_normalisation_equals_the_processor_bit_for_bit(processor):
    loader = PixelLoader(processor)
    assert loader.table() is not None
    images = _images()
    singles = [loader(p) for p in images]
    for path, pixels in zip(images, singles):
        assert torch.equal(pixels, _processor_pixels(processor, path, loader.size))
    batch = torch.from_numpy(np.stack([loader.prepare(p) for p in images]))
    assert torch.equal(loader.normalize(batch), torch.stack(singles))
    assert loader.normalize(batch, torch.bfloat16).dtype == torch.bfloat16


def test_a_processor_that_resizes_keeps_its_own_path(processor):
    # data.image_size other than the processor's: the processor resizes, which no per-value table can do.
    loader = PixelLoader(processor, image_size=processor.image_processor.size["height"] // 2)
    assert loader.table() is None
    path = _images()[0]
    assert torch.equal(loader(path), _processor_pixels(processor, path, loader.size))


def test_training_evaluation_and_prediction_get_the_same_pixels(processor):
    loader = PixelLoader(processor)
    images = _images()
    encoder = PromptEncoder(processor, "sys")
    ids = encoder.encode("report", "FINDINGS:\n- normal")
    items = [EncodedExample(SimpleNamespace(image_path=p), ids["input_ids"], ids["labels"]) for p in images]
    training = [TrainingDataset(items, FeatureSource.pixels(loader))[i]["pixel_values"] for i in range(len(items))]

    # Evaluation and prediction read the images in worker processes and normalise the batch.
    [evaluation] = list(prepared_batches(images, loader.prepare, len(images), workers=2))
    evaluated = loader.normalize(evaluation.pixels)
    requests = [Request(p, "report") for p in images]
    [prediction] = list(prepared_batches(images, loader.prepare, len(images), workers=2))
    predicted, errors = Generator._pixels(SimpleNamespace(pixels=loader), requests, prediction)
    assert errors == [None] * len(images)
    for i, pixels in enumerate(training):
        assert torch.equal(pixels, evaluated[i])
        assert torch.equal(pixels, predicted[i])
        assert torch.equal(pixels, Generator._pixels(SimpleNamespace(pixels=loader), requests[i : i + 1])[0][0])


def test_padding_fills_the_last_batch_with_label_free_copies(processor):
    loader = PixelLoader(processor)
    encoder = PromptEncoder(processor, "sys")
    answers = ["FINDINGS:\n- normal", "FINDINGS:\n- cardiomegaly: cardiac", "no finding at all here"]
    items = []
    for i, path in enumerate(_images()[:5]):
        ids = encoder.encode("report", answers[i % 3])
        items.append(EncodedExample(SimpleNamespace(image_path=path), ids["input_ids"], ids["labels"]))
    dataset = TrainingDataset(items, FeatureSource.pixels(loader))
    dataset.pad_to_multiple(4)
    assert len(dataset) == 8 and len(dataset.lengths()) == 8
    for i in range(5, 8):
        copy, real = dataset[i], dataset[i - 5]
        assert copy["input_ids"] == real["input_ids"] and torch.equal(copy["pixel_values"], real["pixel_values"])
        assert set(copy["labels"]) == {IGNORE_INDEX}
    dataset.pad_to_multiple(5)
    assert len(dataset) == 5
