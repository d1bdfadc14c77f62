"""The other libraries' private names that xray-train cannot avoid, in one place.

Each is used because no public API does the job; each is looked up here only, and
``tests/test_private_api.py`` fails loudly, naming the library, when an upgrade moves one:

- ``torch.nn.Module._compiled_call_impl``: what ``Module.compile()`` runs. The decoder layers mark their
  inputs' sequence length dynamic right before the compiled call (``model.compile_decoder_layers``); a
  mark set inside the compiled region is traced, not applied, and wrapping the layer in another module
  would rename its parameters (and so peft's adapter keys).
- ``torch._dynamo.maybe_mark_dynamic``: the mark itself (documented, but under a private module).
- ``torch._dynamo.utils.counters``: how many graphs torch.compile made (``torch_compiles`` in the summary).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class PrivateNameMoved(RuntimeError):
    """A private name this module relies on is gone: the installed library changed it."""


def wrap_compiled_call(module: torch.nn.Module, wrap: Callable[[Callable], Callable]) -> None:
    """After ``module.compile()``: every call of ``module`` runs ``wrap(compiled_call)`` instead, eagerly
    around the compiled call."""
    compiled = getattr(module, "_compiled_call_impl", None)
    if compiled is None:
        raise PrivateNameMoved(
            f"torch {torch.__version__}: nn.Module.compile() no longer keeps its compiled call in "
            "_compiled_call_impl (xray_train.private_api.wrap_compiled_call needs updating)"
        )
    module._compiled_call_impl = wrap(compiled)


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module.compile()`` was called on it (and not undone by ``uncompile``)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def uncompile(module: torch.nn.Module) -> None:
    """Undo ``module.compile()``: the module runs eagerly again (benchmarks compare both)."""
    module._compiled_call_impl = None


def maybe_mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    """Ask torch.compile to treat ``tensor``'s size ``dim`` as dynamic from the first compile."""
    from torch._dynamo import maybe_mark_dynamic as mark

    mark(tensor, dim)


def compile_count() -> int:
    """Graphs torch.compile has made in this process (each compile or recompile of a frame counts once)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])
