"""GPU memory of a training step, and the micro-batch, accumulation and checkpointing depth that fit a card.

A step's peak is modelled per phase as

    peak = fixed + batch * (per_sample + kept_layers * per_sample_per_layer)

where ``kept_layers`` are the decoder layers that keep their activations for backward (the others are
checkpointed and keep only their input). ``fixed`` holds the 4-bit weights, the embeddings, the frozen
vision tower, the LoRA optimizer state and the LM-head chunk; the two per-sample terms grow with the
batch. The constants (``MEMORY_MODEL``) are fit to peaks measured on MedGemma-4B's architecture
(``benchmarks/results/memory_model.json`` holds the points, the fit and its checks;
``benchmarks/bench_small_gpu.py --memory-model`` measures more). They describe MedGemma-4B's samples of that benchmark (an
896-px image's 256 tokens plus about 170 text tokens); a smaller base needs less.

``plan`` turns a memory budget into the settings: the largest micro-batch that divides the rank's share
of the effective batch and fits with some checkpointing depth, then the fewest checkpointed layers that
let it fit (a larger micro-batch buys more speed than keeping activations does: a QLoRA step is bound by
host overhead per step, see benchmarks/results/train_speed.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from xray_train.errors import XrayTrainError

#: MedGemma-4B's decoder layers: the unit of ``training.checkpoint_layers``.
DECODER_LAYERS = 34

#: GB (1e9 bytes) at a step's peak, per phase: the least-squares fit and the measured peaks it is fit to
#: are in benchmarks/results/memory_model.json, beside the peaks of the runs that check it.
MEMORY_MODEL = {
    "phase1": {"fixed": 6.93, "per_sample": 0.0916, "per_sample_per_layer": 0.0339},
    "phase2": {"fixed": 8.6, "per_sample": 0.0916, "per_sample_per_layer": 0.0384},
}

#: Kept free under the budget: the model's error on the measured peaks, the CUDA context's growth after
#: start-up, and allocator fragmentation (benchmarks/results/memory_model.json).
HEADROOM_GB = 1.0


@dataclass(frozen=True)
class Plan:
    batch: int
    accumulation: int
    checkpointed: int  # decoder layers checkpointed, 0..DECODER_LAYERS
    peak_gb: float | None  # the model's estimate (None where memory is not modelled, e.g. CPU)


def peak_gb(phase: str, batch: int, checkpointed: int) -> float:
    """The modelled peak of one training step in GB."""
    m = MEMORY_MODEL[phase]
    kept = DECODER_LAYERS - min(max(checkpointed, 0), DECODER_LAYERS)
    return m["fixed"] + batch * (m["per_sample"] + kept * m["per_sample_per_layer"])


def fewest_checkpointed(phase: str, batch: int, budget_gb: float, choices: list[int]) -> int | None:
    """The smallest depth of ``choices`` at which ``batch`` fits ``budget_gb``, or None."""
    for depth in sorted(choices):
        if peak_gb(phase, batch, depth) <= budget_gb:
            return depth
    return None


def largest_batch(phase: str, budget_gb: float, checkpointed: int) -> int:
    """The largest micro-batch that fits ``budget_gb`` at ``checkpointed`` layers (0 if none does)."""
    m = MEMORY_MODEL[phase]
    kept = DECODER_LAYERS - min(max(checkpointed, 0), DECODER_LAYERS)
    return max(0, int((budget_gb - m["fixed"]) // (m["per_sample"] + kept * m["per_sample_per_layer"])))


def split_share(share: int, batch: int) -> int:
    """Micro-batches of ``batch`` per optimizer step that make up a rank's ``share`` (rounded up)."""
    return max(1, -(-share // batch))


def plan(
    phase: str,
    memory_gb: float,
    share: int,
    batch: int | None = None,
    accumulation: int | None = None,
    depths: list[int] | None = None,
    where: str = "this GPU",
) -> Plan:
    """The micro-batch, accumulation and checkpointing depth for a rank with ``memory_gb`` GB free.

    ``share``: the rank's part of the effective batch (examples per optimizer step). ``batch`` and
    ``accumulation`` are the user's explicit settings (None: chosen here; an explicit batch without an
    accumulation steps once per micro-batch, as it always has); ``depths`` the checkpointing depths allowed
    (default: any, 0 to every layer). An explicit batch that cannot fit is refused with the largest that can.
    """
    budget = memory_gb - HEADROOM_GB
    depths = list(range(DECODER_LAYERS + 1)) if depths is None else depths
    if batch is not None:
        depth = fewest_checkpointed(phase, batch, budget, depths)
        if depth is None:
            deepest = max(depths)
            fits = largest_batch(phase, budget, deepest)
            layers = f"{deepest} of {DECODER_LAYERS} layers checkpointed"
            advice = f"the largest that fits is {fits}" if fits else "no batch fits"
            raise XrayTrainError(
                f"training.per_device_train_batch_size: {batch} does not fit {where}'s {memory_gb:.1f} GB in {phase} "
                f"(about {peak_gb(phase, batch, deepest):.1f} GB with {layers}); {advice} (leave it unset to "
                "choose the batch and accumulation from the memory)"
            )
        return Plan(batch, accumulation or 1, depth, round(peak_gb(phase, batch, depth), 2))
    per_step = max(1, share // accumulation) if accumulation else share
    for candidate in [b for b in range(per_step, 0, -1) if per_step % b == 0]:
        depth = fewest_checkpointed(phase, candidate, budget, depths)
        if depth is not None:
            acc = accumulation or split_share(share, candidate)
            return Plan(candidate, acc, depth, round(peak_gb(phase, candidate, depth), 2))
    raise XrayTrainError(
        f"{where}: {memory_gb:.1f} GB cannot hold a {phase} step of one example even with "
        f"{max(depths)} of {DECODER_LAYERS} decoder layers checkpointed (about {peak_gb(phase, 1, max(depths)):.1f} "
        "GB); use a GPU with more memory"
    )
