"""End-to-end speed on full-size films: what a user's first epoch costs, with each trainer's own data loading.

    python benchmarks/bench_e2e.py --out benchmarks/results/e2e_speed.json            # one GPU host
    python benchmarks/bench_e2e.py --tiny --out /tmp/e2e.json --workdir /tmp/e2e      # CPU shake-out

Films: PadChest's layout (its real CSV columns, nested ``ImageDir`` folders) with 16-bit PNGs of 2000-3000
px a side and detector noise (5-8 MB each, like the real ones), and Indiana's layout with 8-bit PNGs of the
same size; drawn from ``xray_train.testing.synthetic`` and enlarged. Model: the full MedGemma-4B
architecture with random weights, saved once as ``<workdir>/model.base`` (``--tiny``: the tiny test model
and small films).

Rows, in one invocation, on the same films, each in its own process:

- ``xray-train phase1`` through the real command line with ``configs/phase1_padchest.yaml`` and an empty
  vision-feature cache (a user's first run), then the same command again with the cache built (a rerun,
  and what every later epoch costs), then ``xray-train phase2 --resume`` on the Indiana films with
  ``configs/phase2_indiana.yaml``. Each command's wall time is split into start-up (imports, load and
  quantise), data read (CSV, split, tokenise), cache build, compile (the extra time of steps that
  compiled), train, eval and save, from timers put around those functions in the command's process.
- ``xray-train cache-features`` over thousands of film paths (each PadChest film listed ``CACHE_ROW_COPIES``
  times under new names hard-linked to it, decoded afresh each time) with SigLIP compiled, as auto settings
  compile it from 8000 images: the cache build's rate at scale, which the 100k projection uses.
- The first run again with SigLIP compiled (``xray1-compiled``: what the defaults do from 8000 images) and
  with ``training.fill_cache_during_epoch=false`` (``xray1-build``: the cache built before the first step
  instead of filled by the steps); the rerun with that setting (``xray-rerun-build``). A rerun reads no
  image, so either way it trains with no DataLoader workers.
- The seed recipe and TRL's SFTTrainer (as in ``bench_train.py``) and Unsloth's FastVisionModel
  (imported before transformers), each reading the films the way it naturally does: a DataLoader over
  the image files, decoded in 2 worker processes, one epoch over the same training films, adapter saved.
  Before its epoch each peer times one forward + backward per candidate batch (``PEER_BATCHES``) and
  trains at the fastest whose peak stays within 24 GB; the search is recorded in its row (Unsloth
  trains at 16 with no search: it recompiles after any step run before its trainer's; ``--peer-batches
  unsloth=24`` runs it at another batch, as a row of its own). ``unsloth-eager`` is Unsloth with its
  torch.compile regions switched off (``UNSLOTH_COMPILE_DISABLE=1``). Every peer steps on one batch (no
  accumulation). A peer's process dumps every thread's stack once, shortly before its time limit, and a
  row stopped by that limit keeps the steps it reported.

``samples_per_s_end_to_end`` is training samples over the whole command's wall time (a peer's batch search
left out). ``samples_per_s_training_steps`` is a typical step's rate, by one rule for every row: xray-train's
median step without compiles, a peer's samples per step over the median time between its steps; what the
steps took beyond that rate is a fixed cost (xray-train's ``compile``, a peer's ``warm_up``). The 100k-film
projection keeps the fixed stages and scales the per-film ones (data read, cache build after its first
batch, training steps, evaluation batches) at their measured rates.

Modes. Besides the run above, the script has one user mode and three internal ones, each a row's own
process started by the run (their flags are hidden from ``--help``):

- ``--merge A.json B.json --rows ""``: only combine the rows of earlier outputs (runs split over several
  GPU sessions) into ``--out``, recomputing the ratios and the projection; nothing is run.
- ``--vision-out F --model DIR``: the ``vision`` row, SigLIP's forward rate, written to F.
- ``--cli-stages F -- ARGV``: ``xray-train ARGV`` in this process with timers around its stages (start-up,
  data, cache, compile, train, eval, save), written to F: the xray-train rows.
- ``--peer NAME --films-json F --model DIR --batches B,.. --peer-out G``: one peer (seed, trl, unsloth,
  unsloth-eager) trained on the films, its row written to G.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

from common import REPO, package_version, pythonpath  # noqa: E402 - also puts the checkout's src/ first on the path

PADCHEST_CONFIG = REPO / "configs" / "phase1_padchest.yaml"
INDIANA_CONFIG = REPO / "configs" / "phase2_indiana.yaml"
PROJECTION_FILMS = 100_000
#: The cache-build row reads each PadChest film under this many paths (``linked_padchest``): thousands of
#: films, enough for a steady rate, with SigLIP compiled as a run of PadChest's size compiles it.
CACHE_ROW_COPIES = 6
CACHE_ROW = "xray-train cache-features (compiled SigLIP)"
#: Phase-1 rows through the CLI: row key -> (row name, config overrides, first run). A first run starts with
#: no cache: with the defaults the steps fill it; with ``fill_cache_during_epoch=false`` it is built before
#: the first step. A rerun finds it finished (what a later epoch costs) and reads no image, so it trains with
#: no DataLoader workers either way; with the defaults the collator still gathers the rows, as built first.
#: (Rows named "..., fill_cache_during_epoch's DataLoader workers" in results are from before runs dropped
#: workers that had nothing to read.)
BUILD_FIRST = "training.fill_cache_during_epoch=false"
PHASE1_ROWS = {
    "xray1": ("xray-train phase1 first run, cache filled during the epoch", [], True),
    # What a run of PadChest's size does (compile_vision_cache resolves on from 8000 images), at 221 films.
    "xray1-compiled": ("xray-train phase1 first run, cache filled during the epoch, SigLIP compiled",
                       ["training.compile_vision_cache=true"], True),
    "xray1-build": ("xray-train phase1 first run, cache built first", [BUILD_FIRST], True),
    "xray-rerun": ("xray-train phase1 rerun (cache built), defaults", [], False),
    "xray-rerun-build": ("xray-train phase1 rerun (cache built)", [BUILD_FIRST], False),
}
#: Unsloth trains at 16 without a search (see run_peer; ``--peer-batches`` for another batch).
PEER_BATCHES = {"seed": (8, 10, 12), "trl": (16, 24, 32), "unsloth": (16,), "unsloth-eager": (16,)}
#: Peers beside the seed recipe (the seed is what they are compared with, not one of them).
PEERS = ("trl", "unsloth", "unsloth-eager")


def is_peer(name: str) -> bool:
    """A peer's row, also one run at other batches (``"unsloth, batch 24"``); the seed recipe is no peer."""
    return name.split(",")[0] in PEERS


#: Environment of a peer's process beyond the offline switches: Unsloth with its torch.compile regions
#: off (its kernels, 4-bit loading and gradient checkpointing stay), for when its compiles outlast a row.
PEER_ENV = {"unsloth-eager": {"UNSLOTH_COMPILE_DISABLE": "1"}}
PEER_MEMORY_GB = 24.0
#: The optimizer's state, made at the first real step, is not in a search step's peak: kept as headroom.
SEARCH_HEADROOM_GB = 0.5


# ---------------------------------------------------------------------------------------------
# Films


def _enlarge(args):
    """One synthetic film enlarged to full size with detector noise, written over the small one."""
    path, width, height, seed = args
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        small = np.asarray(img)
    top = 4095.0 if small.dtype == np.uint16 else 255.0
    rng = np.random.default_rng(seed)
    big = np.asarray(Image.fromarray(small.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))
    # Quantum noise plus a fixed-pattern row/column component, roughly a detector's.
    noisy = big + rng.normal(0, top / 100, big.shape).astype(np.float32)
    noisy += rng.normal(0, top / 400, (height, 1)).astype(np.float32)
    out = np.clip(np.rint(noisy), 0, top).astype(small.dtype)
    Image.fromarray(out).save(path, compress_level=1)
    return path.stat().st_size


def make_films(workdir: Path, n_padchest: int, n_indiana: int, size_range: tuple[int, int], workers: int) -> dict:
    """Both layouts under ``workdir`` (reused when complete); returns their paths and the film sizes."""
    from multiprocessing import Pool

    import numpy as np

    from xray_train.testing.synthetic import write_indiana, write_padchest

    done = workdir / "films.json"
    if done.is_file():
        return json.loads(done.read_text())
    rng = np.random.default_rng(0)
    padchest_csv = write_padchest(workdir / "padchest", n=n_padchest, seed=0)
    indiana = write_indiana(workdir / "indiana", n=n_indiana, seed=0)
    jobs = []
    lo, hi = size_range
    for i, path in enumerate(sorted((workdir / "padchest" / "images").rglob("*.png")) + sorted(
        Path(indiana["image_root"]).rglob("*.png")
    )):
        width = int(rng.integers(lo, hi - (hi - lo) // 5))  # films are taller than wide
        height = int(rng.integers(lo + (hi - lo) // 5, hi))
        jobs.append((path, width, height, i))
    with Pool(workers) as pool:
        sizes = pool.map(_enlarge, jobs, chunksize=1)
    info = {
        "padchest_csv": str(padchest_csv),
        "padchest_images": str(workdir / "padchest" / "images"),
        "indiana": {k: str(v) for k, v in indiana.items()},
        "film_px": f"{int(statistics.median(j[1] for j in jobs))}x{int(statistics.median(j[2] for j in jobs))}",
        "film_px_range": f"{lo}-{hi}",
        "film_mb_median": round(statistics.median(sizes) / 1e6, 2),
        "films": len(jobs),
    }
    done.write_text(json.dumps(info, indent=2))
    return info


def linked_padchest(films: dict, copies: int, out: Path) -> Path:
    """A PadChest CSV with every row ``copies`` times, each copy a new ImageID hard-linked to the same PNG.

    The cache-build row needs thousands of film paths to measure a steady rate; writing thousands of 8-MB
    films would take longer than the row. Each copy is decoded, windowed and resized afresh (the cache
    keys on the path), so the work per path is a distinct film's; like every row's films, they are read
    from the page cache, having just been written.
    """
    import csv

    src = Path(films["padchest_csv"])
    root = Path(films["padchest_images"])
    out.mkdir(parents=True, exist_ok=True)
    target = out / "linked.csv"
    with src.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows, fields = list(reader), reader.fieldnames
    linked = []
    for copy in range(copies):
        for row in rows:
            image = root / row["ImageDir"] / row["ImageID"]
            new_id = row["ImageID"] if copy == 0 else f"c{copy}_{row['ImageID']}"
            link = image.with_name(new_id)
            if copy and not link.exists():
                os.link(image, link)
            linked.append({**row, "ImageID": new_id})
    with target.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(linked)
    return target


def make_model(workdir: Path, tiny: bool) -> Path:
    out = workdir / "model.base"
    if (out / "config.json").is_file():
        return out
    if tiny:
        from xray_train.testing.tiny import make_tiny_model

        return make_tiny_model(out)
    from medgemma_arch import build_random_medgemma

    return build_random_medgemma(out)


# ---------------------------------------------------------------------------------------------
# The xray-train command, timed from inside its own process


class _Stages:
    """Wall-clock spans of named stages, written as JSON when the command ends."""

    def __init__(self, out: Path, t0: float):
        self.out, self.t0 = out, t0
        self.spans: dict[str, float] = {}
        self.marks: dict[str, float] = {}
        self.steps: list[dict] = []
        self.active: set[str] = set()

    def wrap(self, owner, name: str, stage: str, mark_end: str | None = None):
        real = getattr(owner, name)
        stages = self

        def timed(*args, **kwargs):
            # An evaluation inside trainer.train is counted once, as eval (see split_stages).
            key = f"{stage}_in_train" if "trainer_train" in stages.active and stage != "trainer_train" else stage
            started = time.time()
            stages.active.add(stage)
            try:
                return real(*args, **kwargs)
            finally:
                stages.active.discard(stage)
                stages.spans[key] = stages.spans.get(key, 0.0) + time.time() - started
                if mark_end:
                    stages.marks.setdefault(mark_end, time.time() - stages.t0)

        setattr(owner, name, timed)

    def write(self) -> None:
        import torch

        peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
        self.out.write_text(json.dumps({
            "spans": self.spans, "marks": self.marks, "steps": self.steps, "peak_mem_gb": peak,
            "ended": time.time() - self.t0,
        }))


def run_cli_with_stages(stages_out: Path, argv: list[str]) -> None:
    """``xray-train <argv>`` in this process, with timers around the functions each stage runs in."""
    import atexit

    t0 = float(os.environ.get("BENCH_T0", time.time()))
    stages = _Stages(stages_out, t0)
    atexit.register(stages.write)

    import transformers
    from transformers import TrainerCallback

    import xray_train.features as features
    import xray_train.model as model
    import xray_train.train as train
    from xray_train.train import compile_count

    stages.wrap(model, "build_training_model", "load_model", mark_end="model_ready")
    stages.wrap(model, "load_base", "load_base", mark_end="base_ready")  # all that cache-features loads
    stages.wrap(train, "prepare_data", "data_read")
    stages.wrap(features, "open_feature_source", "cache_build")
    stages.wrap(transformers.Trainer, "train", "trainer_train")
    stages.wrap(transformers.Trainer, "evaluate", "eval")
    stages.wrap(train, "save_outputs", "save")

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self._begin, self._compiles = time.time(), compile_count()

        def on_step_end(self, args, state, control, **kw):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stages.steps.append({
                "step": state.global_step, "epoch": state.epoch, "s": time.time() - self._begin,
                "compiles": compile_count() - self._compiles,
            })

    real_run = train.run
    train.run = lambda cfg, *a, **kw: real_run(cfg, *a, **{**kw, "callbacks": [Steps(), *(kw.get("callbacks") or [])]})

    from xray_train.cli import main

    sys.argv = ["xray-train", *argv]
    main()


def split_stages(stages: dict, wall: float) -> dict:
    """Start-up, data read, cache build, compile, train, eval, save and the rest, in seconds."""
    spans, steps = stages["spans"], stages["steps"]
    compiled = [s["s"] for s in steps if s["compiles"]]
    plain = [s["s"] for s in steps if not s["compiles"]]
    typical = statistics.median(plain) if plain else 0.0
    compile_s = sum(max(0.0, s - typical) for s in compiled)
    in_train_eval = spans.get("eval_in_train", 0.0)  # counted as eval, not train
    train_s = spans.get("trainer_train", 0.0) - compile_s - in_train_eval
    out = {
        "start_up": stages["marks"].get("model_ready", 0.0),
        "data_read": spans.get("data_read", 0.0),
        "cache_build": spans.get("cache_build", 0.0),
        "compile": compile_s,
        "train": train_s,
        "eval": spans.get("eval", 0.0) + in_train_eval,
        "save": spans.get("save", 0.0),
    }
    out["other"] = wall - sum(out.values())
    return {k: round(v, 2) for k, v in out.items()}


def _timed_cli(label: str, argv: list[str], workdir: Path, env_extra: dict, timeout: float | None):
    """``xray-train <argv>`` in a child process timed by ``--cli-stages``: (process, start time, wall seconds,
    its stages or None). Its output goes to ``log-<label>.txt``."""
    stages_out = workdir / f"stages-{label}.json"
    stages_out.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=pythonpath(), BENCH_T0=str(time.time()), **env_extra)
    started = time.time()
    proc = _run([sys.executable, __file__, "--cli-stages", str(stages_out), "--", *argv], env, timeout)
    wall = time.time() - started
    (workdir / f"log-{label}.txt").write_text(proc.stdout + proc.stderr)
    ok = proc.returncode == 0 and stages_out.is_file()
    return proc, started, wall, json.loads(stages_out.read_text()) if ok else None


def xray_row(name: str, phase: str, argv: list[str], workdir: Path, env_extra: dict, timeout: float | None) -> dict:
    proc, started, wall, stages = _timed_cli(name.replace(" ", "_"), argv, workdir, env_extra, timeout)
    row = {"name": name, "phase": phase, "wall_s": round(wall, 2)}
    if stages is None:
        return {**row, "error": (proc.stderr or proc.stdout)[-1500:]}
    out_dir = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")))
    from xray_train.run_dir import SUMMARY, RunDir

    run = RunDir(out_dir)
    summary = json.loads(run.file(SUMMARY).read_text())
    training = run.config().training  # the settings the command ran with, as it saved them
    steps = stages["steps"]
    batch = training.per_device_train_batch_size
    films = summary["data"]["train_examples_used"]
    cached = films + summary["data"]["validation_examples_used"]
    epochs = training.num_train_epochs
    samples = films * epochs
    split = split_stages(stages, wall)
    steady = [s["s"] for s in steps if not s["compiles"]][1:]  # the step after a compile also warms up
    row.update(
        films=films,
        validation_films=summary["data"]["validation_examples_used"],
        epochs=epochs,
        batch=batch,
        eval_batch=training.per_device_eval_batch_size,
        stages=split,
        samples_per_s_end_to_end=round(samples / wall, 3),
        samples_per_s_training_steps=round(batch / statistics.median(steady), 3) if steady else None,
        cache_films_per_s=round(cached / split["cache_build"], 1)
        if split["cache_build"] > 1 else None,
        cache_build=_cache_build(Path(env_extra["XRAY_TRAIN_FEATURE_CACHE"]), started),
        compiles=sum(s["compiles"] for s in steps),
        compiles_after_step_3=sum(s["compiles"] for s in steps if s["step"] > 3),
        compile_steps=[s["step"] for s in steps if s["compiles"]],
        compiles_outside_steps=(summary["metrics"].get("torch_compiles") or 0) - sum(s["compiles"] for s in steps),
        torch_compiles_in_summary=summary["metrics"].get("torch_compiles"),
        peak_mem_gb=round(stages["peak_mem_gb"], 2) if stages["peak_mem_gb"] else None,
    )
    return row


def cache_row(argv: list[str], workdir: Path, env_extra: dict, timeout: float | None) -> dict:
    """``xray-train cache-features`` on the linked films: start-up, then the build's rate (``build.json``)."""
    proc, started, wall, stages = _timed_cli("cache", argv, workdir, env_extra, timeout)
    row = {"name": CACHE_ROW, "phase": "cache", "wall_s": round(wall, 2), "copies_per_film": CACHE_ROW_COPIES}
    build = _cache_build(Path(env_extra["XRAY_TRAIN_FEATURE_CACHE"]), started)
    if stages is None or build is None:
        return {**row, "error": (proc.stderr or proc.stdout)[-1500:]}
    start_up = stages["marks"].get("base_ready", 0.0)  # cache-features loads the frozen base only
    cache_s = stages["spans"].get("cache_build", 0.0)
    return {**row, "films": build["films"], "stages": {"start_up": round(start_up, 2), "cache_build": round(cache_s, 2),
                                                        "other": round(wall - start_up - cache_s, 2)},
            "cache_build": build, "peak_mem_gb": round(stages["peak_mem_gb"], 2) if stages["peak_mem_gb"] else None}


def _cache_build(root: Path, since: float) -> dict | None:
    """The build this command made (``build.json`` of a cache finished after ``since``): its films/s, whole
    and after the first batch (whose time includes starting the reading workers)."""
    from xray_train.features import BUILD_FILE

    built = [p for p in root.glob(f"*/{BUILD_FILE}") if p.stat().st_mtime >= since]
    if not built:
        return None
    b = json.loads(max(built, key=lambda p: p.stat().st_mtime).read_text())
    # From the first batch's features back on the host, the rest of the films (warm-up excluded).
    first_done = b.get("first_batch_done_s", b["first_batch_s"])
    rest_films, rest_s = b["films"] - b["first_batch_films"], b["seconds"] - first_done
    return {**b, "films_per_s": round(b["films"] / b["seconds"], 1),
            "films_per_s_after_first_batch": round(rest_films / rest_s, 1) if rest_s > 0 and rest_films else None}


def _run(cmd: list[str], env: dict, timeout: float | None):
    """``subprocess.run`` whose timeout becomes a failed result with what the command printed so far."""
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return subprocess.CompletedProcess(cmd, -9, out, err + f"\nbench: stopped after {timeout:.0f} s (its time limit)")


def xray_argv(phase: str, films: dict, base: Path, out: Path, tiny: bool, extra: list[str]) -> list[str]:
    config = PADCHEST_CONFIG if phase == "phase1" else INDIANA_CONFIG
    sets = [f"model.base={base}", f"output_dir={out}", "training.report_to=[none]", "training.save_steps=100000"]
    if phase == "phase1":
        sets += [f"data.csv={films['padchest_csv']}", f"data.image_root={films['padchest_images']}"]
    else:
        ind = films["indiana"]
        sets += [f"data.reports_csv={ind['reports_csv']}", f"data.projections_csv={ind['projections_csv']}",
                 f"data.image_root={ind['image_root']}", "training.num_train_epochs=1"]
    if tiny:
        sets += ["model.compute_dtype=float32", "training.per_device_train_batch_size=4",
                 "training.per_device_eval_batch_size=4", "training.max_eval_samples=8",
                 "data.val_fraction=0.1", "data.test_fraction=0.1"]
    argv = [phase, "--config", str(config), "--overwrite"]
    for s in sets + extra:
        argv += ["--set", s]
    return argv


# ---------------------------------------------------------------------------------------------
# Peers, each in its own process


def peer_items(films: dict, base: Path, tiny: bool):
    """The training films of the phase-1 split, tokenised exactly as xray-train does (same examples)."""
    from transformers import AutoProcessor

    from xray_train.collate import PromptEncoder
    from xray_train.config import load_config
    from xray_train.train import prepare_data, run_inputs

    argv = xray_argv("phase1", films, base, Path("unused"), tiny, [])
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    inputs = run_inputs(load_config(PADCHEST_CONFIG, sets))
    processor = AutoProcessor.from_pretrained(base)
    encoder = PromptEncoder(processor, inputs.cfg.system_prompt)
    return processor, encoder, prepare_data(inputs.cfg, encoder, inputs).train


def run_peer(name: str, films: dict, base: Path, batches: tuple[int, ...], out_dir: Path, tiny: bool) -> dict:
    """A batch search (``batches``), then one epoch over the training films at the batch it found; returns
    the row (timings from process start; the search is a stage of its own)."""
    t0 = float(os.environ.get("BENCH_T0", time.time()))
    unsloth_peer = name.startswith("unsloth")
    if unsloth_peer:
        import unsloth  # noqa: F401 - must precede transformers so its patches apply
    import torch
    from transformers import TrainerCallback

    from xray_train.collate import Collator
    from xray_train.features import FeatureSource
    from xray_train.inputs import PixelLoader, TrainingDataset

    class Timer(TrainerCallback):
        def __init__(self):
            self.begin = self.end = None
            self.steps = 0

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.time()

        def on_step_end(self, args, state, control, **kw):
            self.steps = state.global_step
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's own time, as xray-train's rows take it
            # On the log, so a row stopped by its time limit shows whether its steps were slow or absent, and
            # its step rate (samples per step included: a peer may change its batch or accumulation).
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
            print(f"bench: step {state.global_step} done {time.time() - t0:.1f} s after start, {per_step} samples",
                  flush=True)

        def on_train_end(self, args, state, control, **kw):
            self.end = time.time()

    processor, encoder, items = peer_items(films, base, tiny)
    dataset = TrainingDataset(items, FeatureSource.pixels(PixelLoader(processor)))  # decoded per item in the workers
    collate = Collator(encoder.ids)
    timer = Timer()
    batch = batches[0]
    common = dict(output_dir=str(out_dir), per_device_train_batch_size=batch, num_train_epochs=1,
                  learning_rate=1e-4, logging_steps=1000, gradient_accumulation_steps=1, save_strategy="no",
                  report_to="none",
                  remove_unused_columns=False, dataloader_num_workers=2, disable_tqdm=True, seed=0,
                  bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available())
    if tiny:
        common["max_steps"] = 3
    loaded_at = None
    if name == "seed":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import Trainer, TrainingArguments

        model = _load_4bit(base)
        loaded_at = time.time()
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05,
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        trainer = Trainer(model=model, args=TrainingArguments(gradient_checkpointing=True, **common),
                          train_dataset=dataset, data_collator=collate, callbacks=[timer])
    elif name == "trl" or unsloth_peer:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        from xray_train.model import target_modules_regex

        if name == "trl":
            from peft import LoraConfig

            model = _load_4bit(base, quant_storage=True)
            loaded_at = time.time()
            peft_config = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05,
                                     target_modules=target_modules_regex(["q_proj", "v_proj"]), task_type="CAUSAL_LM")
        else:
            from unsloth import FastVisionModel

            model, _ = FastVisionModel.from_pretrained(str(base), load_in_4bit=True, use_gradient_checkpointing="unsloth")
            loaded_at = time.time()
            # Its VLM recipe: LoRA on the language model's attention projections (q, k, v, o), vision frozen.
            model = FastVisionModel.get_peft_model(
                model, finetune_vision_layers=False, finetune_language_layers=True, finetune_attention_modules=True,
                finetune_mlp_modules=False, r=32, lora_alpha=64, lora_dropout=0.0,
            )
            FastVisionModel.for_training(model)
            peft_config = None
        args = SFTConfig(dataset_kwargs={"skip_prepare_dataset": True}, gradient_checkpointing=name == "trl",
                         max_length=None, **common)
        # As in their VLM examples the collator builds each batch; here from the same prepared films, with
        # only the inputs a transformers forward takes.
        keep = ("input_ids", "attention_mask", "token_type_ids", "labels", "pixel_values")

        def hf_collate(rows):
            batch = collate([dataset[r["index"]] for r in rows])
            return {k: v for k, v in batch.items() if k in keep}

        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"index": list(range(len(dataset)))}),
                             data_collator=hf_collate,
                             peft_config=peft_config, processing_class=processor, callbacks=[timer])
    else:
        raise ValueError(name)
    search_started = time.time()
    if trainer.args.gradient_checkpointing:  # what train() would switch on: the search must see its memory
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Unsloth throws away the torch.compile graphs of any forward/backward run before train() and compiles
    # again; a search would only add its compiles to the row. It trains at its first candidate.
    search = [] if unsloth_peer and len(batches) == 1 else batch_search(trainer.model, dataset, collate, batches)
    fits = [t for t in search if t["peak_gb"] + SEARCH_HEADROOM_GB <= PEER_MEMORY_GB]
    if fits:
        batch = max(fits, key=lambda t: t["samples_per_s"])["batch"]
    trainer.args.per_device_train_batch_size = trainer._train_batch_size = batch
    search_s = time.time() - search_started
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the epoch's own peak, not the search's largest batch
    trainer.train()
    save_started = time.time()
    trainer.save_model(str(out_dir / "adapter"))
    ended = time.time()
    wall = ended - t0
    samples = (timer.steps * batch) if tiny else len(dataset)
    stages = {"start_up": loaded_at - t0, "batch_search": search_s, "train": timer.end - timer.begin,
              "save": ended - save_started}
    stages["other"] = wall - sum(stages.values())
    return {
        "name": name, "phase": "phase1", "films": len(dataset), "samples": samples, "batch": batch,
        "wall_s": round(wall, 2), "stages": {k: round(v, 2) for k, v in stages.items()},
        # The batch search is the benchmark's, not a user's: not counted in the end-to-end rate.
        "samples_per_s_end_to_end": round(samples / (wall - search_s), 3),
        "samples_per_s_training_steps": round(samples / stages["train"], 3),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None,
        "data_loading": "DataLoader over the PNG files, 2 decoding workers",
        "batch_search": search,
    }


def batch_search(model, dataset, collate, batches: tuple[int, ...]) -> list[dict]:
    """One timed forward + backward per batch size (after one untimed at the first), on the same films:
    samples/s and peak GB of each. Stops at the first that passes PEER_MEMORY_GB (larger ones need more)."""
    import torch

    n = min(max(batches), len(dataset))
    subset = torch.utils.data.Subset(dataset, range(n))  # the films decoded once, in parallel
    items = list(torch.utils.data.DataLoader(subset, batch_size=None, num_workers=min(16, n)))
    keep = ("input_ids", "attention_mask", "token_type_ids", "labels", "pixel_values")
    cuda = torch.cuda.is_available()  # --tiny runs the same steps on the CPU (no memory figure)
    device = "cuda" if cuda else "cpu"
    model.train()

    def step(b: int) -> tuple[float, float]:
        batch = {k: v.to(device) for k, v in collate(items[:b]).items() if k in keep}
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(**batch).loss
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        took = time.perf_counter() - started
        model.zero_grad(set_to_none=True)
        return took, torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0

    step(batches[0])
    tried = []
    for b in batches:
        if b > len(dataset):
            break
        took, peak = step(b)
        tried.append({"batch": b, "samples_per_s": round(b / took, 2), "peak_gb": round(peak, 2)})
        if peak + SEARCH_HEADROOM_GB > PEER_MEMORY_GB:
            break
    return tried


def _load_4bit(base: Path, quant_storage: bool = False):
    import torch
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    extra = {"bnb_4bit_quant_storage": dtype} if quant_storage else {}
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype, **extra)
    return AutoModelForImageTextToText.from_pretrained(base, quantization_config=bnb, dtype=dtype,
                                                       device_map={"": 0} if cuda else None, attn_implementation="sdpa")


def peer_row(name: str, films_json: Path, base: Path, workdir: Path, tiny: bool, timeout: float | None,
             batches: tuple[int, ...] | None = None) -> dict:
    row_out = workdir / f"peer-{name}.json"
    row_out.unlink(missing_ok=True)
    batches = batches or ((2, 3) if tiny else PEER_BATCHES[name])
    # Nothing outside the host can be reached: no hub look-ups, no usage statistics (Unsloth's).
    env = dict(os.environ, PYTHONPATH=pythonpath(), BENCH_T0=str(time.time()), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1", **PEER_ENV.get(name, {}))
    stacks = workdir / f"stacks-peer-{name}.txt"
    stacks.unlink(missing_ok=True)
    if timeout is not None:
        # Once, shortly before the limit: a dump reads the other threads' frames without their lock. One taken
        # while Unsloth's main thread was in Triton's code generator broke off mid-frame, and the process ended
        # with no error (H200 host).
        env.update(BENCH_STACKS_FILE=str(stacks), BENCH_STACKS_AT_S=str(max(timeout - 15, 5)))
    cmd = [sys.executable, __file__, "--peer", name, "--peer-out", str(row_out), "--films-json", str(films_json),
           "--model", str(base), "--workdir", str(workdir), "--batches", ",".join(map(str, batches))]
    proc = _run(cmd + (["--tiny"] if tiny else []), env, timeout)
    log = proc.stdout + proc.stderr
    (workdir / f"log-peer-{name}.txt").write_text(log)
    if row_out.is_file():
        return steady_split(json.loads(row_out.read_text()) | {"steps_reported": reported_steps(log)})
    row = {"name": name, "phase": "phase1", "batches": list(batches), "error": (proc.stderr or proc.stdout)[-1500:],
           "returncode": proc.returncode, "steps_reported": reported_steps(log)}
    if stacks.is_file() and stacks.stat().st_size:
        row["stacks_before_stop"] = stacks.read_text()[-6000:]
    return row


def reported_steps(log: str) -> list[list[float]]:
    """``[step, seconds after start, samples per step]`` of each "bench: step" line: a peer stopped by its time
    limit still shows when its steps began and how fast they came."""
    pattern = r"bench: step (\d+) done (\d+(?:\.\d+)?) s after start(?:, (\d+) samples)?"
    return [[int(m[1]), float(m[2]), int(m[3]) if m[3] else None] for m in re.finditer(pattern, log)]


def steady_rate(steps: list[list]) -> float | None:
    """Samples/s of a typical step: samples per step over the median time between consecutive reported steps,
    the first step (compiles, the first batches' decoding) left out; as xray-train's rows take their rate
    (the median step without compiles). None with fewer than three steps or no samples per step."""
    if len(steps) < 3 or any(s[2] is None for s in steps):
        return None
    gaps = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(steps, steps[1:], strict=False) if b[0] > a[0]]
    typical = statistics.median(gaps)
    return round(steps[-1][2] / typical, 3) if typical > 0 else None


def beyond_typical(train_s: float, samples: float, rate: float) -> float:
    """Seconds a run's steps took beyond ``samples`` at its typical step's ``rate`` (compiles, the first
    batches, a recompiled last batch): a fixed cost in the projection, for xray-train and peers alike."""
    return max(train_s - samples / rate, 0.0)


def steady_split(row: dict) -> dict:
    """A finished peer's row with its training rate taken as xray-train's is (``steady_rate``): the time its
    steps took beyond that rate (compiles, the first batches, the short last batch) becomes a fixed stage,
    ``warm_up``; ``samples_per_s_training_mean`` keeps the plain average over the epoch."""
    rate = steady_rate(row.get("steps_reported") or [])
    if rate is None or "stages" not in row:
        return row
    stages = dict(row["stages"])
    stages["warm_up"] = round(beyond_typical(stages["train"], row.get("samples", row["films"]), rate), 2)
    stages["train"] = round(stages["train"] - stages["warm_up"], 2)
    mean = row.get("samples_per_s_training_mean", row["samples_per_s_training_steps"])
    return row | {"stages": stages, "samples_per_s_training_steps": rate, "samples_per_s_training_mean": mean}


def vision_rates(base: Path, batch: int = 32, repeats: int = 5) -> dict:
    """SigLIP forward + pooling in films/s, transformers' eager layers against compiled ones, same inputs."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from xray_train.features import _vision_forward, pooled_vision_features

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    model = Gemma3ForConditionalGeneration.from_pretrained(base, dtype=dtype, attn_implementation="sdpa").model
    model.vision_tower.to("cuda" if cuda else "cpu")
    model.multi_modal_projector.to("cuda" if cuda else "cpu")
    size = model.config.vision_config.image_size
    torch.manual_seed(0)
    pixels = torch.rand(batch, 3, size, size, device="cuda" if cuda else "cpu", dtype=dtype) * 2 - 1

    def rate(fn):
        fn(pixels)
        fn(pixels)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            out = fn(pixels)
        if cuda:
            torch.cuda.synchronize()
        return batch * repeats / (time.perf_counter() - started), out

    eager_rate, eager = rate(lambda px: pooled_vision_features(model, px))
    compile_started = time.perf_counter()
    compiled_fn = _vision_forward(model, compile_vision=True)
    compiled_fn(pixels)
    compile_s = time.perf_counter() - compile_started
    compiled_rate, compiled = rate(compiled_fn)
    diff = (compiled.float() - eager.float()).abs()
    return {"name": "siglip forward (cache build, GPU only)", "batch": batch, "eager_films_per_s": round(eager_rate, 1),
            "compiled_films_per_s": round(compiled_rate, 1), "compile_s": round(compile_s, 1),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "mean_abs_value": float(eager.float().abs().mean())}


# ---------------------------------------------------------------------------------------------
# Report


#: Validation samples a PadChest-size run evaluates (configs/phase1_padchest.yaml: training.max_eval_samples).
PROJECTION_EVAL_SAMPLES = 512


def projection(rows: list[dict]) -> dict:
    """100k films from the measured stages: fixed costs stay, per-film stages scale at their measured rates."""
    out = {"films": PROJECTION_FILMS, "method": (
        "xray-train: start_up + compile + save + other + time in steps beyond the typical step (fixed) + cache "
        "build's first batch and set-up (fixed) + "
        "films / cache films/s after the first batch + films / samples/s in training steps + data read x films "
        f"/ measured films + {PROJECTION_EVAL_SAMPLES} validation samples at the measured time per eval batch; "
        "', cache as built at 100k': the same with the cache build of the cache-features row (compiled SigLIP, "
        "as auto settings give from 8000 images): its first batch (compile included) + films / its rate after "
        "the first batch. Peers: "
        "start_up + save + other (fixed; the benchmark's batch search left out) + films / their samples/s in "
        "training (their decoding workers run alongside the steps). Every training rate is that of a typical step: "
        "xray-train's the median step without compiles, a peer's samples per step over the median time between "
        "its reported steps; a peer's time in steps beyond that rate (compiles, first batches) is fixed "
        "(warm_up). A peer stopped by its time limit after three or more steps: the time of its last reported "
        "step less its steps after the first at that rate (fixed) + films at that rate")}
    films = PROJECTION_FILMS
    at_scale = next((r for r in rows if r["name"] == CACHE_ROW and not r.get("error")), None)
    for row in rows:
        rate = steady_rate(row.get("steps_reported") or []) if row.get("error") else None
        if rate and is_peer(row["name"]):
            # Stopped by its time limit after some steps: what it did up to its last step, beyond its steps
            # at the typical rate, is fixed (start-up, compiles).
            (first, _, _), (last, t_last, per_step) = row["steps_reported"][0], row["steps_reported"][-1]
            fixed = t_last - (last - first) * per_step / rate
            out[row["name"]] = {"first_epoch_h": round((fixed + films / rate) / 3600, 2),
                                "from_steps_reported": {"samples_per_s": rate, "fixed_s": round(fixed, 1)}}
            continue
        if row.get("error") or row.get("phase") != "phase1" or "stages" not in row:
            continue
        st = row["stages"]
        if row["name"].startswith("xray-train"):
            seconds = st["start_up"] + st["compile"] + st["save"] + max(st["other"], 0.0)
            seconds += st["data_read"] * films / row["films"]
            if row.get("validation_films") and st["eval"] > 0:
                # Per evaluation batch: a few validation films are one batch, host-bound like a full one.
                batches = math.ceil(row["validation_films"] / row["eval_batch"])
                seconds += math.ceil(PROJECTION_EVAL_SAMPLES / row["eval_batch"]) * st["eval"] / batches
            rate = row["samples_per_s_training_steps"]
            seconds += beyond_typical(st["train"], row["films"] * row.get("epochs", 1), rate) + films / rate
            build = row.get("cache_build")
            if build and build.get("films_per_s_after_first_batch"):
                steady = build["films_per_s_after_first_batch"]
                cached = row["films"] + row.get("validation_films", 0)
                build_s = max(st["cache_build"] - (cached - build["first_batch_films"]) / steady, 0.0) + films / steady
            else:
                build_s = films / row["cache_films_per_s"] if row.get("cache_films_per_s") else 0.0
            out[row["name"]] = {"first_epoch_h": round((seconds + build_s) / 3600, 2)}
            if build and at_scale and at_scale["cache_build"].get("films_per_s_after_first_batch"):
                # From 8000 images a run compiles SigLIP for its cache: the cache-build row measures that build
                # over thousands of films (its first batch, with the compile, is a fixed cost).
                b = at_scale["cache_build"]
                scaled = b["first_batch_done_s"] + films / b["films_per_s_after_first_batch"]
                out[f"{row['name']}, cache as built at 100k"] = {"first_epoch_h": round((seconds + scaled) / 3600, 2)}
        else:
            fixed = sum(v for k, v in st.items() if k not in ("train", "batch_search"))
            out[row["name"]] = {"first_epoch_h": round((fixed + films / row["samples_per_s_training_steps"]) / 3600, 2)}
    seed = out.get("seed", {}).get("first_epoch_h")
    peers = [v["first_epoch_h"] for n, v in out.items() if is_peer(n)]
    for name, value in out.items():
        if name.startswith("xray-train") and isinstance(value, dict):
            value["x_seed"] = round(seed / value["first_epoch_h"], 2) if seed else None
            value["x_best_peer"] = round(min(peers) / value["first_epoch_h"], 2) if peers else None
    return out


def ratios(rows: list[dict]) -> dict:
    by = {r["name"]: r for r in rows if not r.get("error")}
    seed = by.get("seed", {}).get("samples_per_s_end_to_end")
    peers = [r["samples_per_s_end_to_end"] for n, r in by.items() if is_peer(n)]
    out = {}
    for name, _, _ in PHASE1_ROWS.values():
        if name in by:
            sps = by[name]["samples_per_s_end_to_end"]
            out[name] = {"x_seed": round(sps / seed, 2) if seed else None,
                         "x_best_peer": round(sps / max(peers), 2) if peers else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "e2e_speed.json")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/xray-e2e"))
    ap.add_argument("--padchest-films", type=int, default=320)
    ap.add_argument("--indiana-films", type=int, default=200)
    ap.add_argument("--rows",
                    default="vision,cache,xray1,xray1-compiled,xray1-build,seed,xray-rerun,xray-rerun-build,xray2,trl,unsloth",
                    help="rows to run, in this order: vision, cache (cache-features on linked films), xray1 "
                    "(first run, defaults: the steps fill the cache), xray1-compiled (the same, SigLIP compiled), "
                    "xray1-build (first run, the cache built before the first step), xray-rerun (defaults: what a "
                    "fill run's later epochs cost), xray-rerun-build (a rerun built first), xray2, seed, "
                    "trl, unsloth, unsloth-eager (its torch.compile regions off)")
    ap.add_argument("--merge", type=Path, nargs="*", default=[], help="earlier outputs whose rows to keep")
    ap.add_argument("--cache-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting for the cache row's cache-features (repeatable), e.g. training.vision_attention=cudnn")
    ap.add_argument("--tiny", action="store_true", help="tiny model and small films: a CPU shake-out")
    ap.add_argument("--peer-batches", action="append", default=[], metavar="NAME=B[,B...]",
                    help="a peer's candidate batches instead of PEER_BATCHES (Unsloth, which trains at its first, "
                    "at another batch)")
    ap.add_argument("--deadline-s", type=float, help="stop each row by this many seconds after the start "
                    "(a row that would start later is skipped; a stopped row records what it printed)")
    # Internal: one row in this process (see "Modes" in the docstring).
    ap.add_argument("--cli-stages", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--peer-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--films-json", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--batches", help=argparse.SUPPRESS)
    ap.add_argument("--vision-out", type=Path, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()

    if args.vision_out:
        args.vision_out.write_text(json.dumps(vision_rates(args.model, batch=2 if args.tiny else 32)))
        return
    if args.cli_stages:
        run_cli_with_stages(args.cli_stages, [a for a in rest if a != "--"])
        return
    if args.peer:
        if os.environ.get("BENCH_STACKS_FILE"):
            # A peer stopped by its limit (Unsloth, compiling, on the H200 host) leaves where every thread was
            # shortly before, not only its last lines of output.
            import faulthandler

            stacks = open(os.environ["BENCH_STACKS_FILE"], "w")  # noqa: SIM115 - open until the process ends
            faulthandler.dump_traceback_later(float(os.environ["BENCH_STACKS_AT_S"]), exit=False, file=stacks)
        try:
            row = run_peer(args.peer, json.loads(args.films_json.read_text()), args.model,
                           tuple(int(b) for b in args.batches.split(",")), args.workdir / f"peer-{args.peer}", args.tiny)
        except Exception as exc:  # a failing peer must not lose the other rows
            traceback.print_exc()
            row = {"name": args.peer, "phase": "phase1", "batches": args.batches,
                   "error": f"{type(exc).__name__}: {str(exc)[:600]}"}
        args.peer_out.write_text(json.dumps(row))
        return

    import torch

    from xray_train.data.loader import available_cpus

    if not args.rows:  # only combine earlier outputs (runs split over several GPU sessions)
        merged = [json.loads(p.read_text()) for p in args.merge]
        report = {**merged[0], "rows": []}
        for part in merged:
            names = {r["name"] for r in part["rows"]}
            report["rows"] = [r for r in report["rows"] if r["name"] not in names] + part["rows"]
        report["x"], report["projection"] = ratios(report["rows"]), projection(report["rows"])
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        return

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    size_range = (300, 500) if args.tiny else (2000, 3000)
    films = make_films(work / "films", args.padchest_films, args.indiana_films, size_range, available_cpus())
    films_json = work / "films" / "films.json"
    print(f"films ready in {time.time() - started:.0f} s: {films}", flush=True)
    base = make_model(work, args.tiny)
    print(f"model ready in {time.time() - started:.0f} s", flush=True)

    rows: list[dict] = []
    for earlier in args.merge:  # rows measured by an earlier invocation, marked as such
        rows += [{**r, "earlier_run": True} for r in json.loads(earlier.read_text())["rows"]]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    def record(row: dict) -> None:
        rows[:] = [r for r in rows if r["name"] != row["name"]] + [row]
        print(json.dumps(row), flush=True)
        write()

    def write() -> None:
        report = {
            "device": device, "cpus": available_cpus(), "film_px": films["film_px"],
            "film_px_range": films["film_px_range"], "film_mb_median": films["film_mb_median"],
            "padchest_films": args.padchest_films, "indiana_films": args.indiana_films,
            "tiny": args.tiny, "rows": rows, "x": ratios(rows), "projection": projection(rows),
            "versions": {m: package_version(m) for m in ("torch", "transformers", "peft", "bitsandbytes", "trl", "unsloth")},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    peer_batches = {n: tuple(int(b) for b in bs.split(",")) for n, bs in (a.split("=", 1) for a in args.peer_batches)}
    cache = {"XRAY_TRAIN_FEATURE_CACHE": str(work / "feature-cache")}
    p1, p2 = work / "out-phase1", work / "out-phase2"
    for what in args.rows.split(","):
        left = None if args.deadline_s is None else args.deadline_s - (time.time() - started) - 10
        if left is not None and left < 30:
            print(f"bench: no time left for row {what!r} within --deadline-s", flush=True)
            continue
        if what == "vision":
            vision_out = work / "vision.json"
            cmd = [sys.executable, __file__, "--vision-out", str(vision_out), "--model", str(base)]
            proc = subprocess.run(cmd + (["--tiny"] if args.tiny else []), env=dict(os.environ, PYTHONPATH=pythonpath()),
                                  capture_output=True, text=True)
            record(json.loads(vision_out.read_text()) if proc.returncode == 0 else
                   {"name": "siglip forward (cache build, GPU only)", "error": proc.stderr[-1500:]})
        elif what in PHASE1_ROWS:
            import shutil

            name, sets, first_run = PHASE1_ROWS[what]
            if first_run:  # a user's first run: nothing cached
                shutil.rmtree(work / "feature-cache", ignore_errors=True)
            row = xray_row(name, "phase1", xray_argv("phase1", films, base, p1, args.tiny, sets), work, cache, left)
            record(row | {"overrides": sets})  # what it ran with, beyond the shipped config
        elif what == "cache":
            import shutil

            cache_root = work / "feature-cache-linked"
            shutil.rmtree(cache_root, ignore_errors=True)
            csv_path = linked_padchest(films, CACHE_ROW_COPIES, work / "films" / "linked")
            argv = xray_argv("phase1", films, base, work / "unused", args.tiny,
                             [f"data.csv={csv_path}", "training.compile_vision_cache=true", *args.cache_set])
            argv[0] = "cache-features"
            argv.remove("--overwrite")
            row = cache_row(argv, work, {"XRAY_TRAIN_FEATURE_CACHE": str(cache_root)}, left)
            record(row | {"overrides": args.cache_set})
        elif what == "xray2":
            record(xray_row("xray-train phase2 --resume", "phase2",
                            xray_argv("phase2", films, base, p2, args.tiny, []) + ["--resume", str(p1)], work, cache,
                            left))
        elif what in PEER_BATCHES:
            row = peer_row(what, films_json, base, work, args.tiny, left, peer_batches.get(what))
            if what in peer_batches:  # beside the row at its usual batches, not in its place
                row["name"] = f"{what}, batch {row.get('batch') or ','.join(map(str, peer_batches[what]))}"
            record(row)
        else:
            raise SystemExit(f"--rows: unknown row {what!r}")
    write()
    print(f"wrote {args.out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
