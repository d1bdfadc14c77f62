"""How fast MedGemma's SigLIP-896 tower (plus the projector's pooling) runs: the GPU side of a cache build.

    python benchmarks/bench_vision.py --out benchmarks/results/vision_speed.json     # a GPU host, ~2 min

A cache build overlaps reading films with this forward, so it runs at the slower of the two
(``bench_reading.py`` measures the reading). The tower is MedGemma's shape (27 layers, width 1152, 16 heads of
72, 4096 patches) with random weights: speed does not depend on the values. Each variant runs the same
inputs; ``max_abs_diff`` is against transformers' own forward.

- ``attention_only``: one layer's ``scaled_dot_product_attention`` alone for each SDPA backend (ms per batch);
- ``eager_<backend>``: transformers' forward with SDPA held to one backend (``default``: PyTorch's choice);
- ``compiled_<backend>``: ``features.compile_vision_layers`` (each encoder layer compiled), for PyTorch's choice
  and for the fastest eager backend, tried first (``features.vision_attention``);
- ``--variants``: other ways to compile the same forward (``autotune``: each layer with Inductor's GEMM
  autotuning; ``tower``: the whole tower and pooling as one graph; ``tower_autotune``: both), each with its
  compile seconds and ``max_abs_diff``;
- ``--profile-batch B``: the kernels of the default compiled forward at batch B, grouped into matrix
  products, attention and the rest (``profile`` in the JSON), to say how far the forward is from its ceiling.
- ``--head-dims 64,72,96,128``: attention alone at other head sizes, SigLIP's scale kept (``<batch>_head_dim_<d>``
  under ``attention_only``): a kernel that rounds SigLIP's 72 up to a wider tile runs 72 as slowly as that
  tile; ``--attention-only`` stops there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import REPO, device_name, write_json  # noqa: E402 - also puts the checkout's src/ first on the path


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, pixels, repeats: int) -> tuple[float, object]:

    out = fn(pixels)
    fn(pixels)
    _sync()
    started = time.perf_counter()
    for _ in range(repeats):
        out = fn(pixels)
    _sync()
    return (time.perf_counter() - started) / repeats, out


def attention_only(batch: int, heads: int, tokens: int, dim: int, device: str, repeats: int = 10,
                   scale: float | None = None) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(batch, heads, tokens, dim, device=device, dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * batch * heads * tokens * tokens * dim
    rows = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                seconds, _ = _timed(lambda x: F.scaled_dot_product_attention(x, k, v, scale=scale), q, repeats)
            rows[backend.name.lower()] = {"ms": round(seconds * 1e3, 3), "tflops": round(flops / seconds / 1e12, 1)}
        except RuntimeError as exc:  # a backend that does not take this shape says why
            rows[backend.name.lower()] = {"error": str(exc).splitlines()[0][:200]}
    return rows


def vision_model(tiny: bool, device: str):
    """MedGemma's vision tower and projector with random bf16 weights (``tiny``: 2 layers at 112 px)."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from medgemma_arch import medgemma_config

    config = medgemma_config()
    config.text_config.num_hidden_layers = 1  # only the tower and the projector run here
    config.vision_config._attn_implementation = "sdpa"
    if tiny:
        config.vision_config.num_hidden_layers, config.vision_config.image_size = 2, 112
        config.mm_tokens_per_image = 16
    torch.manual_seed(0)
    with torch.device(device):
        return Gemma3ForConditionalGeneration(config).to(torch.bfloat16).model.eval()


def compiled_variant(model, name: str, attention: str = "default"):
    """Pixels -> pooled features, compiled as ``name`` says (``layers``, ``autotune``, ``tower``,
    ``tower_autotune``), SDPA trying ``attention`` first; a fresh compile: dynamo is reset, and the layers'
    compiles of a variant before are undone."""
    import torch

    from xray_train.features import compile_vision_layers, pooled_vision_features
    from xray_train.gemma3 import vision_encoder_layers
    from xray_train.private_api import uncompile

    torch._dynamo.reset()
    for layer in vision_encoder_layers(model):
        uncompile(layer)
    mode = "max-autotune-no-cudagraphs" if name.endswith("autotune") else None
    forward = lambda px: pooled_vision_features(model, px, attention=attention)  # noqa: E731
    if name.startswith("tower"):
        return torch.compile(forward, mode=mode)
    compile_vision_layers(model, mode=mode)
    return forward


def kernel_profile(fn, pixels, repeats: int = 3) -> dict:
    """GPU time per batch by kernel group, and the top kernels (CUDA activity only)."""
    import torch

    fn(pixels)
    _sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn(pixels)
        _sync()
    groups: dict[str, float] = {}
    top = []
    for event in prof.key_averages():
        us = event.self_device_time_total / repeats
        if us <= 0:
            continue
        name = event.key
        low = name.lower()
        group = ("attention" if any(t in low for t in ("sdpa", "attention", "flash", "fmha")) else
                 "matmul" if any(t in low for t in ("nvjet", "gemm", "sm90_xmma", "cutlass", "mm_")) else
                 "other")
        groups[group] = groups.get(group, 0.0) + us
        top.append((us, name[:90], event.count // repeats))
    top.sort(reverse=True)
    return {"ms_per_batch": {k: round(v / 1e3, 2) for k, v in groups.items()},
            "top": [{"ms": round(us / 1e3, 3), "calls": calls, "kernel": name} for us, name, calls in top[:15]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vision_speed.json")
    ap.add_argument("--batches", default="32,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer tower at 112 px on the CPU: a shake-out")
    ap.add_argument("--backends", default="default,flash,cudnn,efficient", help="eager SDPA backends to time")
    ap.add_argument("--variants", default="", help="comma-separated: autotune, tower, tower_autotune")
    ap.add_argument("--profile-batch", type=int, default=0, help="profile the compiled forward at this batch")
    ap.add_argument("--head-dims", default="",
                    help="also time attention alone at these head sizes, e.g. 64,72,96,128: a kernel that rounds the "
                    "head size up runs as slowly at 72 as at its tile")
    ap.add_argument("--attention-only", action="store_true", help="stop after the attention-only timings")
    args = ap.parse_args()

    import torch

    from xray_train.features import pooled_vision_features, vision_attention

    device = "cpu" if args.tiny else "cuda"
    model = vision_model(args.tiny, device)
    v = model.config.vision_config
    tokens, heads = (v.image_size // v.patch_size) ** 2, v.num_attention_heads
    report = {"device": device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "tower": {"layers": v.num_hidden_layers, "width": v.hidden_size, "heads": heads,
                        "head_dim": v.hidden_size // heads, "patches": tokens},
              "attention_only": {}, "films_per_s": {}, "max_abs_diff": {}}
    batches = [int(b) for b in args.batches.split(",")]
    pixels = {b: torch.rand(b, 3, v.image_size, v.image_size, device=device, dtype=torch.bfloat16) * 2 - 1
              for b in batches}
    head_dim = v.hidden_size // heads
    for b in batches:
        report["attention_only"][str(b)] = attention_only(b, heads, tokens, head_dim, device)
        for dim in filter(None, args.head_dims.split(",")):
            report["attention_only"][f"{b}_head_dim_{dim}"] = attention_only(b, heads, tokens, int(dim), device,
                                                                             scale=head_dim**-0.5)
    if args.attention_only:
        write_json(args.out, report)
        print(json.dumps(report["attention_only"], indent=1))
        return
    reference = {}

    def record(key: str, b: int, seconds: float, out) -> None:
        report["films_per_s"][key] = round(b / seconds, 1)
        report["max_abs_diff"][key] = float((out.float() - reference[b].float()).abs().max())

    def compile_and_time(name: str, forward, key: str) -> None:
        """The first call compiles (``compile_s[name]``); then every batch is timed as ``<key>_b<batch>``."""
        started = time.perf_counter()
        forward(pixels[batches[0]])
        _sync()
        report["compile_s"][name] = round(time.perf_counter() - started, 1)
        for b in batches:
            record(f"{key}_b{b}", b, *_timed(forward, pixels[b], args.repeats))
        print(json.dumps(report["films_per_s"]), flush=True)

    for name in args.backends.split(","):
        for b in batches:
            key = f"eager_{name}_b{b}"
            try:
                with vision_attention(name, only=name != "default"):
                    seconds, out = _timed(lambda px: pooled_vision_features(model, px), pixels[b], args.repeats)
            except RuntimeError as exc:
                report["films_per_s"][key] = {"error": str(exc).splitlines()[0][:200]}
                continue
            reference.setdefault(b, out)
            record(key, b, seconds, out)
        print(json.dumps(report["films_per_s"]), flush=True)
    # Inductor picks the SDPA kernel when it compiles: each compiled variant compiles afresh, inside its context.
    best = max(("flash", "cudnn", "efficient"),
               key=lambda n: report["films_per_s"].get(f"eager_{n}_b{batches[0]}") if isinstance(
                   report["films_per_s"].get(f"eager_{n}_b{batches[0]}"), float) else 0.0)
    report["compile_s"] = {}
    for name in ("default", best):
        compile_and_time(name, compiled_variant(model, "layers", attention=name), f"compiled_{name}")
    for name in filter(None, args.variants.split(",")):
        compile_and_time(name, compiled_variant(model, name), name)
    if args.profile_batch:
        fn = compiled_variant(model, "layers")
        px = torch.rand(args.profile_batch, 3, v.image_size, v.image_size, device=device, dtype=torch.bfloat16)
        report["profile"] = {f"compiled_default_b{args.profile_batch}": kernel_profile(fn, px * 2 - 1)}
        print(json.dumps(report["profile"], indent=1), flush=True)
    report["mean_abs_value"] = float(reference[batches[0]].float().abs().mean())
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
