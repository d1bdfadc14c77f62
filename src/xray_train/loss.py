"""The training loss: Gemma 3 forward with image features merged, LM head only where it is supervised.

``Gemma3ForConditionalGeneration.forward`` projects *every* position through the 262k-row LM head
(``[batch, seq, 262k]`` logits, ~0.5 GB per 8 x 400 tokens in bf16, more in fp32 for the loss) although
only the ~120 answer tokens of a ~400-token sample are supervised. Here the decoder runs once, the
hidden states at supervised positions are gathered, and the head + cross-entropy run on those rows in
checkpointed chunks. ``tests/test_loss.py`` proves it equals the plain HF loss and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from xray_train.attention import span_masks
from xray_train.collate import IGNORE_INDEX, target_positions
from xray_train.features import project_pooled, with_image_rows
from xray_train.gemma3 import active_projector, unwrap_gemma3

@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # summed token cross-entropy (fp32)
    n_tokens: torch.Tensor  # supervised tokens in the batch
    n_correct: torch.Tensor  # supervised tokens whose argmax is the label (teacher-forced accuracy)


def _image_features(gemma3_model, batch) -> torch.Tensor | None:
    if "image_features" in batch:
        return project_pooled(active_projector(gemma3_model), batch["image_features"])
    if "pixel_values" in batch:
        return gemma3_model.get_image_features(batch["pixel_values"], return_dict=True).pooler_output
    return None


def merged_inputs_embeds(gemma3_model, batch) -> torch.Tensor:
    """Token embeddings with the image soft-token positions replaced by the projected image features."""
    input_ids = batch["input_ids"]
    image_mask = input_ids == gemma3_model.config.image_token_id
    # The image placeholder id may be past the embedding rows; its row is overwritten anyway.
    embeds = gemma3_model.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
    features = _image_features(gemma3_model, batch)
    if features is None:
        return embeds
    # Positions from the collator (host): a mask-based scatter would synchronise with the GPU in backward.
    index = batch.get("image_index")
    if index is None:
        index = image_mask.flatten().nonzero().squeeze(1)
    return with_image_rows(embeds, index, features)


@dataclass(frozen=True)
class LocTargets:
    """Distance-aware targets at ``<loc>`` positions (training.loc_label_sigma / loc_l1_weight).

    A one-hot cross-entropy treats a box edge one bin off like one on the other side of the film, and
    each of the 1024 rows learns only from the few boxes that fall in its bin. Here a ``<loc>`` label
    is a Gaussian over the bins (``sigma`` bins wide), so every box also trains the bins around it, and
    ``l1_weight`` adds the distance between the expected coordinate (softmax over the ``<loc>`` rows
    only) and the truth. Positions whose label is not a ``<loc>`` token keep the plain cross-entropy.
    """

    first_id: int  # <loc0000>; the 1024 ids are consecutive (``model.add_loc_tokens`` adds them in order)
    n_bins: int
    sigma: float = 0.0
    l1_weight: float = 0.0

    @classmethod
    def from_ids(cls, loc_ids: list[int] | None, sigma: float, l1_weight: float) -> "LocTargets | None":
        if not loc_ids or (sigma <= 0 and l1_weight <= 0):
            return None
        if list(loc_ids) != list(range(loc_ids[0], loc_ids[0] + len(loc_ids))):
            raise ValueError("the <loc> token ids are not consecutive")
        return cls(int(loc_ids[0]), len(loc_ids), float(sigma), float(l1_weight))

    def row_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-row loss of fp32 ``logits`` [rows, vocab]: plain cross-entropy except at ``<loc>`` labels."""
        lse = torch.logsumexp(logits, dim=-1)
        plain = lse - logits.gather(1, labels.unsqueeze(1)).squeeze(1)
        offset = labels - self.first_id
        is_loc = (offset >= 0) & (offset < self.n_bins)
        target = offset.clamp(0, self.n_bins - 1).to(logits.dtype).unsqueeze(1)
        loc_logits = logits[:, self.first_id : self.first_id + self.n_bins]
        bins = torch.arange(self.n_bins, device=logits.device, dtype=logits.dtype).unsqueeze(0)
        loss = plain
        if self.sigma > 0:
            soft = torch.softmax(-0.5 * ((bins - target) / self.sigma) ** 2, dim=-1)
            loss = torch.where(is_loc, lse - (soft * loc_logits).sum(-1), loss)
        if self.l1_weight > 0:
            expected = (torch.softmax(loc_logits, dim=-1) * bins).sum(-1)
            l1 = (expected - target.squeeze(1)).abs() / (self.n_bins - 1)
            loss = torch.where(is_loc, loss + self.l1_weight * l1, loss)
        return loss


def _head_ce(lm_head, hidden: torch.Tensor, labels: torch.Tensor, loc: LocTargets | None = None):
    # No final-logit soft-capping: Gemma3ForConditionalGeneration (what generate() runs) applies none.
    logits = lm_head(hidden).float()
    if loc is None:
        loss = F.cross_entropy(logits, labels, reduction="sum")
    else:
        loss = loc.row_losses(logits, labels).sum()
    correct = (logits.argmax(-1) == labels).sum()
    return loss, correct


class _HeadLossGradInForward(torch.autograd.Function):
    """Summed cross-entropy of a frozen LM head over ``hidden`` rows, whose gradient is made in the forward.

    The checkpointed chunks compute every chunk's logits twice (forward, then again in backward) and
    run softmax three times. Here each chunk's logits are made once: the loss, the argmax and
    ``d loss / d hidden`` (softmax minus one-hot, through the head) come from the same logits, and the
    backward only scales the stored [rows, hidden] gradient. Liger's fused linear cross-entropy does
    the same. Only for a head without trainable weights (Phase 1); ``tests/test_loss.py`` checks it
    against the plain path.
    """

    @staticmethod
    def forward(ctx, hidden, lm_head, labels, chunk_rows):
        grad_hidden = torch.empty_like(hidden)
        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows]
            y = labels[start : start + chunk_rows]
            low = lm_head(h)  # autocast applies as in the plain path
            logits = low.float()
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(y.shape[0], device=y.device)
            loss_sum = loss_sum + (lse - logits[rows, y]).sum()
            correct = correct + (logits.argmax(-1) == y).sum()
            probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
            probs[rows, y] -= 1.0
            # As autograd would: the fp32 gradient cast to the logits' dtype, then through the head.
            weight = lm_head.weight.to(low.dtype)
            grad_hidden[start : start + chunk_rows] = (probs.to(low.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None


def _frozen_linear_head(lm_head) -> bool:
    return isinstance(lm_head, torch.nn.Linear) and lm_head.bias is None and not lm_head.weight.requires_grad


def targets_only_loss(
    model, batch, chunk_rows: int, grad_in_forward: bool, loc: LocTargets | None = None
) -> LossOutput:
    """Loss over supervised tokens only, LM head evaluated at those positions in chunks of ``chunk_rows``
    (config: training.head_chunk_rows; a chunk's logits are rows x vocab floats at the memory peak).

    ``grad_in_forward`` (config: training.head_grad_in_forward) makes a frozen head's gradient during
    the forward (:class:`_HeadLossGradInForward`); otherwise each chunk is checkpointed. ``loc``: the
    distance-aware ``<loc>`` targets (:class:`LocTargets`).
    """
    full = unwrap_gemma3(model)
    gemma3_model = full.model
    embeds = merged_inputs_embeds(gemma3_model, batch)
    masks = span_masks(gemma3_model.config, batch.get("image_span"), embeds.shape[1])
    out = gemma3_model(
        input_ids=None,
        inputs_embeds=embeds,
        # A prepared mapping skips transformers' dense-mask construction.
        attention_mask=masks if masks is not None else batch["attention_mask"],
        token_type_ids=None if masks is not None else batch["token_type_ids"],
        use_cache=False,
    )
    hidden = out.last_hidden_state
    if "target_index" not in batch:
        batch = {**batch, **target_positions(batch["labels"].cpu())}
    index = batch["target_index"].to(hidden.device)
    hidden_sel = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    labels_sel = batch["target_ids"].to(hidden.device)
    # torch.full, not torch.tensor: copying a host scalar to the GPU would synchronise.
    n_tokens = torch.full((), labels_sel.shape[0], dtype=torch.long, device=hidden_sel.device)
    training = torch.is_grad_enabled() and hidden_sel.requires_grad
    if grad_in_forward and training and loc is None and _frozen_linear_head(full.lm_head):
        loss_sum, correct = _HeadLossGradInForward.apply(hidden_sel, full.lm_head, labels_sel, chunk_rows)
        return LossOutput(loss_sum, n_tokens, correct)
    loss_sum = hidden_sel.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden_sel.device)
    for start in range(0, hidden_sel.shape[0], chunk_rows):
        h = hidden_sel[start : start + chunk_rows]
        y = labels_sel[start : start + chunk_rows]
        if training:
            # Recompute this chunk's logits in backward instead of keeping chunk x vocab floats alive.
            chunk_loss, chunk_correct = checkpoint(_head_ce, full.lm_head, h, y, loc, use_reentrant=False)
        else:
            chunk_loss, chunk_correct = _head_ce(full.lm_head, h, y, loc)
        loss_sum = loss_sum + chunk_loss
        correct = correct + chunk_correct
    return LossOutput(loss_sum, n_tokens, correct)


def full_logits_loss(model, batch) -> LossOutput:
    """The plain path: HF forward with full logits (the reference the fast path is tested against)."""
    full = unwrap_gemma3(model)
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    if "image_features" in batch:
        kwargs = {
            "inputs_embeds": merged_inputs_embeds(full.model, batch),
            "attention_mask": batch["attention_mask"],
            "token_type_ids": batch["token_type_ids"],
        }
    elif "pixel_values" in batch:
        kwargs["pixel_values"] = batch["pixel_values"]
    logits = full(**kwargs, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    supervised = labels != IGNORE_INDEX
    loss_sum = F.cross_entropy(logits[supervised], labels[supervised], reduction="sum")
    correct = (logits[supervised].argmax(-1) == labels[supervised]).sum()
    return LossOutput(loss_sum, supervised.sum(), correct)
