"""Merge the raw runs in benchmarks/results/train_speed_runs/ into train_speed.json and train_speed.md.

    python benchmarks/summarize_train_speed.py

Rows keep the run they came from; each run has its own seed-recipe row where it has one, and speed-ups
are only ever taken against the seed row of the same run (same machine, same process). MFU is recomputed
for every row with one definition (``bench_train.model_flops_per_sample``), so runs recorded under an
older definition compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

TARGET_X_SEED = 10.0
TARGET_GB = 24.0


def main() -> None:
    from bench_train import PEAK_TFLOPS, model_flops_per_sample
    from medgemma_arch import parameter_counts

    runs = []
    for path in sorted((RESULTS / "train_speed_runs").glob("*.json")):
        run = json.loads(path.read_text())
        run["file"] = path.stem.removeprefix("train_speed_")
        runs.append(run)
    flops = model_flops_per_sample(parameter_counts(), runs[-1]["sample"]["sequence_tokens"])
    rows = []
    for run in runs:
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in run["device"]), None)
        for row in run["rows"]:
            sps = row.get("samples_per_s")
            mfu = round(sps * flops / (peak * 1e12), 4) if sps and peak else None
            rows.append({"run": run["file"], **row, "mfu": mfu})
    final = [r for r in rows if r["run"] in FINAL_RUNS]
    defaults = [r for r in final if r["name"].startswith("xray-train (defaults")]
    report = {
        "device": runs[-1]["device"],
        "model_flops_per_sample": flops,
        "mfu_definition": "4 x LM body params x tokens + 4 x LM head x answer tokens + attention; SigLIP excluded "
        "(frozen, cached); dense bf16 peak of the GPU",
        "versions": runs[-1]["versions"],
        "sample": runs[-1]["sample"],
        "targets": {"phase1_x_seed": TARGET_X_SEED, "peak_gb_at_default_batch": TARGET_GB,
                    "x_best_peer": 1.5, "phase2_x_seed": 5.0},
        "headline": {
            "runs": FINAL_RUNS,
            "phase1_defaults": defaults,
            "meets_10x_within_24gb": any(
                (r.get("speedup_vs_seed") or 0) >= TARGET_X_SEED and r["peak_mem_gb"] <= TARGET_GB for r in defaults
            ),
        },
        "runs": {run["file"]: {"code_state": run.get("code_state"), "timed_steps": run.get("timed_steps"),
                               "wall_s": run.get("wall_s")} for run in runs},
        "rows": rows,
    }
    (RESULTS / "train_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Training speed, MedGemma-4B architecture (random weights), {report['device']}",
        "",
        "Same samples for every row: "
        f"{report['sample']['sequence_tokens']} tokens ({report['sample']['image_tokens']} image, "
        f"{report['sample']['answer_tokens']} supervised), 896-px image; 4-bit NF4 double-quant base, bf16, "
        "LoRA r=32 alpha=64 on the language model's q/v. Raw runs: `train_speed_runs/` (each file says which code "
        "it measured). MFU: " + report["mfu_definition"] + ".",
        "",
        "| run | row | phase | batch | samples/s | x seed (same run) | peak GB | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sps = r.get("samples_per_s")
        lines.append(
            f"| {r['run']} | {r['name']} | {r['phase']} | "
            f"{r['batch_size']} | {sps if sps is not None else 'n/a: ' + r.get('error', '')[:60]} | "
            f"{r.get('speedup_vs_seed', '-') or '-'} | {r.get('peak_mem_gb', '-')} | {r.get('mfu', '-')} |"
        )
    lines += ["", *NOTES]
    (RESULTS / "train_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


#: The runs of the current code and defaults (the others are history, kept for the levers they measured).
FINAL_RUNS = ["run6", "run7"]

NOTES = [
    "Reading the table (one H200 per run; speed-ups only against the same run's seed row):",
    "- **Current defaults** (batch 16, compiled decoder layers, 12 of 34 layers checkpointed), run6/run7:",
    "  48.7, 57.7 and 55.1 samples/s at 22.45 GB peak = 8.1x / 9.0x / 8.6x the seed recipe of the same run",
    "  (6.0-6.4 samples/s, 22.9 GB); TRL SFTTrainer 6.6 samples/s (the best peer), so xray-train is 7.4x the",
    "  best peer (target 1.5x). Phase 2 with the defaults: 46.9 samples/s (7.8x; target 5x), 23.9 GB.",
    "  **The 10x-within-24-GB target is not met**: the fastest measured configurations are just outside one",
    "  of the two limits: no checkpointing at batch 16 is 62.4-64.7 samples/s (10.4-10.8x) at 29.9 GB;",
    "  8 checkpointed layers at batch 16 62.4 samples/s at 25.0 GB (run5, no seed row); batch 12 without",
    "  checkpointing 56-58 samples/s (9.6x) at 24.2 GB.",
    "- Run-to-run spread of one configuration is about 15 % (48.7 vs 57.7 for the defaults on two machines),",
    "  larger than the remaining gap; the first xray-train row of a process is the lowest more often than not.",
    "- Why it stops near 10x: at batch 12 the GPU is busy 160 ms of a 214 ms step (`profile_step.py`, run5",
    "  host profile): matmuls already run at ~730 TFLOP/s; the rest of the step is host time (each 4-bit",
    "  linear goes through bitsandbytes' Python op: ~240 dequantise+matmul calls per step, ~1200 Triton",
    "  launches) that the GPU cannot hide. What this session removed: every host-device synchronisation",
    "  inside a step (boolean-mask gathers, the NaN check, blocking batch copies, the Trainer's per-step NaN",
    "  filter; `tests/gpu/test_no_sync.py`). With them gone, compiled batch 8 runs 40 samples/s (26 eager in",
    "  run1) and batch 16 without checkpointing 62-65 samples/s (57.8 in run1).",
    "- Measured and dropped: torch's `activation_memory_budget` for the compiled layers (run4/run5) cut memory",
    "  to 11-14 GB but cost 13-22 % speed at every budget tried (0.3-0.85): it recomputes matmuls, not only",
    "  cheap ops. Liger kernels (run1) were slower than compile (more host time).",
    "- Runs 1-3 (session 1) timed with the GPU synchronised after every step and with 3-4 synchronisations",
    "  inside the step; their numbers are lower bounds for the same configuration today.",
    "- Unsloth: not installed on the GPU host (no network); its wheel (28.6 MB) plus bitsandbytes (43 MB)",
    "  exceed the 64 MiB per-call transfer limit, and it needs unsloth_zoo, xformers built for the host's",
    "  torch 2.11+cu130, diffusers and hf_transfer, none present. Its pins (trl<=1.15) also exclude trl 1.16.",
    "- TRL in run1 failed on a `datasets.Dataset` type check (harness bug, fixed for run2).",
]


if __name__ == "__main__":
    main()
