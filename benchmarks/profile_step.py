"""Where a steady-state xray-train step spends its time at MedGemma-4B scale (GPU). Prints; writes no file.

Two views of the same question:

- the default: the Trainer's steps as ``bench_train.py`` runs them. Prints the wall time per step, the GPU's
  busy time per step (sum of CUDA kernel time, CUPTI only: no CPU tracing that would itself slow the
  host) and a cProfile of the host side of the timed steps. A step whose GPU busy time is well below its
  wall time is bound by the host (Python and kernel launches). ``--gaps 1`` attributes each GPU idle gap
  to the host op that launched the kernel after it.
- ``--parts``: the step taken apart outside the Trainer: DataLoader fetch, forward without gradients,
  forward + backward, the optimizer step (eval and train mode), a step on a fresh batch, then one step
  under the profiler (host and GPU self time, the top ops). ``--compile 1`` compiles the decoder layers.

    python benchmarks/profile_step.py --batch 12 [--set gradient_checkpointing=true ...]
    python benchmarks/profile_step.py --parts --batch 16 [--compile 1]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import os
import pstats
import time
from pathlib import Path

import torch

import bench_train as bt  # also puts the checkout's src/ first on the path (common.py)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm/xray-bench"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--set", action="append", default=[], help="training lever key=value")
    p.add_argument("--host", type=int, default=1, help="0: no cProfile (it slows the host and so the step)")
    p.add_argument("--rows", type=int, default=12, help="kernel table rows")
    p.add_argument("--gaps", type=int, default=0,
                   help="1: also record host ops and attribute each GPU idle gap to the host op that launched "
                        "the kernel after it (slows the host a little: the busy share reads low)")
    p.add_argument("--parts", action="store_true", help="time the step's parts outside the Trainer instead")
    p.add_argument("--compile", type=int, default=0, help="--parts: 1 compiles the decoder layers")
    args = p.parse_args()
    if args.parts:
        parts(args)
        return
    os.environ.setdefault("XRAY_TRAIN_FEATURE_CACHE", str(args.workdir / "features"))
    base = bt.build_random_medgemma(args.workdir / "medgemma-4b-random")
    processor, encoder, items = bt.make_samples(base, args.workdir / "padchest", 96, "report")
    levers = bt.parse_xray_row(f"phase1:{args.batch}:{','.join(args.set)}")[2]

    from transformers import Trainer, TrainerCallback

    activities = [torch.profiler.ProfilerActivity.CUDA]
    if args.gaps:
        activities.append(torch.profiler.ProfilerActivity.CPU)
    prof = torch.profiler.profile(activities=activities)
    host = cProfile.Profile()
    marks: list[float] = []

    class ProfileTimedSteps(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step == args.warmup:
                torch.cuda.synchronize()
                marks.append(time.perf_counter())
                prof.start()
                if args.host:
                    host.enable()
            elif state.global_step == args.steps:
                if args.host:
                    host.disable()
                torch.cuda.synchronize()
                marks.append(time.perf_counter())
                prof.stop()

    real_init = Trainer.__init__

    def init(self, *a, **k):
        k["callbacks"] = list(k.get("callbacks") or []) + [ProfileTimedSteps()]
        real_init(self, *a, **k)

    Trainer.__init__ = init
    bt.run_xray(base, processor, encoder, items, args.batch, args.steps, args.workdir, **levers)
    n = args.steps - args.warmup
    wall = (marks[1] - marks[0]) / n
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6 / n
    print(f"batch {args.batch} {levers}: wall {wall * 1000:.1f} ms/step, GPU busy {busy * 1000:.1f} ms/step "
          f"({100 * busy / wall:.0f} %), {args.batch / wall:.1f} samples/s"
          f"{' (under cProfile)' if args.host else ''}, peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    if args.gaps:
        trace = args.workdir / "trace.json"
        prof.export_chrome_trace(str(trace))
        print_gaps(json.loads(trace.read_text()), n)
    if not args.host:
        return
    out = io.StringIO()
    pstats.Stats(host, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue()[:6000])


def print_gaps(trace: dict, n_steps: int, min_us: float = 5.0, top: int = 25) -> None:
    """GPU idle time between kernels, summed by the host ops running when the next kernel was launched.

    A gap whose next kernel was launched after the previous one ended is the host's fault (the GPU ran
    dry); one whose kernel was queued in time is a dependency (a copy, an event). Labels are the
    outermost and innermost profiler ranges on the launching thread.
    """
    events = trace["traceEvents"]
    device = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and "args" in e}
    ranges = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and e.get("ph") == "X"]
    by_tid: dict = {}
    for e in ranges:
        by_tid.setdefault(e["tid"], []).append(e)
    gaps = []  # (gap_us, launch_ts, tid, host_late)
    for prev, nxt in itertools.pairwise(device):
        gap = nxt["ts"] - (prev["ts"] + prev.get("dur", 0))
        if gap < min_us:
            continue
        launch = launches.get(nxt.get("args", {}).get("correlation"))
        if launch is None:
            gaps.append((gap, None, None, None))
            continue
        late = launch["ts"] > prev["ts"] + prev.get("dur", 0)
        gaps.append((gap, launch["ts"], launch["tid"], late))
    labels: dict[str, list[float]] = {}
    for tid, evs in by_tid.items():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        queries = sorted((g for g in gaps if g[2] == tid), key=lambda g: g[1])
        stack: list[dict] = []
        i = 0
        for gap, ts, _, late in queries:
            while i < len(evs) and evs[i]["ts"] <= ts:
                while stack and stack[-1]["ts"] + stack[-1].get("dur", 0) < evs[i]["ts"]:
                    stack.pop()
                stack.append(evs[i])
                i += 1
            active = [e for e in stack if e["ts"] + e.get("dur", 0) >= ts]
            names = [e["name"] for e in active]
            label = " > ".join(dict.fromkeys([names[0][:60], *[x[:60] for x in names[-2:]]])) if names else "?"
            key = f"{'host-late' if late else 'queued'} | {label}"
            labels.setdefault(key, []).append(gap)
    unattributed = sum(g[0] for g in gaps if g[1] is None)
    total = sum(g[0] for g in gaps)
    print(f"GPU idle in gaps >= {min_us} us: {total / 1000 / n_steps:.1f} ms/step over {len(gaps) / n_steps:.0f} "
          f"gaps/step ({unattributed / 1000 / n_steps:.1f} ms/step without a launch record)")
    for key, values in sorted(labels.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"{sum(values) / 1000 / n_steps:7.2f} ms/step {len(values) / n_steps:6.1f}/step  {key}")



def timed(fn, n):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def parts(args) -> None:
    """The step taken apart outside the Trainer (``--parts``)."""
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
    paths = sorted({it.example.image_path for it in items}, key=str)
    train_set, _ = build_datasets(cfg, model, proc, PreparedData(items, [], image_paths=paths))
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
