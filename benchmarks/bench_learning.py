"""Does Phase 2 learn boxes? Box lesions in synthetic films it never saw, on a pretrained stand-in base.

The base is either

- ``standin`` (the ``full`` preset): ``xray_train.testing.standin.make_standin_model``: Gemma 3 270M with its real
  pretrained weights and a small SigLIP tower pretrained once (fixed seed) on other films to map the
  coverage of other finding kinds (never a mass, never a box), frozen as MedGemma's is; or
- ``tiny`` (the ``ci`` preset and ``tests/test_learning.py``): the tiny random Gemma 3 of
  ``xray_train.testing.tiny`` (with a pretrained-like output scale) carrying the same kind of pretrained tower
  at toy size: it checks the chain on a CPU, not what a pretrained LM can do.

Synthetic films with exactly known boxes (``xray_train.testing.synthetic.write_benchmark``: PadChest layout
for Phase 1, Indiana layout + exact ``boxes.csv`` for Phase 2, a held-out Indiana set drawn from another
seed, one ``mass`` per film) go through the real chain, every step a CLI subprocess:

    xray-train phase1 --config bench_phase1.yaml
    xray-train phase2 --config bench_phase2.yaml --resume P1 [--set LEVER=...]
    xray_train.evaluate.evaluate(P2, held-out config, split="train")     (subprocess; all held-out films)

Rows written to ``benchmarks/results/learns_boxes.json`` (``rows``), each with the overrides it ran with:

- ``main``: Phase 1 -> Phase 2 ``--resume`` with every default;
- ``random_tower``: the same chain on the base with a random frozen tower;
- ``text_format``: ``data.box_format=text`` (plain integers 0-999, no added tokens);
- ``numbers_init``, ``no_label_smoothing``, ``no_l1``, ``two_stage``, ``expected_decode`` (the main
  adapter re-scored): one ``<loc>`` lever moved away from its default each; ``l1_weight_3``: the L1 term
  three times its default weight; ``main_seed_1``, ``main_seed_2``: ``main`` with other
  training seeds (the spread a lever's difference must exceed); ``text_format_seed_1``: ``text_format``
  with another seed;
- ``main_fp16``: ``main`` with the resolver's no-bf16 switch on for its whole chain (Phase 1 too) and the
  precision left to it: fp16 with the residual scale, as on a T4 (CUDA only);
- ``mean_box``: no model: each held-out film gets the mean training box (labels given);

and ``probe``: ridge regression and a non-linear attention readout fitted on the frozen tower's pooled
features of the training films, scored on the held-out ones (the ceiling a readout of this tower reaches).
``standin`` describes the base: language model, tower recipe, seed and weight fingerprints.

Run (see docs/learning.md):

    python benchmarks/bench_learning.py --device cpu --size ci
    python benchmarks/bench_learning.py --device cuda --size full --jobs 4

``--jobs N`` runs N trainings side by side (several share one GPU); ``--rows`` picks a subset;
``--set key=value`` adds an override to every training and evaluation; ``--preset-json`` merges into the preset.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import REPO  # noqa: E402 - also puts the checkout's src/ first on the path
RESULTS = REPO / "benchmarks" / "results" / "learns_boxes.json"
#: ``hit_rate_50_of_probe``: the main row's hit@0.5 over the best probe's, on the same frozen tower.
TARGETS = {"map50": 0.5, "hit_rate_50_of_probe": 0.8, "finding_f1": 0.9, "parse_rate": 0.98}
# Each training row: (base, training overrides, evaluation overrides), each a difference from ``main`` (every
# default). Rows on the same base share its Phase 1. A preset with ``"pretrain_tower": False`` puts every row
# on the random tower. ``{lora_start}`` is a quarter of the preset's Phase-2 steps.
VARIANTS = {
    "main": ("pretrained", [], []),
    "random_tower": ("random", [], []),
    "text_format": ("pretrained", ["data.box_format=text"], ["data.box_format=text"]),
    "numbers_init": ("pretrained", ["model.loc_token_init=numbers"], []),
    "no_label_smoothing": ("pretrained", ["training.loc_label_sigma=0"], []),
    "no_l1": ("pretrained", ["training.loc_l1_weight=0"], []),
    "two_stage": ("pretrained", ["training.lora_start_step={lora_start}"], []),
    # Not a lever switched off: the L1 term three times as strong, to see which way its default should move.
    "l1_weight_3": ("pretrained", ["training.loc_l1_weight=3"], []),
    # ``main`` again with other training seeds (Phase 2's data order and dropout): how far a row moves by
    # chance, which a lever's difference must exceed to mean anything.
    "main_seed_1": ("pretrained", ["training.seed=1"], []),
    "main_seed_2": ("pretrained", ["training.seed=2"], []),
    "text_format_seed_1": ("pretrained", ["data.box_format=text", "training.seed=1"], ["data.box_format=text"]),
    # ``main`` as a GPU without bf16 (a T4) runs it: the precision left to the resolver, which picks fp16 with
    # Gemma 3's residual scale (NO_BF16 below). Its seed spread is the ``main`` rows'.
    "main_fp16": ("pretrained", ["model.compute_dtype=null"], ["model.compute_dtype=null"]),
}
#: Rows whose chain (its own Phase 1, Phase 2 and evaluation) runs with the resolver's no-bf16 switch on, as
#: on a T4. fp16 autocast needs CUDA: on a CPU these rows are left out with a note.
NO_BF16 = {"main_fp16"}
NO_BF16_ENV = {"XRAY_TRAIN_EMULATE_NO_BF16": "1"}
#: Rows that re-score another row's adapter with other evaluation settings: (adapter's row, overrides).
RESCORED = {"expected_decode": ("main", ["model.loc_decode=expected"])}
TRAINED_ROWS = tuple(VARIANTS)
ALL_ROWS = (*TRAINED_ROWS, *RESCORED, "mean_box", "probe")

# Sizes. One image token per patch (no pooling, an 8x8 grid): each token covers 1/8 of the film's side.
PRESETS = {
    # The chain at CPU size (tests/test_learning.py runs it in CI, about 2 minutes on 2 cores): the tiny random
    # LM with a pretrained-like output scale and a tiny pretrained tower, one 8-px patch per image token.
    "ci": {
        "lm": "tiny",
        "model": dict(hidden_size=128, num_layers=2, embedding_std=128**-0.5, final_norm_scale=4.0),
        "tower": dict(image_size=64, patch_size=8, hidden_size=32, layers=2, heads=2, n_films=400, steps=200,
                      batch=32, learning_rate=2e-3, film_scale=0.5),
        "data": dict(n_train=64, n_test=32, n_phase1=64, kinds=("mass",), n_findings=1, blob_radius=(0.08, 0.12)),
        "phase1": dict(max_steps=4, learning_rate=2e-2, batch=4),
        "phase2": dict(max_steps=150, learning_rate=5e-3, projector_learning_rate=5e-3, batch=8),
        "lora_r": 16,
        "compute_dtype": "float32",
        # The tiny random LM's frozen rows for the label and <end_of_turn> lose to <loc> rows trained with the
        # Gaussian and L1 terms, and its answers stop ending: one-hot targets at this size. (160 films for 200
        # steps, an earlier version of this preset, did not learn the answer format: parse rate 0.)
        "overrides": ["training.loc_label_sigma=0", "training.loc_l1_weight=0"],
        "probe_attention": False,  # the ridge readout is the ceiling here (closed form: seconds on a CPU)
    },
    "full": {
        "lm": "gemma3-270m",
        "tower": dict(image_size=112, patch_size=14, hidden_size=192, layers=4, heads=3, n_films=3000, steps=1000,
                      batch=64, learning_rate=1e-3, film_scale=1.0),
        # Phase 2 sees as many samples as a real one: 3 epochs of Indiana's ~3,800 frontal films are ~11,400,
        # 712 steps of 16. 2,400 distinct films (each seen ~5 times): 800 for 400 steps scored mAP@0.5 0.32-0.45.
        "data": dict(n_train=2400, n_test=200, n_phase1=200, kinds=("mass",), n_findings=1,
                     blob_radius=(0.06, 0.09)),
        "phase1": dict(max_steps=60, learning_rate=5e-4, batch=16),
        "phase2": dict(max_steps=720, learning_rate=5e-4, projector_learning_rate=2e-3, batch=16),
        "lora_r": 16,
        "compute_dtype": "bfloat16",
    },
}
# The full chain on the stand-in at toy size, to check it runs (CPU, minutes): not a measurement.
PRESETS["smoke"] = PRESETS["full"] | {
    "tower": dict(image_size=64, patch_size=8, hidden_size=32, layers=2, heads=2, n_films=200, steps=50, batch=32,
                  learning_rate=2e-3, film_scale=0.5),
    "data": dict(n_train=16, n_test=8, n_phase1=8, kinds=("mass",), n_findings=1, blob_radius=(0.06, 0.09)),
    "phase1": dict(max_steps=2, learning_rate=5e-4, batch=4),
    "phase2": dict(max_steps=4, learning_rate=5e-4, projector_learning_rate=3e-3, batch=4),
    "compute_dtype": "float32",  # no bf16 autocast on a CPU
}
SEED_TRAIN, SEED_TEST = 1000, 2000


# ---------------------------------------------------------------------------------------------
# Configs


def _phase_yaml(phase: str, base: Path, out: Path, data: dict, t: dict, r: int, device: str,
                compute_dtype: str = "float32") -> dict:
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
    data_section |= {"val_fraction": 0.0, "test_fraction": 0.0,
                     # Several runs share the host's cores: a few image readers each.
                     "decode_workers": 0 if device == "cpu" else 2}
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
        "report_to": ["none"],
        "seed": 0,
        # Small models, several trainings side by side: compiling each would cost more than it saves,
        # and memory is plentiful.
        "torch_compile": False,
        "gradient_checkpointing": False,
    }
    if t.get("projector_learning_rate"):
        training["projector_learning_rate"] = t["projector_learning_rate"]
    return {
        "phase": phase,
        "output_dir": str(out),
        # The tiny model in fp32 on either device (bf16 rounding would blur 1/1023 loc steps for no speed
        # gain); the pretrained stand-in in bf16, as the real recipe runs.
        "model": {"base": str(base), "load_in_4bit": True, "compute_dtype": compute_dtype},
        "lora": {"r": r, "alpha": 2 * r, "target_modules": ["q_proj", "v_proj"]},
        "data": data_section,
        "training": training,
    }


def _write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


# ``xray-train evaluate`` scores the held-out splits of a config; the benchmark's held-out films are a
# separate set, all of which are scored (the "train" split of a config with no held-out fraction).
_EVALUATE_ALL = (
    "import sys; from pathlib import Path; from xray_train.config import load_config; "
    "from xray_train.evaluate import evaluate; "
    "adapter, config, out, json_out, *sets = sys.argv[1:]; "
    "evaluate(Path(adapter), load_config(Path(config), sets), split='train', baseline=False, out_dir=Path(out), "
    "json_out=Path(json_out), overwrite=True, max_new_tokens=60, progress=False)"
)


def _cli(args: list[str], log: Path, env: dict) -> float:
    """Run ``xray-train ARGS`` as a user would (``evaluate-all``: every film of the config's data);
    output to ``log``; seconds taken."""
    started = time.time()
    argv = ["-c", _EVALUATE_ALL, *args[1:]] if args[0] == "evaluate-all" else ["-m", "xray_train.cli", *args]
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, *argv], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
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


def held_out_overrides(data: dict) -> list[str]:
    d = data["test"]
    return [f"data.reports_csv={d['reports_csv']}", f"data.projections_csv={d['projections_csv']}",
            f"data.image_root={d['image_root']}", f"data.box_file={d['box_file']}",
            "data.val_fraction=0", "data.test_fraction=0"]


def held_out_config(phase2_yaml: Path, data: dict, check_model: bool = True):
    """The Phase-2 config pointed at the held-out films; val/test fractions 0 put all of them in ``train``.
    ``check_model=False`` for callers that only read the data (no base model needed)."""
    from xray_train.config import load_config

    return load_config(phase2_yaml, held_out_overrides(data), check_model=check_model)


def _source_digest() -> str:
    """A digest of the package's source: what was built with other code is not reused."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted((REPO / "src" / "xray_train").rglob("*.py")):
        digest.update(file.read_bytes())
    return digest.hexdigest()


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
# Probe: how well can a readout fitted directly on the frozen tower find the box?


def _features_and_boxes(base: Path, phase2_yaml: Path, data: dict, device: str):
    import torch

    from xray_train.config import ModelConfig, load_config
    from xray_train.data.loc import decode_boxes
    from xray_train.data.registry import read_dataset
    from xray_train.features import pooled_vision_features
    from xray_train.inputs import PixelLoader, build_target
    from xray_train.model import load_base

    model, processor = load_base(ModelConfig(base=str(base), load_in_4bit=False, compute_dtype="float32"),
                                 device_map={"": device})
    loader = PixelLoader(processor)
    out = []
    for cfg in (load_config(phase2_yaml), held_out_config(phase2_yaml, data)):
        examples = [ex for ex in read_dataset(cfg.data).examples if len(ex.boxes or []) == 1]
        feats = []
        with torch.no_grad():
            for i in range(0, len(examples), 32):
                pixels = torch.stack([loader(ex.image_path) for ex in examples[i:i + 32]]).to(device)
                feats.append(pooled_vision_features(model.model, pixels).float().cpu())
        # The target the model is trained on: the box in the prepared (padded, resized) image.
        boxes = [decode_boxes(build_target(ex, "phase2"))[0] for ex in examples]
        y = torch.tensor([[b.x_min, b.y_min, b.x_max, b.y_max] for b in boxes])
        out.append((torch.cat(feats), y))
    del model
    return out


def _iou_and_hits(pred, ref) -> tuple[float, float]:
    import torch

    lo = torch.maximum(pred[:, :2], ref[:, :2])
    hi = torch.minimum(pred[:, 2:], ref[:, 2:])
    inter = (hi - lo).clamp(min=0).prod(1)
    area = lambda b: (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)  # noqa: E731
    iou = inter / (area(pred) + area(ref) - inter).clamp(min=1e-9)
    return float(iou.mean()), float((iou >= 0.5).float().mean())


def probe(base: Path, phase2_yaml: Path, data: dict, device: str, attention: bool = True) -> dict:
    """Ridge and (``attention``) an attention readout on the frozen pooled features (the projector's input)."""

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
        iou = _iou_and_hits(_affine(flat_tr[cut:], w), ytr[cut:])[0]
        if best is None or iou > best[0]:
            best = (iou, alpha)
    w = _ridge(flat_tr, ytr, best[1])
    iou, hit = _iou_and_hits(_affine(flat_te, w), yte)
    result["ridge"] = {"alpha": best[1], "mean_iou": iou, "hit_rate_50": hit}
    if attention:
        result["attention"] = _attention_readout(xtr, ytr, xte, yte, device=device)
    return result


def _attention_readout(xtr, ytr, xte, yte, steps: int = 1500, device: str = "cpu") -> dict:
    """Non-linear readout: a per-token MLP, then per coordinate a softmax over tokens (content + position
    scores) that averages each token's centre plus a learned offset. Trained with an L1 box loss."""
    import torch

    torch.manual_seed(0)
    xtr, ytr, xte, yte = (v.to(device) for v in (xtr, ytr, xte, yte))
    n, t, d = xtr.shape
    grid = int(round(t**0.5))
    centre = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    cy, cx = torch.meshgrid(centre, centre, indexing="ij")
    # Token centres in the box's coordinate order (x_min, y_min, x_max, y_max).
    centres = torch.stack([cx.flatten(), cy.flatten(), cx.flatten(), cy.flatten()], dim=1)  # [t, 4]
    mlp = torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU())
    score = torch.nn.Linear(64, 4)
    offset = torch.nn.Linear(64, 4)
    pos = torch.zeros(t, 4, requires_grad=True)
    centres = centres.to(device)
    for m in (mlp, score, offset):
        m.to(device)
    pos = pos.detach().to(device).requires_grad_()
    params = [*mlp.parameters(), *score.parameters(), *offset.parameters(), pos]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-2)

    def predict(x):
        h = mlp(x)
        att = torch.softmax(score(h) + pos, dim=1)  # [n, t, 4]
        return (att * (centres + 0.1 * torch.tanh(offset(h)))).sum(1)

    for _ in range(steps):
        opt.zero_grad()
        loss = (predict(xtr) - ytr).abs().mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        iou, hit = _iou_and_hits(predict(xte), yte)
        tr_iou, _ = _iou_and_hits(predict(xtr), ytr)
    return {"mean_iou": iou, "hit_rate_50": hit, "train_mean_iou": tr_iou}


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
# Bases


def build_base(path: Path, preset: dict, tower: str, device: str, workers: int) -> dict:
    """Write the base of ``preset`` with a ``pretrained`` or ``random`` tower; returns its record."""
    from xray_train.testing.standin import TowerRecipe, install_tower, make_standin_model, pretrain_tower

    recipe = TowerRecipe(**preset["tower"])
    tower_device = "cuda" if device == "cuda" else "cpu"
    if preset["lm"] == "gemma3-270m":
        _, record = make_standin_model(path, recipe, tower=tower, device=tower_device, workers=workers,
                                       overwrite=True)
        return record
    from xray_train.testing.tiny import make_tiny_model

    r = preset["tower"]
    make_tiny_model(path, overwrite=True, image_size=r["image_size"], patch_size=r["patch_size"],
                    mm_tokens_per_image=(r["image_size"] // r["patch_size"]) ** 2,
                    vision_hidden_size=r["hidden_size"], vision_layers=r["layers"], **preset["model"])
    record = {"language_model": "tiny random Gemma 3 (xray_train.testing.tiny), pretrained-like output scale", "tower": tower}
    if tower == "pretrained":
        state, record["tower_pretraining"] = pretrain_tower(recipe, device=tower_device, workers=workers)
        install_tower(path, state)
    return record


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


def _read_eval(path: Path, seconds: float) -> dict:
    results = json.loads(path.read_text())
    return _row(results, seconds)


def prepare(workdir: Path, preset: dict, device: str, echo=print) -> dict:
    """Write the data and pretrain the tower of ``preset`` (everything but the language model); cached.

    Returns the data's path dict. A later ``run_benchmark`` on the same ``workdir`` reuses both."""
    from xray_train.testing.synthetic import write_benchmark
    from xray_train.testing.standin import TowerRecipe, pretrain_tower

    started = time.time()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    d = preset["data"]
    with ThreadPoolExecutor(2) as pool:
        # Data writing (processes) overlaps the tower's pretraining.
        data_job = pool.submit(_cached, workdir / "data", d, lambda path: write_benchmark(
            path, d["n_train"], d["n_test"], SEED_TRAIN, SEED_TEST, workers=min(3, cpus), n_phase1=d["n_phase1"],
            compress_level=1, n_findings=d["n_findings"], kinds=tuple(d["kinds"]), blob_radius=tuple(d["blob_radius"])))
        if preset.get("pretrain_tower", True):
            pool.submit(pretrain_tower, TowerRecipe(**preset["tower"]), "cuda" if device == "cuda" else "cpu",
                        max(1, cpus - 3)).result()
        data = data_job.result()
    echo(f"data + tower ready ({time.time() - started:.0f} s)")
    return data


def chain_of(name: str, tower_of: dict) -> tuple[str, bool]:
    """The Phase-1 run a trained row continues: its tower, and whether it runs without bf16 (NO_BF16)."""
    return tower_of[name], name in NO_BF16


def phase1_dir(workdir: Path, chain: tuple[str, bool]) -> Path:
    tower, no_bf16 = chain
    return Path(workdir) / (f"phase1_{tower}_no_bf16" if no_bf16 else f"phase1_{tower}")


def run_benchmark(workdir: Path, preset: dict, device: str, rows=ALL_ROWS, extra_sets: list[str] = (),
                  echo=print, jobs: int = 1, on_progress=None) -> dict:
    """Build bases and data under ``workdir``, train and score ``rows``; returns the results dict.

    ``jobs`` > 1 runs that many trainings (each followed by its evaluation) side by side. ``on_progress``
    is called with the results so far whenever a row, the probe or the mean box is done (a run cut short
    still leaves what it finished)."""
    import threading

    # A preset's own overrides first: --set and the rows' overrides win over them.
    extra_sets = [*preset.get("overrides", []), *extra_sets]
    started = time.time()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, XRAY_TRAIN_FEATURE_CACHE=str(workdir / "feature-cache"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.update({k: env[k] for k in ("XRAY_TRAIN_FEATURE_CACHE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")})
    cpus = os.cpu_count() or 1
    needed_by = {r: RESCORED[r][0] for r in RESCORED if r in rows}
    wanted = [r for r in TRAINED_ROWS if r in rows or r in needed_by.values()]
    if device != "cuda" and NO_BF16 & set(wanted):
        echo(f"left out on a CPU (fp16 autocast needs CUDA): {', '.join(sorted(NO_BF16 & set(wanted)))}")
        wanted = [r for r in wanted if r not in NO_BF16]
    main_tower = "pretrained" if preset.get("pretrain_tower", True) else "random"
    tower_of = {name: main_tower if VARIANTS[name][0] == "pretrained" else "random" for name in VARIANTS}
    towers = sorted({tower_of[r] for r in wanted} | ({main_tower} if {"probe", "mean_box"} & set(rows) else set()))
    results: dict = {"standin": {}, "rows": {}, "timeline_s": {}}
    lock = threading.Lock()

    def progress(event: str) -> None:
        with lock:
            results["timeline_s"][event] = round(time.time() - started, 1)
            if on_progress is not None:
                on_progress(results)

    # transformers resolves these lazily, which is not thread-safe: import them before the bases' threads.
    from transformers import (  # noqa: F401
        Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig, SiglipVisionModel)

    data = prepare(workdir, preset, device, echo)
    if preset["lm"] == "gemma3-270m":
        from xray_train.testing.standin import gemma3_270m_dir

        gemma3_270m_dir()  # converted once from the GGUF, before the bases share it
    with ThreadPoolExecutor(len(towers)) as pool:
        base_jobs = {
            tower: pool.submit(_cached, workdir / f"base_{tower}", {k: preset[k] for k in ("lm", "tower")}
                               | {"model": preset.get("model"), "tower_kind": tower},
                               lambda path, tower=tower: build_base(path, preset, tower, device, max(1, cpus - 3)))
            for tower in towers
        }
        bases = {tower: workdir / f"base_{tower}" for tower in towers}
        results["standin"] = {tower: job.result() for tower, job in base_jobs.items()}
    progress("bases_and_data")
    echo(f"bases + data ready ({time.time() - started:.0f} s)")

    r, dtype = preset["lora_r"], preset.get("compute_dtype", "float32")
    p1_yaml, p2_yaml = {}, {}
    for tower in towers:
        p1_yaml[tower] = _write_yaml(workdir / f"bench_phase1_{tower}.yaml", _phase_yaml(
            "phase1", bases[tower], workdir / f"phase1_{tower}", data, preset["phase1"], r, device, dtype))
        p2_yaml[tower] = _write_yaml(workdir / f"bench_phase2_{tower}.yaml", _phase_yaml(
            "phase2", bases[tower], workdir / "phase2", data, preset["phase2"], r, device, dtype))
    sets = [x for s in extra_sets for x in ("--set", s)]
    lora_start = max(1, preset["phase2"]["max_steps"] // 4)

    n_gpus = _visible_gpus() if device == "cuda" else 0

    def run_steps(args_list: list[tuple[list[str], Path]], slot: int = 0, extra_env: dict | None = None) -> list[float]:
        pinned = {"CUDA_VISIBLE_DEVICES": str(slot % n_gpus)} if n_gpus > 1 else {}
        return [_cli(args, log, env | pinned | (extra_env or {})) for args, log in args_list]

    def evaluation(name: str, adapter: Path, tower: str, overrides: list[str]) -> tuple[list[str], Path]:
        out = workdir / f"eval_{name}"
        args = ["evaluate-all", str(adapter), str(p2_yaml[tower]), str(out), str(workdir / f"eval_{name}.json"),
                *held_out_overrides(data), *extra_sets, *overrides]
        return args, workdir / f"eval_{name}.log"

    def record(name: str, fn) -> None:
        # One row that fails is recorded as failed; the others still count.
        try:
            row = fn()
        except Exception as exc:  # noqa: BLE001
            row = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
            echo(f"{name} FAILED: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        else:
            keys = ("ridge", "attention") if name == "probe" else (
                "map50", "mean_iou", "hit_rate_50", "finding_f1", "parse_rate")
            echo(f"{name}: " + ", ".join(f"{k}={_fmt(row.get(k))}" for k in keys))
        with lock:
            if name == "probe":
                results["probe"] = row
            else:
                results["rows"][name] = row
        progress(name)

    # Trainings start in VARIANTS' order (``main`` first), ``jobs`` at a time; each slot is one training
    # followed by its evaluations. The baselines need no training: scored meanwhile.
    # Imported here, not in two threads at once: transformers' lazy imports are not thread-safe.
    import xray_train.data.registry  # noqa: F401
    import xray_train.features  # noqa: F401
    import xray_train.metrics  # noqa: F401
    import xray_train.model  # noqa: F401

    def baselines() -> None:
        if "mean_box" in rows:
            record("mean_box", lambda: mean_box_baseline(data, p2_yaml[main_tower]))
        if "probe" in rows:
            record("probe", lambda: probe(bases[main_tower], p2_yaml[main_tower], data,
                                          "cuda" if device == "cuda" else "cpu", preset.get("probe_attention", True)))

    with ThreadPoolExecutor(1 + len(towers)) as side_pool, ThreadPoolExecutor(max(jobs, 1)) as pool:
        side = [side_pool.submit(baselines)]
        def phase1_of(chain: tuple[str, bool], slot: int) -> list[float]:
            # A later call on the same machine (other rows) reuses Phase 1 when nothing it depends on changed.
            tower, no_bf16 = chain
            out = phase1_dir(workdir, chain)
            args = ["phase1", "--config", str(p1_yaml[tower]), "--overwrite", *sets,
                    *(["--set", f"output_dir={out}", "--set", "model.compute_dtype=null"] if no_bf16 else [])]
            settings = {"args": args, "yaml": p1_yaml[tower].read_text(), "source": _source_digest(),
                        "base": bases[tower].with_name(bases[tower].name + ".settings.json").read_text()}
            return _cached(out, settings, lambda _path: run_steps([(args, out.with_suffix(".log"))], slot,
                                                                  NO_BF16_ENV if no_bf16 else {}))

        chains = sorted({chain_of(n, tower_of) for n in wanted})
        phase1 = {chain: side_pool.submit(phase1_of, chain, i) for i, chain in enumerate(chains)}
        slots = iter(range(10**6))

        def phase2(name: str) -> dict:
            _, train_sets, eval_sets = VARIANTS[name]
            train_sets = [o.format(lora_start=lora_start) for o in train_sets]
            chain = chain_of(name, tower_of)
            tower = chain[0]
            results["timeline_s"][phase1_dir(workdir, chain).name] = round(phase1[chain].result()[0], 1)
            adapter = workdir / f"phase2_{name}"
            train = (["phase2", "--config", str(p2_yaml[tower]), "--overwrite", "--set", f"output_dir={adapter}",
                      "--resume", str(phase1_dir(workdir, chain)), *sets,
                      *[x for o in train_sets for x in ("--set", o)]], workdir / f"phase2_{name}.log")
            rescored = [r for r, of in needed_by.items() if of == name]
            steps = [train, evaluation(name, adapter, tower, eval_sets)]
            steps += [evaluation(r, adapter, tower, eval_sets + RESCORED[r][1]) for r in rescored]
            train_s, eval_s, *more = run_steps(steps, next(slots), NO_BF16_ENV if name in NO_BF16 else {})
            row = _read_eval(workdir / f"eval_{name}.json", eval_s) | {"train_seconds": round(train_s, 1)}
            summary = json.loads((adapter / "training_summary.json").read_text())
            metrics = summary.get("metrics") or {}
            row["final_train_loss"] = metrics.get("train_loss")
            row["train_runtime_s"] = metrics.get("train_runtime")
            row["overrides"] = train_sets
            for r, seconds in zip(rescored, more):
                record(r, lambda r=r, seconds=seconds: _read_eval(workdir / f"eval_{r}.json", seconds)
                       | {"overrides": train_sets + RESCORED[r][1], "adapter_of": name})
            return row

        trained = [pool.submit(record, name, lambda name=name: phase2(name)) for name in wanted]
        for job in [*trained, *side]:
            job.result()
    results["run_time_s"] = round(time.time() - started, 1)
    return results


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def best_probe_hit_rate(results: dict) -> float | None:
    p = results.get("probe")
    if not p or "ridge" not in p:
        return None
    return max(p[k]["hit_rate_50"] for k in ("ridge", "attention") if k in p)


#: The rows whose spread (training seeds only) a lever's row must leave to mean anything.
SEED_ROWS = ("main", "main_seed_1", "main_seed_2")


def fp16_within_seed_spread(results: dict, key: str = "map50") -> dict | None:
    """``main_fp16``'s ``key`` against the bf16 ``main`` rows' seed spread (None until both were run)."""
    fp16 = (results["rows"].get("main_fp16") or {}).get(key)
    seeds = [v for v in ((results["rows"].get(r) or {}).get(key) for r in SEED_ROWS) if v is not None]
    if fp16 is None or len(seeds) < 2:
        return None
    low, high = min(seeds), max(seeds)
    return {"metric": key, "main_fp16": fp16, "bf16_seed_spread": [low, high], "within": low <= fp16 <= high}


def verdict(results: dict) -> dict:
    main = dict(results["rows"].get("main") or {})
    best = best_probe_hit_rate(results)
    if best and main.get("hit_rate_50") is not None:
        main["hit_rate_50_of_probe"] = main["hit_rate_50"] / best
    return {k: (main.get(k) is not None and main[k] >= v) for k, v in TARGETS.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=tuple(PRESETS), default="ci")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_learning")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--rows", default=",".join(ALL_ROWS), help=f"comma-separated subset of {ALL_ROWS}")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="override for every training and evaluation run")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainings run side by side (spread over the visible GPUs; several share one)")
    parser.add_argument("--preset-json", default=None, help="JSON merged into the preset (experiments)")
    parser.add_argument("--prepare", action="store_true",
                        help="only write the data and pretrain the tower (cached for a later run on the same workdir)")
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
    if args.prepare:
        prepare(args.workdir / args.size, preset, args.device)
        return
    import torch
    import transformers

    command = "python benchmarks/bench_learning.py " + " ".join(
        f"'{a}'" if any(c in a for c in " {}\"") else a for a in (argv if argv is not None else sys.argv[1:]))

    def write(results: dict, final: bool = False) -> None:
        results = json.loads(json.dumps(results))
        best = best_probe_hit_rate(results)
        main_hit = (results["rows"].get("main") or {}).get("hit_rate_50")
        doc = {
            "benchmark": "learns_boxes",
            "complete": final,
            "device": device_name(args.device),
            "size": args.size,
            "command": command,
            "run_time_s": results.pop("run_time_s", None),
            "standin": results.pop("standin", None),
            "settings": preset | {"extra_overrides": args.sets, "seed_train": SEED_TRAIN, "seed_test": SEED_TEST,
                                  "torch": torch.__version__, "transformers": transformers.__version__},
            "targets": TARGETS,
            "main_hit_rate_50_of_best_probe": main_hit / best if best and main_hit is not None else None,
            "meets_targets": verdict(results),
            "main_fp16_vs_bf16_seeds": fp16_within_seed_spread(results),
            **results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, args.out)

    results = run_benchmark(args.workdir / args.size, preset, args.device, rows, args.sets, jobs=args.jobs,
                            on_progress=write)
    write(results, final=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
