"""Generation speed: xray-train's evaluate/predict decoding next to the MedGemma notebook's and the model card's.

One invocation, one GPU, PadChest-size 16-bit films (``bench_e2e.make_films``: 2000-3000 px, several MB)
and MedGemma-4B's architecture with random weights (``medgemma_arch``), one LoRA adapter (r=32, alpha=64,
language-model q/v, random non-zero A and B). A random-weight model rarely stops early, so every row
forces ``min_new_tokens == max_new_tokens``: every answer is equally long and the rows compare.

Rows (``name``, ``films``, ``films_per_s``, ``new_tokens_per_s``, ``first_answer_s``, ``peak_mem_gb``):

* ``xray-train evaluate generation ...``: ``generate.Generator`` as ``evaluate`` builds it (the weights
  ``inference.plan_inference`` picks for this card, the automatic batch, prompts sorted, LoRA merged),
  the adapter alone and then with the baseline (the base's answers too: two answers per film). The
  teacher-forced accuracy pass of ``evaluate`` (one prefill per film and model) is not in these rows;
* ``xray-train predict``: ``predict.predict`` itself (annotated PNGs of the full-size films and the JSONL
  included), report task;
* ``notebook``: the MedGemma fine-tuning notebook's way: bf16 base, adapter merged
  (``merge_and_unload``), films opened with PIL and converted to RGB, the transformers processor in the
  main process, batched ``generate`` at batch 64;
* ``model card batch 1``: plain transformers + peft ``generate`` on the 4-bit NF4 base, one film at a time,
  as the seed adapter's model card does it (timed on a few films: it is slow);
* ``... at a 15 GB cap``: the xray-train path as it runs on a 15 GB card (the 4-bit base, since the 16-bit
  copy does not fit twice; the rows that fit 15 GB), with the process's memory capped there.

``first_answer_s``: from the call to the first answers coming back (a whole first batch). Timings include
everything a user waits for after the model is loaded: image decoding, preprocessing, SigLIP, prefill,
decoding. ``projection``: minutes for a 10k-film split scored with the baseline (20k answers) at the
with-baseline row's rate.

Run: ``python benchmarks/bench_generate.py`` (GPU; ``--tiny`` for a CPU shake-out with the tiny model).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

NOTEBOOK_BATCH = 64
CAP_GB = 15.0
SPLIT_ANSWERS = 20_000  # a 10k-film split scored with the baseline


def make_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter with random non-zero A and B written as peft writes one, the base's shapes read from an
    empty (meta) model, nothing loaded."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from xray_train.names import target_modules_regex
    from xray_train.run_dir import ADAPTER_WEIGHTS

    if (out / ADAPTER_WEIGHTS).is_file():
        return out
    config = LoraConfig(r=32, lora_alpha=64, target_modules=target_modules_regex(["q_proj", "v_proj"]),
                        bias="none", task_type="CAUSAL_LM")
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(base))
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    state = {
        name.replace(".default.", "."): torch.randn(p.shape, generator=gen) * 0.02
        for name, p in peft_model.named_parameters() if "lora_" in name
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / ADAPTER_WEIGHTS))
    config.base_model_name_or_path = str(base)
    config.save_pretrained(out)
    AutoProcessor.from_pretrained(base).save_pretrained(out)
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None


def row(name: str, films: int, seconds: float, new_tokens: int, first: float | None, **extra) -> dict:
    return {
        "name": name,
        "films": films,
        "films_per_s": round(films / seconds, 3),
        "new_tokens_per_s": round(new_tokens / seconds, 1),
        "first_answer_s": round(first, 2) if first is not None else None,
        "peak_mem_gb": _peak_gb(),
        "seconds": round(seconds, 2),
        **extra,
    }


def _first_batch_clock(generator, t0: float, marks: list) -> None:
    """Record when ``generator``'s first batch of answers comes back (an instance attribute shadows the method)."""
    real = generator.decode

    def timed(*args, **kwargs):
        started = time.perf_counter()
        out = real(*args, **kwargs)
        _sync()
        now = time.perf_counter()
        if not marks:
            marks.append(now - t0)
        # One line a batch: a run stopped by its time limit still shows how far it got and how fast.
        print(f"  batch of {len(out)}: {now - started:.1f} s (at {now - t0:.1f} s), "
              f"peak {_peak_gb()} GB", flush=True)
        return out

    generator.decode = timed


def xray_rows(model, processor, films: list[Path], max_new: int, system_prompt: str, with_baseline: bool,
              label: str, batch_size: int | None = None, done=lambda rows: None,
              decode_cache: str = "dynamic") -> list[dict]:
    """The Generator ``evaluate`` builds: the adapter's answers, then (``with_baseline``) the base's too;
    ``done(rows)`` after each row (so a stopped run keeps the rows it finished)."""
    from xray_train.generate import Generator, Request

    generator = Generator(model, processor, system_prompt, None, max_new, batch_size, None, min_new_tokens=max_new,
                          decode_cache=decode_cache)
    requests = [Request(f, "report") for f in films]
    rows = []
    _reset_peak()
    marks: list = []
    t0 = time.perf_counter()
    _first_batch_clock(generator, t0, marks)
    answers = generator(requests, progress=False)
    _sync()
    adapter_s = time.perf_counter() - t0
    tokens = sum(g.n_new_tokens for g in answers)
    rows.append(row(f"xray-train evaluate generation, adapter only ({label}, {generator.rows} rows)", len(films),
                    adapter_s, tokens, marks[0], batch=generator.rows, answers=len(answers)))
    done(rows)
    if with_baseline:
        from xray_train.generate import Variant

        # evaluate's way: one pass, each batch's SigLIP rows shared by the adapter and the base model.
        _reset_peak()
        marks.clear()
        del generator.decode  # the clock restarts with this row
        t0 = time.perf_counter()
        _first_batch_clock(generator, t0, marks)
        both = generator.answer(requests, [Variant("adapter"), Variant("baseline", model.disable_adapter)],
                                progress=False, on_batch=lambda *a: None)
        _sync()
        total_s = time.perf_counter() - t0
        tokens = sum(g.n_new_tokens for answers in both.values() for g in answers)
        rows.append(row(f"xray-train evaluate generation, adapter + baseline ({label}, {generator.rows} rows)",
                        len(films), total_s, tokens, marks[0], batch=generator.rows, answers=2 * len(films),
                        answers_per_s=round(2 * len(films) / total_s, 3)))
    return rows


def predict_row(adapter: Path, model, processor, films: list[Path], max_new: int, workdir: Path) -> dict:
    """``predict.predict`` itself (report task) with its Generator forced to ``max_new`` tokens."""
    import shutil

    import xray_train.predict as predict_module
    from xray_train.generate import Generator

    film_dir = workdir / "predict-films"
    shutil.rmtree(film_dir, ignore_errors=True)
    film_dir.mkdir(parents=True)
    for i, f in enumerate(films):
        (film_dir / f"{i:05d}.png").symlink_to(f)
    real = predict_module.Generator
    predict_module.Generator = partial(Generator, min_new_tokens=max_new)
    _reset_peak()
    try:
        t0 = time.perf_counter()
        records = predict_module.predict(adapter, [film_dir], out_dir=workdir / "predictions", task="report",
                                         overwrite=True, max_new_tokens=max_new, model=model, processor=processor,
                                         progress=False, echo=lambda *a: None)
        _sync()
        seconds = time.perf_counter() - t0
    finally:
        predict_module.Generator = real
    assert all("error" not in r for r in records), records[:1]
    # predict answers each distinct file once (it resolves the links).
    return row("xray-train predict (report, annotated PNGs + JSONL)", len(records), seconds, len(records) * max_new,
               None)


def _notebook_prompt(processor, system_prompt: str) -> str:
    from xray_train.collate import TASK_PROMPTS

    messages = [
        {"role": "system", "content": [{"type": "text", "text": system_prompt}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TASK_PROMPTS["report"]}]},
    ]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def hf_generate_row(name: str, model, processor, films: list[Path], batch: int, max_new: int,
                    system_prompt: str) -> dict:
    """The plain transformers way: PIL -> RGB, the processor in the main process, ``generate``."""
    from PIL import Image

    processor.tokenizer.padding_side = "left"
    prompt = _notebook_prompt(processor, system_prompt)
    dtype = next(model.parameters()).dtype if next(model.parameters()).is_floating_point() else torch.bfloat16
    _reset_peak()
    tokens, first = 0, None
    t0 = time.perf_counter()
    for start in range(0, len(films), batch):
        chunk = films[start : start + batch]
        images = [[Image.open(f).convert("RGB")] for f in chunk]
        inputs = processor(text=[prompt] * len(chunk), images=images, return_tensors="pt", padding=True)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                 temperature=None, top_p=None, top_k=None)
        tokens += (out.shape[1] - inputs["input_ids"].shape[1]) * len(chunk)
        _sync()
        if first is None:
            first = time.perf_counter() - t0
    return row(name, len(films), time.perf_counter() - t0, tokens, first, batch=batch)


def model_card_model(base: Path, adapter: Path, tiny: bool = False):
    """The model card's loading: 4-bit NF4 base (bf16 compute), peft adapter on top. (``tiny``: the toy
    vision tower is kept unquantised, as bitsandbytes' CPU kernels cannot pack its widths.)"""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16,
                               llm_int8_skip_modules=["model.vision_tower", "lm_head"] if tiny else None)
    device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    model = AutoModelForImageTextToText.from_pretrained(base, quantization_config=quant, dtype=torch.bfloat16,
                                                        device_map=device_map)
    model = PeftModel.from_pretrained(model, adapter).eval()
    return model, AutoProcessor.from_pretrained(adapter)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "generate_speed.json")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/xray-generate"))
    ap.add_argument("--distinct-films", type=int, default=64, help="films written (each used several times)")
    ap.add_argument("--films", type=int, default=512, help="films per xray-train row")
    ap.add_argument("--notebook-films", type=int, default=128)
    ap.add_argument("--card-films", type=int, default=3)
    ap.add_argument("--predict-films", type=int, default=64)
    ap.add_argument("--cap-films", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=None,
                    help="rows per generate call of the xray-train rows (default: what the free memory holds)")
    ap.add_argument("--rows", default="xray,static,notebook,predict,card,cap")
    ap.add_argument("--deadline-s", type=float, default=None, help="skip rows that would start later than this")
    ap.add_argument("--tiny", action="store_true", help="tiny model and small films: a CPU shake-out")
    args = ap.parse_args()

    from bench_e2e import make_films

    from xray_train.config import ModelConfig, RunConfig
    from xray_train.data.loader import available_cpus
    from xray_train.inference import load_for_inference, plan_inference, rows_that_fit

    t_start = time.time()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    size_range = (300, 500) if args.tiny else (2000, 3000)
    info = make_films(work / "films", args.distinct_films, 1, size_range, max(1, available_cpus()))
    distinct = sorted(Path(info["padchest_images"]).rglob("*.png"))
    films = [distinct[i % len(distinct)] for i in range(args.films)]
    if args.tiny:
        from xray_train.testing.tiny import make_tiny_model

        base = work / "model.base"
        if not (base / "config.json").is_file():
            make_tiny_model(base)
    else:
        from medgemma_arch import build_random_medgemma

        base = build_random_medgemma(work / "model.base")
    adapter = make_adapter(base, work / "adapter")
    system_prompt = RunConfig.model_fields["system_prompt"].default
    compute = "float32" if args.tiny else "bfloat16"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    total_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available() else None
    wanted = args.rows.split(",")
    rows, notes = [], []
    max_new = args.max_new_tokens

    def due(name: str) -> bool:
        late = args.deadline_s is not None and time.time() - t_start > args.deadline_s
        if name in wanted and late:
            notes.append(f"row {name} skipped: the deadline ({args.deadline_s:.0f} s) had passed")
        return name in wanted and not late

    def write(pending: list | None = None) -> None:
        report = {
            "device": device,
            "device_memory_gb": round(total_gb, 1) if total_gb else None,
            "torch": torch.__version__,
            "film_px": info["film_px"],
            "film_px_range": info["film_px_range"],
            "film_mb_median": info["film_mb_median"],
            "distinct_films": len(distinct),
            "max_new_tokens": max_new,
            "min_new_tokens": max_new,
            "model": "tiny" if args.tiny else "MedGemma-4B architecture, random weights",
            "rows": rows + (pending or []),
            "notes": notes,
        }
        report.update(summary(report["rows"]))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    def attempt(name: str, fn) -> list:
        """A row's rows, or none and a note: one failing row must not cost the others."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001  (recorded, the run goes on)
            notes.append(f"row {name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            _reset_peak()
            return []

    model_cfg = ModelConfig(base=str(base), compute_dtype=compute)
    if due("xray") or due("predict") or due("notebook"):
        model, processor, plan = load_for_inference(adapter, model_cfg, echo=print)
        label = "16-bit merged" if plan.weights == "merged" else "4-bit"
        notes.append(f"xray-train path on this card: {plan.weights} ({plan.reason})")
        if due("xray"):
            rows += attempt("xray", lambda: xray_rows(model, processor, films, max_new, system_prompt, True, label,
                                                      args.batch, done=lambda done_rows: write(done_rows)))
            write()
        if due("static"):
            # model.decode_cache: static (the decode step compiled by transformers), not the default until it wins.
            static = attempt("static", lambda: xray_rows(model, processor, films, max_new, system_prompt, False,
                                                         f"{label}, static KV cache", args.batch,
                                                         decode_cache="static"))
            rows += [{**r, "name": r["name"].replace("adapter only", "adapter only, static KV cache")} for r in static]
            write()
        # The notebook's merge_and_unload leaves the same weights as the merged path without peft's wrappers;
        # predict then runs on those (its Generator merges nothing more).
        merged = model.merge_and_unload() if due("notebook") or due("predict") else model
        if due("notebook"):
            rows += attempt("notebook", lambda: [hf_generate_row(
                f"notebook (bf16 base, adapter merged, batched generate, batch {NOTEBOOK_BATCH})", merged, processor,
                films[: args.notebook_films], NOTEBOOK_BATCH, max_new, system_prompt)])
            write()
        if due("predict"):
            rows += attempt("predict", lambda: [predict_row(adapter, merged, processor, films[: args.predict_films],
                                                            max_new, work)])
            write()
        del model, merged
        _reset_peak()
    if due("card"):
        model, processor = model_card_model(base, adapter, args.tiny)
        card = attempt("card", lambda: [hf_generate_row("model card batch 1 (4-bit base + peft generate)", model,
                                                        processor, films[: args.card_films], 1, max_new,
                                                        system_prompt)])
        rows += card
        if card:
            notes.append(f"model card batch 1 timed on {args.card_films} films only (about "
                         f"{card[0]['seconds'] / max(args.card_films, 1):.0f} s a film): it is slow")
        write()
        del model
        _reset_peak()
    if due("cap") and torch.cuda.is_available():
        cap_free = int(CAP_GB * 1e9)
        four_bit = ModelConfig(base=str(base), compute_dtype=compute, inference="auto")
        plan = plan_inference(four_bit, free=cap_free)
        model, processor, _ = load_for_inference(adapter, four_bit.model_copy(update={"inference": plan.weights}))
        used = torch.cuda.memory_allocated()
        rows_cap = rows_that_fit(model, 300 + max_new, free=cap_free - used)
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GB * 1e9 / torch.cuda.get_device_properties(0).total_memory))
        try:
            rows += xray_rows(model, processor, films[: args.cap_films], max_new, system_prompt, False,
                              f"{plan.weights}, {CAP_GB:.0f} GB cap", batch_size=rows_cap)
            rows[-1]["name"] = rows[-1]["name"].replace("adapter only", f"adapter only at a {CAP_GB:.0f} GB cap")
        except torch.OutOfMemoryError as exc:
            notes.append(f"{CAP_GB:.0f} GB cap row: out of memory at {rows_cap} rows ({str(exc).splitlines()[0]})")
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        write()
    write()
    print(json.dumps({"rows": rows, **summary(rows)}, indent=2))


def summary(rows: list[dict]) -> dict:
    """Ratios against the peers and the 10k-split projection, from the rows present."""
    by = {r["name"].split(" (")[0]: r for r in rows}
    ours = next((r for r in rows if r["name"].startswith("xray-train evaluate generation, adapter only (")
                 and "cap" not in r["name"]), None)
    both = next((r for r in rows if "adapter + baseline" in r["name"]), None)
    static = next((r for r in rows if "static KV cache" in r["name"]), None)
    out: dict = {}
    if ours and static:
        out["static_kv_cache_vs_dynamic"] = round(static["films_per_s"] / ours["films_per_s"], 2)
    if ours:
        for peer in ("notebook", "model card batch 1"):
            if peer in by:
                out[f"evaluate_vs_{peer.replace(' ', '_')}"] = round(ours["films_per_s"] / by[peer]["films_per_s"], 2)
    if both:
        out["projection"] = {
            "answers": SPLIT_ANSWERS,
            "answers_per_s": both["answers_per_s"],
            "minutes_for_10k_films_with_baseline": round(SPLIT_ANSWERS / both["answers_per_s"] / 60, 1),
            "note": "generation only, at the with-baseline row's rate; evaluate's teacher-forced pass is extra",
        }
    return out


if __name__ == "__main__":
    main()
