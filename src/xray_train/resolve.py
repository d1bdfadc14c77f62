"""Every "auto" setting of a run config turned into a concrete value, once, at start-up.

A config may leave a setting null (or, for ``head_grad_in_forward``, ask for something the phase cannot
do); ``resolve`` decides it from the phase, the device and the base's processor and returns a config in
which each of ``RESOLVED_KEYS`` holds the value the run uses. That config is what a run directory saves,
so a finished run records whether it compiled, checkpointed or used bf16. Nothing else decides these
values: the model builder, the trainer, the loss and the model card read them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

from xray_train.config import ModelConfig, RunConfig
from xray_train.data.loader import available_cpus, decode_workers
from xray_train.errors import XrayTrainError
from xray_train.gemma3 import residual_scale_for
from xray_train.memory import DECODER_LAYERS, plan, split_share

logger = logging.getLogger("xray_train")

#: Fewer images than this are cached with transformers' eager SigLIP: compiling it takes longer than it saves
#: (H200, MedGemma-4B, batch 32: 61.5 films/s eager, 70.7 compiled, 16 s to compile; even at ~7500 films).
COMPILE_VISION_MIN_IMAGES = 8000

#: torch.compile's Triton kernels need this compute capability (a P100 has 6.0).
TRITON_MIN_CAPABILITY = (7, 0)

#: Environment switches read at start-up (docs/small_gpus.md): run a big GPU as a small one would run.
#: "1": behave as on a GPU without native bf16 (T4, V100): fp16 autocast, float16 compute.
EMULATE_NO_BF16_ENV = "XRAY_TRAIN_EMULATE_NO_BF16"
#: A number of GB (1e9 bytes): this process may use at most that much of the GPU
#: (``torch.cuda.set_per_process_memory_fraction``), and the memory choice plans for it.
MEMORY_CAP_ENV = "XRAY_TRAIN_MEMORY_CAP_GB"

#: The settings ``resolve`` decides (dotted keys); none of them is null in a resolved config.
RESOLVED_KEYS = (
    "model.add_loc_tokens",
    "model.train_projector",
    "model.compute_dtype",
    "model.residual_scale",
    "data.image_size",
    "data.decode_workers",
    "training.bf16",
    "training.fp16",
    "training.per_device_train_batch_size",
    "training.gradient_accumulation_steps",
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
    """What the settings depend on: is there a CUDA GPU, does it have native bf16, its compute capability and
    memory, how many CPUs, and how many processes (GPUs) train together.

    ``memory_gb``: the GB this process may use on its GPU (free memory at start-up, or the memory cap if
    lower); None where unknown (CPU), and then no memory choice is made.
    """

    cuda: bool
    native_bf16: bool
    name: str
    cpu_count: int
    compute_capability: tuple[int, int] | None = None
    total_memory_gb: float | None = None
    memory_gb: float | None = None
    processes: int = 1

    @classmethod
    def detect(cls) -> "Device":
        """This process's device. Applies ``XRAY_TRAIN_MEMORY_CAP_GB`` to the GPU and honours
        ``XRAY_TRAIN_EMULATE_NO_BF16`` (see their constants)."""
        import torch

        processes = _int_env("WORLD_SIZE", 1)
        cuda = torch.cuda.is_available()
        if not cuda:
            return cls(cuda=False, native_bf16=False, name="CPU", cpu_count=available_cpus(), processes=processes)
        emulate = emulating_no_bf16()
        native = torch.cuda.is_bf16_supported(including_emulation=False) and not emulate
        try:
            name = torch.cuda.get_device_name()
        except Exception:  # noqa: BLE001 - only used to word a message
            name = "this GPU"
        if emulate:
            name += f" ({EMULATE_NO_BF16_ENV}: as without bf16)"
        capability = total = free = None
        try:
            index = _int_env("LOCAL_RANK", torch.cuda.current_device())
            capability = tuple(torch.cuda.get_device_capability(index))
            free_bytes, total_bytes = torch.cuda.mem_get_info(index)
            total, free = total_bytes / 1e9, free_bytes / 1e9
        except Exception:  # noqa: BLE001 - a GPU that cannot say: no memory choice, no capability rule
            pass
        cap = memory_cap_gb()
        if cap is not None and total is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), index)
            free = min(free, cap)
        return cls(cuda=True, native_bf16=native, name=name, cpu_count=available_cpus(),
                   compute_capability=capability, total_memory_gb=total, memory_gb=free, processes=processes)


def emulating_no_bf16() -> bool:
    return os.environ.get(EMULATE_NO_BF16_ENV, "").strip().lower() in ("1", "true", "yes")


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else default


def memory_cap_gb() -> float | None:
    """``XRAY_TRAIN_MEMORY_CAP_GB`` as a number, or None when unset."""
    raw = os.environ.get(MEMORY_CAP_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise XrayTrainError(f"{MEMORY_CAP_ENV}: expected a number of GB > 0, got {raw!r}")
    return value


def agreed_by_ranks(device: Device) -> Device:
    """With several ranks, every rank plans for the smallest memory among them: ranks that chose different
    micro-batches or accumulations would run different numbers of steps and wait on each other forever."""
    if device.processes <= 1 or device.memory_gb is None or "WORLD_SIZE" not in os.environ:
        return device
    import torch
    import torch.distributed as dist

    from xray_train.distributed import state

    here = state()  # forms the process group (gloo on CPU ranks, NCCL on GPUs)
    smallest = torch.tensor([device.memory_gb], dtype=torch.float64, device=here.device)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    return replace(device, memory_gb=float(smallest.item()))


def resolve(
    cfg: RunConfig, device: Device | None = None, image_size: int | None = None, images: int = 0
) -> RunConfig:
    """A copy of ``cfg`` with every ``RESOLVED_KEYS`` setting concrete, or a one-line refusal.

    ``image_size``: the base processor's image side, if the caller has it; otherwise it is read from the
    base's image-processor config (a small file, no weights). ``images``: how many images the run caches
    vision features of (``train.run_inputs``), which decides a null ``training.compile_vision_cache``
    on CUDA (callers that build no cache leave it at 0: eager). Resolving a resolved config changes nothing.
    """
    device = agreed_by_ranks(device or Device.detect())
    compute, bf16, fp16 = precision(cfg, device)
    t = cfg.training
    add_loc, projector = cfg.add_loc_tokens, cfg.train_projector  # their phase defaults live with the options
    can_compile = device.cuda and triton_capable(device, t)
    compile_layers = can_compile if t.torch_compile is None else t.torch_compile
    in_graph = compile_layers if t.dequantize_in_graph is None else t.dequantize_in_graph
    batch, accumulation, checkpointing, layers = memory_settings(cfg, device)
    workers = t.dataloader_num_workers
    if workers is None:
        # Cached features are gathered per batch in the collator, in-process: worker processes would only
        # add inter-process copies, which cost step time (docs/speed.md, "The vision-feature cache"). Pixels
        # need workers, also while the steps fill the cache (features.FeatureSource's modes).
        workers = 0 if t.cache_vision_features and not t.fill_cache_during_epoch else device.cpu_count
    compile_vision = t.compile_vision_cache
    if compile_vision is None:
        compile_vision = can_compile and t.cache_vision_features and images >= COMPILE_VISION_MIN_IMAGES
    training = t.model_copy(
        update={
            "compile_vision_cache": compile_vision,
            "bf16": bf16,
            "fp16": fp16,
            "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": accumulation,
            "effective_batch_size": batch * accumulation * device.processes,
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
    model = cfg.model.model_copy(update={
        "add_loc_tokens": add_loc, "train_projector": projector, "compute_dtype": compute,
        # Gemma 3's fp16-safe residual scale follows the compute dtype this run resolved to.
        "residual_scale": residual_scale_for(compute, cfg.model.residual_scale),
    })
    size = cfg.data.image_size or image_size or base_image_size(cfg)
    readers = decode_workers(cfg.data.decode_workers, device.cpu_count)
    data = cfg.data.model_copy(update={"image_size": size, "decode_workers": readers})
    return cfg.model_copy(update={"model": model, "training": training, "data": data})


def triton_capable(device: Device, t) -> bool:
    """False (with a one-line note) on GPUs below compute capability 7.0, where torch.compile cannot run;
    an explicit request to compile there is refused."""
    capability = device.compute_capability
    if capability is None or tuple(capability) >= TRITON_MIN_CAPABILITY:
        return True
    have = f"{capability[0]}.{capability[1]}"
    for key in ("torch_compile", "dequantize_in_graph", "compile_vision_cache"):
        if getattr(t, key) is True:
            raise XrayTrainError(
                f"training.{key}: {device.name} has compute capability {have}; torch.compile's Triton kernels "
                "need 7.0 (leave it unset)"
            )
    if t.torch_compile is None:
        logger.warning("%s has compute capability %s: torch.compile is off (Triton needs 7.0); the steps run "
                       "uncompiled, slower", device.name, have)
    return False


def memory_settings(cfg: RunConfig, device: Device) -> tuple[int, int, bool, int | str]:
    """(micro-batch, accumulation, gradient checkpointing, checkpoint_layers) that fit the device.

    On a GPU whose free memory is known, ``xray_train.memory.plan`` decides what the config leaves unset;
    elsewhere (CPU) the rank's whole share of the effective batch is one micro-batch and nothing is
    checkpointed unless asked for (a GPU that cannot say how much memory it has checkpoints every layer).
    """
    t = cfg.training
    processes = max(1, device.processes)
    share = max(1, t.effective_batch_size // processes)
    explicit_depth = None
    if t.gradient_checkpointing is not False and t.checkpoint_layers is not None:
        explicit_depth = DECODER_LAYERS if t.checkpoint_layers == "all" else t.checkpoint_layers
    if device.cuda and device.memory_gb is not None:
        if t.gradient_checkpointing is False:
            depths = [0]
        elif explicit_depth is not None:
            depths = [explicit_depth]
        else:
            depths = list(range(1 if t.gradient_checkpointing else 0, DECODER_LAYERS + 1))
        chosen = plan(cfg.phase, device.memory_gb, share, t.per_device_train_batch_size,
                      t.gradient_accumulation_steps, depths, where=device.name)
        batch, accumulation, depth = chosen.batch, chosen.accumulation, chosen.checkpointed
        if t.per_device_train_batch_size is None or explicit_depth is None:
            logger.info("%s, %.1f GB: micro-batch %d x %d accumulation x %d GPU(s), %d of %d decoder layers "
                        "checkpointed (about %.1f GB at the peak)", device.name, device.memory_gb, batch,
                        accumulation, processes, depth, DECODER_LAYERS, chosen.peak_gb)
    else:
        per_step = max(1, share // t.gradient_accumulation_steps) if t.gradient_accumulation_steps else share
        batch = t.per_device_train_batch_size or per_step
        accumulation = t.gradient_accumulation_steps or (
            1 if t.per_device_train_batch_size else split_share(share, batch)
        )
        depth = explicit_depth if explicit_depth is not None else (DECODER_LAYERS if device.cuda else 0)
        if t.gradient_checkpointing is False:
            depth = 0
    checkpointing = depth > 0 if t.gradient_checkpointing is None else t.gradient_checkpointing
    if not checkpointing:
        layers: int | str = 0
    elif t.checkpoint_layers is not None:
        layers = t.checkpoint_layers
    else:
        layers = "all" if depth >= DECODER_LAYERS else depth
    if t.per_device_train_batch_size is None and batch * accumulation * processes != t.effective_batch_size:
        logger.warning("training: %d examples per optimizer step (%d x %d accumulation x %d GPU(s)), not "
                       "effective_batch_size %d", batch * accumulation * processes, batch, accumulation,
                       processes, t.effective_batch_size)
    return batch, accumulation, checkpointing, layers


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


def precision(cfg: RunConfig, device: Device) -> tuple[str, bool, bool]:
    """(model.compute_dtype, bf16 autocast, fp16 autocast), or a refusal that says what to set instead.

    bf16 is used where the GPU has it natively. On GPUs without (T4, V100, P100) torch can *emulate* bf16,
    many times slower, so there the defaults are float16 compute with fp16 autocast, and an explicit bf16 is
    refused rather than silently slow. Trainable weights are float32 (model.py) so the Trainer's gradient
    scaler applies; if activations overflow fp16 the non-finite-loss guard stops the run at that step.
    """
    t, model = cfg.training, cfg.model
    if t.fp16 and not device.cuda:
        raise XrayTrainError("training.fp16: fp16 autocast needs a CUDA GPU; leave it off on CPU")
    if device.cuda and not device.native_bf16:
        fix = (
            "set model.compute_dtype=float16 and training.fp16=true (or model.compute_dtype=float32, "
            "slower and larger)"
        )
        if t.bf16:
            raise XrayTrainError(f"training.bf16: {device.name} has no native bf16; {fix}")
        if model.compute_dtype == "bfloat16":
            raise XrayTrainError(
                f"model.compute_dtype: bfloat16 is only emulated on {device.name} (many times slower); {fix}"
            )
    compute = model.compute_dtype
    if compute is None:
        half_only = device.cuda and not device.native_bf16
        compute = "float16" if half_only or (t.fp16 and not t.bf16) else "bfloat16"
    fp16 = t.fp16 if t.fp16 is not None else (device.cuda and compute == "float16" and not t.bf16)
    bf16 = t.bf16 if t.bf16 is not None else (device.native_bf16 and not fp16 and compute == "bfloat16")
    return compute, bf16, fp16


def mixed_precision(cfg: RunConfig, device: Device) -> tuple[bool, bool]:
    """(bf16, fp16) autocast flags of ``precision``."""
    return precision(cfg, device)[1:]


def compute_dtype(model_cfg: ModelConfig) -> str:
    """``model.compute_dtype`` for loading a base outside training (an adapter's run config may predate the
    setting's default): what ``precision`` picks on this machine."""
    if model_cfg.compute_dtype is not None:
        return model_cfg.compute_dtype
    import torch

    native = not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False)
    return "bfloat16" if native and not emulating_no_bf16() else "float16"


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
