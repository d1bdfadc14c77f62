"""Publish a trained adapter to the Hugging Face Hub, with a model card that says what it really is.

Safety rules, each learnt from the published adapter this project replaces:

* An adapter is refused unless its safetensors file holds LoRA tensors and at least one ``lora_B`` is
  non-zero. A freshly initialised LoRA has ``lora_B == 0`` (its ``lora_A`` is random), so "some
  non-zero tensor" is not proof of training; an all-zero ``lora_B`` set is an untrained adapter.
  Tensors are read with ``safetensors`` only: nothing here unpickles anything.
* LoRA on the vision tower is refused: the intended targets are the language model's q/v projections.
* The card's usage code loads Gemma 3 with ``AutoModelForImageTextToText`` (never the PaliGemma class),
  takes the processor from the adapter repo (it carries the ``<locNNNN>`` tokens) and resizes the
  embeddings before attaching the adapter. Evaluation numbers come only from ``eval_results.json``.
* Only an allow-list of files is uploaded (no checkpoints, optimizer states, logs or pickles); the saved
  config and summaries are re-written with secret-looking keys and values removed, and every staged
  file is checked for the token before anything is sent.
* The token is never printed, logged, written to a file or put in an exception message.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import yaml

from xray_train.errors import XrayTrainError
from xray_train.outputs import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EVAL_RESULTS,
    LOSS_CURVE,
    RESOLVED_CONFIG,
    SUMMARY,
    atomic_write_text,
)
from xray_train.report_plots import F1_BARS, IOU_HISTOGRAM

logger = logging.getLogger(__name__)

DEFAULT_BASE = "google/medgemma-4b-it"
CARD_NAME = "README.md"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
#: Configs of earlier phases a phase-2 run may keep beside its own, e.g. ``xray_train_config.phase1.yaml``.
EARLIER_CONFIG_GLOB = "xray_train_config.*.yaml"
#: Files copied verbatim (if present); configs and JSON summaries are re-written sanitised instead.
VERBATIM_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, *TOKENIZER_FILES, *PROCESSOR_FILES, *CHAT_TEMPLATE_FILES)
SANITISED_JSON = (SUMMARY, EVAL_RESULTS)
# Named plots only, never "*.png": an output dir may also hold rendered X-rays with drawn boxes, and
# dataset images must not be republished.
PLOT_FILES = (LOSS_CURVE, F1_BARS, IOU_HISTOGRAM)

CARD_TAGS = ["medical", "radiology", "chest-x-ray", "lora", "qlora", "medgemma", "xray-train"]
LICENSE = {
    "license": "other",
    "license_name": "health-ai-developer-foundations",
    "license_link": "https://developers.google.com/health-ai-developer-foundations/terms",
}
DATASET_NAMES = {
    "padchest": "PadChest (BIMCV)",
    "indiana": "Indiana University Chest X-ray collection (OpenI)",
    "nih": "NIH ChestX-ray14 (bounding-box subset)",
    "vindr": "VinDr-CXR",
    "rsna": "RSNA Pneumonia Detection Challenge",
}

# Hub rule: letters, digits, '-', '_', '.', no '--' or '..', no leading/trailing '-' or '.', <= 96 chars.
_REPO_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
# Key names that hold credentials (``add_loc_tokens`` and ``pad_token`` must NOT match).
_SECRET_KEY = re.compile(
    r"^(?:.*[_-])?(?:token|secret|password|passwd|api[_-]?key|apikey|credentials?|authorization|auth)$"
    r"|secret|password|passwd|api[_-]?key|credential",
    re.IGNORECASE,
)
_PUBLIC_TOKEN_KEYS = re.compile(r"^(?:pad|bos|eos|unk|sep|cls|mask|image|boi|eoi|start|end)_token$", re.IGNORECASE)
# Values that look like credentials whatever their key: HF, OpenAI, GitHub, AWS, W&B, bearer headers.
_SECRET_VALUE = re.compile(
    r"hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}"
    r"|Bearer\s+\S{8,}"
)


# ---------------------------------------------------------------------------------------------
# Validation


@dataclass(frozen=True)
class AdapterInfo:
    """What ``validate_adapter_dir`` found in the adapter weights."""

    n_tensors: int
    n_lora_tensors: int
    n_lora_b: int
    n_trained_lora_b: int
    n_parameters: int
    other_modules: tuple[str, ...]  # non-LoRA module groups saved with the adapter (e.g. the projector)


def validate_repo_id(repo_id: str) -> str:
    """``ORG/NAME`` with Hub-legal characters; returns it unchanged or raises one clear line."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise XrayTrainError(f"repo id {repo_id!r}: expected ORG/NAME (e.g. my-lab/medgemma-cxr-lora)")
    for part in repo_id.split("/"):
        if not _REPO_PART.match(part) or "--" in part or ".." in part or len(part) > 96:
            raise XrayTrainError(
                f"repo id {repo_id!r}: {part!r} must be 1-96 letters, digits, '-', '_' or '.', "
                "not starting or ending with '-' or '.', without '--' or '..'"
            )
    if repo_id.lower().endswith(".git"):
        raise XrayTrainError(f"repo id {repo_id!r}: must not end with .git")
    return repo_id


def _read_yaml_mapping(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise XrayTrainError(f"{path}: not readable YAML ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise XrayTrainError(f"{path}: expected a mapping at the top level")
    return data


def _read_json(path: Path, required: bool = False) -> Any:
    if not path.is_file():
        if required:
            raise XrayTrainError(f"{path}: missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XrayTrainError(f"{path}: not valid JSON ({type(exc).__name__})") from None


def _get(d: Any, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _adds_loc_tokens(cfg: dict) -> bool:
    flag = _get(cfg, "model.add_loc_tokens")
    return cfg.get("phase") == "phase2" if flag is None else bool(flag)


def _trains_projector(cfg: dict) -> bool:
    flag = _get(cfg, "model.train_projector")
    return cfg.get("phase") == "phase2" if flag is None else bool(flag)


def _check_weights(path: Path) -> AdapterInfo:
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - a declared dependency
        raise XrayTrainError("the safetensors package is required to check the adapter weights") from None
    import torch

    n_tensors = n_lora = n_b = n_b_trained = n_params = 0
    other: set[str] = set()
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                tensor = fh.get_tensor(key)
                n_tensors += 1
                n_params += tensor.numel()
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise XrayTrainError(f"{path}: tensor {key} holds NaN/inf values (training diverged)")
                if "lora_" in key:
                    n_lora += 1
                    if "vision_tower" in key or "vision_model" in key:
                        raise XrayTrainError(
                            f"{path}: LoRA on the vision tower ({key}); only the language model's "
                            "projections should be adapted"
                        )
                    if "lora_B" in key or "lora_embedding_B" in key:
                        n_b += 1
                        n_b_trained += bool(torch.count_nonzero(tensor))
                else:
                    other.add(_module_group(key))
    except XrayTrainError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a truncated/corrupt file
        raise XrayTrainError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None
    if n_tensors == 0:
        raise XrayTrainError(f"{path}: holds no tensors (an empty adapter; was the model saved before training?)")
    if n_lora == 0:
        raise XrayTrainError(f"{path}: holds no LoRA (lora_A/lora_B) tensors")
    if n_b == 0:
        raise XrayTrainError(f"{path}: holds no lora_B tensors")
    if n_b_trained == 0:
        raise XrayTrainError(
            f"{path}: every lora_B tensor is all zeros: the adapter is untrained (freshly initialised)"
        )
    return AdapterInfo(n_tensors, n_lora, n_b, n_b_trained, n_params, tuple(sorted(other)))


def _module_group(key: str) -> str:
    for name in ("multi_modal_projector", "embed_tokens", "lm_head"):
        if name in key:
            return name
    return key.rsplit(".", 2)[0]


def validate_adapter_dir(adapter_dir: Path | str) -> AdapterInfo:
    """Refuse (``XrayTrainError``, one line naming the file) anything not worth publishing."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise XrayTrainError(f"adapter directory not found: {d}")
    cfg_path = d / RESOLVED_CONFIG
    if not cfg_path.is_file():
        raise XrayTrainError(f"{cfg_path}: missing (the saved run config; is this an xray-train output dir?)")
    cfg = _read_yaml_mapping(cfg_path)
    if cfg.get("phase") not in ("phase1", "phase2"):
        raise XrayTrainError(f"{cfg_path}: key phase must be phase1 or phase2")
    adapter_cfg = _read_json(d / ADAPTER_CONFIG, required=True)
    if not isinstance(adapter_cfg, dict):
        raise XrayTrainError(f"{d / ADAPTER_CONFIG}: expected a JSON object")
    weights = d / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise XrayTrainError(f"{weights}: missing (adapter weights must be saved as safetensors)")
    has_vocab = any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    if not (d / "tokenizer_config.json").is_file() or not has_vocab:
        raise XrayTrainError(f"{d}: tokenizer files missing (need tokenizer_config.json and tokenizer.json)")
    if not any((d / f).is_file() for f in PROCESSOR_FILES):
        raise XrayTrainError(f"{d}: processor files missing (need processor_config.json or preprocessor_config.json)")
    if _adds_loc_tokens(cfg):
        # Users load the processor from the repo; without the loc tokens it would split every box
        # into ~7 pieces and the adapter's loc rows would be unreachable.
        texts = [
            (d / f).read_text(encoding="utf-8", errors="replace")
            for f in TOKENIZER_FILES
            if (d / f).is_file() and f != "tokenizer.model"
        ]
        if not any("<loc1023>" in t for t in texts):
            raise XrayTrainError(f"{d}: the config adds <locNNNN> tokens but the saved tokenizer has none")
    return _check_weights(weights)


# ---------------------------------------------------------------------------------------------
# Token


def resolve_token(token: str | None = None) -> str:
    """An explicit token, else ``HF_TOKEN``, else the saved login. Never echoed anywhere."""
    candidates = [token, os.environ.get("HF_TOKEN")]
    for cand in candidates:
        if cand and cand.strip():
            return cand.strip()
    try:
        from huggingface_hub import get_token

        saved = get_token()
    except Exception as exc:  # e.g. a failed OIDC exchange; its message is not ours to repeat
        raise XrayTrainError(f"could not read the saved Hugging Face login ({type(exc).__name__})") from None
    if saved and saved.strip():
        return saved.strip()
    raise XrayTrainError(
        "no Hugging Face token: run `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN "
        "to a token with write access"
    )


def _scrub(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    return _SECRET_VALUE.sub("***", text)


# ---------------------------------------------------------------------------------------------
# Sanitising


def _is_secret_key(key: Any) -> bool:
    key = str(key)
    return bool(_SECRET_KEY.search(key)) and not _PUBLIC_TOKEN_KEYS.match(key)


def _is_secret_value(value: Any) -> bool:
    return isinstance(value, str) and bool(_SECRET_VALUE.search(value))


def sanitise(obj: Any) -> Any:
    """A copy with secret-looking keys and values removed (dict entries dropped, list items filtered)."""
    if isinstance(obj, dict):
        return {k: sanitise(v) for k, v in obj.items() if not _is_secret_key(k) and not _is_secret_value(v)}
    if isinstance(obj, list):
        return [sanitise(v) for v in obj if not _is_secret_value(v)]
    return obj


# ---------------------------------------------------------------------------------------------
# Model card


def _load_configs(d: Path) -> list[dict]:
    """Saved configs, earliest phase first: any ``xray_train_config.<tag>.yaml`` then this run's own."""
    earlier = [sanitise(_read_yaml_mapping(p)) for p in sorted(d.glob(EARLIER_CONFIG_GLOB))]
    main = sanitise(_read_yaml_mapping(d / RESOLVED_CONFIG))
    earlier.sort(key=lambda c: str(c.get("phase", "")))
    return earlier + [main]


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        # 4 significant digits: metrics stay readable and a learning rate of 1.5e-4 is not rounded away.
        return f"{value:.1f}" if abs(value) >= 1000 else format(value, ".4g")
    if isinstance(value, list):
        return ", ".join(f"`{v}`" for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _flatten(obj: Any, prefix: str = "", depth: int = 3, skip: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    if not isinstance(obj, dict):
        return rows
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if key in skip:
            continue
        if isinstance(value, dict):
            if depth > 1:
                rows += _flatten(value, name + ".", depth - 1, skip)
        elif value is None or isinstance(value, (int, float, str, bool)):
            rows.append((name, value))
    return rows


def _table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in rows]
    return "\n".join(lines)


def _local_base(base: str) -> bool:
    from xray_train.config import looks_like_local_path

    return looks_like_local_path(base)


def _per_class_tables(results: dict) -> str:
    out = []
    for block, key, support_key in (("per_finding", "f1", "support"), ("per_label", "ap50", "n_reference")):
        for path, table in _find_key(results, block):
            if not isinstance(table, dict) or not table:
                continue
            rows = sorted(
                ((name, v) for name, v in table.items() if isinstance(v, dict)),
                key=lambda kv: -(kv[1].get(support_key) or 0),
            )[:20]
            lines = [f"`{path}` (top {len(rows)} by {support_key}):", ""]
            lines += [f"| class | {key} | {support_key} |", "|---|---|---|"]
            lines += [f"| {_fmt(n)} | {_fmt(v.get(key))} | {_fmt(v.get(support_key))} |" for n, v in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out)


def _find_key(obj: Any, wanted: str, prefix: str = "", depth: int = 3):
    if not isinstance(obj, dict) or depth == 0:
        return
    for k, v in obj.items():
        if k == wanted:
            yield prefix + k, v
        elif isinstance(v, dict):
            yield from _find_key(v, wanted, prefix + k + ".", depth - 1)


CARD_TEMPLATE = Template(
    """---
$front_matter---

# $title

> [!CAUTION]
> **NOT FOR CLINICAL USE.** This is a research adapter. It has not been clinically validated, is not a
> medical device, and must not be used to diagnose, triage or treat anyone. Its outputs can be wrong,
> incomplete or made up, including confident-looking boxes around nothing.

A LoRA adapter for [$base_link]($base_url) (Gemma 3, image-text-to-text), trained with
xray-train (QLoRA with peft) to $purpose.

## What was trained

$phases

| | |
|---|---|
| Base model | $base_text |
| Method | QLoRA: base quantised to 4-bit ($quant), LoRA adapters trained in $compute_dtype |
| LoRA | r = $lora_r, alpha = $lora_alpha, dropout = $lora_dropout |
| LoRA targets | the **language model's** $lora_targets only; the SigLIP vision tower is frozen and not adapted |
| Multimodal projector | $projector |
| `<locNNNN>` tokens | $loc_tokens |
| Adapter tensors | $n_tensors tensors, $n_params parameters ($n_trained_b of $n_b `lora_B` matrices non-zero) |

### Hyper-parameters$hp_note

$hyper_parameters

### Training run

$summary

$loss_curve
## Evaluation

$evaluation

## Usage

The processor **must** come from this repository: it carries the tokenizer the adapter was trained
with$loc_usage. Gemma 3 is loaded with `AutoModelForImageTextToText` (it is not a PaliGemma model).

```python
import torch
from PIL import Image
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

BASE = "$base_id"$base_comment
ADAPTER = "$repo_id"

processor = AutoProcessor.from_pretrained(ADAPTER)
model = AutoModelForImageTextToText.from_pretrained(BASE, torch_dtype=torch.bfloat16, device_map="auto")
if len(processor.tokenizer) > model.get_input_embeddings().weight.shape[0]:
    model.resize_token_embeddings(len(processor.tokenizer))  # room for the added tokens
model = PeftModel.from_pretrained(model, ADAPTER)
model.eval()

image = Image.open("frontal_cxr.png")  # see "Image preprocessing" below$other_prompts
messages = [
    {"role": "system", "content": [{"type": "text", "text": $system_prompt}]},
    {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": $user_prompt}]},
]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
).to(model.device, dtype=torch.bfloat16)
with torch.inference_mode():
    out = model.generate(**inputs, max_new_tokens=256, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=False))
```

Or in one call with xray-train, which also applies the training-time image preprocessing and prompt:

```python
from huggingface_hub import snapshot_download
import xray_train

model, processor = xray_train.load_adapter(snapshot_download("$repo_id")$load_base_arg)
```

### Image preprocessing

Train and inference must share one image path. xray-train windows 12/16-bit PNGs to 8 bits, pads
to a square and resizes (`xray_train.data.images`); `Image.open(...).convert("RGB")` on a 16-bit PNG
clips it to near white and the model will see a blank image. Use `xray-train predict` or the same
preprocessing for your own images.
$output_format
## Data and labels

$data_notes

## Limitations

- Research only; see the notice above. No prospective or external clinical validation was done.
- Trained and evaluated on $dataset_list only; performance on other hospitals, scanners, patient
  populations, lateral views or paediatric images is unknown.
- Evaluation splits are held-out *patients* from the same datasets, not an external test set.
- Findings are those in the training label vocabulary; anything else is never reported.
- Generated boxes carry no calibrated confidence.
- Outputs are English and structured; they are not radiology reports.

## License

The base model is governed by the [Health AI Developer Foundations terms of use]($license_link);
this adapter is a derivative and is distributed under the same terms. Each training dataset has its
own terms of use ($dataset_list); check them before any use of this adapter.
"""
)

PHASE_TEXT = {
    "phase1": "**Phase 1 - structured report**: the model names each finding on a frontal chest X-ray, "
    "with its location qualifiers (or states a normal study).",
    "phase2": "**Phase 2 - localisation**: the model answers with `<locYMIN><locXMIN><locYMAX><locXMAX> label` "
    "boxes.",
}


def _task_prompts() -> dict[str, str]:
    """phase -> the exact user instruction used in training, so the card's snippet asks the same."""
    try:
        from xray_train.collate import PHASE_TASK, TASK_PROMPTS

        return {phase: TASK_PROMPTS[task] for phase, task in PHASE_TASK.items()}
    except (ImportError, KeyError, AttributeError):
        return {}


def _lineage_note(phases: list) -> str:
    if phases == ["phase2"]:
        # train.py continues a Phase-1 adapter with --resume but only this phase's config is saved here.
        return (
            "\n\nWhether this Phase-2 adapter continued a Phase-1 adapter is not recorded in the published "
            f"folder (no earlier-phase config beside `{RESOLVED_CONFIG}`)."
        )
    if phases == ["phase1", "phase2"]:
        return "\n\nPhase 2 continued the Phase-1 adapter (its config is kept beside this one)."
    return ""


def _data_notes(configs: list[dict]) -> str:
    notes = []
    for cfg in configs:
        data = cfg.get("data") or {}
        name = DATASET_NAMES.get(data.get("dataset"), str(data.get("dataset")))
        line = f"- {cfg.get('phase', '?')}: {name}"
        if data.get("dataset") == "padchest":
            line += (
                f"; projections {_fmt(data.get('projections'))}; label sources {_fmt(data.get('method_labels'))} "
                "(RNN_model labels were extracted automatically from Spanish reports, not by a physician)"
            )
        notes.append(line)
        if data.get("dataset") == "indiana":
            if data.get("box_source", "mesh_atlas") == "mesh_atlas":
                notes.append(
                    "\n> [!WARNING]\n> **Weak box labels.** The Indiana collection has no bounding boxes. "
                    "The Phase-2 boxes were derived from MeSH location qualifiers (e.g. "
                    "`Opacity/lung/base/left` -> a fixed atlas region of the left lower lung), not drawn by "
                    "radiologists. They mark an anatomical region, not the lesion's extent, and box metrics "
                    "measure agreement with that atlas.\n"
                )
            else:
                notes.append(f"  - boxes from a user-supplied box file (`{Path(str(data.get('box_file'))).name}`)")
    notes.append(
        "- Splits are grouped by patient (no patient in two splits); the split seed is in "
        f"`{RESOLVED_CONFIG}`."
    )
    return "\n".join(notes)


def build_model_card(adapter_dir: Path | str, repo_id: str | None = None, info: AdapterInfo | None = None) -> str:
    """README.md for the Hub: YAML front matter + what was trained, evaluation, usage, limitations.

    Every number comes from the files in ``adapter_dir``; missing evaluation is stated, not invented.
    """
    d = Path(adapter_dir)
    configs = _load_configs(d)
    cfg = configs[-1]
    info = info or validate_adapter_dir(d)
    summary = sanitise(_read_json(d / SUMMARY) or {})
    results = sanitise(_read_json(d / EVAL_RESULTS))

    base = str(_get(cfg, "model.base") or DEFAULT_BASE)
    revision = _get(cfg, "model.revision")
    local = _local_base(base)
    phases = []
    for c in configs:
        if c.get("phase") not in phases:
            phases.append(c.get("phase"))
    for p in summary.get("phases", []) if isinstance(summary.get("phases"), list) else []:
        if p in PHASE_TEXT and p not in phases:
            phases.insert(0, p)
    datasets = []
    for c in configs:
        name = DATASET_NAMES.get(_get(c, "data.dataset"), _get(c, "data.dataset"))
        if name and name not in datasets:
            datasets.append(name)
    loc = any(_adds_loc_tokens(c) for c in configs)
    projector = any(_trains_projector(c) for c in configs)

    front = {}
    if not local:
        front["base_model"] = base
    front.update({"library_name": "peft", "pipeline_tag": "image-text-to-text", **LICENSE})
    front["tags"] = CARD_TAGS
    front["datasets"] = datasets

    tr = cfg.get("training") or {}
    hp_keys = [
        "learning_rate", "projector_learning_rate", "num_train_epochs", "max_steps",
        "per_device_train_batch_size", "gradient_accumulation_steps", "warmup_ratio", "lr_scheduler_type",
        "weight_decay", "max_grad_norm", "optim", "seed", "max_length", "gradient_checkpointing",
    ]
    hp_rows = [(k, tr[k]) for k in hp_keys if k in tr]
    if results:
        evaluation = _table(_flatten(results, skip=("per_finding", "per_label", "ious")), ("metric", "value"))
        per_class = _per_class_tables(results)
        if per_class:
            evaluation += "\n\n" + per_class
        evaluation += (
            f"\n\nFrom `{EVAL_RESULTS}` (written by `xray-train evaluate`); metric definitions are in "
            "`xray_train.metrics`."
        )
    else:
        evaluation = (
            f"**Not evaluated.** No `{EVAL_RESULTS}` was present when this adapter was published, so no "
            "finding-level or box metric is reported (a validation loss, if one was logged, is in the "
            "training run table above; a loss is not a clinical metric). Run `xray-train evaluate` "
            "before relying on it."
        )

    purpose = " and ".join(
        {"phase1": "write structured chest X-ray findings", "phase2": "localise findings with `<locNNNN>` boxes"}[p]
        for p in phases if p in PHASE_TEXT
    )
    output_format = ""
    if loc:
        output_format = (
            "\n### Box format\n\nA box is `<locYMIN><locXMIN><locYMAX><locXMAX> label` (y before x), boxes "
            "joined by ` ; `, or `no localisable finding`. A coordinate v in [0, 1] of the padded, square "
            "image is binned as `round(v * 1023)` and decoded as `bin / 1023` (big_vision convention). "
            "`xray_train.data.loc.decode_boxes` parses an answer.\n"
        )
    lora = cfg.get("lora") or {}
    quant = _get(cfg, "model.quant_type", "nf4") + (", double quantisation" if _get(cfg, "model.double_quant") else "")
    if not _get(cfg, "model.load_in_4bit", True):
        quant = "not quantised"
    system_prompt = cfg.get("system_prompt") or "You are an expert radiologist."
    prompts = _task_prompts()
    user_prompt = prompts.get(cfg.get("phase"), "Describe the findings in this chest X-ray.")
    other_prompts = "".join(
        f"\n# {p} was trained with the prompt {json.dumps(prompts[p])}"
        for p in phases
        if p != cfg.get("phase") and p in prompts
    )
    return CARD_TEMPLATE.substitute(
        front_matter=yaml.safe_dump(front, sort_keys=False, allow_unicode=True),
        title=(repo_id.split("/")[-1] if repo_id else d.resolve().name) + " - MedGemma chest X-ray LoRA adapter",
        base_link=base if not local else Path(base).name,
        base_url=f"https://huggingface.co/{base}" if not local else "https://huggingface.co/google/medgemma-4b-it",
        base_text=(f"`{base}`" if not local else f"a local copy (`{Path(base).name}`)")
        + (f" at revision `{revision}`" if revision else ""),
        purpose=purpose or "describe chest X-rays",
        phases="\n".join(f"- {PHASE_TEXT[p]}" for p in phases if p in PHASE_TEXT) + _lineage_note(phases),
        quant=quant,
        compute_dtype=_get(cfg, "model.compute_dtype", "bfloat16"),
        lora_r=lora.get("r", "n/a"),
        lora_alpha=lora.get("alpha", "n/a"),
        lora_dropout=lora.get("dropout", "n/a"),
        lora_targets=" and ".join(f"`{t}`" for t in lora.get("target_modules", ["q_proj", "v_proj"])),
        projector="trained and saved with the adapter" if projector else "frozen (base weights)",
        loc_tokens="1024 tokens `<loc0000>`..`<loc1023>` added to the tokenizer; their embedding rows are trained"
        if loc else "not used",
        n_tensors=info.n_tensors,
        n_params=f"{info.n_parameters:,}",
        n_trained_b=info.n_trained_lora_b,
        n_b=info.n_lora_b,
        hp_note=f" (last phase, `{RESOLVED_CONFIG}`)" if len(configs) > 1 else "",
        hyper_parameters=_table(hp_rows, ("setting", "value")) if hp_rows else "Not recorded.",
        summary=_table(_flatten(summary, depth=2, skip=("base_model",)), ("item", "value"))
        if summary else f"No `{SUMMARY}` was saved.",
        loss_curve=f"![Training loss]({LOSS_CURVE})\n" if (d / LOSS_CURVE).is_file() else "",
        evaluation=evaluation,
        loc_usage=" and the 1024 `<locNNNN>` box tokens" if loc else "",
        base_id=base if not local else Path(base).name,
        base_comment="  # trained from a local copy: point this at your base model" if local else "",
        load_base_arg=', base="path/to/medgemma-4b-it"' if local else "",
        repo_id=repo_id or "ORG/NAME",
        system_prompt=json.dumps(system_prompt),
        user_prompt=json.dumps(user_prompt),
        other_prompts=other_prompts,
        output_format=output_format,
        data_notes=_data_notes(configs),
        dataset_list=", ".join(datasets) or "the datasets in the saved config",
        license_link=LICENSE["license_link"],
    )


# ---------------------------------------------------------------------------------------------
# Staging and upload


def stage_upload(
    adapter_dir: Path | str,
    dest_dir: Path | str,
    repo_id: str | None = None,
    token: str | None = None,
    info: AdapterInfo | None = None,
) -> list[str]:
    """Write exactly the folder that would be uploaded; return its file names, sorted.

    ``dest_dir`` must not exist or be empty. If ``token`` is given, every staged file is checked not
    to contain it.
    """
    src = Path(adapter_dir)
    dest = Path(dest_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise XrayTrainError(f"{dest}: staging folder must be new or empty")
    info = info or validate_adapter_dir(src)
    dest.mkdir(parents=True, exist_ok=True)
    for name in VERBATIM_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    for path in [src / RESOLVED_CONFIG, *sorted(src.glob(EARLIER_CONFIG_GLOB))]:
        atomic_write_text(dest / path.name, yaml.safe_dump(sanitise(_read_yaml_mapping(path)), sort_keys=False))
    for name in SANITISED_JSON:
        data = _read_json(src / name)
        if data is not None:
            atomic_write_text(dest / name, json.dumps(sanitise(data), indent=2) + "\n")
    for name in PLOT_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    atomic_write_text(dest / CARD_NAME, build_model_card(src, repo_id=repo_id, info=info))

    files = sorted(p.name for p in dest.iterdir() if p.is_file())
    for name in files:
        data = (dest / name).read_bytes()
        # Belt and braces: sanitising removes known shapes; this catches the actual token anywhere.
        if token and token.encode() in data:
            raise XrayTrainError(f"{src / name}: contains the Hub token; refusing to upload it")
        if name.endswith((".yaml", ".md", ".jinja")) or name in SANITISED_JSON:
            if _SECRET_VALUE.search(data.decode("utf-8", errors="replace")):
                raise XrayTrainError(f"{dest / name}: contains a credential-like string; refusing to upload it")
    return files


def push_to_hub(
    adapter_dir: Path | str,
    repo_id: str,
    private: bool = True,
    dry_run_dir: Path | str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str = "Upload xray-train adapter",
) -> str:
    """Validate, stage and upload; return the repo URL (with ``dry_run_dir``: the staged folder, no network).

    ``private`` applies when the repo is created; an existing repo keeps its visibility.
    """
    repo_id = validate_repo_id(repo_id)
    info = validate_adapter_dir(adapter_dir)
    if dry_run_dir is not None:
        files = stage_upload(adapter_dir, dry_run_dir, repo_id=repo_id, info=info)
        logger.info("dry run: %d files staged in %s for %s", len(files), dry_run_dir, repo_id)
        return str(Path(dry_run_dir))

    token = resolve_token(token)
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from xray_train import __version__

    with tempfile.TemporaryDirectory(prefix="xray_train_push_") as tmp:
        staged = Path(tmp) / "upload"
        files = stage_upload(adapter_dir, staged, repo_id=repo_id, token=token, info=info)
        api = HfApi(endpoint=endpoint, token=token, library_name="xray-train", library_version=__version__)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            logger.info("uploading %d files to %s", len(files), repo_id)
            api.upload_folder(repo_id=repo_id, folder_path=staged, repo_type="model", commit_message=commit_message)
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status == 401:
                msg = "the Hub rejected the token (HTTP 401): run `hf auth login` or set HF_TOKEN to a valid token"
            elif status == 403:
                msg = f"no write access to {repo_id} (HTTP 403): use a token with write permission for that namespace"
            else:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                msg = f"upload to {repo_id} failed: {first}"
            raise XrayTrainError(_scrub(msg, token)) from None
        except httpx.HTTPError as exc:
            raise XrayTrainError(
                _scrub(f"could not reach the Hub at {endpoint or 'huggingface.co'} ({type(exc).__name__})", token)
            ) from None
    return str(url)
