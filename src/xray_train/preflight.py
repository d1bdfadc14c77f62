"""What the schema cannot know: checks against the installed packages and the base model's architecture.

Everything here would otherwise fail later, inside transformers, peft or a logger's callback, after
minutes of loading: an optimiser or scheduler name transformers does not have, a logger that is not
installed, LoRA target names that match no layer of the base's language model, a Hub base that cannot be
reached. The checks read the base's ``config.json`` only and build the module tree on the meta device (no
weights, ~0.2 s for MedGemma-4B once transformers is imported). ``load_config`` runs them once the schema
and paths are clean, so a typo is still reported in the time it takes to read the YAML.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from xray_train.errors import XrayTrainError
from xray_train.gemma3 import local_config_file, require_gemma3
from xray_train.names import did_you_mean, target_modules_regex

#: Seconds to wait for the Hub before calling it unreachable (transformers would retry for minutes).
HUB_TIMEOUT_S = 10

#: report_to name -> the module its Hugging Face callback imports.
LOGGER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def transformers_names() -> tuple[list[str], list[str]]:
    """(scheduler names, optimiser names) transformers' TrainingArguments accepts."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    return [s.value for s in SchedulerType], [o.value for o in OptimizerNames]


def training_problems(training) -> list[str]:
    """Scheduler and optimiser names transformers does not know, and loggers that are not installed."""
    problems = []
    defaults = type(training).model_fields
    chosen = (training.lr_scheduler_type, training.optim)
    if chosen == (defaults["lr_scheduler_type"].default, defaults["optim"].default):
        schedulers, optimisers = [training.lr_scheduler_type], [training.optim]  # no import for the defaults
    else:
        schedulers, optimisers = transformers_names()
    if training.lr_scheduler_type not in schedulers:
        name = training.lr_scheduler_type
        problems.append(
            f"training.lr_scheduler_type: unknown scheduler {name!r}{did_you_mean(name, schedulers)} "
            f"(transformers has: {', '.join(schedulers)})"
        )
    if training.optim not in optimisers:
        name = training.optim
        problems.append(
            f"training.optim: unknown optimizer {name!r}{did_you_mean(name, optimisers)} "
            "(transformers' OptimizerNames, e.g. adamw_torch, adamw_torch_fused, adafactor, sgd)"
        )
    for name in training.report_to:
        modules = LOGGER_MODULES.get(name)
        if modules and not any(importlib.util.find_spec(m) for m in modules):
            problems.append(
                f"training.report_to: {name} is not installed (pip install {modules[0]}, or leave it out of report_to)"
            )
    return problems


# ---------------------------------------------------------------------------------------------
# The base model


def _hint(repo_id: str) -> str:
    return (
        f"MedGemma and other gated models need their licence accepted on https://huggingface.co/{repo_id} and "
        "`hf auth login` (or HF_TOKEN); or set model.base to a local copy of the model"
    )


def _go_offline() -> None:
    """The Hub is unreachable but the base is cached: make transformers use the cache without first retrying
    every request for minutes."""
    import os

    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def hub_config_file(repo_id: str, revision: str | None) -> Path:
    """The Hub base's config.json, downloaded or from the local cache; an error that says what to do when
    it can be neither. Fails within ``HUB_TIMEOUT_S`` with no network."""
    import httpx
    from huggingface_hub import errors, get_hf_file_metadata, hf_hub_download, hf_hub_url, is_offline_mode
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    cached = Path(cached) if isinstance(cached, str) else None
    if is_offline_mode():
        if cached is not None:
            return cached
        raise XrayTrainError(
            f"model.base: {repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"download it where there is network (`hf download {repo_id}`). {_hint(repo_id)}"
        )
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json", revision=revision), timeout=HUB_TIMEOUT_S)
    except errors.GatedRepoError:
        raise XrayTrainError(
            f"model.base: {repo_id} is gated and this machine has no access. {_hint(repo_id)}"
        ) from None
    except errors.RevisionNotFoundError:
        raise XrayTrainError(f"model.revision: {revision!r} is not a branch, tag or commit of {repo_id}") from None
    except errors.RepositoryNotFoundError:
        raise XrayTrainError(
            f"model.base: {repo_id} was not found on the Hub (a private repo needs `hf auth login`); "
            "check the id or set model.base to a local directory"
        ) from None
    except errors.RemoteEntryNotFoundError:
        raise XrayTrainError(f"model.base: {repo_id} has no config.json; it is not a transformers model") from None
    except (httpx.HTTPError, OSError) as exc:
        # No network, DNS, proxy, timeout or a server error: the cache is the only way left.
        if cached is not None:
            _go_offline()
            return cached
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise XrayTrainError(
            f"model.base: cannot reach the Hugging Face Hub ({reason}) and {repo_id} is not in the local cache. "
            f"{_hint(repo_id)}"
        ) from None
    return Path(hf_hub_download(repo_id, "config.json", revision=revision, etag_timeout=HUB_TIMEOUT_S))


def base_config_file(base: str, revision: str | None) -> Path:
    return local_config_file(base) or hub_config_file(base, revision)


def base_modules(config_file: Path) -> dict:
    """Every module of the base by name, as peft will see them; built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(config_file.parent, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise XrayTrainError(f"model.base: {config_file} does not describe an image-text model ({reason})") from None
    require_gemma3(model, "the config describes")
    return dict(model.named_modules())


def _adaptable(module) -> bool:
    """A layer type peft's LoRA can wrap (what else it is given makes it raise)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D))


def target_module_problems(target_modules: list[str], modules: dict) -> list[str]:
    """Each ``lora.target_modules`` name must match an adaptable layer of the language model, with the
    pattern peft is given (``names.target_modules_regex``); peft itself only fails when none matches."""

    problems = []
    language = {n: m for n, m in modules.items() if "language_model" in n}
    linear = {n.rsplit(".", 1)[-1] for n, m in language.items() if "." in n and type(m).__name__ == "Linear"}
    candidates = sorted(linear)
    for name in dict.fromkeys(target_modules):
        pattern = re.compile(target_modules_regex([name]))
        matched = [m for n, m in language.items() if pattern.fullmatch(n)]
        if not matched:
            problems.append(
                f"lora.target_modules: {name!r} matches no layer of the base's language model"
                f"{did_you_mean(name, candidates)} (its layers: {', '.join(candidates)})"
            )
        elif not all(_adaptable(m) for m in matched):
            kinds = sorted({type(m).__name__ for m in matched if not _adaptable(m)})
            problems.append(
                f"lora.target_modules: {name!r} names a {'/'.join(kinds)}, which LoRA cannot adapt "
                f"(use layers such as {', '.join(candidates)})"
            )
    return problems


def base_problems(model, lora) -> list[str]:
    """The base is reachable and a Gemma 3 image-text model, and the LoRA targets exist in it."""
    try:
        modules = base_modules(base_config_file(model.base, model.revision))
    except XrayTrainError as exc:
        return [str(exc)]
    return target_module_problems(lora.target_modules, modules)


def environment_problems(cfg, check_base: bool = True) -> list[str]:
    """Every problem of a schema-valid ``RunConfig`` that only transformers, peft or the installed packages
    would find. ``check_base=False`` skips the base model (no file or network access)."""
    problems = training_problems(cfg.training)
    if check_base:
        problems += base_problems(cfg.model, cfg.lora)
    return problems
