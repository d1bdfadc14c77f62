"""Micro-benchmarks behind three training levers, at MedGemma-4B shapes on one GPU (forward + backward).

- attention: Gemma 3's mask (causal text, bidirectional image block) as the dense boolean mask
  transformers builds (with K/V repeated to every query head) against the same attention split into
  mask-free calls (``xray_train.attention``) and against FlexAttention;
- NF4 dequantisation: bitsandbytes' kernel against the in-graph torch-op version, compiled;
- LoRA dropout: RMSNorm + two dropouts + the LoRA A matmuls, compiled, with Inductor's own RNG and with
  ATen's (``fallback_random``).

    python benchmarks/bench_kernels.py [--batch 16] [--out benchmarks/results/kernels.json]

Each row reports milliseconds per call and, where there is a reference, the largest absolute
difference from it (fp32 math attention; bitsandbytes' dequantisation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common  # noqa: E402,F401 - puts the checkout's src/ first on the path


def cuda_ms(fn, iters: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1000


def gemma_mask(length: int, image: tuple[int, int], device) -> torch.Tensor:
    i = torch.arange(length, device=device)
    causal = i[:, None] >= i[None, :]
    in_image = (i >= image[0]) & (i < image[1])
    return causal | (in_image[:, None] & in_image[None, :])


def attention_rows(batch: int, length: int, image: tuple[int, int], heads: int, kv_heads: int, dim: int) -> list[dict]:
    from xray_train.attention import split_image_attention

    dev = "cuda"
    scale = 256**-0.5  # Gemma 3: query_pre_attn_scalar = 256
    q = torch.randn(batch, heads, length, dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, kv_heads, length, dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(batch, kv_heads, length, dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(batch, heads, length, dim, device=dev, dtype=torch.bfloat16)
    mask = gemma_mask(length, image, dev)[None, None].expand(batch, 1, length, length)
    rep = heads // kv_heads

    def hf_dense(backend=None):
        def run():
            kk = k.repeat_interleave(rep, dim=1)
            vv = v.repeat_interleave(rep, dim=1)
            if backend is None:
                return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)
            with torch.nn.attention.sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)

        return run

    def split(backend=None):
        def run():
            if backend is None:
                return split_image_attention(q, k, v, image, scale)
            with torch.nn.attention.sdpa_kernel(backend):
                return split_image_attention(q, k, v, image, scale)

        return run

    def split3():
        # Exact pieces: the flash op's causal flag is lower-right for a non-square call.
        start, end = image
        parts = [
            F.scaled_dot_product_attention(q[:, :, :start], k[:, :, :start], v[:, :, :start], is_causal=True,
                                           scale=scale, enable_gqa=True),
            F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], scale=scale,
                                           enable_gqa=True),
            torch.ops.aten._scaled_dot_product_flash_attention(q[:, :, end:], k, v, 0.0, True, False, scale=scale)[0],
        ]
        return torch.cat(parts, dim=2)

    with torch.no_grad():
        ref = F.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1),
            attn_mask=mask, scale=scale,
        )

    variants = {
        "dense mask, SDPA default backend (transformers today)": hf_dense(),
        "dense mask, SDPA memory-efficient backend": hf_dense(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION),
        "split: causal + image rows (SDPA default backend)": split(),
        "split: causal + image rows (flash)": split(torch.nn.attention.SDPBackend.FLASH_ATTENTION),
        "split: causal + image rows (cuDNN)": split(torch.nn.attention.SDPBackend.CUDNN_ATTENTION),
        "split: three exact pieces, lower-right flash for the text after the image": split3,
    }
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        start, end = image

        def mask_mod(b, h, qi, ki):
            return (qi >= ki) | ((qi >= start) & (qi < end) & (ki >= start) & (ki < end))

        block = create_block_mask(mask_mod, None, None, length, length, device=dev)
        flex = torch.compile(flex_attention)
        variants["FlexAttention (compiled, block mask)"] = lambda: flex(q, k, v, block_mask=block, scale=scale, enable_gqa=True)
    except Exception as exc:  # noqa: BLE001 - recorded as the row's error
        variants["FlexAttention (compiled, block mask)"] = exc

    rows = []
    for name, fn in variants.items():
        row = {"kernel": "attention", "name": name, "batch": batch, "length": length}
        if isinstance(fn, Exception):
            rows.append({**row, "error": f"{type(fn).__name__}: {fn}"[:300]})
            continue
        try:
            out = fn()
            row["max_abs_diff_vs_fp32"] = float((out.float() - ref).abs().max())

            def step(fn=fn):
                q.grad = k.grad = v.grad = None
                fn().backward(grad)

            row["fwd_ms"] = round(cuda_ms(fn), 3)
            row["fwd_bwd_ms"] = round(cuda_ms(step), 3)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        print(row, flush=True)
    return rows


def dequant_rows() -> list[dict]:
    import bitsandbytes.functional as bnbf

    from xray_train.nf4 import dequantize_nf4

    def dequantize_pairs(packed, code, absmax, blocksize, shape, dtype, nested):
        code2, absmax2, blocksize2, offset = nested
        scales = code2[absmax.long()].view(-1, blocksize2) * absmax2.view(-1, 1)
        absmax = scales.view(-1) + offset
        table = torch.stack((code.view(16, 1).expand(16, 16), code.view(1, 16).expand(16, 16)), -1).reshape(256, 2)
        values = table[packed.reshape(-1).view(torch.uint8).long()].view(-1, blocksize) * absmax.view(-1, 1)
        return values.view(shape).to(dtype)

    rows = []
    compiled = torch.compile(dequantize_nf4)
    compiled_pairs = torch.compile(dequantize_pairs)
    for shape in ((10240, 2560), (2048, 2560), (2560, 10240)):
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
        nested = (state.state2.code.float(), state.state2.absmax.float(), int(state.state2.blocksize),
                  torch.as_tensor(state.offset, dtype=torch.float32, device="cuda"))
        args = (packed, state.code.float(), state.absmax, int(state.blocksize), shape, torch.bfloat16, nested)
        ref = bnbf.dequantize_4bit(packed, state)
        n_bytes = packed.numel() + w.numel() * 2
        variants = (
            ("bitsandbytes dequantize_4bit", lambda packed=packed, state=state: bnbf.dequantize_4bit(packed, state)),
            ("in-graph torch ops, compiled", lambda args=args: compiled(*args)),
            ("in-graph, one lookup per byte, compiled", lambda args=args: compiled_pairs(*args)),
        )
        for name, fn in variants:
            mine = fn()
            ms = cuda_ms(fn, iters=50)
            rows.append({"kernel": "nf4_dequant", "name": name, "shape": list(shape), "ms": round(ms, 4),
                         "gb_per_s": round(n_bytes / ms / 1e6, 1),
                         "max_abs_diff_vs_bnb": float((mine.float() - ref.float()).abs().max())})
            print(rows[-1], flush=True)
    return rows


def dropout_rows(tokens: int, hidden: int = 2560, rank: int = 32, p: float = 0.05) -> list[dict]:
    import torch._inductor.config as inductor_config

    rows = []
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gamma = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    a_q = torch.randn(rank, hidden, device="cuda", dtype=torch.float32, requires_grad=True)
    a_v = torch.randn(rank, hidden, device="cuda", dtype=torch.float32, requires_grad=True)

    def block(x, gamma, a_q, a_v, p):
        n = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + gamma.float())).to(x.dtype)
        q = F.dropout(n, p) @ a_q.to(n.dtype).t()
        v = F.dropout(n, p) @ a_v.to(n.dtype).t()
        return n, q, v

    for fallback in (False, True):
        for rate in (p, 0.0):
            torch._dynamo.reset()
            inductor_config.fallback_random = fallback
            fn = torch.compile(block)

            def step(fn=fn, rate=rate):
                x.grad = a_q.grad = a_v.grad = None
                n, q, v = fn(x, gamma, a_q, a_v, rate)
                (n.float().sum() + q.float().sum() + v.float().sum()).backward()

            rows.append({"kernel": "lora_dropout", "name": f"norm + 2 dropouts + LoRA A, fallback_random={fallback}",
                         "p": rate, "tokens": tokens, "fwd_bwd_ms": round(cuda_ms(step), 3)})
            print(rows[-1], flush=True)
    inductor_config.fallback_random = False
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=426)
    p.add_argument("--image", default="22,278", help="image block [start,end) in the sequence")
    p.add_argument("--parts", default="attention,dequant,dropout")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    image = tuple(int(x) for x in args.image.split(","))
    parts = args.parts.split(",")
    rows: list[dict] = []
    if "attention" in parts:
        rows += attention_rows(args.batch, args.length, image, heads=8, kv_heads=4, dim=256)
    if "dequant" in parts:
        rows += dequant_rows()
    if "dropout" in parts:
        rows += dropout_rows(args.batch * args.length)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
