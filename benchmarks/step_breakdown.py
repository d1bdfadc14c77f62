"""Where does a QLoRA step's time go at MedGemma-4B scale? Data loading vs forward/backward vs optimizer.

    python benchmarks/step_breakdown.py --batch 16 [--compile 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402


def timed(fn, n):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--compile", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm/xray-bench"))
    args = p.parse_args()
    os.environ.setdefault("XRAY_TRAIN_FEATURE_CACHE", str(args.workdir / "features"))
    base = bt.build_random_medgemma(args.workdir / "medgemma-4b-random")
    processor, encoder, items = bt.make_samples(base, args.workdir / "padchest", 32, "report")

    from xray_train.collate import Collator
    from xray_train.config import RunConfig
    from xray_train.loss import targets_only_loss
    from xray_train.model import build_training_model, compile_decoder_layers
    from xray_train.resolve import resolve
    from xray_train.train import PreparedData, build_datasets

    image_root = Path(items[0].example.image_path).parents[1]
    cfg = resolve(RunConfig.model_validate({
        "phase": "phase1", "output_dir": str(args.workdir / "bd"), "model": {"base": str(base)},
        "data": {"dataset": "padchest", "image_root": str(image_root), "csv": str(image_root / "x.csv")},
        "training": {"torch_compile": False},  # --compile compiles the layers below
    }))
    model, proc = build_training_model(cfg)
    if args.compile:
        compile_decoder_layers(model)
    train_set, _ = build_datasets(cfg, model, proc, PreparedData(items, []))
    collate = Collator(encoder.ids)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch, collate_fn=collate, num_workers=2, shuffle=True)
    it = iter(loader)

    def fetch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(loader)
            return next(it)

    print(f"dataloader fetch: {timed(fetch, 6) * 1000:.1f} ms/batch")
    batch = {k: v.cuda() for k, v in fetch().items()}
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)

    def fwd():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            targets_only_loss(model, batch, cfg.training.head_chunk_rows, grad_in_forward=False)

    def fwd_bwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = targets_only_loss(model, batch, cfg.training.head_chunk_rows, cfg.training.head_grad_in_forward)
            loss = out.loss_sum / out.n_tokens
        loss.backward()

    def step():
        fwd_bwd()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name, fn in (("forward (no grad)", fwd), ("forward+backward", fwd_bwd), ("full step, eval mode", step)):
        fn(); fn()
        print(f"{name}: {timed(fn, 4) * 1000:.1f} ms")
    model.train()
    step(); step()
    print(f"full step, train mode (LoRA dropout on): {timed(step, 4) * 1000:.1f} ms")

    def loader_step():
        nonlocal batch
        batch = {k: v.cuda(non_blocking=True) for k, v in fetch().items()}
        step()

    loader_step(); loader_step()
    print(f"full step, train mode, fresh batch from DataLoader: {timed(loader_step, 4) * 1000:.1f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    cpu = sum(e.self_cpu_time_total for e in ev) / 1000
    gpu = sum(e.self_device_time_total for e in ev) / 1000
    print(f"one step: self CPU {cpu:.0f} ms, self GPU {gpu:.0f} ms")
    print(ev.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    print(f"peak {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")


if __name__ == "__main__":
    main()
