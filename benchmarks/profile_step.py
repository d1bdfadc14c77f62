"""Profile a few xray-train Phase-1 steps at MedGemma-4B scale (GPU): top CUDA kernels and step time.

    python benchmarks/profile_step.py --batch 16
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm/xray-bench"))
    p.add_argument("--liger", type=int, default=1)
    p.add_argument("--compile", type=int, default=0)
    p.add_argument("--steps", type=int, default=7)
    args = p.parse_args()
    os.environ.setdefault("XRAY_TRAIN_FEATURE_CACHE", str(args.workdir / "features"))
    base = bt.build_random_medgemma(args.workdir / "medgemma-4b-random")
    processor, encoder, items = bt.make_samples(base, args.workdir / "padchest", 32, "report")

    from transformers import TrainerCallback

    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
        with_stack=bool(int(os.environ.get("PROF_STACK", 0))),
        schedule=torch.profiler.schedule(wait=int(os.environ.get("PROF_WAIT", 3)), warmup=1, active=2, repeat=1),
    )

    class ProfCB(TrainerCallback):
        def on_train_begin(self, *a, **k):
            prof.start()

        def on_step_end(self, *a, **k):
            prof.step()

        def on_train_end(self, *a, **k):
            prof.stop()

    orig = bt.StepTimer.__init__

    def patched(self, warmup=2):
        orig(self, warmup)
        self.extra = ProfCB()

    # Reuse run_xray but with the profiler callback attached through the timer.
    from transformers import Trainer

    real_init = Trainer.__init__

    def init(self, *a, **k):
        k["callbacks"] = list(k.get("callbacks") or []) + [ProfCB()]
        real_init(self, *a, **k)

    Trainer.__init__ = init
    t = time.time()
    sec = bt.run_xray(base, processor, encoder, items, args.batch, args.steps, args.workdir,
                      use_liger=bool(args.liger), torch_compile=bool(args.compile))
    print(f"sec/step {sec:.3f}  samples/s {args.batch / sec:.2f}  wall {time.time() - t:.0f}s")
    sort = os.environ.get("PROF_SORT", "cuda_time_total")
    print(prof.key_averages(group_by_stack_n=int(os.environ.get("PROF_STACK", 0))).table(
        sort_by=sort, row_limit=int(os.environ.get("PROF_ROWS", 30)), max_name_column_width=70))


if __name__ == "__main__":
    main()
