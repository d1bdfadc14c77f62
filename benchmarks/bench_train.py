"""Training speed at MedGemma-4B scale: the seed recipe, TRL, Unsloth and xray-train in one process.

Run on one GPU (weights are random; nothing is downloaded):

    python benchmarks/bench_train.py --out benchmarks/results/train_speed.json

Every row trains the full MedGemma-4B architecture loaded in 4-bit NF4 with double
quantisation and bf16 compute, LoRA r=32 alpha=64 on the language model's q_proj/v_proj (the seed recipe
also adapts SigLIP's, as it did), on the *same* samples: the Phase-1 prompt (system + task, ~45 tokens),
one 896-px image (256 soft tokens + 4 markers) and a 120-token answer. Steps 1-8 are warm-up; steps
9..30 are timed with CUDA synchronised. Peak memory is ``torch.cuda.max_memory_allocated`` from model
load to the end of the timed steps.

Rows:
- ``seed``: the published ExplainMyXray recipe: LoRA on every q_proj/v_proj,
  ``prepare_model_for_kbit_training`` + gradient checkpointing, HF forward with full logits.
- ``trl``: TRL ``SFTTrainer`` as its Gemma 3 vision example uses it (custom VLM collator,
  ``skip_prepare_dataset``, gradient checkpointing as SFTConfig defaults), with our LoRA.
- ``unsloth``: ``FastVisionModel`` when it can be imported; otherwise the exact reason is recorded.
- ``xray-train``: the project's real training path (``build_training_model`` + ``XrayTrainer`` +
  ``TrainingDataset`` + vision-feature cache + targets-only loss), with each lever switchable.

MFU counts the model FLOPs one sample's update needs, identical for every row, over the GPU's dense bf16
peak: the language model's forward and input-gradient matmuls at every token (4 x body parameters x
tokens; its weights are frozen, so no weight gradients), the LM head at the supervised tokens
(4 x head x answer tokens) and attention scores (4 x 2 x layers x heads x head_dim x tokens^2 for
forward + backward). The frozen SigLIP tower is left out: its output does not change during training (a
cached run computes it once per image). Recomputation is not counted, so MFU ratios equal speed ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from common import REPO, versions as _versions  # noqa: E402 - also puts the checkout's src/ first on the path

from medgemma_arch import build_random_medgemma, parameter_counts  # noqa: E402

ANSWER_TOKENS = 120
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def gpu_peak_tflops() -> float | None:
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def versions() -> dict:
    return _versions("transformers", "peft", "bitsandbytes", "accelerate", "trl", "unsloth")


# ---------------------------------------------------------------------------------------------
# Shared samples


def make_samples(base_dir: Path, data_dir: Path, n_images: int, task: str):
    """Real-schema synthetic PadChest images + fixed-length token sequences shared by every row."""
    from transformers import AutoProcessor

    from xray_train.collate import PromptEncoder
    from xray_train.config import data_config
    from xray_train.data.padchest import read as read_padchest
    from xray_train.testing.synthetic import write_padchest
    from xray_train.inputs import EncodedExample

    csv_path = write_padchest(data_dir, n=n_images, seed=0)
    examples = read_padchest(data_config(dataset="padchest", csv=csv_path, image_root=data_dir / "images")).examples
    processor = AutoProcessor.from_pretrained(base_dir)
    encoder = PromptEncoder(processor, "You are an expert radiologist. Describe chest X-rays accurately and concisely.")
    filler = (
        "FINDINGS:\n- cardiomegaly: cardiac\n- pleural effusion: left, costophrenic angle\n"
        "- interstitial pattern: bilateral, basal\n- aortic elongation: aortic\n"
        "LOCATIONS: cardiac, left, costophrenic angle, bilateral, basal, aortic\n"
        "IMPRESSION: cardiomegaly; pleural effusion; interstitial pattern; aortic elongation.\n"
    ) * 4
    answer_ids = encoder.tokenizer(filler, add_special_tokens=False).input_ids[: ANSWER_TOKENS - 1]
    answer_ids.append(encoder.ids.end_of_turn)
    prompt = encoder.prompt_ids(task)
    items = [
        EncodedExample(ex, prompt + answer_ids, [-100] * len(prompt) + answer_ids) for ex in examples
    ]
    return processor, encoder, items


def model_flops_per_sample(counts: dict, seq_len: int) -> float:
    body = 4 * counts["lm_body"] * seq_len
    head = 4 * counts["lm_head"] * ANSWER_TOKENS
    attention = 4 * 2 * counts["layers"] * counts["attention_width"] * seq_len**2
    return float(body + head + attention)


# xray-train rows when no --xray is given: the defaults first, then one lever changed at a time.
DEFAULT_XRAY_ROWS = [
    ("phase1", 16, {}),
    ("phase2", 16, {}),
    ("phase1", 16, {"gradient_checkpointing": False}),
    ("phase1", 16, {"dequantize_in_graph": False}),
    ("phase1", 16, {"head_chunk_rows": 1024}),
    ("phase1", 16, {"split_image_attention": False}),
    ("phase1", 16, {"head_grad_in_forward": False}),
    ("phase1", 16, {"checkpoint_layers": "all"}),
    ("phase1", 32, {"checkpoint_layers": "all"}),
    ("phase1", 16, {"torch_compile": False, "checkpoint_layers": "all"}),
    ("phase1", 16, {"loss_on_targets_only": False}),
    ("phase1", 8, {"cache_vision_features": False}),
]


def parse_xray_row(text: str):
    import yaml

    phase, batch, spec = (text.split(":", 2) + [""])[:3]
    levers = {}
    for part in filter(None, spec.split(",")):
        key, value = part.split("=", 1)
        levers[key] = yaml.safe_load(value)
    return phase, int(batch), levers


def describe_levers(phase: str, levers: dict) -> str:
    name = "xray-train" + (" Phase 2" if phase == "phase2" else "")
    if not levers:
        return f"{name} (defaults)"
    return f"{name}, " + ", ".join(f"{k}={v}" for k, v in levers.items())


class StepTimer:
    """Times optimizer steps after warm-up (a TrainerCallback).

    The GPU is synchronised only where the timed window opens and closes: a sync in every step would
    serialise the host and the GPU and hide what removing per-step synchronisation buys.
    """

    default_warmup = 2

    def __init__(self, warmup: int | None = None):
        warmup = warmup if warmup is not None else StepTimer.default_warmup
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step in (timer.warmup, state.max_steps):
                    torch.cuda.synchronize()
                    timer.stamps.append((state.global_step, time.perf_counter()))

        self.callback = _CB()
        self.warmup = warmup
        self.stamps: list[tuple[int, float]] = []

    def seconds_per_step(self) -> float:
        (first, t0), (last, t1) = self.stamps[0], self.stamps[-1]
        return (t1 - t0) / (last - first)


def training_args(out: Path, batch: int, steps: int, **extra):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-4,
        bf16=True,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=2,
        disable_tqdm=True,
        seed=0,
    )
    base.update(extra)
    return TrainingArguments(**base)


def measure(name, phase, batch, fn, results, peak_tflops, flops_per_sample, notes=""):  # noqa: PLR0913
    """Run one row; record speed, memory and MFU, or the error that stopped it."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    row = {"name": name, "phase": phase, "batch_size": batch, "notes": notes}
    try:
        sec_per_step = fn()
        sps = batch / sec_per_step
        row.update(
            samples_per_s=round(sps, 3),
            supervised_tokens_per_s=round(sps * ANSWER_TOKENS, 1),
            peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
            mfu=round(sps * flops_per_sample / (peak_tflops * 1e12), 4) if peak_tflops else None,
        )
    except torch.cuda.OutOfMemoryError:
        row.update(samples_per_s=None, error="CUDA out of memory", peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2))
    except Exception as exc:  # a failing peer must not lose the other rows
        row.update(samples_per_s=None, error=f"{type(exc).__name__}: {str(exc)[:400]}")
        traceback.print_exc()
    results.append(row)
    print(json.dumps(row), flush=True)
    if measure.checkpoint_path:  # partial results survive a run cut short by a time limit
        measure.checkpoint_path.write_text(json.dumps({"rows_so_far": results}, indent=2) + "\n")
    gc.collect()
    torch.cuda.empty_cache()


measure.checkpoint_path = None

# ---------------------------------------------------------------------------------------------
# Rows


def pixel_dataset(items, processor):
    from xray_train.features import FeatureSource
    from xray_train.inputs import PixelLoader, TrainingDataset

    return TrainingDataset(items, FeatureSource.pixels(PixelLoader(processor)))


def run_seed(base, processor, encoder, items, batch, steps, workdir, precision="bf16"):
    """The seed recipe: every q_proj/v_proj (SigLIP too), kbit prep + checkpointing, full logits.
    ``precision="fp16"``: the same recipe as a GPU without bf16 runs it (float16 weights, fp16 autocast)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig, Trainer

    from xray_train.collate import Collator

    half = torch.float16 if precision == "fp16" else torch.bfloat16
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=half)
    model = AutoModelForImageTextToText.from_pretrained(base, quantization_config=bnb, dtype=half,
                                                        device_map={"": 0}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    timer = StepTimer()
    flags = {"bf16": False, "fp16": True} if precision == "fp16" else {}
    trainer = Trainer(model=model, args=training_args(workdir / "seed", batch, steps, gradient_checkpointing=True,
                                                      **flags),
                      train_dataset=pixel_dataset(items, processor), data_collator=Collator(encoder.ids),
                      callbacks=[timer.callback])
    trainer.train()
    del trainer, model
    return timer.seconds_per_step()


def run_trl(base, processor, encoder, items, batch, steps, workdir):
    """TRL SFTTrainer, its Gemma 3 VLM example's setup, our LoRA (language-model q/v)."""
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from xray_train.collate import Collator
    from xray_train.model import target_modules_regex

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForImageTextToText.from_pretrained(base, quantization_config=bnb, dtype=torch.bfloat16,
                                                        device_map={"": 0}, attn_implementation="sdpa")
    lora = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=target_modules_regex(["q_proj", "v_proj"]),
                      task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
        bf16=True, logging_steps=1000, save_strategy="no", report_to="none", remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True}, gradient_checkpointing=True, max_length=None,
        dataloader_num_workers=2, disable_tqdm=True, seed=0,
    )
    from datasets import Dataset

    # TRL wants a `datasets.Dataset`; as in its VLM examples the collator builds each batch (here from
    # the same prepared samples every row trains on).
    samples = pixel_dataset(items, processor)
    collate = Collator(encoder.ids)
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"index": list(range(len(items)))}),
                         data_collator=lambda rows: collate([samples[r["index"]] for r in rows]),
                         peft_config=lora, processing_class=processor, callbacks=[timer.callback])
    trainer.train()
    del trainer, model
    return timer.seconds_per_step()


def unsloth_unavailable_reason() -> str | None:
    try:
        import unsloth  # noqa: F401
    except Exception as exc:  # unsloth raises more than ImportError when its stack is incomplete
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None


def run_xray(base, processor, encoder, items, batch, steps, workdir, phase="phase1", **levers):
    """The project's real path: build_training_model + XrayTrainer + TrainingDataset (+ feature cache)."""
    from xray_train.collate import Collator
    from xray_train.config import RunConfig
    from xray_train.model import build_training_model
    from xray_train.resolve import resolve
    from xray_train.train import PreparedData, build_datasets, training_arguments
    from xray_train.trainer import XrayTrainer

    import torch._dynamo

    # Each row compiles afresh: code compiled for an earlier row's batch shape (or marked dynamic by it)
    # must not carry over.
    torch._dynamo.reset()
    training = {
        "per_device_train_batch_size": batch,
        "max_steps": steps,
        "logging_steps": 1000,
        "save_steps": 10_000,
        "report_to": ["none"],
        "group_by_length": False,
        "eval_strategy": "no",
        **levers,
    }
    dataset = "padchest" if phase == "phase1" else "indiana"
    image_root = Path(items[0].example.image_path).parents[1]
    extra = {"csv": str(image_root / "x.csv")} if dataset == "padchest" else {}
    cfg = resolve(RunConfig.model_validate(
        {
            "phase": phase,
            "output_dir": str(workdir / f"xray-{phase}-{batch}-{abs(hash(json.dumps(levers, sort_keys=True)))}"),
            "model": {"base": str(base)},
            "data": {"dataset": dataset, "image_root": str(image_root), **extra},
            "training": training,
        }
    ))
    model, proc = build_training_model(cfg)
    if phase == "phase2":
        from xray_train.collate import PromptEncoder

        encoder = PromptEncoder(proc, cfg.system_prompt)
    started = time.perf_counter()
    paths = sorted({it.example.image_path for it in items}, key=str)
    train_set, _ = build_datasets(cfg, model, proc, PreparedData(items, [], image_paths=paths))
    cache_s = time.perf_counter() - started
    timer = StepTimer()
    trainer = XrayTrainer(
        model=model, args=training_arguments(cfg, has_eval=False), train_dataset=train_set,
        data_collator=Collator(encoder.ids), lengths=None, targets_only=cfg.training.loss_on_targets_only,
        head_chunk_rows=cfg.training.head_chunk_rows, head_grad_in_forward=cfg.training.head_grad_in_forward,
        callbacks=[timer.callback],
    )
    trainer.args.disable_tqdm = True
    trainer.args.dataloader_drop_last = True  # a smaller last batch would recompile inside the timed steps
    trainer.train()
    del trainer, model
    run_xray.last_cache_s = cache_s
    return timer.seconds_per_step()


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_speed.json")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("BENCH_WORKDIR", "/dev/shm/xray-bench")))
    parser.add_argument("--rows", default="seed,trl,unsloth", help="peer rows to run (seed, trl, unsloth)")
    parser.add_argument("--xray", action="append", type=parse_xray_row, metavar="PHASE:BATCH:key=value,...",
                        help="an xray-train row (repeatable), e.g. phase1:16:gradient_checkpointing=true,"
                             "checkpoint_layers=12; default: DEFAULT_XRAY_ROWS")
    parser.add_argument("--batch", type=int, default=8)
    # A window of 20+ steps after 8 untimed ones: shorter windows swung 30 % between identical rows.
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps (torch.compile compiles in them)")
    args = parser.parse_args()
    StepTimer.default_warmup = args.warmup
    measure.checkpoint_path = args.out.with_suffix(".partial.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        sys.exit("bench_train.py needs a CUDA GPU")

    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XRAY_TRAIN_FEATURE_CACHE", str(args.workdir / "features"))
    t0 = time.time()
    base = build_random_medgemma(args.workdir / "medgemma-4b-random")
    print(f"random MedGemma-4B ready in {time.time() - t0:.0f}s", flush=True)
    processor, encoder, items = make_samples(base, args.workdir / "padchest", args.images, "report")
    seq_len = len(items[0].input_ids)
    counts = parameter_counts()
    flops = model_flops_per_sample(counts, seq_len)
    peak = gpu_peak_tflops()
    rows = set(args.rows.split(","))
    results: list[dict] = []
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    b = args.batch

    if "seed" in rows:
        measure("seed recipe (HF Trainer, all q/v incl. SigLIP, kbit prep + checkpointing, full logits)", "phase1", b,
                lambda: run_seed(base, processor, encoder, items, b, args.steps, work), results, peak, flops)
    if "trl" in rows:
        measure("TRL SFTTrainer (Gemma 3 VLM recipe, checkpointing)", "phase1", b,
                lambda: run_trl(base, processor, encoder, items, b, args.steps, work), results, peak, flops)
    if "unsloth" in rows:
        reason = unsloth_unavailable_reason()
        results.append({"name": "Unsloth FastVisionModel", "phase": "phase1", "batch_size": b, "samples_per_s": None,
                        "error": reason or "importable but not run", "notes": "see not_run"})
    for phase, batch, levers in args.xray or DEFAULT_XRAY_ROWS:
        measure(describe_levers(phase, levers), phase, batch,
                lambda levers=levers, batch=batch, phase=phase: run_xray(
                    base, processor, encoder, items, batch, args.steps, work, phase=phase, **levers),
                results, peak, flops, notes=json.dumps(levers))
        if "cache_build_s" not in results[-1]:
            results[-1]["cache_build_s"] = round(getattr(run_xray, "last_cache_s", 0.0), 2)

    seed = next((r["samples_per_s"] for r in results if r["name"].startswith("seed") and r.get("samples_per_s")), None)
    for r in results:
        if seed and r.get("samples_per_s"):
            r["speedup_vs_seed"] = round(r["samples_per_s"] / seed, 2)
    report = {
        "device": torch.cuda.get_device_name(),
        "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1),
        "peak_bf16_tflops": peak,
        "versions": versions(),
        "sample": {"sequence_tokens": seq_len, "answer_tokens": ANSWER_TOKENS, "image_px": 896, "image_tokens": 256},
        "timed_steps": f"{args.warmup + 1}..{args.steps}",
        "model_flops_per_sample": flops,
        "rows": results,
        "not_run": {
            "unsloth": unsloth_unavailable_reason(),
        },
        "wall_s": round(time.time() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\n{report['device']}")
    print(f"{'row':<70} {'b':>3} {'samples/s':>9} {'x seed':>7} {'peak GB':>8} {'MFU':>6}")
    for r in report["rows"]:
        sps = r.get("samples_per_s")
        print(
            f"{r['name'][:70]:<70} {r['batch_size']:>3} {sps if sps is not None else '-':>9} "
            f"{r.get('speedup_vs_seed', '-'):>7} {r.get('peak_mem_gb', '-'):>8} {r.get('mfu', '-') or '-':>6}"
            + (f"  ERROR {r['error'][:60]}" if r.get("error") else "")
        )


if __name__ == "__main__":
    main()
