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
    defaults = [r for r in final if (r["run"], r["name"]) in CURRENT_DEFAULT_ROWS]
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
            "phase1_defaults": [r for r in defaults if r["phase"] == "phase1"],
            "meets_10x_within_24gb": any(
                (r.get("speedup_vs_seed") or 0) >= TARGET_X_SEED and r["peak_mem_gb"] <= TARGET_GB
                for r in defaults
                if r["phase"] == "phase1"
            ),
            "best_phase1_within_24gb": max(
                (r for r in final if r["phase"] == "phase1" and r.get("samples_per_s") and r["peak_mem_gb"] <= TARGET_GB
                 and r["name"].startswith("xray-train")),
                key=lambda r: r["samples_per_s"],
                default=None,
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
FINAL_RUNS = ["run10"]
#: Rows of FINAL_RUNS whose settings are today's defaults (Phase 1: 7 of 34 layers checkpointed).
CURRENT_DEFAULT_ROWS = {("run10", "xray-train, checkpoint_layers=7")}

NOTES = [
    "Reading the table (one H200 per run; speed-ups only against the same run's seed row):",
    "- **Current defaults** (run10: batch 16, compiled decoder layers, in-graph NF4 dequantisation, 7 of 34",
    "  layers checkpointed in Phase 1, 256-row LM-head chunks): 62.5 samples/s at 23.2 GB = 9.4x the seed",
    "  recipe of the same run (6.65 samples/s, 22.9 GB) and 8.7x TRL SFTTrainer (7.2, the best peer; target",
    "  1.5x). **The 10x-within-24-GB target is not met**: the best under 24 GB is 6 checkpointed layers,",
    "  63.2 samples/s at 23.8 GB (9.5x); no checkpointing runs 63.9 at 27.5 GB (9.6x) in the same run.",
    "- Phase 2 (trainable projector and <loc> rows) with 7 checkpointed layers: 56.3 samples/s (8.5x; target",
    "  5x) at 25.3 GB, so Phase 2 keeps 12 checkpointed layers by default (~0.65 GB less per layer at batch",
    "  16: about 22 GB; 23.9 GB in run6, measured before the 256-row head chunks saved ~2.4 GB).",
    "- Session 3 levers: `training.head_chunk_rows` 1024 -> 256 cut the peak by 2.4 GB (22.45 -> 20.03 GB",
    "  with 12 layers checkpointed, run8/run10) at equal speed; `training.dequantize_in_graph` +6.6 % (58.6 ->",
    "  62.5 with 7 layers, run10) at the same peak. Its first version (run9) let the compiler keep every bf16",
    "  weight for backward (+4-5 GB); the dequantisation is now a checkpointed region, recomputed in backward.",
    "- The seed recipe itself ran 5.99-6.65 samples/s across runs 4-10 (11 %), and xray-train rows move as",
    "  much: run8's window (steps 3..10) was too short (identical settings 44.5 and 63.1); from run9 on the",
    "  window is steps 9..30.",
    "- Why it stops near 10x: at batch 12 the GPU was busy 160 ms of a 214 ms step (`profile_step.py`, run5):",
    "  matmuls run at ~730 TFLOP/s; the rest is host time that the GPU cannot hide (bitsandbytes' Python ops,",
    "  now replaced by in-graph dequantisation, and ~1200 Triton launches a step). Session 2 removed every",
    "  host-device synchronisation inside a step (`tests/gpu/test_no_sync.py`, passing on an H200 in",
    "  session 3). Next levers not tried: CUDA graphs for the compiled layers, recomputable LoRA dropout",
    "  (its masks and inputs are ~16 % of the saved activations).",
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
