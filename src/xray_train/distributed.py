"""What data-parallel training (``accelerate launch`` / ``torchrun``, one process per GPU) needs from the recipe.

Nothing here launches processes: the launchers do that (``xray_train.launch`` only builds their command).
These helpers keep the single-process code path unchanged and make it correct with several ranks.
"""

from __future__ import annotations

import torch

_NO_INSTANCE_FORWARD = object()


def use_cpu() -> bool:
    """Ranks on a machine without CUDA talk over gloo. accelerate's ``PartialState()`` would otherwise
    treat torchrun-started CPU ranks as independent single processes (each training on all the data)."""
    return not torch.cuda.is_available()


def state():
    """The process's accelerate ``PartialState``; the first call initialises the process group.

    Call this (not a bare ``PartialState()``) wherever the recipe needs the rank before the Trainer exists,
    so that CPU ranks (tests, CI) form a gloo group exactly as GPU ranks form an NCCL one.
    """
    from accelerate import PartialState

    return PartialState(cpu=use_cpu())


def is_ddp(model) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def call_through_ddp(model, fn, *args):
    """``fn(inner_model, *args)``, run as the forward of ``model`` when ``model`` is DDP-wrapped.

    DDP all-reduces gradients only in a backward that follows its own ``forward`` (which arms the
    reducer). A loss that unwraps the model and calls its submodules directly skips that, and every rank
    then silently trains on its own shard only. Running the loss as the wrapped module's forward keeps the
    custom loss and gets the gradient all-reduce (and ``no_sync`` under gradient accumulation) back.
    Outside DDP, or without autograd (evaluation), it is a plain call.
    """
    if not is_ddp(model) or not torch.is_grad_enabled():
        return fn(model, *args)
    inner = model.module
    # accelerate may already have put an autocast forward on the instance; restore it afterwards.
    previous = inner.__dict__.get("forward", _NO_INSTANCE_FORWARD)
    inner.forward = lambda *a: fn(inner, *a)
    try:
        return model(*args)
    finally:
        if previous is _NO_INSTANCE_FORWARD:
            del inner.forward
        else:
            inner.forward = previous
