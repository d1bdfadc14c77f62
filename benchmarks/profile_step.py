"""Where a steady-state xray-train step spends its time at MedGemma-4B scale (GPU).

Prints the wall time per step, the GPU's busy time per step (sum of CUDA kernel time, CUPTI only: no
CPU tracing that would itself slow the host) and a cProfile of the host side of the timed steps. A step
whose GPU busy time is well below its wall time is bound by the host (Python and kernel launches).

    python benchmarks/profile_step.py --batch 12 [--set gradient_checkpointing=true ...]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm/xray-bench"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--set", action="append", default=[], help="training lever key=value")
    args = p.parse_args()
    os.environ.setdefault("XRAY_TRAIN_FEATURE_CACHE", str(args.workdir / "features"))
    base = bt.build_random_medgemma(args.workdir / "medgemma-4b-random")
    processor, encoder, items = bt.make_samples(base, args.workdir / "padchest", 96, "report")
    levers = bt.parse_xray_row(f"phase1:{args.batch}:{','.join(args.set)}")[2]

    from transformers import Trainer, TrainerCallback

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    host = cProfile.Profile()
    marks: list[float] = []

    class ProfileTimedSteps(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step == args.warmup:
                torch.cuda.synchronize()
                marks.append(time.perf_counter())
                prof.start()
                host.enable()
            elif state.global_step == args.steps:
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
          f"({100 * busy / wall:.0f} %), {args.batch / wall:.1f} samples/s (under cProfile)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
    out = io.StringIO()
    pstats.Stats(host, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue()[:6000])


if __name__ == "__main__":
    main()
