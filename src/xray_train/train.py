"""The training recipe, one path for both phases: config -> data -> settings -> output dir -> model -> train
-> save. (Over 400 lines: the recipe and each step it takes are meant to be read on one page.)

``run(cfg)`` comes first and reads top to bottom, with ``cache_features`` (the cache build alone, as
``run`` does it) beside it; the steps they call follow in the order they are called, then the final save.
The trainer ``run`` configures (``XrayTrainer``, its callbacks, the non-finite-loss guard) is
``xray_train.trainer``.
Phase 2 differs from Phase 1 only by configuration (loc tokens, trainable projector, box targets) and by
continuing the Phase-1 adapter.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xray_train.collate import Collator, PromptEncoder
from xray_train.config import RunConfig
from xray_train.data.check import read_for_training
from xray_train.data.records import ReadResult
from xray_train.data.registry import read_dataset
from xray_train.data.splits import cap_examples, split_examples
from xray_train.distributed import use_cpu
from xray_train.distributed import state as distributed_state
from xray_train.errors import XrayTrainError
from xray_train.inputs import EncodedExample, PixelLoader, TrainingDataset, encode_examples
from xray_train.resolve import require_resolved, resolve
from xray_train.outputs import atomic_write_json, disk_full_as_error, staging_dir
from xray_train.run_dir import DONE_MARKER, LOSS_CURVE, SUMMARY, RunDir, checkpoint_step, tidy_saved_adapter

logger = logging.getLogger("xray_train")


# ---------------------------------------------------------------------------------------------
# The recipe


def run(
    cfg: RunConfig, resume_from: Path | None = None, overwrite: bool = False, echo=print, callbacks=None
) -> Path:
    """Train one phase end to end and write the adapter, processor, config and summary to output_dir.

    ``callbacks``: extra ``TrainerCallback`` objects (tests and benchmarks observe a real run with them).
    """
    # Everything that can be refused is refused before the (slow) model load: the output dir, --resume,
    # the data (read now, before any weight), every "auto" setting (decided here, once).
    refuse_finished(cfg, overwrite)
    parent = None
    if cfg.phase == "phase2" and resume_from is None:
        echo("Phase 2 without --resume: training a fresh adapter (no Phase-1 report knowledge).")
    if resume_from is not None:
        parent = check_resume_dir(resume_from, cfg)
    read = read_for_training(cfg.data)
    cfg = resolve(cfg, images=len(cached_images(cfg, read)))
    # One writer per output_dir, from before it is created, overwritten or resumed until the run ends.
    lock = RunDir(cfg.output_dir).lock().acquire() if distributed_state().is_main_process else None
    try:
        return _train(cfg, read, parent, resume_from, overwrite, echo, callbacks)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, read: ReadResult, parent, resume_from, overwrite: bool, echo, callbacks) -> Path:
    checkpoint = prepare_output_dir(cfg, overwrite, parent)

    # Imported here, after every refusal above: transformers' Trainer takes seconds to import. Looked up
    # at call time, so tests and benchmarks can replace the model builder or the trainer class.
    from transformers import set_seed

    from xray_train import trainer as trainer_module
    from xray_train.features import CacheFill
    from xray_train.gemma3 import gemma3_core
    from xray_train.loss import LocTargets
    from xray_train.model import build_training_model, loc_token_ids

    set_seed(cfg.training.seed)
    model, processor = build_training_model(cfg, resume_from=resume_from)
    encoder = PromptEncoder(processor, cfg.system_prompt)
    data = prepare_data(cfg, encoder, read)
    train_set, val_set = build_datasets(cfg, model, processor, data)
    if cfg.training.pad_last_batch:
        train_set.pad_to_multiple(cfg.training.per_device_train_batch_size * distributed_state().num_processes)
    echo(f"{cfg.phase}: {len(train_set.items)} training / {len(val_set) if val_set else 0} validation examples")

    # With DataLoader workers (reading images while the steps fill the cache, or asked for), cached rows are
    # gathered in this process: features sent from workers cost more step time than they save. A run with
    # every feature already cached reads no image, so it has no workers (trainer.WorkersOnlyWhileReadingCallback)
    # and its collator gathers the rows, as a run that built its cache first does.
    rows_here = (train_set.feature_cache is not None and cfg.training.dataloader_num_workers > 0
                 and train_set.reads_images())
    trainer = trainer_module.XrayTrainer(
        model=model,
        args=training_arguments(cfg, has_eval=val_set is not None and len(val_set) > 0),
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=Collator(encoder.ids, gather_features=not rows_here),
        lengths=train_set.lengths(),
        targets_only=cfg.training.loss_on_targets_only,
        head_chunk_rows=cfg.training.head_chunk_rows,
        head_grad_in_forward=cfg.training.head_grad_in_forward,
        loc_targets=LocTargets.from_ids(
            loc_token_ids(processor.tokenizer) if cfg.add_loc_tokens else None,
            cfg.training.loc_label_sigma, cfg.training.loc_l1_weight,
        ),
        lora_start_step=cfg.training.lora_start_step,
        feature_fill=train_set.feature_cache if isinstance(train_set.feature_cache, CacheFill) else None,
        feature_rows_from=train_set.feature_cache if rows_here else None,
        pixel_loader=train_set.pixel_loader,
        optimizers=(optimizer_groups(cfg, model), None),
        callbacks=callbacks,
    )
    resumed_step = 0
    if checkpoint is not None:
        resumed_step = checkpoint_step(checkpoint)
        echo(f"Resuming from {checkpoint.name}")
    started = time.time()
    compiles_before = compile_count()
    with disk_full_as_error(cfg.output_dir, advice="free space and rerun the same command to resume"):
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        elapsed = time.time() - started
        metrics = dict(result.metrics)
        if val_set is not None and len(val_set):
            metrics.update(trainer.evaluate())
        if isinstance(train_set.feature_cache, CacheFill):
            train_set.feature_cache.finish(gemma3_core(model), train_set.pixel_loader,
                                           cfg.training.feature_cache_batch_size, cfg.data.decode_workers)
    metrics["torch_compiles"] = compile_count() - compiles_before
    logger.info("torch.compile compiled %d graphs in this run (training and evaluation)", metrics["torch_compiles"])
    if trainer.is_world_process_zero():
        advice = "training finished and its checkpoints are kept: free space and rerun the same command"
        with disk_full_as_error(cfg.output_dir, advice=advice):
            save_outputs(cfg, trainer, processor, data, metrics, elapsed, train_set, resumed_step)
    return cfg.output_dir


def cache_features(cfg: RunConfig, echo=print):
    """``xray-train cache-features``: build (or continue) the vision-feature cache a training run of ``cfg``
    will use. The data is read, the settings resolved and the model loaded exactly as ``run`` does (the
    cache key covers the vision weights and dtype); the cache covers the training and validation images."""
    from transformers import set_seed

    from xray_train.features import feature_cache_root, open_feature_cache
    from xray_train.gemma3 import gemma3_core
    from xray_train.model import build_training_model

    read = read_for_training(cfg.data)
    cfg = resolve(cfg, images=len(cached_images(cfg, read)))
    set_seed(cfg.training.seed)
    model, processor = build_training_model(cfg)
    data = prepare_data(cfg, PromptEncoder(processor, cfg.system_prompt), read)
    paths = [it.example.image_path for it in data.train + data.validation]
    echo(f"{cfg.phase}: caching vision features of {len(set(paths))} images in {feature_cache_root()}")
    cache = open_feature_cache(cfg, gemma3_core(model), PixelLoader(processor, cfg.data.image_size), paths)
    echo(f"{len(cache.index)} images cached, {len(cache.failed)} unreadable: {cache.folder}")
    return cache


# ---------------------------------------------------------------------------------------------
# Output directory: refuse, create or resume


def check_resume_dir(resume_from: Path, cfg: RunConfig) -> RunDir:
    """``--resume`` must name a *finished* Phase-1 run: its done marker is written after every final
    file, so a Phase-1 run killed while saving is refused instead of half-continued."""
    from xray_train.model import check_phase1_dir

    parent = RunDir(resume_from)
    if not parent.exists():
        raise XrayTrainError(f"--resume: directory not found: {resume_from}")
    if not parent.is_finished():
        raise XrayTrainError(
            f"--resume: {resume_from} holds no finished Phase-1 run (no {DONE_MARKER}); "
            "rerun its phase1 command to finish it, or point --resume at a finished Phase-1 output dir"
        )
    phase = parent.finished_phase()
    if phase != "phase1":
        raise XrayTrainError(f"--resume: {resume_from} holds a {phase or 'unknown'} run, expected a phase1 output dir")
    if cfg.output_dir.resolve() == parent.path.resolve():
        raise XrayTrainError(f"output_dir: {cfg.output_dir} is the --resume dir; Phase 2 needs its own output_dir")
    check_phase1_dir(parent.path, cfg)
    return parent


def refuse_finished(cfg: RunConfig, overwrite: bool) -> None:
    if not overwrite and RunDir(cfg.output_dir).is_finished():
        raise XrayTrainError(
            f"{cfg.output_dir} holds a finished {cfg.phase} run; pass --overwrite to replace it or choose another "
            "output_dir"
        )


def prepare_output_dir(cfg: RunConfig, overwrite: bool, parent: RunDir | None = None) -> Path | None:
    """Create ``output_dir`` with the resolved config and the lineage (``parent``: the Phase-1 run this
    one continues), or decide to resume; returns the checkpoint to resume from, if any. With several
    ranks only the main process deletes, creates, renames or writes; the others wait for it, then find
    the same checkpoint (every rank must resume from the same step)."""
    refuse_finished(cfg, overwrite)
    out = RunDir(cfg.output_dir)
    if not overwrite:
        out.check_rerun(cfg)
    state = distributed_state()
    with state.main_process_first():
        if state.is_main_process:
            if overwrite and out.exists():
                out.clear()
            with disk_full_as_error(out.path):
                out.path.mkdir(parents=True, exist_ok=True)
                out.write_config(require_resolved(cfg))
                out.write_lineage(cfg.phase, parent)
        checkpoint = out.resumable_checkpoint()
    return checkpoint


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class PreparedData:
    train: list[EncodedExample]
    validation: list[EncodedExample]
    counts: dict = field(default_factory=dict)


def select_examples(cfg: RunConfig, read: ReadResult) -> tuple[dict, list, list]:
    """The patient split of ``read`` and the training and validation examples a run uses (capped)."""
    splits = split_examples(read.examples, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    train_examples = cap_examples(splits["train"], cfg.data.max_examples, cfg.training.seed)
    val_examples = cap_examples(splits["validation"], cfg.training.max_eval_samples, cfg.training.seed)
    return splits, train_examples, val_examples


def cached_images(cfg: RunConfig, read: ReadResult) -> set[Path]:
    """The images whose vision features a run of ``cfg`` caches (none without the cache)."""
    if not cfg.training.cache_vision_features:
        return set()
    _, train_examples, val_examples = select_examples(cfg, read)
    return {ex.image_path for ex in train_examples + val_examples}


def prepare_data(cfg: RunConfig, encoder: PromptEncoder, read: ReadResult | None = None) -> PreparedData:
    """Split and encode the examples of ``read`` (by default, the dataset read now)."""
    read = read if read is not None else read_dataset(cfg.data)
    splits, train_examples, val_examples = select_examples(cfg, read)
    fmt = cfg.data.box_format
    train, train_skipped = encode_examples(train_examples, cfg.phase, encoder, cfg.training.max_length, fmt)
    validation, _ = encode_examples(val_examples, cfg.phase, encoder, cfg.training.max_length, fmt)
    if not train:
        reasons = ", ".join(f"{k}={v}" for k, v in (read.skipped + train_skipped).items()) or "none"
        raise XrayTrainError(
            f"no training examples left after filtering {read.rows_total} rows of {cfg.data.dataset} "
            f"(skipped: {reasons}); run `xray-train data check` to see why"
        )
    counts = {
        "rows_total": read.rows_total,
        "examples": len(read.examples),
        "skipped": dict(read.skipped),
        "splits": {k: len(v) for k, v in splits.items()},
        "train_examples_used": len(train),
        "train_skipped": dict(train_skipped),
        "validation_examples_used": len(validation),
    }
    return PreparedData(train, validation, counts)


def build_datasets(cfg: RunConfig, model, processor, data: PreparedData):
    from xray_train.features import open_feature_cache
    from xray_train.gemma3 import gemma3_core

    pixel_loader = PixelLoader(processor, cfg.data.image_size)
    cache = None
    if cfg.training.cache_vision_features:
        paths = [it.example.image_path for it in data.train + data.validation]
        state = distributed_state()
        # Rank 0 computes the cache; the other ranks then find it complete and memory-map it.
        with state.main_process_first():
            cache = open_feature_cache(cfg, gemma3_core(model), pixel_loader, paths, state.is_main_process,
                                       fill=cfg.training.fill_cache_during_epoch and state.num_processes == 1)
        if cache.failed:
            data.counts["unreadable_images"] = len(cache.failed)
    train = TrainingDataset(data.train, pixel_loader, cache)
    validation = TrainingDataset(data.validation, pixel_loader, cache) if data.validation else None
    return train, validation


# ---------------------------------------------------------------------------------------------
# Training arguments and optimizer


def training_arguments(cfg: RunConfig, has_eval: bool):
    from transformers import TrainingArguments

    t = require_resolved(cfg).training
    eval_strategy = t.eval_strategy if has_eval else "no"
    report_to = [r for r in t.report_to if r != "none"] or "none"
    # TensorBoard reads its folder from the environment in transformers 5; keep logs beside the run.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(cfg.output_dir / "logs")
    return TrainingArguments(
        output_dir=str(cfg.output_dir),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        # Its per-step NaN check reads the loss on the host (a GPU sync); NonFiniteLossGuard stops instead.
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps if eval_strategy == "steps" else None,
        bf16=t.bf16,
        fp16=t.fp16,
        dataloader_num_workers=t.dataloader_num_workers,
        # Read ahead so decoding full-size films in the workers overlaps with the GPU's steps.
        dataloader_prefetch_factor=4 if t.dataloader_num_workers else None,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Pinned batches copied without blocking: a blocking copy would make the host wait, every step,
        # for the GPU to finish the previous step before it could queue the next.
        accelerator_config={"non_blocking": torch.cuda.is_available()},
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        report_to=report_to,
        remove_unused_columns=False,
        # Gradient checkpointing is applied in model.py to decoder layers only: the Trainer's own switch
        # stays at its default (off). Not passed, since transformers renamed it and warns on the old name.
        ddp_find_unused_parameters=False,
        # DDP would otherwise re-broadcast every buffer before each forward; ours never change (rotary
        # tables, the 4-bit quantisation state of dequantize_in_graph: ~50 MB at MedGemma-4B scale).
        ddp_broadcast_buffers=False,
        # Without CUDA, ranks (tests, CI) must still form a gloo group rather than train independently.
        use_cpu=use_cpu(),
        disable_tqdm=False,
    )


def optimizer_groups(cfg: RunConfig, model):
    """LoRA at learning_rate; projector and loc-token rows at projector_learning_rate when it differs
    (otherwise the Trainer builds ``training.optim`` over every trainable weight)."""
    lr_other = cfg.training.projector_learning_rate
    if lr_other == cfg.training.learning_rate:
        return None
    lora, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (lora if "lora_" in name else other).append(p)
    groups = [{"params": lora, "lr": cfg.training.learning_rate}]
    if other:
        groups.append({"params": other, "lr": lr_other})
    return torch.optim.AdamW(groups, weight_decay=cfg.training.weight_decay)


# ---------------------------------------------------------------------------------------------
# Final outputs


def save_outputs(
    cfg, trainer, processor, data: PreparedData, metrics: dict, elapsed: float, train_set, resumed_step: int = 0
) -> None:
    """Adapter + processor + summary + loss curve, each moved into place whole; DONE_MARKER last, so
    a kill (or a full disk) anywhere before it leaves a dir that resumes instead of looking finished."""
    from xray_train.report_plots import plot_loss_curve

    run_dir = RunDir(cfg.output_dir)
    out = run_dir.path
    staging = staging_dir(out, ".final-")
    try:
        trainer.model.save_pretrained(staging, save_embedding_layers=False)
        processor.save_pretrained(staging)
        tidy_saved_adapter(staging)
        run_dir.move_in(staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    state = trainer.state
    steps = state.global_step
    samples = (steps - resumed_step) * cfg.training.per_device_train_batch_size
    samples *= cfg.training.gradient_accumulation_steps * trainer.accelerator.num_processes
    metrics = dict(metrics)
    if resumed_step and "train_loss" in metrics:
        metrics["train_loss"] = _train_loss(state.log_history)
    summary = {
        "phase": cfg.phase,
        "base_model": cfg.model.base,
        "parent": run_dir.parent(),
        "global_steps": steps,
        "resumed_from_step": resumed_step or None,
        "train_runtime_s": round(elapsed, 2),
        "train_samples_per_s": round(samples / elapsed, 4) if elapsed > 0 else None,
        "num_processes": trainer.accelerator.num_processes,
        "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "metrics": {
            k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items() if v is not None
        },
        "data": data.counts | {"unreadable_during_training": train_set.unreadable},
    }
    atomic_write_json(out / SUMMARY, summary)
    try:
        plot_loss_curve(state.log_history, out / LOSS_CURVE)
    except Exception as exc:  # a plot must never cost a finished run
        logger.warning("loss curve not written: %s", exc)
    run_dir.mark_finished(cfg.phase, steps)


def compile_count() -> int:
    """Graphs torch.compile has made in this process (each compile or recompile of a frame counts once)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def _train_loss(log_history: list[dict]) -> float | None:
    """Mean logged training loss of the whole run. After a resume the Trainer's own ``train_loss``
    divides the resumed part's loss sum by all steps, so it is recomputed from the log."""
    losses = [h["loss"] for h in log_history if "loss" in h and isinstance(h["loss"], (int, float))]
    return sum(losses) / len(losses) if losses else None

