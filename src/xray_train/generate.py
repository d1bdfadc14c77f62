"""Batched greedy generation shared by ``evaluate`` and ``predict``.

Inputs go through exactly the training path: ``PixelLoader`` for the image (window, pad, resize, HF
normalisation) and ``PromptEncoder.prompt_ids(task)`` for the prompt (the image already expanded into
its soft tokens), so what the model sees at inference is what it was trained on (a 16-bit PNG is
windowed, never clipped, in both).

Prompts of different tasks differ in length; a batch is *left*-padded so every row's answer starts
at the same column and the decoder's next token is always the last position. ``token_type_ids``
marks the image soft tokens for Gemma 3's bidirectional image attention; Gemma 3's
``prepare_inputs_for_generation`` uses them on the prompt (first step) and drops them for decoded
tokens. Decoding is plain greedy ``generate`` without ``output_scores``: only the last position's
logits exist at each step, nothing vocabulary-sized is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from xray_train.collate import TASK_PROMPTS, PromptEncoder
from xray_train.data.images import ImageError
from xray_train.inputs import PixelLoader
from xray_train.gemma3 import unwrap_gemma3, vision_dtype

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_BATCH_SIZE = 8


class ExpectedLocProcessor:
    """``model.loc_decode: expected``: once a ``<loc>`` token wins a step, emit the bin nearest the expected
    coordinate under the softmax over the ``<loc>`` rows alone instead of the most likely bin.

    Greedy argmax reads one bin out of a distribution that, after distance-aware training, is spread
    over neighbouring bins; its mean is the less noisy estimate of the edge (what the auxiliary L1
    loss trains). Steps whose winner is not a ``<loc>`` token are left untouched.
    """

    def __init__(self, loc_ids: Sequence[int]):
        ids = list(loc_ids)
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError("the <loc> token ids are not consecutive")
        self.first, self.n = ids[0], len(ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        top = scores.argmax(-1)
        is_loc = (top >= self.first) & (top < self.first + self.n)
        loc = scores[:, self.first : self.first + self.n].float()
        bins = torch.arange(self.n, device=scores.device, dtype=torch.float32)
        expected = (torch.softmax(loc, dim=-1) * bins).sum(-1).round().long() + self.first
        # The expected bin gets the row's best score plus one: greedy decoding then picks it.
        boosted = scores.scatter(1, expected.unsqueeze(1), scores.max(-1, keepdim=True).values + 1)
        return torch.where(is_loc.unsqueeze(1), boosted, scores)


@dataclass(frozen=True)
class Request:
    """One image and the task (a ``TASK_PROMPTS`` key) to answer about it."""

    image: Path
    task: str


@dataclass
class Generation:
    """The decoded answer (``None`` when the image could not be read; ``error`` then says why)."""

    text: str | None
    n_new_tokens: int = 0
    error: str | None = None
    #: False when ``max_new_tokens`` ran out before a stop token (the answer is cut off).
    finished: bool = True


def progress_bar(enabled: bool = True, console=None):
    """A rich progress bar on stderr (a no-op context when disabled)."""
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=False,
    )


class Generator:
    """``Generator(model, processor, system_prompt)(requests) -> [Generation]``, in request order."""

    def __init__(
        self,
        model,
        processor,
        system_prompt: str,
        image_size: int | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        decode_workers: int | None = None,
        loc_decode: str = "argmax",
    ):
        from xray_train.data.loader import decode_workers as default_workers

        if max_new_tokens <= 0 or batch_size <= 0:
            raise ValueError("max_new_tokens and batch_size must be positive")
        self.workers = default_workers(decode_workers)
        self.model = model
        self.encoder = PromptEncoder(processor, system_prompt)
        self.pixels = PixelLoader(processor, image_size)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        tok = processor.tokenizer
        # Training ends every answer with <end_of_turn>; eos stops a model that never learnt that.
        self.stop_ids = [self.encoder.ids.end_of_turn] + (
            [tok.eos_token_id] if tok.eos_token_id is not None and tok.eos_token_id != self.encoder.ids.end_of_turn else []
        )
        self.logits_processor = None
        if loc_decode == "expected":
            from transformers import LogitsProcessorList

            from xray_train.model import loc_token_ids

            loc_ids = loc_token_ids(tok)
            if loc_ids:
                self.logits_processor = LogitsProcessorList([ExpectedLocProcessor(loc_ids)])
        elif loc_decode != "argmax":
            raise ValueError(f"loc_decode must be 'argmax' or 'expected', not {loc_decode!r}")
        inner = unwrap_gemma3(model)
        self.device = inner.device
        self.pixel_dtype = vision_dtype(inner)

    def __call__(
        self, requests: Sequence[Request], progress: bool = True, description: str = "Generating", console=None
    ) -> list[Generation]:
        for req in requests:
            if req.task not in TASK_PROMPTS:
                raise ValueError(f"unknown task {req.task!r}; expected one of {sorted(TASK_PROMPTS)}")
        results: list[Generation] = []
        with progress_bar(progress and bool(requests), console) as bar:
            handle = bar.add_task(description, total=len(requests)) if bar is not None else None
            from xray_train.data.loader import read_ahead

            # Images are read by worker processes while the GPU generates for the batch before.
            for chunk, prepared in read_ahead(
                requests, lambda r: r.image, self.pixels.prepare, self.batch_size, self.workers
            ):
                results += self.generate_batch(chunk, prepared)
                if bar is not None:
                    bar.advance(handle, len(chunk))
        return results

    def _pixels(self, requests: Sequence[Request], prepared=None) -> tuple[list[torch.Tensor | None], list[str | None]]:
        if prepared is not None:  # read ahead by data.loader.read_ahead, indices within ``requests``
            pixels: list = [None] * len(requests)
            errors: list = [prepared.failed.get(i) for i in range(len(requests))]
            if prepared.pixels is not None:
                for i, values in zip(prepared.indices, self.pixels.normalize(prepared.pixels)):
                    pixels[i] = values
            for err in prepared.failed.values():
                logger.warning("%s", err)
            return pixels, errors
        pixels, errors = [], []
        for req in requests:
            try:
                pixels.append(self.pixels(req.image))
                errors.append(None)
            except ImageError as exc:
                # One unreadable file must not cost the rest of an evaluation or a folder of predictions.
                logger.warning("%s", exc)
                pixels.append(None)
                errors.append(str(exc))
        return pixels, errors

    def build_batch(self, requests: Sequence[Request], pixel_values: Sequence[torch.Tensor]) -> dict:
        """Left-padded prompt ids, attention mask, token_type_ids and stacked pixel values."""
        prompts = [self.encoder.prompt_ids(req.task) for req in requests]
        longest = max(len(p) for p in prompts)
        pad = self.encoder.ids.pad
        input_ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, longest - len(ids) :] = torch.as_tensor(ids)
            attention[row, longest - len(ids) :] = 1
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention.to(self.device),
            "token_type_ids": (input_ids == self.encoder.ids.image).long().to(self.device),
            "pixel_values": torch.stack(list(pixel_values)).to(self.device, self.pixel_dtype),
        }

    @torch.inference_mode()
    def generate_batch(self, requests: Sequence[Request], prepared=None) -> list[Generation]:
        """One ``generate`` call for up to ``batch_size`` requests (unreadable images are left out);
        ``prepared``: their images already read (a ``data.loader.PreparedBatch``)."""
        pixels, errors = self._pixels(requests, prepared)
        ok = [i for i, p in enumerate(pixels) if p is not None]
        out: list[Generation] = [Generation(None, 0, err) for err in errors]
        if not ok:
            return out
        batch = self.build_batch([requests[i] for i in ok], [pixels[i] for i in ok])
        generated = self.model.generate(
            **batch,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            # Unset the sampling knobs a base generation_config may carry (MedGemma's does), so greedy
            # decoding is exactly greedy and transformers does not warn about ignored flags.
            temperature=None,
            top_p=None,
            top_k=None,
            num_beams=1,
            eos_token_id=self.stop_ids,
            pad_token_id=self.encoder.ids.pad,
            logits_processor=self.logits_processor,
            # load_base sets config.use_cache=False for training; decoding without a KV cache would
            # recompute the whole prompt (256 image tokens at MedGemma's size) for every new token.
            use_cache=True,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :].tolist()
        for i, ids in zip(ok, new_tokens):
            stops = [ids.index(s) + 1 for s in self.stop_ids if s in ids]
            n = min(stops) if stops else len(ids)
            out[i] = Generation(self.encoder.decode_answer(ids), n, finished=bool(stops))
        return out
