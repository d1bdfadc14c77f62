"""Load the base, quantise it, add loc tokens, attach or continue the LoRA adapter, and load it back.

What it guarantees:
- the base is a Gemma 3 model loaded with ``AutoModelForImageTextToText`` (never PaliGemma);
- LoRA targets only the *language model's* q_proj/v_proj (SigLIP has modules of the same names);
- Phase 2 continues the Phase-1 LoRA weights instead of re-initialising them;
- ``<locNNNN>`` are single added tokens whose embedding rows, and only those, are trained (peft
  ``trainable_token_indices``: no copy of the 262k-row embedding or the tied LM head is saved).

Over 400 lines because it is one contract: the model a run trains, from the base to what is applied to its
decoder layers (loc rows, LoRA, checkpointing, compiling), built in one order.
"""

from __future__ import annotations

from pathlib import Path

import torch

from xray_train.config import ModelConfig, RunConfig
from xray_train.data.loc import LOC_TOKENS
from xray_train.errors import XrayTrainError
from xray_train.gemma3 import (
    decoder_layers, local_config_file, require_gemma3, residual_scale_for, scale_residual_stream,
)
from xray_train.names import target_modules_regex
from xray_train.resolve import compute_dtype, require_resolved
from xray_train.run_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RESOLVED_CONFIG, RunDir, absolute_base

PROJECTOR = "multi_modal_projector"
EMBED_TOKENS = "embed_tokens"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def quantization_config(model_cfg: ModelConfig):
    if not model_cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_cfg.quant_type,
        bnb_4bit_use_double_quant=model_cfg.double_quant,
        bnb_4bit_compute_dtype=DTYPES[compute_dtype(model_cfg)],
        # The projector is a bare parameter and the vision tower is small next to the LM; keeping
        # them unquantised keeps image features exact (and makes the vision cache base-exact).
        llm_int8_skip_modules=["model.vision_tower", f"model.{PROJECTOR}", "lm_head"],
    )


def default_device_map():
    if torch.cuda.is_available():
        from accelerate import PartialState

        return {"": PartialState().local_process_index}
    return {"": "cpu"}


def load_base(model_cfg: ModelConfig, device_map=None, with_processor: bool = True):
    """Base model (4-bit if configured) and its processor (None unless ``with_processor``), from a hub id
    or a local directory."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    local_config_file(model_cfg.base)
    kwargs = dict(
        revision=model_cfg.revision,
        dtype=DTYPES[compute_dtype(model_cfg)],
        attn_implementation=model_cfg.attn_implementation,
        use_safetensors=True,
        trust_remote_code=False,
        device_map=device_map if device_map is not None else default_device_map(),
    )
    quant = quantization_config(model_cfg)
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_cfg.base, **kwargs)
        processor = None
        if with_processor:
            processor = AutoProcessor.from_pretrained(model_cfg.base, revision=model_cfg.revision)
    except OSError as exc:
        raise XrayTrainError(f"model.base: cannot load {model_cfg.base}: {str(exc).splitlines()[0]}") from None
    require_gemma3(model, f"{model_cfg.base} is")
    # Training never reuses past keys/values; the text config is where Gemma 3 reads the flag.
    model.config.get_text_config().use_cache = False
    return model, processor


def add_loc_tokens(tokenizer) -> list[int]:
    """Add ``<loc0000>``..``<loc1023>`` as single, non-special tokens; return their ids in order.

    Added through the tokenizers backend so ids follow the backend's vocabulary size (transformers'
    ``len(tokenizer)`` can disagree with it); idempotent.
    """
    from tokenizers import AddedToken

    existing = tokenizer.convert_tokens_to_ids(LOC_TOKENS[:1])[0]
    if existing is None or existing == tokenizer.unk_token_id:
        tokenizer.backend_tokenizer.add_tokens(
            [AddedToken(t, normalized=False, special=False, single_word=False) for t in LOC_TOKENS]
        )
    ids = tokenizer.convert_tokens_to_ids(LOC_TOKENS)
    if len(set(ids)) != len(LOC_TOKENS) or tokenizer.unk_token_id in ids:
        raise XrayTrainError("could not add the <loc> tokens to the tokenizer")
    return ids


def loc_token_ids(tokenizer) -> list[int] | None:
    ids = tokenizer.convert_tokens_to_ids(LOC_TOKENS)
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        return None
    return ids


def resize_embeddings_for(model, token_ids: list[int]) -> None:
    """Grow the (tied) embedding so every given id has a row (new rows start at the mean embedding)."""
    needed = max(token_ids) + 1
    current = model.get_input_embeddings().weight.shape[0]
    if needed > current:
        # mean_resizing=False: the covariance-sampled init costs minutes at 262k x 2560 and the rows
        # are trained anyway; starting them at the mean keeps the first logits unremarkable.
        model.resize_token_embeddings(needed, pad_to_multiple_of=64, mean_resizing=False)
        weight = model.get_input_embeddings().weight
        with torch.no_grad():
            weight[current:] = weight[:current].float().mean(0).to(weight.dtype)


#: ``numbers`` init: weight of each digit of the bin's 0-999 number, most significant first.
_DIGIT_WEIGHTS = (4.0, 2.0, 1.0)


def number_rows(embedding: torch.Tensor, tokenizer, n_bins: int) -> torch.Tensor:
    """[n_bins, dim] fp32: bin k as the base embeds its number ``round(k * 999 / (n_bins - 1))``.

    Gemma's tokenizer writes a number digit by digit, so a row is a weighted mean of its digits' rows,
    the leading digit weighted most (it says the most about where the coordinate is).
    """
    digit_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list("0123456789")), device=embedding.device)
    numbers = [str(round(k * 999 / (n_bins - 1))).zfill(3) for k in range(n_bins)]
    ids = digit_ids[torch.tensor([[int(c) for c in n] for n in numbers], device=embedding.device)]  # [n_bins, 3]
    w = torch.tensor(_DIGIT_WEIGHTS, dtype=torch.float32, device=embedding.device)
    return (embedding[ids].float() * w[:, None]).sum(1) / w.sum()


def init_loc_rows(model, loc_ids: list[int], init: str = "mean", tokenizer=None) -> None:
    """Give freshly added <loc> tokens (``loc_ids`` in bin order) their starting rows.

    All of them, including the first ~60 ids that land on the base's unused padding rows (Gemma 3 pads its
    vocabulary to 262,208 rows) and would otherwise start from whatever those rows hold. ``"mean"``: the
    mean embedding of the real vocabulary. ``"ordinal"``: that plus ``ordinal_code``. ``"numbers"``: the
    base's embedding of the bin's number (``number_rows``, needs ``tokenizer``) plus ``ordinal_code``, so
    a pretrained base starts from what it already knows about numbers.
    """
    weight = model.get_input_embeddings().weight
    real_vocab = weight.detach()[: min(loc_ids)]
    # Accumulated in fp32 without an fp32 copy of the 262k x 2560 table.
    rows = real_vocab.mean(0, keepdim=True, dtype=torch.float32).expand(len(loc_ids), -1)
    if init == "numbers":
        if tokenizer is None:
            raise ValueError("loc_token_init 'numbers' needs the tokenizer")
        rows = number_rows(real_vocab, tokenizer, len(loc_ids))
    if init in ("ordinal", "numbers"):
        scale = float(real_vocab[:8192].float().norm(dim=1).median())
        rows = rows + ordinal_code(len(loc_ids), weight.shape[1], scale).to(rows.device)
    with torch.no_grad():
        weight[torch.as_tensor(loc_ids, device=weight.device)] = rows.to(weight.dtype)


def ordinal_code(n_bins: int, dim: int, scale: float, frequencies: int = 32, seed: int = 0) -> torch.Tensor:
    """[n_bins, dim] rows whose dot products fall off smoothly with the distance between bins.

    Row k is ``scale * Q [cos(pi f k / n), sin(pi f k / n)]_f / sqrt(F)`` for f = 1..F, Q a fixed random
    orthonormal basis: row_i . row_k = scale^2 / F * sum_f cos(pi f (i - k) / n), a kernel peaked at i = k
    about n / F bins wide. With a tied head the <loc> logits inherit it: the bin the hidden state points
    at scores highest and its neighbours next, so bins never seen as a target are still reachable.
    """
    f_count = max(1, min(frequencies, dim // 4))
    k = torch.arange(n_bins, dtype=torch.float64)[:, None]
    f = torch.arange(1, f_count + 1, dtype=torch.float64)[None, :]
    angles = torch.pi * k * f / n_bins
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1) / f_count**0.5
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, 2 * f_count, generator=generator, dtype=torch.float64))
    return (scale * features @ basis.T).float()


def lora_config(cfg: RunConfig, loc_ids: list[int] | None):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=target_modules_regex(cfg.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        modules_to_save=[PROJECTOR] if cfg.train_projector else None,
        trainable_token_indices={EMBED_TOKENS: list(loc_ids)} if loc_ids else None,
    )


def _upcast_trainable(model) -> None:
    """Trainable weights in fp32 (AdamW updates vanish in bf16); frozen ones stay as loaded."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def read_lora_state(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise XrayTrainError(f"--resume: {adapter_dir} has no {ADAPTER_WEIGHTS}; is it a phase1 output dir?")
    return load_file(str(path))


def continue_adapter(peft_model, phase1_dir: Path) -> int:
    """Copy the Phase-1 LoRA A/B weights into a freshly built Phase-2 adapter (same r, same targets).

    Every Phase-1 LoRA tensor must land on a Phase-2 parameter of the same shape, otherwise the
    continuation would silently start from scratch (the seed recipe's bug): that is an error.
    Phase 2 has extra trainable pieces (projector copy, loc rows) that Phase 1 never had, so the
    tensors are placed by name rather than through peft's whole-adapter loader.
    """
    state = read_lora_state(phase1_dir)
    adapter = peft_model.active_adapter
    mapped = {}
    for key, tensor in state.items():
        if "lora_" not in key:
            continue
        for part in (".lora_A.", ".lora_B."):
            if part in key:
                key = key.replace(part, f"{part}{adapter}.", 1)
        mapped[key] = tensor
    if not mapped:
        raise XrayTrainError(f"--resume: {phase1_dir}/{ADAPTER_WEIGHTS} holds no LoRA tensors")
    own = peft_model.state_dict()
    missing = [k for k in mapped if k not in own]
    wrong_shape = [k for k in mapped if k in own and own[k].shape != mapped[k].shape]
    if missing or wrong_shape:
        example = (missing or wrong_shape)[0]
        raise XrayTrainError(
            f"--resume: {len(missing) + len(wrong_shape)} Phase-1 LoRA tensors do not fit this model "
            f"(e.g. {example}); check lora.r and lora.target_modules match Phase 1"
        )
    with torch.no_grad():
        for key, tensor in mapped.items():
            own[key].copy_(tensor.to(own[key].dtype))
    return len(mapped)


def check_phase1_dir(phase1_dir: Path, cfg: RunConfig) -> None:
    """--resume must point at a finished Phase-1 output with the same LoRA shape and base."""
    run_dir = RunDir(phase1_dir)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, RESOLVED_CONFIG):
        if not run_dir.file(name).is_file():
            raise XrayTrainError(f"--resume: {phase1_dir} is not a Phase-1 output dir (no {name})")
    saved = run_dir.config()
    if saved.phase != "phase1":
        raise XrayTrainError(f"--resume: {phase1_dir} was written by {saved.phase}, expected phase1")
    adapter = run_dir.adapter_config()
    if adapter.get("r") != cfg.lora.r:
        raise XrayTrainError(f"lora.r: {cfg.lora.r} differs from the Phase-1 adapter's r={adapter.get('r')}")
    if absolute_base(saved.model.base) != absolute_base(cfg.model.base):
        raise XrayTrainError(f"model.base: {cfg.model.base} differs from the Phase-1 base {saved.model.base}")


def build_training_model(cfg: RunConfig, resume_from: Path | None = None, device_map=None):
    """Base + (loc tokens) + LoRA (+ projector), continuing Phase 1 when ``resume_from`` is given.

    ``cfg`` is resolved (``xray_train.resolve``): every lever below is read, none decided here.
    Returns ``(peft_model, processor)``.
    """
    from peft import get_peft_model

    t = require_resolved(cfg).training
    model, processor = load_base(cfg.model, device_map=device_map)
    # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for an inference kernel the first
    # time a layer runs in eval mode and unpacks them only when a state_dict is taken, so training
    # after a mid-run evaluation would backpropagate through the repacked layout (wrong gradients).
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    loc_ids = None
    if cfg.add_loc_tokens:
        fresh = loc_token_ids(processor.tokenizer) is None
        loc_ids = add_loc_tokens(processor.tokenizer)
        resize_embeddings_for(model, loc_ids)
        if fresh:
            init_loc_rows(model, loc_ids, cfg.model.loc_token_init, processor.tokenizer)
    # Frozen base weights only (nothing peft adapts or saves), so the adapter means what a bf16 run's does.
    scale_residual_stream(model, residual_scale_for(cfg.model.compute_dtype, cfg.model.residual_scale))
    peft_model = get_peft_model(model, lora_config(cfg, loc_ids))
    if resume_from is not None:
        continue_adapter(peft_model, resume_from)
    _upcast_trainable(peft_model)
    if t.split_image_attention:
        from xray_train.attention import use_split_attention

        use_split_attention(model)
    if t.dequantize_in_graph:
        from xray_train.nf4 import dequantize_in_graph

        dequantize_in_graph(decoder_layers(peft_model).modules())
    if t.torch_compile:
        compile_decoder_layers(peft_model)
    if t.gradient_checkpointing:
        enable_checkpointing(peft_model)
        peft_model.enable_input_require_grads()
        if t.checkpoint_layers != "all":
            keep_activations_except(peft_model, t.checkpoint_layers)
    return peft_model, processor


def enable_checkpointing(model) -> None:
    """Checkpointing on every decoder layer (``keep_activations_except`` then narrows it), non-reentrant."""
    # Newer transformers call it activation checkpointing and warn on the old name; 5.17 has only the old one.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointed_layer_indices(n_layers: int, n_checkpointed: int) -> list[int]:
    """``n_checkpointed`` of ``n_layers`` decoder layers, spread evenly over the stack."""
    n = min(max(n_checkpointed, 0), n_layers)
    return sorted({int(i * n_layers / n) for i in range(n)}) if n else []


def keep_activations_except(model, n_checkpointed: int) -> list[int]:
    """Selective checkpointing: only ``n_checkpointed`` decoder layers recompute in backward.

    Peak memory grows by one layer's activations per layer that keeps them, and each such layer saves
    its share of the recomputation (about a third of its step time), so a memory budget between "all"
    and "none" is met at the best speed. Returns the indices of the checkpointed layers.
    """
    layers = decoder_layers(model)
    chosen = checkpointed_layer_indices(len(layers), n_checkpointed)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in chosen
    return chosen


def compile_decoder_layers(model, backend: str | None = None) -> int:
    """``torch.compile`` each language-model decoder layer (bitsandbytes and peft layers included).

    At MedGemma-4B scale a QLoRA step is bound by Python and kernel-launch overhead, not by the GPU
    (about 0.6 s of CPU for 0.2 s of GPU work at batch 16 on an H200): per layer, seven 4-bit matmuls
    with their dequantisation, two LoRA branches, six RMSNorms and RoPE each cost tens of microseconds
    of host time. Compiling the layers fuses the elementwise work and removes most of that overhead.
    The LM head and loss stay eager (they run once per step). Returns the number of layers compiled.
    The sequence length is a dynamic size from the first step (:func:`_sequence_dynamic`), not a second
    compile at step 2. ``backend``: tests pass ``"eager"`` (the same graphs and guards, nothing generated).
    """
    from xray_train.private_api import wrap_compiled_call

    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(**({"backend": backend} if backend else {}))
        # The wrapper runs eagerly around the compiled call, where marks may be set.
        wrap_compiled_call(layer, _sequence_dynamic)
    return len(layers)


def _sequence_dynamic(compiled_call):
    """``compiled_call`` with the sequence dimensions of its tensor inputs (hidden states [b, s, h], rotary
    cos/sin [1, s, d], position ids [1, s], a dense mask [b, 1, s, s]: those of the hidden states' length)
    marked dynamic before it runs. A mark only decides how a first compile treats that size."""
    from xray_train.private_api import maybe_mark_dynamic

    def mark(value, length: int) -> None:
        if isinstance(value, (tuple, list)):
            for v in value:
                mark(v, length)
        elif isinstance(value, torch.Tensor):
            for dim in (1, 2, 3) if value.dim() == 4 else (1,) if value.dim() >= 2 else ():
                if value.shape[dim] == length:
                    maybe_mark_dynamic(value, dim)

    def call(*args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.shape[1] > 1:
            mark((args, tuple(kwargs.values())), hidden.shape[1])
        return compiled_call(*args, **kwargs)

    return call


def load_adapter(adapter_dir, base: str | None = None, load_in_4bit: bool | None = None, device_map=None,
                 residual_scale: int | None = None):
    """Base + loc tokens + adapter + processor from an xray-train output dir (or a pushed Hub repo dir).

    ``base`` overrides the base recorded at training time (e.g. a local copy of MedGemma, or the recorded
    local folder after it moved). The residual stream is scaled as the run's config says
    (``model.residual_scale``, float16 runs: on) unless ``residual_scale`` says otherwise (1: the
    unmodified base, as ``merge`` needs it). Returns ``(model, processor)`` in eval mode.
    """
    from xray_train.quiet import silence_what_users_cannot_act_on

    silence_what_users_cannot_act_on()  # before peft imports bitsandbytes, which logs at import
    from peft import PeftModel
    from transformers import AutoProcessor

    run_dir = RunDir(adapter_dir).require_adapter()
    adapter_dir = run_dir.path
    model_cfg = run_dir.config().model.model_copy() if run_dir.has_config() else ModelConfig()
    model_cfg.base, model_cfg.revision = run_dir.base_to_load(base)
    if load_in_4bit is not None:
        model_cfg.load_in_4bit = load_in_4bit
    # The adapter directory carries its own processor (with the <loc> tokens).
    model, _ = load_base(model_cfg, device_map=device_map, with_processor=False)
    if residual_scale is None:
        residual_scale = residual_scale_for(compute_dtype(model_cfg), model_cfg.residual_scale)
    scale_residual_stream(model, residual_scale)
    processor = AutoProcessor.from_pretrained(adapter_dir)
    loc_ids = loc_token_ids(processor.tokenizer)
    if loc_ids:
        resize_embeddings_for(model, loc_ids)
    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    model.eval()
    return model, processor
