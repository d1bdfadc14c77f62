"""Training as on a 16 GB T4 or a 24 GB card, emulated on a big GPU: both phases under a memory cap, fp16.

Run on one GPU (weights are random; nothing is downloaded):

    python benchmarks/bench_small_gpu.py --out benchmarks/results/small_gpu.json
    python benchmarks/bench_small_gpu.py --memory-model --out benchmarks/results/memory_model.json

Each xray-train row runs what a user's default config would run on that card: the row sets only the two
switches the resolver reads (``XRAY_TRAIN_EMULATE_NO_BF16=1`` behaves as a GPU without native bf16;
``XRAY_TRAIN_MEMORY_CAP_GB`` caps this process with ``torch.cuda.set_per_process_memory_fraction`` and
plans for it), then ``resolve`` picks precision, micro-batch, accumulation and checkpointing depth, and
the row trains through the project's path (``build_training_model`` + ``XrayTrainer`` + the
vision-feature cache) on MedGemma-4B's architecture with random weights, on bench_train.py's samples
(426 tokens: 256 image tokens, 120 supervised). The seed recipe (bench_train.py's ``run_seed``) is
forced to fp16 under the same cap, at the largest of 4, 2, 1 that does not run out of memory.

Steps 1..3 are warm-up (compiles); ``samples_per_s`` is over steps 4..N. Every row starts with an empty
vision-feature cache that its steps fill, so each step runs SigLIP on its images as a first epoch does;
the images are bench_train.py's synthetic films, not PadChest-size ones, so decoding full-size 16-bit
films (benchmarks/bench_e2e.py) is not part of these numbers: a diagnostic of the training step on the
emulated card. ``peak_mem_gb`` is ``torch.cuda.max_memory_reserved`` (what
the cap limits; allocated is beside it). ``compiles_after_step_3`` counts torch.compile graphs made after
step 3; ``non_finite_steps`` the logged steps whose loss was inf or NaN.

``--memory-model`` instead measures the peaks that ``xray_train.memory.MEMORY_MODEL`` is fit to: per
phase and precision, a few micro-batches and checkpointing depths, three steps each, and writes the
least-squares fit of ``peak = fixed + batch * (per_sample + kept_layers * per_sample_per_layer)``.

``--tiny`` runs the same code on the tiny test model on CPU (a shake-out, not a measurement).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_train import StepTimer, make_samples, run_seed, versions  # noqa: E402

SWITCHES = ("XRAY_TRAIN_EMULATE_NO_BF16", "XRAY_TRAIN_MEMORY_CAP_GB")
WARMUP = 3


def set_switches(emulate: bool, cap_gb: float | None) -> None:
    """What a user's environment would say; uncapped rows give the whole GPU back first."""
    for name in SWITCHES:
        os.environ.pop(name, None)
    if emulate:
        os.environ["XRAY_TRAIN_EMULATE_NO_BF16"] = "1"
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(1.0)
    if cap_gb is not None:
        os.environ["XRAY_TRAIN_MEMORY_CAP_GB"] = str(cap_gb)
        if torch.cuda.is_available():  # the seed recipe does not resolve: cap it here too
            total = torch.cuda.get_device_properties(0).total_memory / 1e9
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb / total))


def fresh() -> None:
    import torch._dynamo

    gc.collect()
    torch._dynamo.reset()  # each row compiles afresh: nothing carries over from an earlier row's shapes
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peaks() -> dict:
    if not torch.cuda.is_available():
        return {"peak_mem_gb": None, "peak_allocated_gb": None}
    return {"peak_mem_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2),
            "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}


class StepWatch:
    """Compiles made after each step and logged losses that are not finite (a TrainerCallback)."""

    def __init__(self):
        from transformers import TrainerCallback

        from xray_train.train import compile_count

        watch = self
        self.compiles: dict[int, int] = {}
        self.non_finite = 0
        self.losses: list[float] = []

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                watch.compiles[state.global_step] = compile_count()

            def on_log(self, args, state, control, logs=None, **kwargs):
                loss = (logs or {}).get("loss")
                if isinstance(loss, (int, float)):
                    watch.losses.append(float(loss))
                    watch.non_finite += not math.isfinite(loss)

        self.callback = _CB()

    def compiles_after(self, step: int) -> int | None:
        if step not in self.compiles:
            return None
        return self.compiles[max(self.compiles)] - self.compiles[step]


def row_config(base: Path, items, phase: str, workdir: Path, training: dict):
    from xray_train.config import RunConfig

    dataset = "padchest" if phase == "phase1" else "indiana"
    image_root = Path(items[0].example.image_path).parents[1]
    extra = {"csv": str(image_root / "x.csv")} if dataset == "padchest" else {}
    return RunConfig.model_validate({
        "phase": phase,
        "output_dir": str(workdir / f"{phase}-{time.time_ns()}"),
        # A CPU shake-out (--tiny) runs float32: without autocast a bf16 base meets the float32 trainable rows.
        "model": {"base": str(base), **({} if torch.cuda.is_available() else {"compute_dtype": "float32"})},
        "data": {"dataset": dataset, "image_root": str(image_root), **extra},
        "training": {"logging_steps": 1, "save_steps": 10_000, "report_to": ["none"], "group_by_length": False,
                     "eval_strategy": "no", **training},
    })


def build(cfg, items, workdir: Path):
    """The project's training path for ``cfg`` (resolved): the model, and a maker of trainers.

    Every trainer gets a fresh, empty vision-feature cache that its steps fill (the default), so each row
    and each memory point runs SigLIP in its steps as a user's first epoch does, whatever ran before it.
    """
    from xray_train.collate import Collator, PromptEncoder
    from xray_train.features import CacheFill
    from xray_train.model import build_training_model
    from xray_train.train import PreparedData, build_datasets, training_arguments
    from xray_train.trainer import XrayTrainer

    model, proc = build_training_model(cfg)
    encoder = PromptEncoder(proc, cfg.system_prompt)

    def trainer(callbacks, steps, batch=None):
        os.environ["XRAY_TRAIN_FEATURE_CACHE"] = str(workdir / f"features-{time.time_ns()}")
        train_set, _ = build_datasets(cfg, model, proc, PreparedData(items, []))
        args = training_arguments(cfg, has_eval=False)
        args.disable_tqdm = True
        args.dataloader_drop_last = True  # a smaller last batch would recompile inside the timed steps
        args.max_steps = steps
        args.per_device_train_batch_size = batch or cfg.training.per_device_train_batch_size
        # As train.run wires it: the steps fill the vision-feature cache during the first epoch.
        fill = train_set.feature_cache if isinstance(train_set.feature_cache, CacheFill) else None
        rows_here = (train_set.feature_cache is not None and cfg.training.dataloader_num_workers > 0
                     and train_set.reads_images())
        return XrayTrainer(
            model=model, args=args, train_dataset=train_set,
            data_collator=Collator(encoder.ids, gather_features=not rows_here), lengths=None,
            targets_only=cfg.training.loss_on_targets_only, head_chunk_rows=cfg.training.head_chunk_rows,
            head_grad_in_forward=cfg.training.head_grad_in_forward, feature_fill=fill,
            feature_rows_from=train_set.feature_cache if rows_here else None, pixel_loader=train_set.pixel_loader,
            callbacks=callbacks,
        )

    return model, trainer


def precision_name(cfg) -> str:
    t = cfg.training
    return "fp16" if t.fp16 else "bf16" if t.bf16 else cfg.model.compute_dtype


def xray_row(name, base, items, phase, workdir, steps, emulate, cap_gb) -> dict:
    """One row: the defaults a user's config gets on this (emulated) card."""
    from xray_train.memory import DECODER_LAYERS, peak_gb
    from xray_train.resolve import resolve

    set_switches(emulate, cap_gb)
    fresh()
    row = {"name": name, "phase": phase, "memory_cap_gb": cap_gb, "emulate_no_bf16": emulate}
    started = time.perf_counter()
    try:
        cfg = resolve(row_config(base, items, phase, workdir, {}))
        t = cfg.training
        layers = t.checkpoint_layers if t.gradient_checkpointing else 0
        row.update(precision=precision_name(cfg), batch=t.per_device_train_batch_size,
                   accumulation=t.gradient_accumulation_steps,
                   checkpoint_layers=DECODER_LAYERS if layers == "all" else layers, torch_compile=t.torch_compile)
        row["model_peak_gb"] = round(peak_gb(phase, row["batch"], row["checkpoint_layers"]), 2)
        model, make_trainer = build(cfg, items, workdir)
        timer, watch = StepTimer(WARMUP), StepWatch()
        make_trainer([timer.callback, watch.callback], steps).train()
        per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
        row.update(samples_per_s=round(per_step / timer.seconds_per_step(), 3), **peaks(),
                   non_finite_steps=watch.non_finite, compiles_after_step_3=watch.compiles_after(WARMUP),
                   first_loss=watch.losses[0] if watch.losses else None,
                   last_loss=watch.losses[-1] if watch.losses else None)
        del model, make_trainer
    except torch.cuda.OutOfMemoryError:
        row.update(samples_per_s=None, error="CUDA out of memory", **peaks())
    except Exception as exc:  # a failing row must not lose the others
        row.update(samples_per_s=None, error=f"{type(exc).__name__}: {str(exc)[:400]}", **peaks())
        traceback.print_exc()
    row["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(row), flush=True)
    return row


def seed_row(base, processor, encoder, items, workdir, steps, cap_gb) -> dict:
    """The seed recipe forced to fp16 under the cap, at the largest batch of 4, 2, 1 that fits."""
    set_switches(False, cap_gb)
    row = {"name": "seed recipe forced to fp16", "phase": "phase1", "memory_cap_gb": cap_gb, "precision": "fp16",
           "accumulation": 1, "checkpoint_layers": 34}  # the seed checkpoints every layer (HF's flag)
    for batch in (4, 2, 1):  # batch 8 peaks near 23 GB in bf16 (train_speed.json)
        fresh()
        started = time.perf_counter()
        try:
            per_step = run_seed(base, processor, encoder, items, batch, steps, workdir, precision="fp16")
            row.update(batch=batch, samples_per_s=round(batch / per_step, 3), **peaks(), non_finite_steps=None,
                       wall_s=round(time.perf_counter() - started, 1))
            break
        except torch.cuda.OutOfMemoryError:
            row.setdefault("out_of_memory_at", []).append(batch)
            gc.collect()
    else:
        row.update(samples_per_s=None, error="CUDA out of memory at every batch")
    print(json.dumps(row), flush=True)
    return row


def run_benchmark(args, base, processor, encoder, items, work) -> dict:
    rows = []

    class _Rows(list):
        def append(self, row):  # what was measured survives a run cut short by a time limit
            super().append(row)
            args.partial.write_text(json.dumps({"rows_so_far": list(self)}, indent=2) + "\n")

    rows = _Rows()
    cap_small, cap_mid = args.caps
    if "seed" in args.rows:
        rows.append(seed_row(base, processor, encoder, items, work, args.seed_steps, cap_small))
    for phase in ("phase1", "phase2"):
        if f"{phase}@{cap_small:g}" in args.rows:
            rows.append(xray_row(f"xray-train {phase} defaults, no bf16, {cap_small:g} GB", base, items, phase, work,
                                 args.steps, True, cap_small))
    for phase in ("phase1", "phase2"):
        if f"{phase}@{cap_mid:g}" in args.rows:
            rows.append(xray_row(f"xray-train {phase} defaults, {cap_mid:g} GB", base, items, phase, work, args.steps,
                                 False, cap_mid))
        if f"{phase}@full" in args.rows:
            rows.append(xray_row(f"xray-train {phase} defaults, uncapped", base, items, phase, work, args.steps,
                                 False, None))
    return {"rows": list(rows), "targets": targets_of(rows, cap_small, cap_mid)}


def targets_of(rows: list[dict], cap_small: float, cap_mid: float) -> dict:
    """Each target of the issue, per phase, from the rows; a row that failed (out of memory) misses all of its."""
    seed = next((r["samples_per_s"] for r in rows if r["name"].startswith("seed") and r.get("samples_per_s")), None)
    targets = {}
    for r in rows:
        if r["name"].startswith("seed"):
            continue
        sps = r.get("samples_per_s")
        if seed and sps:
            r["speedup_vs_seed_fp16"] = round(sps / seed, 2)
        if r["memory_cap_gb"] == cap_small:
            targets[f"{r['phase']}@{cap_small:g}GB"] = {
                "ran": bool(sps), **({"error": r["error"]} if r.get("error") else {}),
                "peak_le_cap": bool(sps) and r["peak_mem_gb"] <= cap_small,
                "no_non_finite_loss": bool(sps) and r["non_finite_steps"] == 0,
                "no_compile_after_step_3": bool(sps) and r["compiles_after_step_3"] == 0,
                "at_least_5x_seed_fp16": bool(seed and sps) and sps >= 5 * seed,
            }
        if r["memory_cap_gb"] == cap_mid:
            full = next((u["samples_per_s"] for u in rows if u["phase"] == r["phase"] and u["memory_cap_gb"] is None
                         and u.get("samples_per_s")), None)
            if full and sps:
                r["share_of_uncapped"] = round(sps / full, 3)
            targets[f"{r['phase']}@{cap_mid:g}GB"] = {
                "ran": bool(sps), "at_least_90pct_of_uncapped": bool(full and sps) and sps / full >= 0.9}
    return targets


# ---------------------------------------------------------------------------------------------
# --memory-model


def measure_memory(args, base, items, work) -> dict:
    """Peaks at a few (batch, depth) points per phase and precision, one model load each, three steps each."""
    from xray_train.memory import DECODER_LAYERS
    from xray_train.model import keep_activations_except

    points = [tuple(int(v) for v in p.split("x")) for p in args.points.split(",")]
    rows = []
    for precision in args.precisions.split(","):
        for phase in ("phase1", "phase2"):
            set_switches(precision == "fp16", None)
            fresh()
            first_batch, first_depth = points[0]
            from xray_train.resolve import resolve

            cfg = resolve(row_config(base, items, phase, work, {
                "per_device_train_batch_size": first_batch, "gradient_accumulation_steps": 1,
                "gradient_checkpointing": True, "checkpoint_layers": "all"}))
            try:
                model, make_trainer = build(cfg, items, work)
            except Exception as exc:  # noqa: BLE001
                rows.append({"phase": phase, "precision": precision, "error": f"{type(exc).__name__}: {exc}"[:400]})
                traceback.print_exc()
                continue
            for batch, depth in points:
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                keep_activations_except(model, depth)
                row = {"phase": phase, "precision": precision_name(cfg), "batch": batch, "checkpoint_layers": depth,
                       "kept_layers": DECODER_LAYERS - depth}
                started = time.perf_counter()
                try:
                    trainer = make_trainer([], args.memory_steps, batch)
                    trainer.train()
                    row.update(peaks())
                    del trainer
                except torch.cuda.OutOfMemoryError:
                    row.update(error="CUDA out of memory", **peaks())
                except Exception as exc:  # noqa: BLE001
                    row.update(error=f"{type(exc).__name__}: {str(exc)[:300]}")
                    traceback.print_exc()
                row["wall_s"] = round(time.perf_counter() - started, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.partial:  # what was measured survives a run cut short by a time limit
                    args.partial.write_text(json.dumps({"rows_so_far": rows}, indent=2) + "\n")
            del model, make_trainer
    return {"rows": rows, "fit": fit_memory_model(rows)}


def fit_memory_model(rows: list[dict]) -> dict:
    """Least squares of peak = fixed + batch * per_sample + batch * kept * per_sample_per_layer, per phase
    (all precisions together), with the largest error of the fit on its own points."""
    fits = {}
    for phase in sorted({r["phase"] for r in rows}):
        pts = [r for r in rows if r["phase"] == phase and r.get("peak_mem_gb") and "error" not in r]
        if len(pts) < 3:
            continue
        a = torch.tensor([[1.0, r["batch"], r["batch"] * r["kept_layers"]] for r in pts], dtype=torch.float64)
        y = torch.tensor([r["peak_mem_gb"] for r in pts], dtype=torch.float64)
        coef = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1)
        err = (a @ coef - y)
        fits[phase] = {"fixed": round(coef[0].item(), 3), "per_sample": round(coef[1].item(), 4),
                       "per_sample_per_layer": round(coef[2].item(), 5),
                       "largest_under_estimate_gb": round(max(0.0, -err.min().item()), 3), "points": len(pts)}
    return fits


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "small_gpu.json")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("BENCH_WORKDIR", "/dev/shm/xray-bench")))
    parser.add_argument("--caps", type=float, nargs=2, default=[15.0, 22.0], metavar=("SMALL", "MID"))
    parser.add_argument("--rows", default="seed,phase1@15,phase2@15,phase1@22,phase1@full,phase2@22,phase2@full")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed-steps", type=int, default=8)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--memory-model", action="store_true")
    parser.add_argument("--points", default="16x34,8x34,16x24,16x14", help="BATCHxCHECKPOINTED,... (--memory-model)")
    parser.add_argument("--precisions", default="fp16,bf16")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the tiny test model on CPU (shake-out)")
    args = parser.parse_args()
    args.partial = args.out.with_suffix(".partial.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XRAY_TRAIN_FEATURE_CACHE", str(args.workdir / "features"))
    t0 = time.time()
    if args.tiny:
        from xray_train.testing.tiny import make_tiny_model

        base = args.workdir / "tiny-medgemma"
        if not (base / "config.json").is_file():
            make_tiny_model(base)
        torch.cuda.synchronize = lambda *a, **k: None  # StepTimer's synchronisation, on a CPU
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_small_gpu.py needs a CUDA GPU (or --tiny)")
        from medgemma_arch import build_random_medgemma

        base = build_random_medgemma(args.workdir / "medgemma-4b-random")
    processor, encoder, items = make_samples(base, args.workdir / "padchest", args.images, "report")
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    if args.memory_model:
        body = measure_memory(args, base, items, work)
    else:
        body = run_benchmark(args, base, processor, encoder, items, work)
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (--tiny shake-out)",
        "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
        if torch.cuda.is_available() else None,
        "model": "tiny test model" if args.tiny else "MedGemma-4B architecture, random weights, NF4",
        "sample": {"sequence_tokens": len(items[0].input_ids), "image_tokens": 256 if not args.tiny else None},
        "timed_steps": f"{WARMUP + 1}..{args.steps}" if not args.memory_model else None,
        "versions": versions(),
        **body,
        "wall_s": round(time.time() - t0, 1),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report.get("targets", report.get("fit")), indent=2))


if __name__ == "__main__":
    main()
