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

What makes it fast (each exact: the same greedy tokens as one plain ``generate`` per batch, tested):

* requests are sorted by prompt length (the task's prompt; every film has the same number of image
  tokens), so a batch pads little, and answered in the caller's order;
* the batch is as large as the free memory allows (``xray_train.inference.rows_that_fit``) unless set:
  a decode step reads every weight whatever the batch, so rows are nearly free;
* on a 16-bit base the adapter's LoRA is merged into the weights while its answers are generated
  (``xray_train.inference.lora_merged``) and the base's weights restored afterwards;
* answering under several model states (``Generator.answer`` with several :class:`Variant`: evaluate's
  adapter and base model), each batch's images are read once and SigLIP encodes each film once: its pooled
  output is frozen in every state, so only the projector and the decoder run per state.

(Over 400 lines: batching, the exact levers above and the ``<loc>`` decode rule are one contract, tested
together against plain ``generate``; the progress bar is the one every inference command shows.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
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
#: Unit of the progress bars' rate column.
RATE_UNIT = "films/s"


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


@dataclass(frozen=True)
class Variant:
    """A model state every request is answered under: ``state()`` enters it (evaluate: the adapter as
    loaded, then the base with ``model.disable_adapter()``)."""

    label: str
    state: Callable[[], AbstractContextManager] = nullcontext


#: ``on_batch(label, request_indices, image_inputs)``: called in each variant's state before its answers, with
#: the batch's readable requests (indices into the caller's list) and their image inputs, one row each
#: (``{"image_features": pooled SigLIP rows}``): evaluate's teacher-forced pass rides on the same encoding.
BatchHook = Callable[[str, list, dict], None]


@dataclass
class Generation:
    """The decoded answer (``None`` when the image could not be read; ``error`` then says why)."""

    text: str | None
    n_new_tokens: int = 0
    error: str | None = None
    #: False when ``max_new_tokens`` ran out before a stop token (the answer is cut off).
    finished: bool = True


def rate_text(speed: float | None, unit: str = RATE_UNIT) -> str:
    """``"12.3 films/s"`` (``"-- films/s"`` before the first completed batch)."""
    return f"-- {unit}" if not speed else f"{speed:.3g} {unit}" if speed < 10 else f"{speed:.0f} {unit}"


def progress_bar(enabled: bool = True, console=None):
    """A rich progress bar on stderr: done/total, films per second, elapsed time and the ETA (a no-op
    context when disabled)."""
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task):
            # Rich's own speed estimate (over its recent samples), so a slow first batch (compiles, the
            # model warming up) does not hold the figure down for the whole run.
            return Text(rate_text(task.finished_speed or task.speed), style="progress.data.speed")

    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
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
        batch_size: int | None = DEFAULT_BATCH_SIZE,
        decode_workers: int | None = None,
        loc_decode: str = "argmax",
        merge_lora: bool = True,
        sort_by_length: bool = True,
        min_new_tokens: int | None = None,
        decode_cache: str = "dynamic",
    ):
        """``batch_size``: rows per ``generate`` call, None for as many as the free memory holds;
        ``merge_lora``: merge an active LoRA into a 16-bit base while generating (``inference.lora_merged``);
        ``sort_by_length``: batch requests of equal prompt length together; ``min_new_tokens``: benchmarks
        only (forces every answer to that length); ``decode_cache``: ``model.decode_cache``."""
        from xray_train.data.loader import decode_workers as default_workers

        if max_new_tokens <= 0 or (batch_size is not None and batch_size <= 0):
            raise ValueError("max_new_tokens and batch_size must be positive")
        self.workers = default_workers(decode_workers)
        self.model = model
        self.encoder = PromptEncoder(processor, system_prompt)
        self.pixels = PixelLoader(processor, image_size)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.merge_lora = merge_lora
        self.sort_by_length = sort_by_length
        self.min_new_tokens = min_new_tokens
        if decode_cache not in ("dynamic", "static"):
            raise ValueError(f"decode_cache must be 'dynamic' or 'static', not {decode_cache!r}")
        self.decode_cache = decode_cache
        #: Rows per ``generate`` call of the last call (the automatic choice once made).
        self.rows = batch_size
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
        """One answer per request, in request order."""
        return self.answer(requests, [Variant(description)], progress, console)[description]

    def answer(
        self,
        requests: Sequence[Request],
        variants: Sequence[Variant],
        progress: bool = True,
        console=None,
        on_batch: BatchHook | None = None,
        description: str | None = None,
    ) -> dict[str, list[Generation]]:
        """Every request answered under every variant: ``{label: [Generation in request order]}``.

        Batch by batch, each variant in turn, so a film is read once; with several variants (or ``on_batch``)
        its SigLIP features are made once and shared. The progress bar counts films with every answer made.
        """
        from xray_train.data.loader import read_ahead

        if not variants or len({v.label for v in variants}) != len(variants):
            raise ValueError("variants must be non-empty with distinct labels")
        lengths = {}
        for req in requests:
            if req.task not in TASK_PROMPTS:
                raise ValueError(f"unknown task {req.task!r}; expected one of {sorted(TASK_PROMPTS)}")
            if req.task not in lengths:
                lengths[req.task] = len(self.encoder.prompt_ids(req.task))
        # Longest prompts first: a memory error, if any, comes with the first batch.
        order = sorted(range(len(requests)), key=lambda i: -lengths[requests[i].task]) if self.sort_by_length \
            else list(range(len(requests)))
        ordered = [requests[i] for i in order]
        batch_size = self.batch_size or self.auto_batch_size(max(lengths.values(), default=0))
        self.rows = batch_size
        shared = len(variants) > 1 or on_batch is not None
        answers = {v.label: [None] * len(requests) for v in variants}
        description = description or " + ".join(v.label for v in variants)
        with progress_bar(progress and bool(requests), console) as bar:
            handle = bar.add_task(description, total=len(requests)) if bar is not None else None
            start = 0
            # Images are read by worker processes while the GPU generates for the batch before.
            for chunk, prepared in read_ahead(ordered, lambda r: r.image, self.pixels.prepare, batch_size, self.workers):
                where = order[start : start + len(chunk)]
                start += len(chunk)
                if shared:
                    results = self._answer_shared(chunk, prepared, variants, on_batch, where)
                else:
                    with variants[0].state():
                        results = {variants[0].label: self.generate_batch(chunk, prepared)}
                for label, generations in results.items():
                    for i, generation in zip(where, generations):
                        answers[label][i] = generation
                if bar is not None:
                    bar.advance(handle, len(chunk))
        return answers

    def _answer_shared(self, chunk, prepared, variants, on_batch, where) -> dict[str, list[Generation]]:
        """One batch under every variant, SigLIP run once for all of them."""
        ok, errors, images = self._image_rows(chunk, prepared, encode=True)
        readable = [chunk[i] for i in ok]
        results = {}
        for variant in variants:
            with variant.state():
                if ok and on_batch is not None:
                    on_batch(variant.label, [where[i] for i in ok], images)
                results[variant.label] = self._placed(errors, ok, self.decode(readable, images) if ok else [])
        return results

    def auto_batch_size(self, prompt_length: int) -> int:
        """Rows per ``generate`` call when none is set: what the free memory holds (``inference.rows_that_fit``)."""
        from xray_train.inference import rows_that_fit

        rows = rows_that_fit(self.model, prompt_length + self.max_new_tokens)
        logger.info("Generating %d rows at once", rows)
        return rows

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

    def build_batch(self, requests: Sequence[Request]) -> dict:
        """Left-padded prompt ids, attention mask and token_type_ids, on the model's device."""
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
        }

    def generate_batch(self, requests: Sequence[Request], prepared=None) -> list[Generation]:
        """One ``generate`` call for up to ``batch_size`` requests (unreadable images are left out);
        ``prepared``: their images already read (a ``data.loader.PreparedBatch``)."""
        ok, errors, images = self._image_rows(requests, prepared, encode=False)
        return self._placed(errors, ok, self.decode([requests[i] for i in ok], images) if ok else [])

    def _image_rows(self, requests: Sequence[Request], prepared, encode: bool) -> tuple[list[int], list, dict | None]:
        """(readable positions, each request's read error or None, the readable rows' image inputs): their
        pixels, or with ``encode`` their pooled SigLIP rows (None when nothing could be read)."""
        from xray_train.features import pooled_vision_features

        pixels, errors = self._pixels(requests, prepared)
        ok = [i for i, p in enumerate(pixels) if p is not None]
        if not ok:
            return ok, errors, None
        stacked = torch.stack([pixels[i] for i in ok])
        if encode:
            return ok, errors, {"image_features": pooled_vision_features(self.model, stacked.to(self.device))}
        return ok, errors, {"pixel_values": stacked}

    @staticmethod
    def _placed(errors: list, ok: list[int], answers: list[Generation]) -> list[Generation]:
        """One Generation per request: the answers at the readable positions, the read errors elsewhere."""
        out = [Generation(None, 0, err) for err in errors]
        for i, generation in zip(ok, answers):
            out[i] = generation
        return out

    @torch.inference_mode()
    def decode(self, requests: Sequence[Request], image_inputs: dict) -> list[Generation]:
        """Greedy answers to ``requests`` in the model's current state, one ``generate`` call; ``image_inputs``:
        one row per request, ``{"pixel_values": ...}`` or ``{"image_features": pooled SigLIP rows}``."""
        from xray_train.features import image_features_at_prefill
        from xray_train.inference import lora_merged

        batch = self.build_batch(requests)
        if "image_features" in image_inputs:
            # No pixels: the prefill gets the shared SigLIP rows through the projector active now (Phase 2
            # trains a copy of it, which the base model does not use).
            images = image_features_at_prefill(self.model, batch["input_ids"], image_inputs["image_features"])
        else:
            batch["pixel_values"] = image_inputs["pixel_values"].to(self.device, self.pixel_dtype)
            images = nullcontext()
        with images, lora_merged(self.model) if self.merge_lora else nullcontext():
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
                min_new_tokens=self.min_new_tokens,
                # load_base sets config.use_cache=False for training; decoding without a KV cache would
                # recompute the whole prompt (256 image tokens at MedGemma's size) for every new token.
                use_cache=True,
                # "static": the KV cache allocated once at its full length, which lets transformers compile
                # the decode step on a GPU (see model.decode_cache).
                cache_implementation="static" if self.decode_cache == "static" else None,
            )
        new_tokens = generated[:, batch["input_ids"].shape[1] :].tolist()
        out = []
        for ids in new_tokens:
            stops = [ids.index(s) + 1 for s in self.stop_ids if s in ids]
            n = min(stops) if stops else len(ids)
            out.append(Generation(self.encoder.decode_answer(ids), n, finished=bool(stops)))
        return out
