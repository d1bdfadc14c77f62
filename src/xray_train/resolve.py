"""Every "auto" setting of a run config turned into a concrete value, once, at start-up.

A config may leave a setting null (or, for ``head_grad_in_forward``, ask for something the phase cannot
do); ``resolve`` decides it from the phase, the device and the base's processor and returns a config in
which each of ``RESOLVED_KEYS`` holds the value the run uses. That config is what a run directory saves,
so a finished run records whether it compiled, checkpointed or used bf16. Nothing else decides these
values: the model builder, the trainer, the loss and the model card read them.
"""

from __future__ import annotations

from dataclasses import dataclass

from xray_train.config import DEFAULT_CHECKPOINT_LAYERS, RunConfig
from xray_train.data.loader import available_cpus, decode_workers
from xray_train.errors import XrayTrainError
from xray_train.gemma3 import residual_scale_for


#: Fewer images than this are cached with transformers' eager SigLIP: compiling it takes longer than it saves
#: (H200, MedGemma-4B, batch 32: 61.5 films/s eager, 70.7 compiled, 16 s to compile; even at ~7500 films).
COMPILE_VISION_MIN_IMAGES = 8000

#: The settings ``resolve`` decides (dotted keys); none of them is null in a resolved config.
RESOLVED_KEYS = (
    "model.add_loc_tokens",
    "model.train_projector",
    "data.image_size",
    "data.decode_workers",
    "training.bf16",
    "training.torch_compile",
    "training.dequantize_in_graph",
    "training.gradient_checkpointing",
    "training.checkpoint_layers",
    "training.dataloader_num_workers",
    "training.compile_vision_cache",
    "training.eval_steps",
    "training.projector_learning_rate",
    "training.head_grad_in_forward",
)


@dataclass(frozen=True)
class Device:
    """What the settings depend on: is there a CUDA GPU, does it have native bf16, how many CPUs."""

    cuda: bool
    native_bf16: bool
    name: str
    cpu_count: int

    @classmethod
    def detect(cls) -> "Device":
        import torch

        cuda = torch.cuda.is_available()
        native = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
        name = "CPU"
        if cuda:
            try:
                name = torch.cuda.get_device_name()
            except Exception:  # noqa: BLE001 - only used to word a message
                name = "this GPU"
        return cls(cuda=cuda, native_bf16=native, name=name, cpu_count=available_cpus())


def resolve(
    cfg: RunConfig, device: Device | None = None, image_size: int | None = None, images: int = 0
) -> RunConfig:
    """A copy of ``cfg`` with every ``RESOLVED_KEYS`` setting concrete, or a one-line refusal.

    ``image_size``: the base processor's image side, if the caller has it; otherwise it is read from the
    base's image-processor config (a small file, no weights). ``images``: how many images the run caches
    vision features of (``train.run_inputs``), which decides a null ``training.compile_vision_cache``
    on CUDA (callers that build no cache leave it at 0: eager). Resolving a resolved config changes nothing.
    """
    device = device or Device.detect()
    bf16, fp16 = mixed_precision(cfg, device)
    t = cfg.training
    add_loc, projector = cfg.add_loc_tokens, cfg.train_projector  # their phase defaults live with the options
    compile_layers = device.cuda if t.torch_compile is None else t.torch_compile
    in_graph = compile_layers if t.dequantize_in_graph is None else t.dequantize_in_graph
    checkpointing = device.cuda if t.gradient_checkpointing is None else t.gradient_checkpointing
    if not checkpointing:
        layers = 0
    elif t.checkpoint_layers is None:
        layers = DEFAULT_CHECKPOINT_LAYERS[cfg.phase]
    else:
        layers = t.checkpoint_layers
    workers = t.dataloader_num_workers
    if workers is None:
        # Cached features are gathered per batch in the collator, in-process: worker processes would only
        # add inter-process copies, which cost step time (docs/speed.md, "The vision-feature cache"). Pixels
        # need workers, also while the steps fill the cache (features.FeatureSource's modes).
        workers = 0 if t.cache_vision_features and not t.fill_cache_during_epoch else device.cpu_count
    compile_vision = t.compile_vision_cache
    if compile_vision is None:
        compile_vision = device.cuda and t.cache_vision_features and images >= COMPILE_VISION_MIN_IMAGES
    training = t.model_copy(
        update={
            "compile_vision_cache": compile_vision,
            "bf16": bf16,
            "torch_compile": compile_layers,
            "dequantize_in_graph": in_graph,
            "gradient_checkpointing": checkpointing,
            "checkpoint_layers": layers,
            "dataloader_num_workers": workers,
            "eval_steps": t.eval_steps or t.save_steps,
            "projector_learning_rate": t.projector_learning_rate or t.learning_rate,
            # The in-forward head gradient needs a frozen LM head; trainable <loc> rows share the tied head.
            "head_grad_in_forward": t.head_grad_in_forward and not add_loc,
        }
    )
    model = cfg.model.model_copy(update={"add_loc_tokens": add_loc, "train_projector": projector,
                                         "residual_scale": residual_scale_for(cfg.model.compute_dtype, cfg.model.residual_scale)})
    size = cfg.data.image_size or image_size or base_image_size(cfg)
    readers = decode_workers(cfg.data.decode_workers, device.cpu_count)
    data = cfg.data.model_copy(update={"image_size": size, "decode_workers": readers})
    return cfg.model_copy(update={"model": model, "training": training, "data": data})


def unresolved(cfg: RunConfig) -> list[str]:
    """The ``RESOLVED_KEYS`` still null in ``cfg`` (empty for a resolved config)."""
    missing = []
    for key in RESOLVED_KEYS:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) is None:
            missing.append(key)
    return missing


def require_resolved(cfg: RunConfig) -> RunConfig:
    missing = unresolved(cfg)
    if missing:
        raise XrayTrainError(f"config not resolved ({', '.join(missing)} still null): pass it through resolve() first")
    return cfg


def mixed_precision(cfg: RunConfig, device: Device) -> tuple[bool, bool]:
    """(bf16, fp16) autocast flags, or a refusal that says what to set instead.

    bf16 is used where the GPU has it natively. On GPUs without (T4, V100) torch can *emulate* bf16,
    many times slower, so bf16 there is refused rather than silently slow. fp16 autocast works with
    ``model.compute_dtype`` float16 or float32: trainable weights are float32 (model.py) so the
    Trainer's gradient scaler applies; if Gemma 3's activations overflow fp16 the non-finite-loss
    guard stops the run at that step.
    """
    t = cfg.training
    if t.fp16 and not device.cuda:
        raise XrayTrainError("training.fp16: fp16 autocast needs a CUDA GPU; leave it off on CPU")
    if device.cuda and not device.native_bf16:
        fix = (
            "set model.compute_dtype=float16 and training.fp16=true (or model.compute_dtype=float32, "
            "slower and larger)"
        )
        if t.bf16:
            raise XrayTrainError(f"training.bf16: {device.name} has no native bf16; {fix}")
        if cfg.model.compute_dtype == "bfloat16":
            raise XrayTrainError(
                f"model.compute_dtype: bfloat16 is only emulated on {device.name} (many times slower); {fix}"
            )
    if t.bf16 is None:
        bf16 = device.native_bf16 and not t.fp16 and cfg.model.compute_dtype == "bfloat16"
    else:
        bf16 = t.bf16
    return bf16, t.fp16


def base_image_size(cfg: RunConfig) -> int:
    """The side of the square image the base's processor makes (MedGemma: 896)."""
    from transformers import AutoImageProcessor

    from xray_train.inputs import image_processor_size

    try:
        image_processor = AutoImageProcessor.from_pretrained(cfg.model.base, revision=cfg.model.revision)
    except OSError as exc:
        raise XrayTrainError(
            f"model.base: cannot load the image processor of {cfg.model.base}: {str(exc).splitlines()[0]}"
        ) from None
    return image_processor_size(image_processor)
