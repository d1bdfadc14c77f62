"""The training recipe, one path for both phases: config -> data -> model -> train -> save.

``run(cfg)`` reads top to bottom; the builders beneath it are small. Phase 2 differs from Phase 1 only
by configuration (loc tokens, trainable projector, box targets) and by continuing the Phase-1 adapter.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xray_train.collate import Collator, PromptEncoder
from xray_train.config import RunConfig, dump_config
from xray_train.data.check import read_for_training
from xray_train.data.records import Example, ReadResult
from xray_train.data.registry import read_dataset
from xray_train.data.splits import split_examples
from xray_train.distributed import call_through_ddp, use_cpu
from xray_train.distributed import state as distributed_state
from xray_train.errors import XrayTrainError
from xray_train.inputs import EncodedExample, PixelLoader, TrainingDataset, encode_examples
from xray_train.loss import full_logits_loss, targets_only_loss
from xray_train.run_guard import LOCK, OutputDirLock, adapter_setting_changes
from xray_train.outputs import (
    ADAPTER_WEIGHTS,
    DONE_MARKER,
    LOSS_CURVE,
    RESOLVED_CONFIG,
    SUMMARY,
    atomic_write_json,
    atomic_write_text,
    disk_full_as_error,
    staging_dir,
    tidy_saved_adapter,
)

logger = logging.getLogger("xray_train")

CHECKPOINT_COMPLETE = "xray_train_checkpoint_complete"


# ---------------------------------------------------------------------------------------------
# Output directory policy: never overwrite silently, resume what can be resumed


def checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.split("-")[-1])
    except ValueError:
        return -1


def _safetensors_problem(path: Path) -> str | None:
    """Header parses and the file is as long as the header says (a truncated save is not)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                return f"{path.name} is truncated"
            header = json.loads(fh.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return f"{path.name} is unreadable"
    if 8 + n + max(ends, default=0) != size:
        return f"{path.name} is truncated"
    return None


def _torch_zip_problem(path: Path) -> str | None:
    """torch.save writes a zip archive whose directory is at the end: a truncated file has none.
    Checked without unpickling anything."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            if not zf.namelist():
                return f"{path.name} is empty"
    except (OSError, zipfile.BadZipFile):
        return f"{path.name} is truncated or unreadable"
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from, or None. The completion marker is written after every
    file of the save; the files are still checked since a disk can lose what was written before a crash."""
    if not (ckpt / CHECKPOINT_COMPLETE).is_file():
        return "its save did not complete"
    state = ckpt / "trainer_state.json"
    try:
        if not isinstance(json.loads(state.read_text(encoding="utf-8")).get("global_step"), int):
            return "trainer_state.json has no global_step"
    except (OSError, ValueError, AttributeError):
        return "trainer_state.json is missing or unreadable"
    weights = ckpt / ADAPTER_WEIGHTS
    if not weights.is_file():
        return f"{ADAPTER_WEIGHTS} is missing"
    problem = _safetensors_problem(weights)
    if problem:
        return problem
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (ckpt / name).is_file():
            return f"{name} is missing"
        problem = _torch_zip_problem(ckpt / name)
        if problem:
            return problem
    rng = sorted(ckpt.glob("rng_state*.pth"))
    if not rng:
        return "rng_state.pth is missing"
    for path in rng:
        problem = _torch_zip_problem(path)
        if problem:
            return problem
    return None


def find_resumable_checkpoint(output_dir: Path) -> Path | None:
    """Newest checkpoint whose save completed and whose files are intact. A half-written or damaged
    one (killed while saving, disk trouble) is renamed aside, so neither we nor the Trainer (which
    rotates ``checkpoint-*``) trip over it, and the previous one is used."""
    checkpoints = sorted(
        (p for p in output_dir.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) >= 0),
        key=checkpoint_step,
        reverse=True,
    )
    for ckpt in checkpoints:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        aside = ckpt.with_name(f"incomplete-{ckpt.name}-{int(time.time())}")
        logger.warning("Not resuming from %s: %s (moved to %s)", ckpt.name, problem, aside.name)
        try:
            ckpt.rename(aside)
        except FileNotFoundError:  # another rank of the same run moved it first
            pass
    return None


def check_resume_dir(resume_from: Path, cfg: RunConfig) -> None:
    """``--resume`` must name a *finished* Phase-1 run: its done marker is written after every final
    file, so a Phase-1 run killed while saving is refused instead of half-continued."""
    from xray_train.model import check_phase1_dir

    resume_from = Path(resume_from)
    if not resume_from.is_dir():
        raise XrayTrainError(f"--resume: directory not found: {resume_from}")
    marker = resume_from / DONE_MARKER
    if not marker.is_file():
        raise XrayTrainError(
            f"--resume: {resume_from} holds no finished Phase-1 run (no {DONE_MARKER}); "
            "rerun its phase1 command to finish it, or point --resume at a finished Phase-1 output dir"
        )
    try:
        phase = json.loads(marker.read_text(encoding="utf-8")).get("phase")
    except (OSError, ValueError, AttributeError):
        phase = None
    if phase != "phase1":
        raise XrayTrainError(f"--resume: {resume_from} holds a {phase or 'unknown'} run, expected a phase1 output dir")
    if (cfg.output_dir.resolve() == resume_from.resolve()):
        raise XrayTrainError(f"output_dir: {cfg.output_dir} is the --resume dir; Phase 2 needs its own output_dir")
    check_phase1_dir(resume_from, cfg)


def prepare_output_dir(cfg: RunConfig, overwrite: bool) -> Path | None:
    """Create ``output_dir`` (and its resolved config) or decide to resume; returns the checkpoint to
    resume from, if any. With several ranks only the main process deletes, creates, renames or writes;
    the others wait for it, then find the same checkpoint (every rank must resume from the same step)."""
    out = cfg.output_dir
    if not overwrite and (out / DONE_MARKER).is_file():
        raise XrayTrainError(
            f"{out} holds a finished {cfg.phase} run; pass --overwrite to replace it or choose another output_dir"
        )
    if not overwrite:
        check_rerun_settings(cfg)
    state = distributed_state()
    with state.main_process_first():
        if state.is_main_process:
            if overwrite and out.exists():
                # Everything but the lock this run holds (deleting it would let a second run in).
                for item in out.iterdir():
                    if item.name != LOCK:
                        shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
            with disk_full_as_error(out):
                out.mkdir(parents=True, exist_ok=True)
                atomic_write_text(out / RESOLVED_CONFIG, dump_config(cfg))
        checkpoint = find_resumable_checkpoint(out)
    return checkpoint


def _adapter_view(raw: dict) -> dict:
    """A saved or current config as a dict, with the phase defaults of the adapter switches filled in."""
    from pydantic import ValidationError

    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError:
        return raw
    view = cfg.model_dump(mode="json")
    view["model"].update(add_loc_tokens=cfg.add_loc_tokens, train_projector=cfg.train_projector)
    return view


def check_rerun_settings(cfg: RunConfig) -> None:
    """A rerun resumes the newest intact checkpoint, which holds the adapter the run's saved config
    describes: a rerun that would build another one (other rank, targets, base, ...) stops here, naming the
    changed settings, before anything on disk changes."""
    from xray_train.config import read_yaml

    out = cfg.output_dir
    checkpoints = sorted(
        (p for p in out.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) >= 0), key=checkpoint_step, reverse=True
    )
    newest = next((c for c in checkpoints if checkpoint_problem(c) is None), None)
    if newest is None or not (out / RESOLVED_CONFIG).is_file():
        return
    saved = _adapter_view(read_yaml(out / RESOLVED_CONFIG))
    changes = adapter_setting_changes(saved, _adapter_view(cfg.model_dump(mode="json")))
    if changes:
        raise XrayTrainError(
            f"output_dir: {out} holds {newest.name}, made with other adapter settings ({'; '.join(changes)}); "
            f"pass --overwrite to start this run over, or restore these settings to resume from {newest.name}"
        )


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class PreparedData:
    train: list[EncodedExample]
    validation: list[EncodedExample]
    counts: dict = field(default_factory=dict)


def cap_examples(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    if limit is None or len(examples) <= limit:
        return examples
    rng = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=rng)[:limit].sort().values
    return [examples[i] for i in order]


def prepare_data(cfg: RunConfig, encoder: PromptEncoder, read: ReadResult | None = None) -> PreparedData:
    """Split and encode the examples of ``read`` (by default, the dataset read now)."""
    read = read if read is not None else read_dataset(cfg.data)
    splits = split_examples(read.examples, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    train_examples = cap_examples(splits["train"], cfg.data.max_examples, cfg.training.seed)
    val_examples = cap_examples(splits["validation"], cfg.training.max_eval_samples, cfg.training.seed)
    train, train_skipped = encode_examples(train_examples, cfg.phase, encoder, cfg.training.max_length)
    validation, _ = encode_examples(val_examples, cfg.phase, encoder, cfg.training.max_length)
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


def feature_cache_root(cfg: RunConfig) -> Path:
    from xray_train.features import feature_cache_root as root

    return root()


def build_datasets(cfg: RunConfig, model, processor, data: PreparedData):
    from xray_train.features import open_feature_cache
    from xray_train.loss import unwrap_gemma3

    pixel_loader = PixelLoader(processor, cfg.data.image_size)
    cache = None
    if cfg.training.cache_vision_features:
        paths = [it.example.image_path for it in data.train + data.validation]
        state = distributed_state()
        # Rank 0 computes the cache; the other ranks then find it complete and memory-map it.
        with state.main_process_first():
            cache = open_feature_cache(cfg, unwrap_gemma3(model).model, pixel_loader, paths, state.is_main_process)
        if cache.failed:
            data.counts["unreadable_images"] = len(cache.failed)
    train = TrainingDataset(data.train, pixel_loader, cache)
    validation = TrainingDataset(data.validation, pixel_loader, cache) if data.validation else None
    return train, validation


# ---------------------------------------------------------------------------------------------
# Trainer


class NonFiniteLossGuard:
    """Stops a run whose loss became NaN or inf, naming the step, without stalling the GPU.

    Reading a CUDA loss on the host (``if not torch.isfinite(loss)``) waits for the GPU every step, and
    a QLoRA step is host-bound: the GPU would idle while Python queues the next step. The loss is instead
    copied to pinned memory asynchronously and read once the copy is done, at the latest before any
    checkpoint is written and at the end of training, so a non-finite loss is still never saved.

    With several processes (``collective``) a rank must never stop alone: the others would wait for it in
    the next gradient all-reduce until the collective times out. Losses are then only judged at the points
    every rank reaches at the same step (``check(wait=True)``: log, save and last steps), where the ranks
    agree on the first bad step and all stop together.
    """

    def __init__(self, collective: bool = False):
        self.collective = collective
        self._pending: list[tuple[int, torch.Tensor, object]] = []

    def watch(self, loss: torch.Tensor, step: int) -> None:
        value = loss.detach().float()
        if not loss.is_cuda:
            self._pending.append((step, value.clone(), None))
        else:
            host = torch.empty((), dtype=torch.float32, pin_memory=True)
            host.copy_(value, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending.append((step, host, done))
        if not self.collective:
            self.check(wait=False)

    def check(self, wait: bool) -> None:
        if self.collective and not wait:
            return
        first_bad = None
        while self._pending:
            step, host, done = self._pending[0]
            if done is not None and not wait and not done.query():
                break
            if done is not None:
                done.synchronize()
            self._pending.pop(0)
            if first_bad is None and not math.isfinite(float(host)):
                first_bad = (step, float(host))
                if not self.collective:
                    break
        if self.collective:
            first_bad = self._agree(first_bad)
        if first_bad is not None:
            self._pending.clear()
            self.on_bad_loss(*first_bad)

    @staticmethod
    def _agree(first_bad: tuple[int, float] | None) -> tuple[int, float] | None:
        """The earliest bad step over all ranks (every rank calls this at the same step)."""
        import torch.distributed as dist

        never = torch.iinfo(torch.int64).max
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        step = torch.tensor([first_bad[0] if first_bad else never], dtype=torch.int64, device=device)
        dist.all_reduce(step, op=dist.ReduceOp.MIN)
        earliest = int(step.item())
        if earliest == never:
            return None
        return earliest, first_bad[1] if first_bad and first_bad[0] == earliest else float("nan")

    def on_bad_loss(self, step: int, value: float) -> None:  # replaced by the trainer
        raise XrayTrainError(f"loss became {value} at step {step}")


def _trainer_class():
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import DefaultFlowCallback

    class FiniteLossCallback(TrainerCallback):
        """Resolves the pending loss checks before anything is saved and when training ends."""

        def __init__(self, guard: NonFiniteLossGuard):
            self.guard = guard

        def on_step_end(self, args, state, control, **kwargs):
            # Points every rank reaches at the same step (a collective check needs all of them).
            if (
                control.should_save
                or control.should_log
                or control.should_training_stop
                or state.global_step >= state.max_steps
            ):
                self.guard.check(wait=True)
            return control

        def on_train_end(self, args, state, control, **kwargs):
            self.guard.check(wait=True)
            return control

    class CheckpointCompleteCallback(TrainerCallback):
        """Marks a checkpoint complete only after every file of it was written."""

        def on_save(self, args, state, control, **kwargs):
            # Every rank writes its own rng_state_N.pth into the checkpoint: mark it once all have.
            distributed_state().wait_for_everyone()
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    tidy_saved_adapter(ckpt)
                    atomic_write_text(ckpt / CHECKPOINT_COMPLETE, str(state.global_step))
            return control

    class XrayTrainer(Trainer):
        """HF Trainer with the project's loss (targets-only LM head), token accuracy, length grouping
        without loading images, and a non-finite-loss guard."""

        def __init__(
            self, *args, lengths=None, targets_only=True, head_chunk_rows=256, head_grad_in_forward=False, **kwargs
        ):
            super().__init__(*args, **kwargs)
            self.loss_guard = NonFiniteLossGuard(collective=self.args.world_size > 1)
            self.loss_guard.on_bad_loss = self._stop_on_bad_loss
            # Right after the flow callback (which decides should_save), before any that writes files.
            flow = next(i for i, cb in enumerate(self.callback_handler.callbacks) if isinstance(cb, DefaultFlowCallback))
            self.callback_handler.callbacks.insert(flow + 1, FiniteLossCallback(self.loss_guard))
            self.add_callback(CheckpointCompleteCallback())
            self._lengths = lengths
            self._targets_only = targets_only
            self._head_chunk_rows = head_chunk_rows
            self._head_grad_in_forward = head_grad_in_forward
            # compute_loss divides by the token count of the whole accumulated batch itself.
            self.model_accepts_loss_kwargs = True
            # One process sees several GPUs (plain `python`, or `accelerate launch --num_processes 1`):
            # the Trainer would wrap the model in nn.DataParallel, which a 4-bit model placed on one GPU
            # cannot use. Several GPUs mean several processes (see docs/multi_gpu.md).
            if self.args.parallel_mode.value == "not_distributed" and self.args.n_gpu > 1:
                self.args._n_gpu = 1
                # The Trainer already multiplied the batch by the GPU count (for DataParallel).
                self._train_batch_size = self.args.train_batch_size
            self._eval_correct = 0
            self._eval_total = 0

        def _get_train_sampler(self, train_dataset=None):
            if self.args.train_sampling_strategy == "group_by_length" and self._lengths is not None:
                from transformers.trainer_pt_utils import LengthGroupedSampler

                return LengthGroupedSampler(
                    self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=self._lengths
                )
            return super()._get_train_sampler(train_dataset)

        def _get_eval_sampler(self, eval_dataset):
            # Evaluation order does not matter; the default would load every image to sort by length.
            return torch.utils.data.SequentialSampler(eval_dataset)

        def autocast_smart_context_manager(self, cache_enabled=True):
            # accelerate puts autocast on model.forward, which the project's loss does not call (it runs
            # the decoder and the LM head separately), so the mixed-precision context is entered here.
            return self.accelerator.autocast(autocast_handler=None)

        def _loss(self, model, inputs):
            # Through DDP's own forward: a loss on the unwrapped model would never all-reduce gradients.
            if not self._targets_only:
                return call_through_ddp(model, full_logits_loss, inputs)
            # The module-level name is looked up per call so tests can substitute the loss.
            return call_through_ddp(
                model, lambda m, b: targets_only_loss(m, b, self._head_chunk_rows, self._head_grad_in_forward), inputs
            )

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = self._loss(model, inputs)
            denom = num_items_in_batch if num_items_in_batch is not None else out.n_tokens.clamp(min=1)
            loss = out.loss_sum / denom
            self.loss_guard.watch(loss, self.state.global_step + 1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, out) if return_outputs else loss

        def floating_point_ops(self, inputs) -> int:
            # The Trainer counts parameters anew every step (a walk over every module); they never change.
            if not hasattr(self, "_params_no_embeddings"):
                self._params_no_embeddings = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs["input_ids"].numel() * self._params_no_embeddings

        def _stop_on_bad_loss(self, step: int, value: float) -> None:
            last = find_last_good(Path(self.args.output_dir))
            raise XrayTrainError(
                f"loss became {value} at step {step}; stopped without saving. "
                f"Last good checkpoint: {last or 'none'}. Lower training.learning_rate or check the data."
            )

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                out = self._loss(model, inputs)
            counts = torch.stack([out.n_correct, out.n_tokens]).to(self.args.device)
            counts = self.accelerator.reduce(counts, reduction="sum")
            self._eval_correct += int(counts[0])
            self._eval_total += int(counts[1])
            return (out.loss_sum / out.n_tokens.clamp(min=1)).detach(), None, None

        def evaluate(self, *args, **kwargs):
            self._eval_correct = self._eval_total = 0
            metrics = super().evaluate(*args, **kwargs)
            if self._eval_total:
                acc = self._eval_correct / self._eval_total
                metrics["eval_token_accuracy"] = acc
                self.log({"eval_token_accuracy": acc})
            return metrics

    return XrayTrainer


def find_last_good(output_dir: Path) -> Path | None:
    done = [p for p in output_dir.glob("checkpoint-*") if (p / CHECKPOINT_COMPLETE).is_file()]
    return max(done, key=checkpoint_step) if done else None


def _gpu_name() -> str:
    try:
        return torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 - only used to word a message
        return "this GPU"


def mixed_precision(cfg: RunConfig) -> tuple[bool, bool]:
    """(bf16, fp16) autocast flags, or a refusal that says what to set instead.

    bf16 is used where the GPU has it natively. On GPUs without (T4, V100) torch can *emulate* bf16,
    many times slower, so bf16 there is refused rather than silently slow. fp16 autocast works with
    ``model.compute_dtype`` float16 or float32: trainable weights are float32 (model.py) so the
    Trainer's gradient scaler applies; if Gemma 3's activations overflow fp16 the non-finite-loss
    guard stops the run at that step.
    """
    t = cfg.training
    has_cuda = torch.cuda.is_available()
    if t.fp16 and not has_cuda:
        raise XrayTrainError("training.fp16: fp16 autocast needs a CUDA GPU; leave it off on CPU")
    native_bf16 = has_cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    if has_cuda and not native_bf16:
        fix = (
            "set model.compute_dtype=float16 and training.fp16=true (or model.compute_dtype=float32, "
            "slower and larger)"
        )
        if t.bf16:
            raise XrayTrainError(f"training.bf16: {_gpu_name()} has no native bf16; {fix}")
        if cfg.model.compute_dtype == "bfloat16":
            raise XrayTrainError(
                f"model.compute_dtype: bfloat16 is only emulated on {_gpu_name()} (many times slower); {fix}"
            )
    if t.bf16 is None:
        bf16 = native_bf16 and not t.fp16 and cfg.model.compute_dtype == "bfloat16"
    else:
        bf16 = t.bf16
    return bf16, t.fp16


def training_arguments(cfg: RunConfig, has_eval: bool):
    from transformers import TrainingArguments

    t = cfg.training
    bf16, fp16 = mixed_precision(cfg)
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
        eval_steps=(t.eval_steps or t.save_steps) if eval_strategy == "steps" else None,
        bf16=bf16,
        fp16=fp16,
        dataloader_num_workers=loader_workers(cfg),
        # Read ahead so decoding full-size films in the workers overlaps with the GPU's steps.
        dataloader_prefetch_factor=4 if loader_workers(cfg) else None,
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


def loader_workers(cfg: RunConfig) -> int:
    """Cached features are gathered per batch in the collator, in-process: worker processes would only
    add inter-process copies (measured: +30 % step time at MedGemma scale). Pixels need workers: one per CPU."""
    from xray_train.data.loader import available_cpus

    t = cfg.training
    if t.dataloader_num_workers is not None:
        return t.dataloader_num_workers
    return 0 if t.cache_vision_features else available_cpus()


def _optimizer_groups(cfg: RunConfig, model):
    """LoRA at learning_rate; projector and loc-token rows at projector_learning_rate if set."""
    lr_other = cfg.training.projector_learning_rate
    if lr_other is None:
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
# The recipe


def run(
    cfg: RunConfig, resume_from: Path | None = None, overwrite: bool = False, echo=print, callbacks=None
) -> Path:
    """Train one phase end to end and write the adapter, processor, config and summary to output_dir.

    ``callbacks``: extra ``TrainerCallback`` objects (tests and benchmarks observe a real run with them).
    """
    # Everything that can be refused is checked before the (slow) model load.
    mixed_precision(cfg)
    if cfg.phase == "phase2" and resume_from is None:
        echo("Phase 2 without --resume: training a fresh adapter (no Phase-1 report knowledge).")
    if resume_from is not None:
        check_resume_dir(resume_from, cfg)
    read = read_for_training(cfg.data)
    # One writer per output_dir, from before it is created, overwritten or resumed until the run ends.
    lock = OutputDirLock(cfg.output_dir).acquire() if distributed_state().is_main_process else None
    try:
        return _train(cfg, read, resume_from, overwrite, echo, callbacks)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, read: ReadResult, resume_from, overwrite: bool, echo, callbacks) -> Path:
    checkpoint = prepare_output_dir(cfg, overwrite)

    from transformers import set_seed

    from xray_train.model import build_training_model

    set_seed(cfg.training.seed)
    model, processor = build_training_model(cfg, resume_from=resume_from)
    encoder = PromptEncoder(processor, cfg.system_prompt)
    data = prepare_data(cfg, encoder, read)
    train_set, val_set = build_datasets(cfg, model, processor, data)
    if cfg.training.pad_last_batch:
        train_set.pad_to_multiple(cfg.training.per_device_train_batch_size * distributed_state().num_processes)
    echo(f"{cfg.phase}: {len(train_set.items)} training / {len(val_set) if val_set else 0} validation examples")

    trainer = _trainer_class()(
        model=model,
        args=training_arguments(cfg, has_eval=val_set is not None and len(val_set) > 0),
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=Collator(encoder.ids),
        lengths=train_set.lengths(),
        targets_only=cfg.training.loss_on_targets_only,
        head_chunk_rows=cfg.training.head_chunk_rows,
        head_grad_in_forward=cfg.training.head_grad_in_forward,
        optimizers=(_optimizer_groups(cfg, model), None),
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
    metrics["torch_compiles"] = compile_count() - compiles_before
    logger.info("torch.compile compiled %d graphs in this run (training and evaluation)", metrics["torch_compiles"])
    if trainer.is_world_process_zero():
        advice = "training finished and its checkpoints are kept: free space and rerun the same command"
        with disk_full_as_error(cfg.output_dir, advice=advice):
            save_outputs(cfg, trainer, processor, data, metrics, elapsed, train_set, resumed_step)
    return cfg.output_dir


def compile_count() -> int:
    """Graphs torch.compile has made in this process (each compile or recompile of a frame counts once)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def _train_loss(log_history: list[dict]) -> float | None:
    """Mean logged training loss of the whole run. After a resume the Trainer's own ``train_loss``
    divides the resumed part's loss sum by all steps, so it is recomputed from the log."""
    losses = [h["loss"] for h in log_history if "loss" in h and isinstance(h["loss"], (int, float))]
    return sum(losses) / len(losses) if losses else None


def save_outputs(
    cfg, trainer, processor, data: PreparedData, metrics: dict, elapsed: float, train_set, resumed_step: int = 0
) -> None:
    """Adapter + processor + summary + loss curve, each moved into place whole; DONE_MARKER last, so
    a kill (or a full disk) anywhere before it leaves a dir that resumes instead of looking finished."""
    from xray_train.report_plots import plot_loss_curve

    out = cfg.output_dir
    staging = staging_dir(out, ".final-")
    try:
        trainer.model.save_pretrained(staging, save_embedding_layers=False)
        processor.save_pretrained(staging)
        tidy_saved_adapter(staging)
        for item in staging.iterdir():
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
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
    atomic_write_json(out / DONE_MARKER, {"phase": cfg.phase, "global_steps": steps})
