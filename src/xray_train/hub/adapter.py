"""Is this output directory worth publishing? The checks ``push-to-hub`` runs before anything is staged.

An adapter is refused unless its safetensors file holds LoRA tensors and at least one ``lora_B`` is
non-zero: a freshly initialised LoRA has ``lora_B == 0`` (its ``lora_A`` is random), so "some non-zero
tensor" is not proof of training. LoRA on the vision tower is refused: the intended targets are the
language model's projections. Tensors are read with ``safetensors`` only: nothing here unpickles anything.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from xray_train.names import looks_like_local_path
from xray_train.errors import XrayTrainError
from xray_train.run_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RESOLVED_CONFIG, RunDir, safetensors_problem

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")

# Hub rule: letters, digits, '-', '_', '.', no '--' or '..', no leading/trailing '-' or '.', <= 96 chars.
_REPO_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")


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


def _is_hub_id(name: object) -> bool:
    if not isinstance(name, str) or name.count("/") != 1 or name.startswith((".", "/", "~")):
        return False
    return all(_REPO_PART.match(part) for part in name.split("/"))


def published_base(base: str, base_model: str | None = None) -> str:
    """The Hub id a published adapter names as its base (card front matter, ``adapter_config.json``).

    ``base_model`` (``push-to-hub --base-model``) wins. A base given as a Hub id is its own. A local
    folder (MedGemma is gated, so it is often downloaded once) must name its Hub id: ``_name_or_path``
    in its ``config.json``, or the ``models--ORG--NAME`` folder of a Hugging Face cache snapshot.
    """
    if base_model is not None:
        if not _is_hub_id(base_model):
            raise XrayTrainError(
                f"--base-model {base_model!r}: expected a Hub id ORG/NAME (e.g. google/medgemma-4b-it)"
            )
        return base_model
    if not looks_like_local_path(base):
        return base
    folder = Path(base).expanduser()
    try:
        named = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        named = None
    if _is_hub_id(named):
        return named
    for part in folder.resolve().parts:
        if part.startswith("models--") and part.count("--") == 2:
            return part.removeprefix("models--").replace("--", "/")
    raise XrayTrainError(
        f"model.base is a local folder ({base}) that does not name its Hub id; pass --base-model ORG/NAME "
        "(e.g. --base-model google/medgemma-4b-it) so the published adapter can be loaded"
    )


#: What must agree between the base a run trained on and the Hub id it is published under: the model class,
#: the vocabulary (the adapter's token rows) and every width and depth the LoRA matrices are shaped by.
BASE_SHAPE = (
    "architectures", "model_type", "mm_tokens_per_image", "text_config.vocab_size", "text_config.hidden_size",
    "text_config.num_hidden_layers", "text_config.intermediate_size", "text_config.num_attention_heads",
    "text_config.num_key_value_heads", "text_config.head_dim", "vision_config.hidden_size",
    "vision_config.num_hidden_layers", "vision_config.image_size", "vision_config.patch_size",
)  # fmt: skip


def base_shape(config_file: Path) -> dict:
    """The ``BASE_SHAPE`` entries of a base's ``config.json`` (absent ones as None)."""
    try:
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise XrayTrainError(f"{config_file}: not a readable config.json ({type(exc).__name__})") from None
    shape = {}
    for key in BASE_SHAPE:
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        shape[key] = node
    return shape


def check_base_model(base: str, revision: str | None, base_model: str) -> None:
    """``push-to-hub --base-model X``: refuse to publish the adapter under X unless the run's base is that
    model (same ``BASE_SHAPE``), since downloaders would load the adapter onto X. ``--force`` skips this."""
    if base == base_model:
        return
    from xray_train.preflight import base_config_file

    force = "pass --force to publish under it anyway"
    try:
        ours = base_shape(base_config_file(base, revision))
        theirs = base_shape(base_config_file(base_model, None))
    except XrayTrainError as exc:
        raise XrayTrainError(
            f"--base-model {base_model}: cannot check that the run's base is that model ({exc}); {force}"
        ) from None
    differ = [f"{key} {ours[key]!r} vs {theirs[key]!r}" for key in BASE_SHAPE if ours[key] != theirs[key]]
    if differ:
        raise XrayTrainError(
            f"--base-model {base_model}: the run was trained on another model ({base}: {'; '.join(differ[:4])}), "
            f"so the published adapter would not fit {base_model}; name the base it was trained on, or {force}"
        )


def _check_weights(path: Path) -> AdapterInfo:
    import torch
    from safetensors import safe_open

    problem = safetensors_problem(path)
    if problem:
        raise XrayTrainError(f"{path}: not a readable safetensors file ({problem})")

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
    run_dir = RunDir(adapter_dir)
    d = run_dir.path
    if not d.is_dir():
        raise XrayTrainError(f"adapter directory not found: {d}")
    if run_dir.config_dict().get("phase") not in ("phase1", "phase2"):
        raise XrayTrainError(f"{run_dir.file(RESOLVED_CONFIG)}: key phase must be phase1 or phase2")
    cfg = run_dir.config()
    if not run_dir.has_adapter():
        raise XrayTrainError(f"{run_dir.file(ADAPTER_CONFIG)}: missing")
    run_dir.adapter_config()
    weights = run_dir.file(ADAPTER_WEIGHTS)
    if not weights.is_file():
        raise XrayTrainError(f"{weights}: missing (adapter weights must be saved as safetensors)")
    has_vocab = any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    if not (d / "tokenizer_config.json").is_file() or not has_vocab:
        raise XrayTrainError(f"{d}: tokenizer files missing (need tokenizer_config.json and tokenizer.json)")
    if not any((d / f).is_file() for f in PROCESSOR_FILES):
        raise XrayTrainError(f"{d}: processor files missing (need processor_config.json or preprocessor_config.json)")
    if cfg.add_loc_tokens:
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
