"""Prompts, tokenisation and batching: the one text path for training, evaluation and prediction.

The prompt is tokenised once per task (it is the same for every image) and the answer separately, so
the supervised span is known *by construction*, on the expanded sequence, with no string-length
arithmetic (the seed recipe masked by characters of the un-expanded text and trained ~240 image
placeholders as targets). Labels are the answer ids and its ``<end_of_turn>``; everything else is -100.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100

#: The user instruction of each task; Phase 1 trains "report", Phase 2 trains "detect".
TASK_PROMPTS = {
    "report": "Write a structured report for this chest X-ray with FINDINGS, LOCATIONS and IMPRESSION sections.",
    "detect": "Locate the findings in this chest X-ray. Answer with one box per finding as "
    "<loc> tokens followed by the finding name, separated by ' ; '.",
}
PHASE_TASK = {"phase1": "report", "phase2": "detect"}


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    pad: int
    start_of_turn: int
    end_of_turn: int
    boi: int
    eoi: int
    image: int

    @classmethod
    def from_processor(cls, processor) -> "SpecialIds":
        tok = processor.tokenizer
        ids = tok.convert_tokens_to_ids(
            ["<start_of_turn>", "<end_of_turn>", tok.boi_token, tok.eoi_token, tok.image_token]
        )
        return cls(tok.bos_token_id, tok.pad_token_id, *ids)


class PromptEncoder:
    """Builds Gemma 3 chat sequences: ``<bos><start_of_turn>user\\n{system}\\n\\n{image}{task}<end_of_turn>\\n
    <start_of_turn>model\\n{answer}<end_of_turn>``, with the image expanded exactly as the processor does."""

    def __init__(self, processor, system_prompt: str):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.system_prompt = system_prompt
        self.ids = SpecialIds.from_processor(processor)
        self.image_seq_length = int(processor.image_seq_length)
        self._prompt_cache: dict[str, list[int]] = {}

    def prompt_text(self, task: str) -> str:
        user = f"{self.system_prompt}\n\n{self.processor.full_image_sequence}{TASK_PROMPTS[task]}"
        return f"<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n"

    def prompt_ids(self, task: str) -> list[int]:
        if task not in self._prompt_cache:
            ids = [self.ids.bos] + self.tokenizer(self.prompt_text(task), add_special_tokens=False).input_ids
            n_image = sum(1 for i in ids if i == self.ids.image)
            if n_image != self.image_seq_length:
                raise ValueError(f"prompt has {n_image} image tokens, processor expects {self.image_seq_length}")
            self._prompt_cache[task] = ids
        return list(self._prompt_cache[task])

    def answer_ids(self, answer: str) -> list[int]:
        ids = self.tokenizer(answer, add_special_tokens=False).input_ids + [self.ids.end_of_turn]
        forbidden = {self.ids.image, self.ids.boi, self.ids.eoi, self.ids.bos, self.ids.pad}
        if forbidden.intersection(ids):
            raise ValueError("answer text contains image or control tokens")
        return ids

    def encode(self, task: str, answer: str) -> dict[str, list[int]]:
        prompt, target = self.prompt_ids(task), self.answer_ids(answer)
        return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}

    def decode_answer(self, ids) -> str:
        """Generated ids after the prompt -> answer text (stops at <end_of_turn>, keeps <loc> tokens)."""
        ids = list(ids)
        for stop in (self.ids.end_of_turn, self.tokenizer.eos_token_id):
            if stop in ids:
                ids = ids[: ids.index(stop)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


@dataclass(frozen=True)
class FeatureRef:
    """A row of the vision-feature cache, resolved by the collator for the whole batch at once.

    Per-item tensor copies and their inter-process transfer cost more host time than the training
    step itself at MedGemma scale; one gather per batch does not.
    """

    cache: object
    row: int


class Collator:
    """Pads a list of encoded examples (right padding) and stacks their image tensors.

    Each item: ``input_ids``, ``labels`` and either ``pixel_values`` [3, S, S] or ``image_features``
    [mm_tokens, vision_hidden] (the cached, pooled vision output).
    """

    def __init__(self, special_ids: SpecialIds, pad_to_multiple_of: int | None = 8, gather_features: bool = True):
        self.ids = special_ids
        self.pad_to_multiple_of = pad_to_multiple_of
        # False where the collator runs in DataLoader worker processes: cached rows then travel as row numbers
        # (``feature_rows``) and the training process gathers them itself (``XrayTrainer``), instead of a
        # worker sending every batch's features through shared memory.
        self.gather_features = gather_features

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(it["input_ids"]) for it in items)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        batch = len(items)
        input_ids = torch.full((batch, longest), self.ids.pad, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((batch, longest), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[row, :n] = torch.as_tensor(it["input_ids"])
            labels[row, :n] = torch.as_tensor(it["labels"])
            attention[row, :n] = 1
        out = {
            "input_ids": input_ids,
            "attention_mask": attention,
            # Gemma 3 attends bidirectionally inside an image block: it needs to know where images are.
            "token_type_ids": (input_ids == self.ids.image).long(),
            "labels": labels,
            **target_positions(labels),
            # Flat positions of the image soft tokens, where the loss writes the image features.
            "image_index": (input_ids == self.ids.image).flatten().nonzero().squeeze(1),
            # Where the image block sits when every row has it at the same place (split attention).
            "image_span": image_span(input_ids, self.ids.image),
        }
        if "pixel_values" in items[0]:
            out["pixel_values"] = torch.stack([torch.as_tensor(it["pixel_values"]) for it in items])
        filling = [row for row, it in enumerate(items) if "fill_pixels" in it]
        if filling:
            # A cache being filled: these rows' features are made in the step from their uint8 images.
            cached = [row for row, it in enumerate(items) if "fill_pixels" not in it]
            out["fill_pixels"] = torch.stack([items[row]["fill_pixels"] for row in filling])
            # Cache rows stay on the host (numpy: the Trainer moves only tensors), where the cache writes them:
            # reading them back from the GPU would make every step wait for the one before.
            out["fill_rows"] = np.array([items[row]["fill_row"] for row in filling], dtype=np.int64)
            out["fill_positions"] = torch.tensor(filling)
            out["feature_positions"] = torch.tensor(cached, dtype=torch.long)
            items = [items[row] for row in cached]
        if items and "image_features" in items[0]:
            first = items[0]["image_features"]
            if isinstance(first, FeatureRef) and not self.gather_features:
                out["feature_rows"] = np.array([it["image_features"].row for it in items], dtype=np.int64)
            elif isinstance(first, FeatureRef):
                out["image_features"] = first.cache.rows([it["image_features"].row for it in items])
            else:
                out["image_features"] = torch.stack([torch.as_tensor(it["image_features"]) for it in items])
        return out


def batch_to(batch: dict, device) -> dict:
    """The batch with its tensors on ``device`` (layout values such as ``image_span`` stay as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def image_span(input_ids: torch.Tensor, image_token_id: int) -> tuple[int, int] | None:
    """``(start, end)`` of the one image block that every row has at the same place, else None."""
    is_image = input_ids == image_token_id
    counts = is_image.sum(1)
    if input_ids.shape[0] == 0 or int(counts[0]) == 0 or not bool((counts == counts[0]).all()):
        return None
    first = is_image.int().argmax(1)
    if not bool((first == first[0]).all()):
        return None
    start = int(first[0])
    end = start + int(counts[0])
    if not bool(is_image[:, start:end].all()):  # two blocks, or a gap inside one
        return None
    return start, end


def target_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where the loss is taken, computed on the host: ``target_index`` flat positions (row * seq + col)
    of the hidden states that predict a supervised token, and ``target_ids`` those tokens.

    The loss gathers with these instead of a boolean mask on the GPU, whose data-dependent shape would
    force a host-device synchronisation in every training step.
    """
    shifted = labels[:, 1:]
    rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
    return {"target_index": rows * labels.shape[1] + cols, "target_ids": shifted[rows, cols]}


def describe_supervision(encoder: PromptEncoder, encoded: dict[str, list[int]]) -> list[tuple[str, bool]]:
    """(text piece, supervised?) runs for ``config validate``'s highlighted example; image runs collapsed."""
    runs: list[tuple[str, bool]] = []
    ids, labels = encoded["input_ids"], encoded["labels"]
    i = 0
    while i < len(ids):
        if ids[i] == encoder.ids.image:
            j = i
            while j < len(ids) and ids[j] == encoder.ids.image:
                j += 1
            runs.append((f"<image_soft_token> x {j - i}", False))
            i = j
            continue
        supervised = labels[i] != IGNORE_INDEX
        j = i
        while j < len(ids) and ids[j] != encoder.ids.image and (labels[j] != IGNORE_INDEX) == supervised:
            j += 1
        runs.append((encoder.tokenizer.decode(ids[i:j], skip_special_tokens=False), supervised))
        i = j
    return runs
