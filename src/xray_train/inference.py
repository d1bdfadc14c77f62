"""How ``evaluate`` and ``predict`` hold the model for fast decoding: which copy of the base, and how many rows.

Two ways to hold the base (``model.inference``):

* ``merged``: the base unquantised in the compute dtype (bf16 for MedGemma, about 8.6 GB), the adapter
  attached, and while the adapter's answers are generated its LoRA is folded into the q/v weights
  (:func:`lora_merged`), so a decode step runs no LoRA branch; the base's own weights are put back bit for
  bit afterwards, for the baseline and the teacher-forced pass. The answers are those of the model
  ``xray-train merge`` publishes.
* ``4bit``: the NF4 base the adapter was trained against. bitsandbytes' fast 4-bit kernels are for batch 1:
  at larger batches every decode step dequantises the weights again, so this is the path for cards that
  cannot hold the 16-bit copy, not the fast one.

``auto`` (the default) takes ``merged`` where the card's free memory holds the 16-bit weights and a
decode batch beside them, else ``4bit``; the log says which ran and why. On a CPU ``auto`` keeps the
training layout (``model.load_in_4bit``).

The decode batch (``model.generate_batch_size``) defaults to as many rows as the free memory holds after
the weights (KV cache, prefill activations), up to :data:`MAX_AUTO_ROWS`: a 4B model's decode step reads
all its weights whatever the batch, so rows are nearly free until the GPU's compute, not its memory
bandwidth, is the limit. ``benchmarks/bench_generate.py`` measures it (not yet run to completion on a GPU).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from xray_train.config import ModelConfig
from xray_train.resolve import compute_dtype

logger = logging.getLogger(__name__)

#: Upper bound of the automatic decode batch (rows generated at once).
MAX_AUTO_ROWS = 256
#: Decode batch on a CPU (no memory to measure; the tiny test model).
CPU_ROWS = 8
#: Free memory kept aside beyond the weights and the rows' estimate (allocator fragmentation, CUDA context).
HEADROOM_BYTES = 2 * 1024**3

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class InferencePlan:
    """Which weights ``evaluate``/``predict`` decode with, and the reason (for the log and the results)."""

    weights: str  # "merged" or "4bit"
    reason: str

    @property
    def description(self) -> str:
        return {"merged": "16-bit base with the adapter merged in memory",
                "4bit": "4-bit base with the adapter attached"}[self.weights]


def parameter_count(base: str, revision: str | None = None) -> int:
    """Parameters of the base model, from its config alone (nothing is allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(base, revision=revision, trust_remote_code=False)
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    model.tie_weights()  # a tied LM head is the embedding, not a second copy of it
    return sum(p.numel() for p in model.parameters())


def free_memory(device: int | None = None) -> int | None:
    """Free bytes on the current CUDA device, or None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info(device)[0]


def plan_inference(model_cfg: ModelConfig, free: int | None = None, n_params: int | None = None) -> InferencePlan:
    """Decide ``merged`` or ``4bit`` from ``model.inference`` and the free memory (``free``: bytes, measured
    when None; ``n_params``: the base's parameter count, read from its config when None)."""
    mode = model_cfg.inference
    if mode == "merged":
        return InferencePlan("merged", "model.inference: merged")
    if mode == "4bit" or not model_cfg.load_in_4bit:
        # A base trained unquantised is already 16-bit: there is nothing faster to switch to.
        weights = "4bit" if model_cfg.load_in_4bit else "merged"
        return InferencePlan(weights, f"model.inference: {mode}, model.load_in_4bit: {model_cfg.load_in_4bit}")
    free = free_memory() if free is None else free
    if free is None:
        return InferencePlan("4bit", "no GPU: the training layout (model.load_in_4bit) is kept")
    n_params = parameter_count(model_cfg.base, model_cfg.revision) if n_params is None else n_params
    needed = n_params * _DTYPE_BYTES[compute_dtype(model_cfg)]
    # The 16-bit copy must leave at least as much again for the decode batch, or the 4-bit base with a
    # larger batch is the better use of the card.
    if 2 * needed + HEADROOM_BYTES <= free:
        return InferencePlan("merged", f"{needed / 1e9:.1f} GB of 16-bit weights fit in {free / 1e9:.1f} GB free")
    return InferencePlan("4bit", f"{needed / 1e9:.1f} GB of 16-bit weights do not fit twice in {free / 1e9:.1f} GB free")


def load_for_inference(adapter_dir, model_cfg: ModelConfig, base: str | None = None, echo=None):
    """``(model, processor, plan)``: the adapter on the base chosen by :func:`plan_inference`, in eval mode."""
    from xray_train.model import load_adapter
    from xray_train.run_dir import RunDir

    model_cfg = model_cfg or ModelConfig()
    # The base is found (or a moved one refused, in one line) before the plan reads its size.
    found, revision = RunDir(adapter_dir).require_adapter().base_to_load(base)
    model_cfg = model_cfg.model_copy(update={"base": found, "revision": revision})
    plan = plan_inference(model_cfg)
    message = f"Inference on the {plan.description} ({plan.reason})"
    logger.info("%s", message)
    if echo is not None:
        echo(message)
    model, processor = load_adapter(adapter_dir, base=model_cfg.base, load_in_4bit=plan.weights == "4bit")
    return model, processor, plan


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token of one row takes across the decoder's layers."""
    from xray_train.gemma3 import text_model, unwrap_gemma3

    text = unwrap_gemma3(model).config.get_text_config()
    dtype = next(text_model(model).parameters()).dtype
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 2
    return 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * max(size, 2)


def rows_that_fit(model, tokens_per_row: int, free: int | None = None, cap: int = MAX_AUTO_ROWS) -> int:
    """Decode rows the free memory holds: each row's KV cache for ``tokens_per_row`` tokens, three times over
    for the prefill's activations, the step's logits and the allocator's slack; at most ``cap``."""
    free = free_memory() if free is None else free
    if free is None:
        return CPU_ROWS
    from xray_train.gemma3 import unwrap_gemma3

    vocab = unwrap_gemma3(model).config.get_text_config().vocab_size
    per_row = 3 * kv_bytes_per_token(model) * tokens_per_row + 4 * vocab * 4
    return max(1, min(cap, int((free - HEADROOM_BYTES) // per_row)))


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def adapter_enabled(model) -> bool:
    """True for a peft model whose LoRA layers are active (not inside ``disable_adapter()``)."""
    layers = _lora_layers(model)
    return bool(layers) and not any(layer.disable_adapters for layer in layers)


@contextmanager
def lora_merged(model):
    """The adapter's LoRA folded into its base weights for the duration, the base weights restored exactly.

    peft's ``unmerge_adapter`` subtracts the delta again, which in 16-bit does not give back the base's
    bits; the base's q/v weights (about 0.5 GB at MedGemma's size) are kept aside and copied back instead.
    A no-op for a model without active LoRA layers, and for a 4-bit base (merging there would
    requantise the weights).
    """
    layers = _lora_layers(model) if adapter_enabled(model) else []
    weights = [layer.get_base_layer().weight for layer in layers]
    if not layers or any(w.dtype not in (torch.float32, torch.bfloat16, torch.float16) for w in weights):
        yield False
        return
    saved = [w.detach().clone() for w in weights]
    model.merge_adapter()
    try:
        yield True
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for w, original in zip(weights, saved):
                w.copy_(original)
