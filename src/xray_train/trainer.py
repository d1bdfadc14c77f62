"""The project's Hugging Face Trainer: the targets-only loss, token accuracy, length grouping without
loading images, checkpoints that carry the run's resolved config and lineage and are marked complete
last, and a non-finite-loss guard that never stalls the GPU.

``xray_train.train`` builds it from a resolved config; nothing here decides a setting.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from xray_train.distributed import call_through_ddp
from xray_train.distributed import state as distributed_state
from xray_train.errors import XrayTrainError
from xray_train.loss import LocTargets, full_logits_loss, targets_only_loss
from xray_train.run_dir import RunDir, tidy_saved_adapter

logger = logging.getLogger(__name__)


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
    """Gives each checkpoint the run's resolved config and lineage and the umask's modes (without peft's
    placeholder model card), then marks it complete: only after every file of it was written."""

    def on_save(self, args, state, control, **kwargs):
        # Every rank writes its own rng_state_N.pth into the checkpoint: mark it once all have.
        distributed_state().wait_for_everyone()
        if state.is_world_process_zero:
            run_dir = RunDir(args.output_dir)
            ckpt = run_dir.file(f"checkpoint-{state.global_step}")
            if ckpt.is_dir():
                tidy_saved_adapter(ckpt)
                run_dir.copy_records_into(ckpt)
                run_dir.mark_checkpoint_complete(ckpt, state.global_step)
        return control


class LoraStartCallback(TrainerCallback):
    """Two-stage training (training.lora_start_step): before step ``start`` the optimizer skips LoRA.

    Its gradients are dropped after clipping and before the step (AdamW skips a parameter without a
    gradient: no moment, no decay), so parameters, DDP's reduction and compiled graphs stay as they are.
    """

    def __init__(self, params, start: int):
        self.params, self.start = params, start

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step < self.start:
            for p in self.params:
                p.grad = None
        return control


class WorkersOnlyWhileReadingCallback(TrainerCallback):
    """An epoch that reads no image (every feature cached: a later epoch of a run whose steps filled the cache,
    or a rerun) runs without DataLoader workers. They are there to read images; with nothing to read they only
    name cached rows, and steps ran 10 % slower with them (67.5 against 75.3 samples/s, MedGemma-4B on an
    H200). The batches are the same: the sampler, not the workers, orders them."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        # accelerate's loader wraps the torch DataLoader that iterates (and forwards attribute reads to it).
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
        if loader is None or not getattr(loader, "num_workers", 0) or getattr(loader, "persistent_workers", False):
            return
        if not hasattr(self.dataset, "reads_images") or self.dataset.reads_images():
            return
        # Read when the epoch's iterator is made, right after this event; no image is read again in this run.
        loader.num_workers = 0
        loader.prefetch_factor = None  # a loader rebuilt from this one (resuming mid-epoch) must accept 0
        logger.info("every image's features are cached: this epoch and later ones run without DataLoader workers")


@contextlib.contextmanager
def evaluation_context():
    """No autograd, and the compiled decoder layers run eagerly unless a graph already matches.

    Without autograd and dropout the training graphs' guards fail: compiling evaluation's own graphs
    would cost more than the few hundred validation samples take eagerly, and would compile after the
    first training steps.
    """
    with torch.no_grad(), torch.compiler.set_stance("eager_on_recompile"):
        yield


class XrayTrainer(Trainer):
    """HF Trainer with the project's loss (targets-only LM head), token accuracy, length grouping
    without loading images, and a non-finite-loss guard."""

    def __init__(
        self, *args, lengths, targets_only: bool, head_chunk_rows: int, head_grad_in_forward: bool,
        loc_targets: LocTargets | None = None, lora_start_step: int = 0, feature_fill=None, pixel_loader=None,
        feature_rows_from=None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self._feature_fill = feature_fill  # features.CacheFill, when the steps fill the vision-feature cache
        # The feature cache whose rows batches name by number (``feature_rows``: a collator in worker processes).
        self._feature_rows_from = feature_rows_from
        self._pixel_loader = pixel_loader
        self.loss_guard = NonFiniteLossGuard(collective=self.args.world_size > 1)
        self.loss_guard.on_bad_loss = self._stop_on_bad_loss
        # Right after the flow callback (which decides should_save), before any that writes files.
        flow = next(i for i, cb in enumerate(self.callback_handler.callbacks) if isinstance(cb, DefaultFlowCallback))
        self.callback_handler.callbacks.insert(flow + 1, FiniteLossCallback(self.loss_guard))
        self.add_callback(CheckpointCompleteCallback())
        self.add_callback(WorkersOnlyWhileReadingCallback(self.train_dataset))
        if lora_start_step > 0:
            lora = [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n]
            self.add_callback(LoraStartCallback(lora, lora_start_step))
        self._lengths = lengths
        self._targets_only = targets_only
        self._head_chunk_rows = head_chunk_rows
        self._head_grad_in_forward = head_grad_in_forward
        self._loc_targets = loc_targets
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

    def gather_features(self, inputs: dict) -> dict:
        """The batch with the cached rows it names (``feature_rows``) read here, in the training process."""
        if "feature_rows" not in inputs:
            return inputs
        inputs = dict(inputs)
        rows = self._feature_rows_from.rows(inputs.pop("feature_rows"))
        device = inputs["input_ids"].device
        if device.type == "cuda":
            rows = rows.pin_memory()  # the copy to the GPU then does not wait for the steps queued before it
        inputs["image_features"] = rows.to(device, non_blocking=device.type == "cuda")
        return inputs

    def fill_features(self, model, inputs: dict) -> dict:
        """The batch as the loss takes it from a finished cache: the rows the cache is still missing are made
        here (SigLIP on their uint8 images, as a cache build makes them) and handed to the cache."""
        inputs = self.gather_features(inputs)
        if "fill_pixels" not in inputs:
            return inputs
        from xray_train.features import pooled_vision_features
        from xray_train.gemma3 import gemma3_core, vision_dtype

        gemma = gemma3_core(model)
        inputs = dict(inputs)
        pixels, rows = inputs.pop("fill_pixels"), inputs.pop("fill_rows")
        fill_at, cached_at = inputs.pop("fill_positions"), inputs.pop("feature_positions")
        dtype = vision_dtype(gemma)
        # The build's numbers: the tower in its own dtype, outside the step's mixed-precision autocast.
        with torch.no_grad(), torch.autocast(pixels.device.type, enabled=False):
            made = pooled_vision_features(gemma, self._pixel_loader.normalize(pixels, dtype),
                                          self._feature_fill.attention)
        self._feature_fill.write(rows, made)
        features = made.new_empty((len(fill_at) + len(cached_at), *made.shape[1:]))
        features[fill_at] = made
        if len(cached_at):
            features[cached_at] = inputs["image_features"].to(made.device, made.dtype)
        inputs["image_features"] = features
        return inputs

    def _loss(self, model, inputs):
        inputs = self.fill_features(model, inputs)
        # Through DDP's own forward: a loss on the unwrapped model would never all-reduce gradients.
        if not self._targets_only:
            return call_through_ddp(model, full_logits_loss, inputs)
        # The module-level name is looked up per call so tests can substitute the loss.
        loc = {"loc": self._loc_targets} if self._loc_targets is not None else {}
        return call_through_ddp(
            model, lambda m, b: targets_only_loss(m, b, self._head_chunk_rows, self._head_grad_in_forward, **loc),
            inputs,
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
        last = RunDir(self.args.output_dir).last_good_checkpoint()
        raise XrayTrainError(
            f"loss became {value} at step {step}; stopped without saving. "
            f"Last good checkpoint: {last or 'none'}. Lower training.learning_rate or check the data."
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with evaluation_context(), self.compute_loss_context_manager():
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
