"""``xray-train merge``: fold the adapter into the base and save a standalone model, then prove it.

QLoRA trains against a 4-bit base, but a merged model is published in 16-bit: the base is loaded
unquantised in the training compute dtype (bf16 for MedGemma; the float32 tiny demo model stays
float32) and peft's ``merge_and_unload`` folds in all three kinds of adapter state:

* LoRA on the language model's q/v projections: ``W + scale * B @ A``;
* the Phase-2 projector (``modules_to_save``): the trained copy replaces the base projector;
* the ``<locNNNN>`` embedding rows (``trainable_token_indices``): the trained rows are copied into the
  (tied) embedding, so the LM head scores loc tokens with them too.

Before saving, the expected value of every one of those tensors is computed from the unmerged model;
after saving, ``OUT_DIR`` is reloaded with ``AutoModelForImageTextToText`` (nothing of peft or
xray-train) and each tensor is compared, and so are the logits of a fixed batch (a synthetic film with
a report prompt, and a detect prompt whose answer contains loc tokens) against base + adapter at the
same precision. ``merge_check.json`` records the differences. ``OUT_DIR`` appears whole or not at all.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
from pathlib import Path

import torch

from xray_train.errors import XrayTrainError
from xray_train.gemma3 import residual_scale_for, residual_scaled
from xray_train.outputs import atomic_write_json, share_like_umask, staging_dir
from xray_train.run_dir import RESOLVED_CONFIG, RunDir

logger = logging.getLogger(__name__)

MERGE_CHECK = "merge_check.json"
#: Argmax agreement required on the check batch: float32 must agree everywhere; 16-bit merging rounds
#: ``W + BA`` once instead of adding two separately rounded products, which may flip a near-tie.
MIN_AGREEMENT = {torch.float32: 1.0, torch.bfloat16: 0.97, torch.float16: 0.97}
PEFT_PREFIX = "base_model.model."


def _weight_tolerance(expected: torch.Tensor, dtype: torch.dtype) -> float:
    # One rounding of the stored dtype, relative to the tensor's scale.
    eps = torch.finfo(dtype).eps
    return float(expected.abs().max()) * eps * 2 + 1e-6


def expected_weights(peft_model) -> tuple[dict[str, dict], dict[str, float]]:
    """What the merged model's tensors must hold, computed from the unmerged peft model.

    Returns ``(expected, changes)``: ``expected = {"lora": {param: W + delta}, "projector": {param:
    trained copy}, "loc_rows": {param: (indices, rows)}}`` named as in the plain transformers model, and
    ``changes[component]`` = the largest absolute change from the base (0.0 means merging it is a no-op).
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    expected: dict[str, dict] = {"lora": {}, "projector": {}, "loc_rows": {}}
    changes = {"lora": 0.0, "projector": 0.0, "loc_rows": 0.0}
    adapter = peft_model.active_adapter
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            plain = name.removeprefix(PEFT_PREFIX)
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                delta = module.get_delta_weight(adapter).float()
                expected["lora"][f"{plain}.weight"] = (module.get_base_layer().weight.float() + delta).cpu()
                changes["lora"] = max(changes["lora"], float(delta.abs().max()))
            elif isinstance(module, ModulesToSaveWrapper):
                original = module.original_module.state_dict()
                for key, tensor in module.modules_to_save[adapter].state_dict().items():
                    tensor = tensor.detach().float().cpu()
                    expected["projector"][f"{plain}.{key}"] = tensor
                    change = float((tensor - original[key].float().cpu()).abs().max())
                    changes["projector"] = max(changes["projector"], change)
            elif isinstance(module, TrainableTokensWrapper) and adapter in module.token_adapter.trainable_tokens_delta:
                layer = module.token_adapter
                if layer.tied_adapter is not None:
                    continue  # the tied LM head shares the embedding's rows: checked through the embedding
                rows = layer.trainable_tokens_delta[adapter].detach().float().cpu()
                indices = torch.as_tensor(layer.token_indices[adapter])
                expected["loc_rows"][f"{plain}.weight"] = (indices, rows)
                original = layer.trainable_tokens_original[adapter].float().cpu()
                changes["loc_rows"] = max(changes["loc_rows"], float((rows - original).abs().max()))
    return expected, changes


def compare_weights(expected: dict, model, dtype: torch.dtype) -> dict:
    """Max abs difference per component between the expected tensors and ``model``'s.

    The loc rows are also checked in the output embedding (the LM head), tied or not: a loc token the
    head cannot score is as broken as one the embedding cannot read.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    head = model.get_output_embeddings().weight
    report = {}
    for component, tensors in expected.items():
        worst, ok = 0.0, True
        for name, value in tensors.items():
            if name not in params:
                raise XrayTrainError(f"merge check: the merged model has no tensor {name} ({component})")
            actuals = [params[name]]
            if component == "loc_rows":
                indices, value = value
                actuals = [params[name][indices], head[indices]]
            for actual in actuals:
                diff = float((actual.detach().float().cpu() - value).abs().max()) if value.numel() else 0.0
                worst = max(worst, diff)
                ok &= diff <= _weight_tolerance(value, dtype)
        report[component] = {"tensors": len(tensors), "max_abs_diff": worst, "ok": bool(ok)}
    return report


# ---------------------------------------------------------------------------------------------
# The fixed check batch


def check_samples(processor, system_prompt: str, image_size: int | None, with_loc: bool, workdir: Path) -> list[dict]:
    """A synthetic film through the real image path, with a report answer and (Phase 2) a box answer."""
    import numpy as np

    from xray_train.collate import PromptEncoder
    from xray_train.data.images import Geometry
    from xray_train.data.loc import encode_boxes
    from xray_train.data.records import Finding
    from xray_train.data.reports import format_report
    from xray_train.testing.synthetic import generate_film, save_png
    from xray_train.inputs import PixelLoader

    film = generate_film(np.random.default_rng(1234), size=(240, 300), n_findings=2)
    path = workdir / "merge_check_film.png"
    save_png(film.pixels, path)
    pixels = PixelLoader(processor, image_size)(path)
    encoder = PromptEncoder(processor, system_prompt)
    answers = [("report", format_report([Finding(f.label, f.locations) for f in film.findings]))]
    if with_loc:
        geometry = Geometry(240, 300, 0)
        answers.append(("detect", encode_boxes([geometry.to_prepared(f.box) for f in film.findings])))
    samples = []
    for task, answer in answers:
        encoded = encoder.encode(task, answer)
        ids = torch.tensor([encoded["input_ids"]])
        n_answer = sum(1 for label in encoded["labels"] if label != -100)
        samples.append({
            "task": task,
            "input_ids": ids,
            "token_type_ids": (ids == encoder.ids.image).long(),
            "pixel_values": pixels.unsqueeze(0),
            # Logits at the last prompt position and every answer position but the final one.
            "n_logits": n_answer,
        })
    return samples


@torch.inference_mode()
def sample_logits(model, samples: list[dict]) -> list[torch.Tensor]:
    """Float32 logits of the answer positions only (no full-sequence, full-vocabulary tensor)."""
    from xray_train.gemma3 import unwrap_gemma3, vision_dtype

    inner = unwrap_gemma3(model)
    dtype = vision_dtype(inner)
    out = []
    for s in samples:
        result = model(
            input_ids=s["input_ids"].to(inner.device),
            attention_mask=torch.ones_like(s["input_ids"]).to(inner.device),
            token_type_ids=s["token_type_ids"].to(inner.device),
            pixel_values=s["pixel_values"].to(inner.device, dtype),
            logits_to_keep=s["n_logits"] + 1,
            use_cache=False,
        )
        out.append(result.logits[0, :-1].float().cpu())
    return out


def compare_logits(reference: list[torch.Tensor], merged: list[torch.Tensor]) -> dict:
    diffs = [float((a - b).abs().max()) for a, b in zip(reference, merged)]
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, merged))
    total = sum(a.shape[0] for a in reference)
    return {
        "positions": total,
        "max_abs_diff": max(diffs, default=0.0),
        "max_abs_logit": max((float(a.abs().max()) for a in reference), default=0.0),
        "argmax_agreement": agree / total if total else None,
    }


# ---------------------------------------------------------------------------------------------
# The command


def _check_dirs(adapter_dir: Path, out_dir: Path, overwrite: bool) -> None:
    RunDir(adapter_dir).require_adapter()
    a, o = adapter_dir.resolve(), out_dir.resolve()
    if o == a or a in o.parents or o in a.parents:
        raise XrayTrainError(f"OUT_DIR {out_dir} must not be the adapter dir, inside it or above it")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise XrayTrainError(f"OUT_DIR {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not overwrite:
            raise XrayTrainError(f"OUT_DIR {out_dir} is not empty; pass --overwrite to replace it")


def _move_into_place(staging: Path, out_dir: Path) -> None:
    aside = None
    if out_dir.exists():
        aside = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, aside)
    os.replace(staging, out_dir)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def merge(
    adapter_dir: Path | str,
    out_dir: Path | str,
    overwrite: bool = False,
    base: str | None = None,
    device_map=None,
    echo=print,
) -> dict:
    """Merge the adapter into the unquantised base, save to ``out_dir``, reload and verify.

    Returns the check report (also written to ``out_dir/merge_check.json``). Raises ``XrayTrainError``
    after writing if the reloaded model disagrees with base + adapter.
    """
    from transformers import AutoModelForImageTextToText

    from xray_train.model import load_adapter
    from xray_train.predict import saved_settings

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    _check_dirs(adapter_dir, out_dir, overwrite)
    settings = saved_settings(adapter_dir)

    echo(f"Loading the base unquantised and attaching {adapter_dir}")
    # Merged into the unmodified base: the residual scaling of a float16 run is switched on only around
    # the check's forward passes (it changes frozen norms, which a merged model must not carry).
    model, processor = load_adapter(adapter_dir, base=base, load_in_4bit=False, device_map=device_map,
                                    residual_scale=1)
    dtype = next(model.get_base_model().parameters()).dtype
    source = RunDir(adapter_dir)
    check_scale = residual_scale_for(str(dtype).removeprefix("torch."),
                                     source.config().model.residual_scale if source.has_config() else None)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(out_dir.parent, f".{out_dir.name}.staging-")
    try:
        samples = check_samples(
            processor, settings["system_prompt"], settings["image_size"], RunDir(adapter_dir).has_loc_rows(), staging
        )
        (staging / "merge_check_film.png").unlink()
        with residual_scaled(model, check_scale):
            reference = sample_logits(model, samples)
        expected, changes = expected_weights(model)

        echo("Merging LoRA, projector and loc-token rows into the base weights")
        merged = model.merge_and_unload()
        # load_base switches the KV cache off for training (as a top-level config attribute, which
        # save_pretrained would publish); a published model should generate with its cache.
        merged.config.use_cache = True
        merged.config.get_text_config().use_cache = True
        merged.save_pretrained(staging)
        processor.save_pretrained(staging)
        if source.has_config():
            shutil.copyfile(source.file(RESOLVED_CONFIG), staging / RESOLVED_CONFIG)
        del model, merged
        gc.collect()

        echo("Reloading the merged model with AutoModelForImageTextToText to check it")
        reloaded = AutoModelForImageTextToText.from_pretrained(
            staging, dtype=dtype, use_safetensors=True, trust_remote_code=False,
            device_map=device_map if device_map is not None else _device_map(),
        )
        reloaded.eval()
        weights = compare_weights(expected, reloaded, dtype)
        with residual_scaled(reloaded, check_scale):
            logits = compare_logits(reference, sample_logits(reloaded, samples))
        del reloaded
        gc.collect()
        needed = MIN_AGREEMENT.get(dtype, 0.97)
        passed = all(w["ok"] for w in weights.values()) and (logits["argmax_agreement"] or 0.0) >= needed
        report = {
            "adapter": adapter_dir.resolve().name,
            "dtype": str(dtype).removeprefix("torch."),
            "check_residual_scale": check_scale,
            "adapter_change_from_base": changes,
            "weights": weights,
            "logits": logits | {"required_argmax_agreement": needed, "samples": [s["task"] for s in samples]},
            "passed": passed,
        }
        atomic_write_json(staging / MERGE_CHECK, report)
        share_like_umask(staging)
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not passed:
        raise XrayTrainError(
            f"merged model written to {out_dir} but it does not match base + adapter "
            f"(see {out_dir / MERGE_CHECK}); do not publish it"
        )
    return report


def _device_map():
    from xray_train.model import default_device_map

    return default_device_map()
