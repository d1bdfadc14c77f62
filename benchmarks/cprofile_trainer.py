"""cProfile the Trainer-driven xray-train step at MedGemma-4B scale (where does host time go?)."""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402

work = Path("/dev/shm/xray-bench")
os.environ.setdefault("XRAY_TRAIN_FEATURE_CACHE", str(work / "features"))
base = bt.build_random_medgemma(work / "medgemma-4b-random")
processor, encoder, items = bt.make_samples(base, work / "padchest", 32, "report")
batch = int(os.environ.get("BATCH", 16))
prof = cProfile.Profile()
prof.enable()
sec = bt.run_xray(base, processor, encoder, items, batch, 8, work, use_liger=True)
prof.disable()
print(f"sec/step {sec:.3f} samples/s {batch / sec:.2f}")
stats = pstats.Stats(prof)
stats.sort_stats("cumulative").print_stats(45)
stats.sort_stats("tottime").print_stats(20)
