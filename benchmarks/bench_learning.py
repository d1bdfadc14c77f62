"""Does the two-phase recipe learn to localise? Box lesions in synthetic films it never saw.

Builds a small random Gemma 3 image-text model (``xray_train.testing.tiny.make_tiny_model``: SigLIP tower, the
real Gemma 3 tokenizer, a few decoder layers), writes synthetic films with exactly known boxes
(``xray_train.testing.synthetic.write_benchmark``: PadChest layout for Phase 1, Indiana layout + exact
``boxes.csv`` for Phase 2, a held-out Indiana set drawn from another seed), then runs the real chain:

    xray-train phase1 --config bench_phase1.yaml             (subprocess, the CLI)
    xray-train phase2 --config bench_phase2.yaml --resume P1 (subprocess, the CLI)
    xray_train.evaluate.evaluate(P2, held-out config, split="train")  (all held-out images)

As in the real recipe the vision tower is random and FROZEN; Phase 1 trains LoRA on the language
model's q_proj/v_proj, Phase 2 continues it and also trains the projector and the ``<loc>`` rows.

Rows written to ``benchmarks/results/learns_boxes.json``:

- ``main``: Phase 1 -> Phase 2 --resume;
- ``phase2_only``: Phase 2 from a fresh adapter (no Phase 1);
- ``projector_frozen``: ``model.train_projector=false`` in Phase 2;
- ``plain_text_loc``: ``model.add_loc_tokens=false``: the answers still spell ``<loc0123>``, which the
  tokenizer then splits into several ordinary pieces (evaluated with ``add_loc_tokens=false`` too, see
  ``_evaluate``);
- ``mean_box``: no model: every held-out image gets the mean training box of each label it really has
  (the labels are given for free, so it isolates localisation), scored with ``metrics.box_scores``;
- ``probe``: is the box even readable from the frozen, pooled vision features? A ridge regression and a
  one-head attention readout (a learned query picks image tokens, a linear map turns them into the box:
  what one attention layer over trainable projector outputs can do) are fitted on the training films'
  features and scored on the held-out ones.

Run (CPU, a few minutes; GPU, the full preset, about 8 minutes on one H100):

    /work/venv/bin/python benchmarks/bench_learning.py --device cpu --size ci
    python benchmarks/bench_learning.py --device cuda --size full

``--jobs N`` runs N trainings side by side (4 fit one GPU); ``--set key=value`` adds a config override to
every training run (e.g. ``training.learning_rate=1e-3``);
``--rows main,mean_box`` runs a subset; ``--out`` names the results file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "learns_boxes.json"
TARGETS = {"map50": 0.7, "finding_f1": 0.9, "parse_rate": 0.98}
ALL_ROWS = ("main", "phase2_only", "projector_frozen", "plain_text_loc", "mean_box", "probe")

# Sizes. Gemma 3 pools SigLIP's patch grid to mm_tokens_per_image soft tokens; the tiny default (4x4)
# gives each token a quarter of the film's width, far coarser than a lesion, so the presets keep one
# token per 14-px patch on a 112-px image (8x8 grid, each token 1/8 of the film).
PRESETS = {
    "ci": {
        "model": dict(image_size=112, patch_size=14, mm_tokens_per_image=64, hidden_size=128, num_layers=2,
                      vision_hidden_size=64, vision_layers=2, embedding_std=128**-0.5, final_norm_scale=4.0),
        "data": dict(n_train=160, n_test=48, kinds=("mass",), n_findings=1, blob_radius=(0.06, 0.09)),
        "phase1": dict(max_steps=40, learning_rate=2e-3, batch=8),
        "phase2": dict(max_steps=200, learning_rate=2e-3, projector_learning_rate=2e-3, batch=8),
        "lora_r": 16,
    },
    "full": {
        "model": dict(image_size=224, patch_size=14, mm_tokens_per_image=256, hidden_size=256, num_layers=4,
                      vision_hidden_size=128, vision_layers=2, embedding_std=256**-0.5, final_norm_scale=4.0),
        "data": dict(n_train=1500, n_test=200, kinds=("mass",), n_findings=1, blob_radius=(0.06, 0.09)),
        "phase1": dict(max_steps=300, learning_rate=1e-3, batch=16),
        "phase2": dict(max_steps=1500, learning_rate=1e-3, projector_learning_rate=1e-3, batch=16),
        "lora_r": 32,
    },
}
SEED_TRAIN, SEED_TEST = 1000, 2000


# ---------------------------------------------------------------------------------------------
# Configs


def _phase_yaml(phase: str, base: Path, out: Path, data: dict, t: dict, r: int, device: str) -> dict:
    """A complete run config; anything not set here is the project default."""
    if phase == "phase1":
        data_section = {"dataset": "padchest", "csv": str(data["padchest_csv"]),
                        "image_root": str(data["padchest_images"])}
    else:
        d = data["train"]
        data_section = {"dataset": "indiana", "reports_csv": str(d["reports_csv"]),
                        "projections_csv": str(d["projections_csv"]), "image_root": str(d["image_root"]),
                        "projections": ["Frontal"], "box_source": "box_file", "box_file": str(d["box_file"])}
    # The held-out set is separate data: no validation split, every training film is trained on.
    data_section |= {"val_fraction": 0.0, "test_fraction": 0.0}
    training = {
        "max_steps": t["max_steps"],
        "per_device_train_batch_size": t["batch"],
        "per_device_eval_batch_size": 16,
        "learning_rate": t["learning_rate"],
        "warmup_steps": 0.05,
        "logging_steps": 10,
        "save_steps": t["max_steps"],
        "save_total_limit": 1,
        "eval_strategy": "no",
        "dataloader_num_workers": 0 if device == "cpu" else 2,
        "report_to": ["none"],
        "seed": 0,
    }
    if t.get("projector_learning_rate"):
        training["projector_learning_rate"] = t["projector_learning_rate"]
    return {
        "phase": phase,
        "output_dir": str(out),
        # A tiny model in fp32 on either device: bf16 rounding would blur 1/1023 loc steps for no speed gain.
        "model": {"base": str(base), "load_in_4bit": True, "compute_dtype": "float32"},
        "lora": {"r": r, "alpha": 2 * r, "target_modules": ["q_proj", "v_proj"]},
        "data": data_section,
        "training": training,
    }


def _write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _cli(args: list[str], log: Path, env: dict) -> float:
    """Run ``xray-train ARGS`` as a user would; output to ``log``; seconds taken."""
    started = time.time()
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, "-m", "xray_train.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                              env=env, cwd=REPO)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(f"xray-train {args[0]} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return time.time() - started


# ---------------------------------------------------------------------------------------------
# Scoring


def _row(results: dict, seconds: float | None = None) -> dict:
    boxes = results.get("boxes") or {}
    return {
        "map50": results.get("map50"),
        "mean_iou": results.get("iou"),
        "hit_rate_50": results.get("hit_rate_50"),
        "precision_50": results.get("precision_50"),
        "finding_f1": results.get("f1"),
        "parse_rate": results.get("parse_rate"),
        "token_accuracy": results.get("token_accuracy"),
        "n_images": results.get("n_examples"),
        "n_reference_boxes": boxes.get("n_reference_boxes"),
        "n_predicted_boxes": boxes.get("n_predicted_boxes"),
        "truncated_answers": (results.get("generation") or {}).get("truncated_answers", {}).get("adapter"),
        "seconds": round(seconds, 1) if seconds is not None else None,
    }


def held_out_config(phase2_yaml: Path, data: dict, check_model: bool = True):
    """The Phase-2 config pointed at the held-out films; val/test fractions 0 put all of them in ``train``.
    ``check_model=False`` for callers that only read the data (no base model needed)."""
    from xray_train.config import load_config

    d = data["test"]
    return load_config(phase2_yaml, [
        f"data.reports_csv={d['reports_csv']}", f"data.projections_csv={d['projections_csv']}",
        f"data.image_root={d['image_root']}", f"data.box_file={d['box_file']}",
        "data.val_fraction=0", "data.test_fraction=0",
    ], check_model=check_model)


def _cached(path: Path, settings: dict, build):
    """Reuse what an earlier run built with the same settings (data writing is slow on a CPU)."""
    import pickle

    stamp = path.with_name(path.name + ".settings.json")
    saved = path.with_name(path.name + ".result.pkl")
    key = json.dumps(settings, sort_keys=True, default=list)
    if stamp.is_file() and saved.is_file() and stamp.read_text() == key and path.exists():
        return pickle.loads(saved.read_bytes())
    if path.exists():
        import shutil

        shutil.rmtree(path)
    result = build(path)
    saved.write_bytes(pickle.dumps(result))
    stamp.write_text(key)
    return result


def _evaluate(adapter: Path, phase2_yaml: Path, data: dict, max_new_tokens: int, plain_text: bool = False) -> dict:
    from xray_train.evaluate import evaluate

    cfg = held_out_config(phase2_yaml, data)
    if plain_text:
        # Evaluated as it was trained: without loc tokens (evaluate otherwise refuses a Phase-2 adapter with
        # no trained loc rows, normally a Phase-1 adapter by mistake).
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"add_loc_tokens": False})})
    return evaluate(adapter, cfg, split="train", baseline=False, out_dir=adapter / "held_out_eval",
                    overwrite=True, max_new_tokens=max_new_tokens, progress=False, echo=lambda *a: None)


def mean_box_baseline(data: dict, phase2_yaml: Path) -> dict:
    """Mean training box per label, given to each held-out image once per label it really has."""
    from xray_train.config import load_config
    from xray_train.data.records import Box
    from xray_train.data.registry import read_dataset
    from xray_train.metrics import box_scores

    # Only the data is read: the baseline needs no base model.
    train = read_dataset(load_config(phase2_yaml, check_model=False).data).examples
    sums: dict[str, list[float]] = {}
    for ex in train:
        for b in ex.boxes or []:
            s = sums.setdefault(b.label, [0.0] * 5)
            for i, v in enumerate((b.x_min, b.y_min, b.x_max, b.y_max, 1.0)):
                s[i] += v
    mean = {label: Box(label, *(v / s[4] for v in s[:4])) for label, s in sums.items()}
    test = read_dataset(held_out_config(phase2_yaml, data, check_model=False).data).examples
    refs = [list(ex.boxes or []) for ex in test]
    preds = [[mean[label] for label in dict.fromkeys(b.label for b in r) if label in mean] for r in refs]
    s = box_scores(preds, refs)
    return {"map50": s["map50"], "mean_iou": s["mean_iou"], "hit_rate_50": s["hit_rate_50"],
            "precision_50": s["precision_50"], "finding_f1": 1.0, "parse_rate": 1.0, "n_images": len(test),
            "note": "labels given (oracle); only the box is predicted"}


# ---------------------------------------------------------------------------------------------
# Probe: is the box in the frozen features at all?


def _features_and_boxes(base: Path, phase2_yaml: Path, data: dict, device: str):
    import torch

    from xray_train.config import ModelConfig, load_config
    from xray_train.data.registry import read_dataset
    from xray_train.features import pooled_vision_features
    from xray_train.inputs import PixelLoader, build_target
    from xray_train.data.loc import decode_boxes
    from xray_train.model import load_base

    model, processor = load_base(ModelConfig(base=str(base), load_in_4bit=False, compute_dtype="float32"),
                                 device_map={"": device})
    loader = PixelLoader(processor)
    out = []
    for cfg in (load_config(phase2_yaml), held_out_config(phase2_yaml, data)):
        examples = [ex for ex in read_dataset(cfg.data).examples if len(ex.boxes or []) == 1]
        feats = []
        for i in range(0, len(examples), 32):
            pixels = torch.stack([loader(ex.image_path) for ex in examples[i:i + 32]]).to(device)
            feats.append(pooled_vision_features(model.model, pixels).float().cpu())
        # The target the model is trained on: the box in the prepared (padded, resized) image.
        boxes = [decode_boxes(build_target(ex, "phase2"))[0] for ex in examples]
        y = torch.tensor([[b.x_min, b.y_min, b.x_max, b.y_max] for b in boxes])
        out.append((torch.cat(feats), y))
    del model
    return out


def _mean_iou(pred, ref) -> float:
    import torch

    lo = torch.maximum(pred[:, :2], ref[:, :2])
    hi = torch.minimum(pred[:, 2:], ref[:, 2:])
    inter = (hi - lo).clamp(min=0).prod(1)
    area = lambda b: (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)  # noqa: E731
    iou = inter / (area(pred) + area(ref) - inter).clamp(min=1e-9)
    return float(iou.mean()), float((iou >= 0.5).float().mean())


def probe(base: Path, phase2_yaml: Path, data: dict, device: str) -> dict:
    import torch

    (xtr, ytr), (xte, yte) = _features_and_boxes(base, phase2_yaml, data, device)
    n, t, d = xtr.shape
    mu, sd = xtr.mean((0, 1)), xtr.std((0, 1)) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    result = {"n_train": n, "n_test": len(xte), "tokens": t, "feature_dim": d}
    # Ridge on all tokens' features, alpha picked on a slice of the training films.
    flat_tr, flat_te = xtr.reshape(n, -1), xte.reshape(len(xte), -1)
    cut = int(n * 0.8)
    best = None
    for alpha in (1.0, 10.0, 100.0, 1000.0, 10000.0):
        w = _ridge(flat_tr[:cut], ytr[:cut], alpha)
        iou = _mean_iou(_affine(flat_tr[cut:], w), ytr[cut:])[0]
        if best is None or iou > best[0]:
            best = (iou, alpha)
    w = _ridge(flat_tr, ytr, best[1])
    iou, hit = _mean_iou(_affine(flat_te, w), yte)
    result["ridge"] = {"alpha": best[1], "mean_iou": iou, "hit_rate_50": hit}
    # One-head attention readout, trained with an L1 box loss.
    torch.manual_seed(0)
    q = torch.zeros(d, requires_grad=True)
    pos = torch.zeros(t, requires_grad=True)
    val = torch.nn.Linear(d, 4)
    opt = torch.optim.Adam([q, pos, *val.parameters()], lr=1e-2)

    def predict(x):
        att = torch.softmax(x @ q + pos, dim=1)
        return torch.einsum("nt,ntk->nk", att, val(x))

    for _ in range(1500):
        opt.zero_grad()
        loss = (predict(xtr) - ytr).abs().mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        iou, hit = _mean_iou(predict(xte), yte)
        tr_iou, _ = _mean_iou(predict(xtr), ytr)
    result["attention"] = {"mean_iou": iou, "hit_rate_50": hit, "train_mean_iou": tr_iou}
    return result


def _ridge(x, y, alpha):
    import torch

    x1 = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    # Dual form: n is far smaller than the feature count.
    k = x1 @ x1.T
    a = torch.linalg.solve(k + alpha * torch.eye(len(x1), dtype=k.dtype), y.double())
    return (x1.T @ a).float()


def _affine(x, w):
    import torch

    return torch.cat([x, torch.ones(len(x), 1)], 1) @ w


# ---------------------------------------------------------------------------------------------
# The benchmark


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_benchmark(workdir: Path, preset: dict, device: str, rows=ALL_ROWS, extra_sets: list[str] = (),
                  echo=print, jobs: int = 1) -> dict:
    """Build model and data under ``workdir``, train and score ``rows``; returns the results dict.

    ``jobs`` > 1 runs that many trainings side by side."""
    from xray_train.testing.synthetic import write_benchmark
    from xray_train.testing.tiny import make_tiny_model

    started = time.time()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, XRAY_TRAIN_FEATURE_CACHE=str(workdir / "feature-cache"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.update({k: env[k] for k in ("XRAY_TRAIN_FEATURE_CACHE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")})

    d = preset["data"]
    base = _cached(workdir / "base", preset["model"],
                   lambda path: make_tiny_model(path, overwrite=True, **preset["model"]))
    data = _cached(workdir / "data", d, lambda path: write_benchmark(
        path, d["n_train"], d["n_test"], SEED_TRAIN, SEED_TEST, workers=min(3, os.cpu_count() or 1),
        n_findings=d["n_findings"], kinds=tuple(d["kinds"]), blob_radius=tuple(d["blob_radius"])))
    echo(f"model + data ready ({time.time() - started:.0f} s)")
    r = preset["lora_r"]
    p1_yaml = _write_yaml(workdir / "bench_phase1.yaml",
                          _phase_yaml("phase1", base, workdir / "phase1", data, preset["phase1"], r, device))
    p2_yaml = _write_yaml(workdir / "bench_phase2.yaml",
                          _phase_yaml("phase2", base, workdir / "phase2", data, preset["phase2"], r, device))
    sets = [x for s in extra_sets for x in ("--set", s)]
    results: dict = {"rows": {}}
    # Plain-text boxes are ~7 pieces per coordinate; room for three boxes either way.
    new_tokens = {"plain_text_loc": 100}

    variants = {
        "main": (["--resume", str(workdir / "phase1")], []),
        "phase2_only": ([], []),
        "projector_frozen": (["--resume", str(workdir / "phase1")], ["model.train_projector=false"]),
        "plain_text_loc": (["--resume", str(workdir / "phase1")], ["model.add_loc_tokens=false"]),
    }
    # Trainings are subprocesses. ``jobs`` > 1 runs that many side by side (Phase 2 alone needs no Phase 1,
    # the --resume variants wait for it), spread over the visible GPUs: a tiny model leaves a GPU mostly
    # idle, so several share one. Scoring runs here afterwards, one at a time.
    n_gpus = _visible_gpus() if device == "cuda" else 0
    free_slots: queue.Queue = queue.Queue()
    for slot in range(max(jobs, 1)):
        free_slots.put(slot)

    def on_a_slot(args: list[str], log: Path) -> float:
        slot = free_slots.get()
        try:
            pinned = {"CUDA_VISIBLE_DEVICES": str(slot % n_gpus)} if n_gpus > 1 else {}
            return _cli(args, log, env | pinned)
        finally:
            free_slots.put(slot)

    wanted = [name for name in variants if name in rows]
    with ThreadPoolExecutor(len(wanted) + 1) as pool:  # threads wait; slots bound the trainings
        phase1 = None
        if any(name != "phase2_only" for name in wanted):
            phase1 = pool.submit(on_a_slot, ["phase1", "--config", str(p1_yaml), "--overwrite", *sets],
                                 workdir / "phase1.log")

        def phase2(name: str) -> float:
            resume, overrides = variants[name]
            if resume:
                phase1.result()
            args = ["phase2", "--config", str(p2_yaml), "--overwrite", "--set",
                    f"output_dir={workdir / f'phase2_{name}'}", *resume, *sets]
            return on_a_slot(args + [x for o in overrides for x in ("--set", o)], workdir / f"phase2_{name}.log")

        # Phase 2 alone first: it need not wait for Phase 1.
        trainings = {name: pool.submit(phase2, name) for name in sorted(wanted, key=lambda n: bool(variants[n][0]))}
        if phase1 is not None:
            results["phase1_seconds"] = round(phase1.result(), 1)
            echo(f"phase1 done ({results['phase1_seconds']:.0f} s)")
        train_seconds = {name: job.result() for name, job in trainings.items()}
    for name in wanted:
        out = workdir / f"phase2_{name}"
        t0 = time.time()
        res = _evaluate(out, p2_yaml, data, new_tokens.get(name, 40), plain_text=name == "plain_text_loc")
        row = _row(res, time.time() - t0 + train_seconds[name]) | {"train_seconds": round(train_seconds[name], 1)}
        summary = json.loads((out / "training_summary.json").read_text())
        row["final_train_loss"] = (summary.get("metrics") or {}).get("train_loss")
        results["rows"][name] = row
        echo(f"{name}: " + ", ".join(f"{k}={_fmt(row[k])}" for k in ("map50", "mean_iou", "hit_rate_50",
                                                                      "finding_f1", "parse_rate")))
    if "mean_box" in rows:
        results["rows"]["mean_box"] = mean_box_baseline(data, p2_yaml)
        echo(f"mean_box: map50={_fmt(results['rows']['mean_box']['map50'])}, "
             f"mean_iou={_fmt(results['rows']['mean_box']['mean_iou'])}")
    if "probe" in rows:
        results["probe"] = probe(base, p2_yaml, data, "cuda" if device == "cuda" else "cpu")
        echo(f"probe: {results['probe']}")
    results["run_time_s"] = round(time.time() - started, 1)
    return results


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def verdict(results: dict) -> dict:
    main = results["rows"].get("main") or {}
    return {k: (main.get(k) is not None and main[k] >= v) for k, v in TARGETS.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=tuple(PRESETS), default="ci")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_learning")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--rows", default=",".join(ALL_ROWS), help=f"comma-separated subset of {ALL_ROWS}")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override for every training run")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainings run side by side (spread over the visible GPUs; several share one)")
    parser.add_argument("--preset-json", default=None, help="JSON merged into the preset (experiments)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU visible")
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    preset = json.loads(json.dumps(PRESETS[args.size]))
    for key, value in json.loads(args.preset_json or "{}").items():
        preset[key] = preset[key] | value if isinstance(value, dict) else value
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    unknown = set(rows) - set(ALL_ROWS)
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; choose from {ALL_ROWS}")
    results = run_benchmark(args.workdir / args.size, preset, args.device, rows, args.sets, jobs=args.jobs)
    import torch
    import transformers

    doc = {
        "benchmark": "learns_boxes",
        "device": device_name(args.device),
        "size": args.size,
        "run_time_s": results.pop("run_time_s"),
        "settings": preset | {"extra_overrides": args.sets, "seed_train": SEED_TRAIN, "seed_test": SEED_TEST,
                              "torch": torch.__version__, "transformers": transformers.__version__},
        "targets": TARGETS,
        "meets_targets": verdict(results),
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
