"""GPU smoke: Phase 1 then Phase 2 (--resume) through the real CLI on the full MedGemma-4B architecture.

    python benchmarks/gpu_smoke.py --out benchmarks/results/gpu_smoke.json
    python benchmarks/gpu_smoke.py --as-t4 --out benchmarks/results/gpu_smoke_t4.json

``--as-t4``: the same chain with only the small-card emulation switched on (``XRAY_TRAIN_EMULATE_NO_BF16=1``,
``XRAY_TRAIN_MEMORY_CAP_GB=15``) and no setting beyond the data paths and the step counts: the shipped
configs' defaults must then choose fp16 and a memory plan that fits.

Random weights saved as a local model dir, synthetic data in the real PadChest and
Indiana layouts, shipped configs with ``--set`` overrides; records each phase's samples/s, peak GPU
memory and the files it wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, device_name, pythonpath, write_json  # noqa: E402 - also puts the checkout's src/ first on the path

from medgemma_arch import build_random_medgemma  # noqa: E402

import yaml  # noqa: E402

from xray_train.run_dir import RESOLVED_CONFIG  # noqa: E402


def cli(*args: str, env: dict) -> tuple[int, str, float]:
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "xray_train.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, time.time() - started


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_smoke.json")
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm/xray-bench"))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--as-t4", action="store_true", help="no bf16 and a 15 GB cap, as on a T4 (see the docstring)")
    args = p.parse_args()
    from xray_train.testing.synthetic import write_indiana, write_padchest

    base = build_random_medgemma(args.workdir / "medgemma-4b-random")
    pad = write_padchest(args.workdir / "smoke-padchest", n=48, seed=3)
    ind = write_indiana(args.workdir / "smoke-indiana", n=48, seed=4)
    env = dict(os.environ, PYTHONPATH=pythonpath(), XRAY_TRAIN_FEATURE_CACHE=str(args.workdir / "features"))
    emulation = {"XRAY_TRAIN_EMULATE_NO_BF16": "1", "XRAY_TRAIN_MEMORY_CAP_GB": "15"} if args.as_t4 else {}
    env |= emulation
    common = [f"model.base={base}", f"training.max_steps={args.steps}", "training.save_steps=3",
              "training.eval_steps=3", "training.logging_steps=1", "training.max_eval_samples=8",
              "training.report_to=[none]", "data.val_fraction=0.2", "data.test_fraction=0.1"]
    out1, out2 = args.workdir / "smoke" / "phase1", args.workdir / "smoke" / "phase2"
    sets = lambda items: [x for kv in items for x in ("--set", kv)]  # noqa: E731
    rows = {}
    rc, log1, t1 = cli("phase1", "--config", "configs/phase1_padchest.yaml", "--overwrite",
                       *sets(common + [f"data.csv={pad}", f"data.image_root={pad.parent / 'images'}", f"output_dir={out1}"]), env=env)
    rows["phase1"] = {"returncode": rc, "wall_s": round(t1, 1), "log_tail": log1[-1500:]}
    if rc == 0:
        rc, log2, t2 = cli("phase2", "--config", "configs/phase2_indiana.yaml", "--resume", str(out1), "--overwrite",
                           *sets(common + [f"data.reports_csv={ind['reports_csv']}", f"data.projections_csv={ind['projections_csv']}",
                                           f"data.image_root={ind['image_root']}", "data.box_source=box_file",
                                           f"data.box_file={ind['box_file']}", f"output_dir={out2}"]), env=env)
        rows["phase2"] = {"returncode": rc, "wall_s": round(t2, 1), "log_tail": log2[-1500:]}
    for name, out in (("phase1", out1), ("phase2", out2)):
        summary = out / "training_summary.json"
        if name in rows and summary.is_file():
            s = json.loads(summary.read_text())
            rows[name].update(samples_per_s=s.get("train_samples_per_s"), peak_gpu_mem_gb=s.get("peak_gpu_mem_gb"),
                              steps=s.get("global_steps"), eval_token_accuracy=s.get("metrics", {}).get("eval_token_accuracy"),
                              files=sorted(f.name for f in out.iterdir()))
        resolved = out / RESOLVED_CONFIG
        if name in rows and resolved.is_file():
            cfg = yaml.safe_load(resolved.read_text())
            t = cfg.get("training") or {}
            rows[name]["chosen"] = {"compute_dtype": (cfg.get("model") or {}).get("compute_dtype"),
                                    "residual_scale": (cfg.get("model") or {}).get("residual_scale"),
                                    **{k: t.get(k) for k in ("fp16", "bf16", "per_device_train_batch_size",
                                                            "gradient_accumulation_steps", "checkpoint_layers")}}
    report = {"device": device_name(), "model": "MedGemma-4B architecture, random weights, 4-bit NF4",
              "steps_per_phase": args.steps, "emulation": emulation or None, "phases": rows}
    write_json(args.out, report)
    for name, row in rows.items():
        print(name, {k: v for k, v in row.items() if k != "log_tail"})


if __name__ == "__main__":
    main()
