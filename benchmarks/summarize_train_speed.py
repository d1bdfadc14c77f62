"""Merge the raw runs in benchmarks/results/train_speed_runs/ into train_speed.json and train_speed.md.

    python benchmarks/summarize_train_speed.py

Rows keep the run they came from; each run has its own seed-recipe row, and speed-ups are always taken
against the seed row of the same run (same machine, same process).
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    runs = []
    for path in sorted((RESULTS / "train_speed_runs").glob("*.json")):
        run = json.loads(path.read_text())
        run["file"] = path.name
        runs.append(run)
    rows = []
    for run in runs:
        for row in run["rows"]:
            rows.append({"run": run["file"], **row})
    headline = best_within(rows, 24.0)
    report = {
        "device": runs[0]["device"],
        "note": "All runs on one H200 machine in one lease (same process per run). Speed-ups are against the "
        "seed-recipe row of the same run. MFU counts 6 x LM params x tokens + SigLIP forward per sample "
        "(REFERENCE-style model FLOPs); with the vision path cached it can exceed what is executed.",
        "versions": runs[0]["versions"],
        "sample": runs[0]["sample"],
        "headline_phase1_within_24gb": headline,
        "rows": rows,
    }
    (RESULTS / "train_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Training speed, MedGemma-4B architecture (random weights), {report['device']}",
        "",
        "Same samples for every row: "
        f"{report['sample']['sequence_tokens']} tokens ({report['sample']['image_tokens']} image, "
        f"{report['sample']['answer_tokens']} supervised), 896-px image; 4-bit NF4 double-quant base, bf16, "
        "LoRA r=32 alpha=64 on the language model's q/v. Raw runs: `train_speed_runs/`.",
        "",
        "| run | row | phase | batch | samples/s | x seed (same run) | peak GB | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sps = r.get("samples_per_s")
        lines.append(
            f"| {r['run'].removeprefix('train_speed_').removesuffix('.json')} | {r['name']} | {r['phase']} | "
            f"{r['batch_size']} | {sps if sps is not None else 'n/a: ' + r.get('error', '')[:60]} | "
            f"{r.get('speedup_vs_seed', '-')} | {r.get('peak_mem_gb', '-')} | {r.get('mfu', '-')} |"
        )
    lines += ["", *NOTES]
    (RESULTS / "train_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


NOTES = [
    "Reading the table:",
    "- A QLoRA step at this scale is bound by host (Python + launch) overhead, not the GPU: about 0.6 s of CPU",
    "  for 0.2 s of GPU work at batch 16 (`benchmarks/step_breakdown.py`). Hence the levers that pay are",
    "  `torch.compile` of the decoder layers and larger batches; gradient checkpointing costs little speed",
    "  and cuts memory 3-5x. Liger's fused kernels add host time and were slower than compile here.",
    "- The first compiled row of each run (run1 batch 8, run2 batch 16, run3 batch 16) includes",
    "  recompilation inside the timed steps (the dataset's last, smaller batch is a new shape); the later",
    "  compiled rows of the same process reuse the compiled code and show the steady state.",
    "- Best phase-1 configuration within 24 GB: compile + checkpointing, batch 32-64: 50-56 samples/s",
    "  (7.7-8.8x the seed recipe measured in the same run, ~8x TRL), 10-13 GB. Without checkpointing",
    "  compile reaches 57.8 samples/s at batch 16 (30 GB) and 77.7 at batch 32 (52 GB, 12.3x).",
    "  Against REFERENCE.md's seed anchor (2.49 samples/s) the 24-GB figure is ~21x; against this run's",
    "  own seed measurement (6.3-6.5 samples/s with current transformers/peft) the 10x-within-24-GB target",
    "  is not met.",
    "- Unsloth: not installed on the GPU host (no network); its wheel (28.6 MB) plus bitsandbytes (43 MB)",
    "  exceed the 64 MiB per-call transfer limit, and it needs unsloth_zoo, xformers built for the host's",
    "  torch 2.11+cu130, diffusers and hf_transfer, none present. Its pins (trl<=1.15) also exclude trl 1.16.",
    "- TRL in run1 failed on a `datasets.Dataset` type check (harness bug, fixed for run2).",
]


def best_within(rows: list[dict], limit_gb: float) -> dict | None:
    fits = [r for r in rows if r.get("samples_per_s") and r["phase"] == "phase1" and not r["name"].startswith(("seed", "TRL"))
            and r.get("peak_mem_gb", 1e9) <= limit_gb]
    return max(fits, key=lambda r: r["samples_per_s"], default=None)


if __name__ == "__main__":
    main()
