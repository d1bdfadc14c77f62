"""Typed run configuration: YAML in, validated sections out.

Every problem in a config (unknown key, wrong type, value out of range, conflicting options, a missing
file) is collected and reported together, each naming its dotted key, before any weight is loaded.
``training`` keys use Hugging Face ``TrainingArguments`` names wherever one exists.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from xray_train.errors import XrayTrainError

Phase = Literal["phase1", "phase2"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    base: str = Field(
        "google/medgemma-4b-it",
        description="Hub id or local directory of the base model (a Gemma 3 image-text-to-text model).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    load_in_4bit: bool = Field(True, description="Quantise the base to 4-bit NF4 with bitsandbytes (QLoRA).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit quantisation type.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the non-quantised weights and of the 4-bit matmuls' compute."
    )
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Attention kernel. SDPA is faster and smaller; eager is the reference."
    )
    add_loc_tokens: bool | None = Field(
        None,
        description="Add the 1024 <locNNNN> tokens as single tokens with trainable rows. "
        "Default: on for phase2, off for phase1.",
    )
    train_projector: bool | None = Field(
        None,
        description="Train the multi_modal_projector (saved with the adapter). Default: on for phase2 only.",
    )


class LoraSection(_Section):
    r: int = Field(32, gt=0, description="LoRA rank.")
    alpha: int = Field(64, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        ["q_proj", "v_proj"],
        description="Projection names inside the *language model's* decoder layers. The vision tower "
        "has modules with the same names; they are never adapted.",
    )


class DataConfig(_Section):
    dataset: Literal["padchest", "indiana", "nih", "vindr", "rsna"] = Field(
        ..., description="Which reader to use (see xray_train.data.registry)."
    )
    # PadChest / NIH / VinDr / RSNA
    csv: Path | None = Field(None, description="The dataset's main CSV (PadChest: plain or .gz).")
    image_root: Path = Field(..., description="Folder holding the images.")
    image_layout: Literal["auto", "nested", "flat"] = Field(
        "auto",
        description="PadChest: images under {ImageDir}/{ImageID} (nested) or all in one folder (flat).",
    )
    projections: list[str] = Field(
        ["PA", "AP", "AP_horizontal"],
        description="PadChest: Projection values kept. Indiana: projection values kept (Frontal).",
    )
    method_labels: list[str] = Field(
        ["Physician", "RNN_model"], description="PadChest: MethodLabel values kept."
    )
    drop_labels: list[str] = Field(
        ["exclude", "suboptimal study"], description="PadChest: rows carrying any of these labels are skipped."
    )
    include_pediatric: bool = Field(True, description="PadChest: keep rows with Pediatric == PED.")
    # Indiana
    reports_csv: Path | None = Field(None, description="Indiana: indiana_reports.csv.")
    projections_csv: Path | None = Field(None, description="Indiana: indiana_projections.csv.")
    box_source: Literal["mesh_atlas", "box_file"] = Field(
        "mesh_atlas",
        description="Indiana: where boxes come from. mesh_atlas derives WEAK boxes from MeSH location "
        "qualifiers; box_file reads data.box_file.",
    )
    box_file: Path | None = Field(
        None, description="CSV filename|uid,label,x_min,y_min,x_max,y_max (used when box_source=box_file)."
    )
    box_coords: Literal["pixels", "normalized"] = Field(
        "pixels", description="Units of data.box_file coordinates: original-image pixels or 0-1."
    )
    # Shared
    image_size: int | None = Field(
        None, gt=0, description="Side of the square image the model sees. Default: the processor's size."
    )
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of patients held out for validation.")
    test_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of patients held out for testing.")
    split_seed: int = Field(0, description="Seed of the patient-grouped split (stable across dataset edits).")
    max_examples: int | None = Field(None, gt=0, description="Use at most this many training examples.")
    strict: bool = Field(False, description="Fail on the first unusable row instead of skipping it.")

    @model_validator(mode="after")
    def _check_fractions(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1")
        return self


class TrainingSection(_Section):
    """Hugging Face ``TrainingArguments`` names where one exists."""

    num_train_epochs: float = Field(1.0, gt=0, description="Epochs over the training split.")
    max_steps: int = Field(-1, description="If > 0, stop after this many optimizer steps (overrides epochs).")
    per_device_train_batch_size: int = Field(8, gt=0, description="Micro-batch per GPU.")
    per_device_eval_batch_size: int = Field(8, gt=0, description="Evaluation batch per GPU.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of the LoRA weights.")
    projector_learning_rate: float | None = Field(
        None, gt=0, description="Learning rate of the projector and loc-token rows (default: learning_rate)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: float = Field(
        0.03, ge=0, description="Linear warm-up: a float in [0, 1) is a share of all steps, >= 1 a step count."
    )
    lr_scheduler_type: str = Field("cosine", description="Any transformers scheduler name.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    optim: str = Field("adamw_torch", description="Any transformers optimizer name.")
    seed: int = Field(42, description="Seed for initialisation, shuffling and dropout.")
    logging_steps: int = Field(10, gt=0, description="Log every N steps.")
    save_steps: int = Field(200, gt=0, description="Checkpoint every N steps.")
    save_total_limit: int | None = Field(3, gt=0, description="Keep at most this many checkpoints.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (default: save_steps).")
    eval_strategy: Literal["no", "steps", "epoch"] = Field("steps", description="When to evaluate.")
    max_eval_samples: int | None = Field(256, gt=0, description="Cap on validation examples per evaluation.")
    bf16: bool | None = Field(None, description="bf16 autocast. Default: on where the GPU supports it.")
    fp16: bool = Field(False, description="fp16 autocast (GPUs without bf16).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute decoder activations in backward: less memory, ~30 % slower."
    )
    dataloader_num_workers: int = Field(2, ge=0, description="Image-loading worker processes.")
    group_by_length: bool = Field(True, description="Batch examples of similar length (less padding).")
    report_to: list[str] = Field(
        ["tensorboard"], description="Loggers: any of tensorboard, wandb, mlflow, or none."
    )
    max_length: int = Field(1024, gt=0, description="Longest tokenised example; longer answers are skipped.")
    # xray-train speed levers (each benchmarked in benchmarks/bench_train.py)
    cache_vision_features: bool = Field(
        True,
        description="Precompute the frozen vision tower's pooled output once per image and train on it.",
    )
    loss_on_targets_only: bool = Field(
        True, description="Compute the LM head only at supervised positions (chunked cross-entropy)."
    )
    use_liger: bool = Field(False, description="Patch Gemma 3 with Liger kernels (GPU only).")

    @model_validator(mode="after")
    def _check(self) -> "TrainingSection":
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are mutually exclusive")
        bad = set(self.report_to) - {"tensorboard", "wandb", "mlflow", "none"}
        if bad:
            raise ValueError(f"report_to: unknown logger(s) {sorted(bad)}")
        return self


class RunConfig(_Section):
    """A whole run: one YAML file."""

    phase: Phase = Field(..., description="phase1 (report SFT) or phase2 (<loc> spatial SFT).")
    output_dir: Path = Field(..., description="Where checkpoints, the adapter and logs are written.")
    system_prompt: str = Field(
        "You are an expert radiologist. Describe chest X-rays accurately and concisely.",
        description="Folded into the first user turn (Gemma has no system role).",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataConfig
    training: TrainingSection = Field(default_factory=TrainingSection)

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.phase == "phase1" and self.data.dataset != "padchest":
            raise ValueError("phase1 trains on report targets: data.dataset must be padchest")
        if self.phase == "phase2" and self.data.dataset == "padchest":
            raise ValueError("phase2 trains on boxes: data.dataset must be a box source, not padchest")
        return self

    @property
    def add_loc_tokens(self) -> bool:
        flag = self.model.add_loc_tokens
        return self.phase == "phase2" if flag is None else flag

    @property
    def train_projector(self) -> bool:
        flag = self.model.train_projector
        return self.phase == "phase2" if flag is None else flag


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error reporting


class ConfigError(XrayTrainError):
    """Every problem found in a config, one per line, each naming its dotted key."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s): " + "; ".join(problems))


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-after"))


def _format_validation_error(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        key = _dotted(e["loc"]) or "<top level>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        problems.append(f"{key}: {msg}")
    return problems


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], value parsed as YAML so 3, 1e-4, true, [x, y] get their types)."""
    if "=" not in text:
        raise ConfigError("--set", [f"{text!r}: expected dotted.key=value"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("--set", [f"{text!r}: empty key"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set`` overrides to a raw dict; types are checked by the schema afterwards."""
    data = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError("--set", [f"{'.'.join(path)}: {part} is not a section"])
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return data


def _resolve_paths(data: dict, base_dir: Path) -> dict:
    """Relative data paths in a YAML file are relative to the current directory, like every CLI tool;
    ``${CONFIG_DIR}`` expands to the YAML's own folder for configs shipped beside their data."""
    def expand(value):
        if isinstance(value, str) and "${CONFIG_DIR}" in value:
            return value.replace("${CONFIG_DIR}", str(base_dir))
        return value

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return expand(node)

    return walk(data)


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise XrayTrainError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise XrayTrainError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise XrayTrainError(f"{path}: expected a mapping of sections at the top level")
    return data


def _check_paths(cfg: RunConfig) -> list[str]:
    """Existence checks the schema cannot do. Reported with the schema's errors, before any loading."""
    problems = []
    d = cfg.data
    wanted: list[tuple[str, Path | None]] = [("data.image_root", d.image_root)]
    if d.dataset == "indiana":
        wanted += [("data.reports_csv", d.reports_csv), ("data.projections_csv", d.projections_csv)]
        if d.box_source == "box_file":
            wanted.append(("data.box_file", d.box_file))
    else:
        wanted.append(("data.csv", d.csv))
    for key, path in wanted:
        if path is None:
            problems.append(f"{key}: required for data.dataset={d.dataset}")
        elif not path.exists():
            problems.append(f"{key}: not found: {path}")
    base = cfg.model.base
    if looks_like_local_path(base) and not Path(base).expanduser().is_dir():
        problems.append(f"model.base: local model directory not found: {base}")
    if cfg.output_dir.exists() and not cfg.output_dir.is_dir():
        problems.append(f"output_dir: exists and is not a directory: {cfg.output_dir}")
    return problems


def looks_like_local_path(name: str) -> bool:
    """A hub id is ``org/name``; anything else (./x, /x, ~/x, a/b/c, an existing folder) is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists()


def load_config(path: Path | str, overrides: list[str] | None = None, check_paths: bool = True) -> RunConfig:
    """Read, override and validate a run config; raise ``ConfigError`` listing every problem."""
    path = Path(path)
    raw = _resolve_paths(apply_overrides(read_yaml(path), overrides or []), path.parent.resolve())
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(str(path), _format_validation_error(err)) from None
    problems = _check_paths(cfg) if check_paths else []
    if problems:
        raise ConfigError(str(path), problems)
    return cfg


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (saved beside every output)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
