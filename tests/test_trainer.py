"""XrayTrainer's wiring into the HF Trainer through its public hooks: the loss guard's place among the
callbacks, and one GPU per process."""

import pytest
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from xray_train.trainer import FiniteLossCallback, OneGpuPerProcessArguments, XrayTrainer


def _trainer(args, **kwargs):
    return XrayTrainer(
        model=torch.nn.Linear(2, 2), args=args, train_dataset=list(range(8)), data_collator=list, lengths=None,
        targets_only=True, head_chunk_rows=8, head_grad_in_forward=False, **kwargs,
    )


def test_the_loss_guard_runs_after_the_flow_callback_and_before_the_caller_s(tmp_path):
    """The guard reads should_save, which the flow callback decides in the same event, and must stop a
    non-finite run before any other callback acts on the step."""

    class Callers(TrainerCallback):
        pass

    trainer = _trainer(OneGpuPerProcessArguments(output_dir=str(tmp_path), report_to="none"), callbacks=[Callers()])
    kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert kinds.count(FiniteLossCallback) == 1
    guard = kinds.index(FiniteLossCallback)
    assert kinds.index(DefaultFlowCallback) < guard < kinds.index(Callers)
    assert trainer.callback_handler.callbacks[guard].guard is trainer.loss_guard


def test_plain_training_arguments_are_refused(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="OneGpuPerProcessArguments"):
        _trainer(TrainingArguments(output_dir=str(tmp_path), report_to="none"))
