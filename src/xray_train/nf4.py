"""4-bit NF4 weights dequantised inside the compiled decoder layers (``training.dequantize_in_graph``).

bitsandbytes runs each 4-bit matmul as a custom op whose implementation is Python: it allocates, calls
a CUDA kernel through ctypes to dequantise the weight, then runs the matmul, and its backward does the
same again. A QLoRA step of MedGemma-4B makes about 480 such calls (7 projections x 34 layers, forward
and backward), and on an H100/H200 their host time, not the GPU, bounds the step.

Written as plain torch ops (a 16-entry table lookup and a per-block scale, as bitsandbytes defines
them), the dequantisation becomes part of the compiled layer: Inductor fuses it into a few generated
kernels, and the backward recomputes it from the packed weight instead of keeping a bf16 copy. The
result is the same weight (``tests/test_nf4.py`` checks it bit for bit against bitsandbytes, and the
loss and gradients against the bitsandbytes path).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def dequantize_nf4(
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: tuple[int, int],
    dtype: torch.dtype,
    nested: tuple[torch.Tensor, torch.Tensor, int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The ``shape`` weight that bitsandbytes packed into ``packed`` (two 4-bit codes per byte, high first).

    ``absmax`` holds one scale per ``blocksize`` weights; with double quantisation it is itself 8-bit and
    ``nested`` = ``(code2, absmax2, blocksize2, offset)`` restores it. Arithmetic in fp32, as bitsandbytes.
    """
    n = shape[0] * shape[1]
    if nested is not None:
        code2, absmax2, blocksize2, offset = nested
        codes = absmax.reshape(-1)
        pad = -codes.numel() % blocksize2  # the last block of scales may be partial
        scales = code2[F.pad(codes, (0, pad)).long()].view(-1, blocksize2) * absmax2.view(-1, 1)
        absmax = scales.view(-1)[: codes.numel()] + offset
    nibbles = packed.reshape(-1).view(torch.uint8)
    index = torch.stack((nibbles >> 4, nibbles & 0xF), dim=-1).reshape(-1)[:n].long()
    values = code[index].view(-1, blocksize) * absmax.float().view(-1, 1)
    return values.view(shape).to(dtype)


def supports(module) -> bool:
    """A bitsandbytes Linear4bit layer holding an NF4 matrix of whole blocks."""
    import bitsandbytes as bnb

    if not isinstance(module, bnb.nn.Linear4bit):
        return False
    state = getattr(module.weight, "quant_state", None)
    if state is None or state.quant_type != "nf4" or len(state.shape) != 2:
        return False
    return state.shape[0] * state.shape[1] % state.blocksize == 0  # whole blocks: every Gemma 3 projection


@functools.cache
def _in_graph_class():
    import bitsandbytes as bnb

    class InGraphLinear4bit(bnb.nn.Linear4bit):
        """bitsandbytes' Linear4bit whose forward dequantises with torch ops (see the module docstring)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            nested = None
            if self.nf4_nested:
                nested = (self.nf4_code2, self.nf4_absmax2, self.nf4_blocksize2, self.nf4_offset)
            compute = self.compute_dtype or x.dtype
            args = (self.weight, self.nf4_code, self.nf4_absmax, self.nf4_blocksize, self.nf4_shape, compute, nested)
            if torch.compiler.is_compiling():
                # Under compile the partitioner would keep each bf16 weight for backward (it will not
                # recompute an op whose output is over 4x its input, as the 4-bit unpacking is): 4-5 GB
                # at MedGemma-4B scale. A checkpointed region is always recomputed in backward.
                weight = checkpoint(dequantize_nf4, *args, use_reentrant=False)
            else:
                weight = dequantize_nf4(*args)
            bias = None if self.bias is None else self.bias.to(compute)
            return F.linear(x.to(compute), weight, bias).to(x.dtype)

    return InGraphLinear4bit


def dequantize_in_graph(modules) -> int:
    """Switch every supported 4-bit layer among ``modules`` to in-graph dequantisation; returns the count.

    The quantisation state becomes non-persistent buffers (so it follows ``.to()`` and, under
    ``torch.compile``, every layer shares one graph); saved checkpoints are unchanged.
    """
    count = 0
    for module in modules:
        if not supports(module) or getattr(module, "nf4_shape", None) is not None:
            continue
        state = module.weight.quant_state
        module.register_buffer("nf4_code", state.code.float(), persistent=False)
        module.register_buffer("nf4_absmax", state.absmax, persistent=False)
        module.nf4_nested = bool(state.nested)
        if state.nested:
            module.register_buffer("nf4_code2", state.state2.code.float(), persistent=False)
            module.register_buffer("nf4_absmax2", state.state2.absmax.float(), persistent=False)
            module.register_buffer("nf4_offset", torch.as_tensor(state.offset, dtype=torch.float32), persistent=False)
            module.nf4_blocksize2 = int(state.state2.blocksize)
        module.nf4_blocksize = int(state.blocksize)
        module.nf4_shape = tuple(int(s) for s in state.shape)
        module.__class__ = _in_graph_class()
        count += 1
    return count
