"""Typed run configuration: YAML in, validated sections out.

Every problem in a config (unknown key, wrong type, value out of range, conflicting options, a missing
file) is collected and reported together, each naming its dotted key, before any weight is loaded.
``training`` keys use Hugging Face ``TrainingArguments`` names wherever one exists.

Over 400 lines because each option is declared once, here, with its one default and the description
that documents it (``xray-train config validate`` and the README's key table read from these).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator, model_validator,
)

from xray_train.data.registry import DATASETS, datasets_for
from xray_train.errors import XrayTrainError
from xray_train.names import did_you_mean, looks_like_local_path

Phase = Literal["phase1", "phase2"]
#: ``training.vision_attention``: PyTorch's own choice, or the SDPA kernel tried first (the rest follow in this order).
VisionAttention = Literal["default", "flash", "cudnn", "efficient", "math"]


# ---------------------------------------------------------------------------------------------
# Cross-field rules. Each returns (dotted key, problem) pairs. The validators below raise them, and
# ``load_config`` also applies them to the raw YAML when schema errors elsewhere in a section stop
# pydantic from reaching its validator, so one run of the CLI lists every problem.

KNOWN_LOGGERS = {"tensorboard", "wandb", "mlflow", "none"}


def as_name_list(value):
    """``wandb`` or ``wandb,mlflow`` -> a list, as Hugging Face reads ``report_to``; lists pass through."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _data_conflicts(val_fraction, test_fraction) -> list[tuple[str, str]]:
    if _num(val_fraction) and _num(test_fraction) and val_fraction + test_fraction >= 1.0:
        return [("test_fraction", f"val_fraction + test_fraction must be < 1 (got {val_fraction} + {test_fraction})")]
    return []


def _training_conflicts(bf16, fp16, report_to, levers: dict | None = None) -> list[tuple[str, str]]:
    out = []
    levers = levers or {}
    # 0 is what ``resolve`` records for a run without checkpointing.
    if levers.get("checkpoint_layers") not in (None, 0) and levers.get("gradient_checkpointing") is False:
        out.append(("checkpoint_layers", "has no effect with gradient_checkpointing: false (remove one of them)"))
    if levers.get("dequantize_in_graph") is True and levers.get("torch_compile") is False:
        out.append((
            "dequantize_in_graph",
            "needs torch_compile (uncompiled, every layer would keep a bf16 copy of its weight for backward, "
            "~6 GB for MedGemma-4B); remove one of them",
        ))
    if bf16 is True and fp16 is True:
        out.append(("fp16", "bf16 and fp16 are mutually exclusive (set one of them to false)"))
    report_to = as_name_list(report_to)
    if isinstance(report_to, list):
        bad = sorted({str(r) for r in report_to} - KNOWN_LOGGERS)
        if bad:
            out.append(("report_to", f"unknown logger(s) {bad} (use any of {sorted(KNOWN_LOGGERS)})"))
    return out


_LEVER_KEYS = ("gradient_checkpointing", "checkpoint_layers", "dequantize_in_graph", "torch_compile")


_PHASE_TARGETS = {"phase1": "report targets", "phase2": "boxes"}


def _run_conflicts(phase, dataset, fp16, compute_dtype) -> list[tuple[str, str]]:
    out = []
    entry = DATASETS.get(dataset) if isinstance(dataset, str) else None
    if entry is not None and phase in _PHASE_TARGETS and phase not in entry.phases:
        out.append((
            "data.dataset",
            f"{phase} trains on {_PHASE_TARGETS[phase]}: must be one of {', '.join(datasets_for(phase))}, not {dataset}",
        ))
    if fp16 is True and compute_dtype == "bfloat16":
        out.append(
            ("training.fp16", "fp16 autocast over model.compute_dtype=bfloat16 mixes two half types, "
             "set model.compute_dtype=float16 (or float32)")
        )
    return out


def _num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Conflicts(ValueError):
    """Carries full dotted keys, so the report names ``training.fp16`` rather than the section."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def _raise_conflicts(conflicts: list[tuple[str, str]], prefix: str) -> None:
    if conflicts:
        raise _Conflicts([f"{prefix}{key}: {msg}" for key, msg in conflicts])


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    base: str = Field(
        "google/medgemma-4b-it",
        description="Hub id or local directory of the base model (a Gemma 3 image-text-to-text model).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    base_fingerprint: str | None = Field(
        None,
        description="Fingerprint of a local base folder (run_dir.base_fingerprint), written by a run into its saved "
        "config beside the folder's absolute path, so that loading the adapter checks the folder still holds "
        "that model. Leave unset in a config you write.",
    )
    load_in_4bit: bool = Field(True, description="Quantise the base to 4-bit NF4 with bitsandbytes (QLoRA).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit quantisation type.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None,
        description="dtype of the non-quantised weights and of the 4-bit matmuls' compute. Default: bfloat16, "
        "or float16 on a GPU without native bf16 (T4, V100, P100; see docs/small_gpus.md).",
    )
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Attention kernel. SDPA is faster and smaller; eager is the reference."
    )
    add_loc_tokens: bool | None = Field(
        None,
        description="Add the 1024 <locNNNN> tokens as single tokens with trainable rows. "
        "Default: on for phase2 with data.box_format loc, off otherwise.",
    )
    train_projector: bool | None = Field(
        None,
        description="Train the multi_modal_projector (saved with the adapter). Default: on for phase2 only.",
    )
    loc_token_init: Literal["mean", "ordinal", "numbers"] = Field(
        "ordinal",
        description="Initial rows of the new <loc> tokens: 'mean' (all equal to the mean embedding), 'ordinal' "
        "(the mean plus a smooth code of the bin index, so neighbouring bins start alike and training one bin "
        "also moves its neighbours) or 'numbers' (the base's own embedding of the bin's number, written 0-999, "
        "plus the ordinal code). See docs/learning.md for what the learning benchmark measured.",
    )
    loc_decode: Literal["argmax", "expected"] = Field(
        "argmax",
        description="How a <loc> token is chosen when generating: the most likely bin ('argmax'), or, once a "
        "<loc> token wins, the bin nearest the expected coordinate under the softmax over the <loc> rows "
        "('expected'; measured worse: where the model hesitates between two places, the expectation lands "
        "between them). See docs/learning.md.",
    )
    residual_scale: int | None = Field(
        None,
        ge=1,
        description="Divide Gemma 3's residual stream by this power of two while the model runs (an exact "
        "reparametrisation: the same logits, the same adapter, the same merged model), so that float16 "
        "activations cannot overflow. 1 turns it off. Default: 16 with compute_dtype float16, 1 otherwise. "
        "See docs/fp16.md.",
    )

    @field_validator("residual_scale")
    @classmethod
    def _power_of_two(cls, value: int | None) -> int | None:
        if value is not None and value & (value - 1):
            raise ValueError(f"must be a power of two (1, 2, 4, ... 16, ...) so scaling is exact, not {value}")
        return value
    inference: Literal["auto", "merged", "4bit"] = Field(
        "auto",
        description="Weights evaluate and predict decode with: 'merged' (the base in compute_dtype with the "
        "adapter merged in memory: the model `xray-train merge` publishes, many times faster at large "
        "batches), '4bit' (the NF4 base trained against; for cards without room for the 16-bit copy) or "
        "'auto' (merged where the free GPU memory holds it, else 4bit). See xray_train.inference.",
    )
    generate_batch_size: int | None = Field(
        None,
        gt=0,
        description="Rows decoded at once by evaluate and predict (prompts sorted by length). Default: as many "
        "as the free GPU memory holds after the weights, up to 256 (8 on a CPU).",
    )
    decode_cache: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="KV cache of evaluate's and predict's decoding: 'dynamic' (grows token by token) or "
        "'static' (allocated once at the prompt plus max_new_tokens, which lets transformers compile the "
        "decode step on a GPU). Both give the same greedy tokens; 'static' is not yet measured faster, so "
        "it is not the default (docs/evaluation.md).",
    )


class LoraSection(_Section):
    r: int = Field(32, gt=0, description="LoRA rank.")
    alpha: int = Field(64, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        ["q_proj", "v_proj"],
        min_length=1,
        description="Projection names inside the *language model's* decoder layers. The vision tower "
        "has modules with the same names; they are never adapted.",
    )


class _DataSection(_Section):
    """What every dataset reader shares: the images and the patient-grouped split."""

    image_root: Path = Field(..., description="Folder holding the images.")
    box_format: Literal["loc", "text"] = Field(
        "loc",
        description="Phase-2 answers: 'loc' writes each coordinate as one added <locNNNN> token (PaliGemma); "
        "'text' as a plain integer 0-999 (Qwen2-VL style, no added tokens). Evaluate and predict read both.",
    )
    image_size: int | None = Field(
        None, gt=0, description="Side of the square image the model sees. Default: the processor's size."
    )
    decode_workers: int | None = Field(
        None,
        ge=0,
        description="Processes reading images for the vision-feature cache, evaluation and prediction "
        "(0: in-process). Default: one per CPU.",
    )
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of patients held out for validation.")
    test_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of patients held out for testing.")
    split_seed: int = Field(0, description="Seed of the patient-grouped split (stable across dataset edits).")
    max_examples: int | None = Field(None, gt=0, description="Use at most this many training examples.")
    strict: bool = Field(
        False,
        description="Fail on the first unreadable or malformed row instead of skipping it (rows left out by the "
        "filters above, e.g. lateral views, are still only counted).",
    )

    @model_validator(mode="after")
    def _check_fractions(self) -> "_DataSection":
        _raise_conflicts(_data_conflicts(self.val_fraction, self.test_fraction), prefix="data.")
        return self

    def phase_problems(self, phase: str) -> list[tuple[str, str]]:
        """(dotted key, problem) pairs where this data section cannot give ``phase``'s targets although its
        dataset serves the phase (a source whose columns decide it)."""
        return []


class PadchestData(_DataSection):
    dataset: Literal["padchest"] = Field(..., description="PadChest (BIMCV): report targets for Phase 1.")
    # Required, but checked with the other paths (``_check_paths``) so the message names the dataset.
    csv: Path | None = Field(None, description="PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz).")
    image_layout: Literal["auto", "nested", "flat"] = Field(
        "auto", description="Images under {ImageDir}/{ImageID} (nested) or all in one folder (flat)."
    )
    projections: list[str] = Field(["PA", "AP", "AP_horizontal"], description="Projection values kept.")
    method_labels: list[str] = Field(["Physician", "RNN_model"], description="MethodLabel values kept.")
    drop_labels: list[str] = Field(
        ["exclude", "suboptimal study"], description="Rows carrying any of these labels are skipped."
    )
    include_pediatric: bool = Field(True, description="Keep rows with Pediatric == PED.")


class IndianaData(_DataSection):
    dataset: Literal["indiana"] = Field(..., description="Indiana CXR (OpenI, Kaggle layout): box targets.")
    reports_csv: Path | None = Field(None, description="indiana_reports.csv.")
    projections_csv: Path | None = Field(None, description="indiana_projections.csv.")
    projections: list[str] = Field(
        ["Frontal"], description="projection values of indiana_projections.csv kept (Frontal, Lateral)."
    )
    box_source: Literal["mesh_atlas", "box_file"] = Field(
        "mesh_atlas",
        description="Where boxes come from. mesh_atlas derives WEAK boxes from MeSH location qualifiers; "
        "box_file reads data.box_file.",
    )
    box_file: Path | None = Field(
        None, description="CSV filename|uid,label,x_min,y_min,x_max,y_max (used when box_source=box_file)."
    )
    box_coords: Literal["pixels", "normalized"] = Field(
        "pixels", description="Units of data.box_file coordinates: original-image pixels or 0-1."
    )


class NihData(_DataSection):
    dataset: Literal["nih"] = Field(..., description="NIH ChestX-ray14, bounding-box subset.")
    csv: Path | None = Field(None, description="BBox_List_2017.csv.")


class VindrData(_DataSection):
    dataset: Literal["vindr"] = Field(..., description="VinDr-CXR.")
    csv: Path | None = Field(None, description="The annotations CSV (e.g. train.csv).")


class RsnaData(_DataSection):
    dataset: Literal["rsna"] = Field(..., description="RSNA Pneumonia Detection Challenge.")
    csv: Path | None = Field(None, description="stage_2_train_labels.csv.")


class HfColumns(_Section):
    """Which column of a Hugging Face dataset holds what. A dotted name reaches inside a column
    (``objects.bbox``: the ``bbox`` field of the ``objects`` column, per box)."""

    image: str = Field("image", description="Image column: an Image feature, or text paths (relative to data.image_root).")
    report: str | list[str] | None = Field(
        None, description="Report text column, or several joined by data.report_template (Phase-1 targets)."
    )
    labels: str | None = Field(
        None, description="Finding names of each image: text, a list, or ClassLabel ids (named by the ClassLabel)."
    )
    boxes: str | None = Field(None, description="Boxes of each image, 4 numbers each, e.g. objects.bbox (Phase-2 targets).")
    box_labels: str | None = Field(
        None, description="One label per box, text or ClassLabel ids, e.g. objects.category. Default: 'abnormality'."
    )
    patient_id: str | None = Field(
        None, description="Patient column for the patient-grouped split. Default: each image is its own patient."
    )


class HfData(_DataSection):
    dataset: Literal["hf"] = Field(
        ..., description="Any dataset Hugging Face `datasets` loads: a Hub id, parquet, JSON lines, CSV or an image folder."
    )
    source: str = Field(
        ..., description="Hub dataset id (owner/name, with data.revision), or a local folder, file or glob."
    )
    revision: str | None = Field(None, description="Hub revision (a commit hash pins the data). Required for a Hub id.")
    format: Literal["auto", "hub", "parquet", "json", "csv", "imagefolder"] = Field(
        "auto", description="How to load data.source. auto: a local folder or file by its files' suffixes, else the Hub."
    )
    split: str = Field("train", description="The split read for training.")
    validation_split: str | None = Field(
        None, description="A split held out for validation. Default: patients of data.split, by data.val_fraction."
    )
    test_split: str | None = Field(
        None, description="A split held out for testing. Default: patients of data.split, by data.test_fraction."
    )
    columns: HfColumns = Field(default_factory=HfColumns)
    report_template: str | None = Field(
        None,
        description="How data.columns.report's columns become one text, e.g. 'FINDINGS: {findings}\nIMPRESSION: "
        "{impression}' (the default for several columns). Text in the Phase-1 FINDINGS / LOCATIONS / IMPRESSION "
        "form is trained as the canonical report; other text verbatim.",
    )
    box_order: Literal["xywh", "xyxy"] = Field(
        "xywh", description="Box numbers: top-left corner and size (COCO, the Hub's object-detection schema) or corners."
    )
    box_coords: Literal["pixels", "normalized"] = Field(
        "pixels", description="Units of the box numbers: pixels of the image, or 0-1 of its width and height."
    )
    streaming: bool = Field(
        False, description="Read rows as they arrive instead of preparing the whole set first (sets larger than the disk)."
    )
    image_root: Path | None = Field(
        None, description="Folder that image paths given as text are relative to. Default: data.source's folder."
    )

    @model_validator(mode="after")
    def _check_hf(self) -> "HfData":
        problems = []
        if self.format == "hub" and not self.revision:
            problems.append(("revision", "required for a Hub dataset: pin the commit (or tag) the data comes from"))
        names = self.columns.report if isinstance(self.columns.report, list) else [self.columns.report]
        if self.report_template is not None:
            import string

            fields = {f for _, f, _, _ in string.Formatter().parse(self.report_template) if f}
            unknown = sorted(fields - set(filter(None, names)))
            if unknown:
                problems.append(("report_template", f"names {unknown}, not columns of data.columns.report"))
        _raise_conflicts(problems, prefix="data.")
        return self

    def phase_problems(self, phase: str) -> list[tuple[str, str]]:
        if phase == "phase1" and not (self.columns.report or self.columns.labels):
            return [("data.columns.report", "phase1 trains on report targets: map a report (or labels) column")]
        if phase == "phase2" and not self.columns.boxes:
            return [("data.columns.boxes", "phase2 trains on boxes: map a boxes column, e.g. objects.bbox")]
        return []


#: One class per dataset of the registry, chosen by ``data.dataset``: a key of another dataset's reader is
#: an unknown key.
DATA_CLASSES: dict[str, type[_DataSection]] = {name: globals()[entry.config] for name, entry in DATASETS.items()}
DataConfig = Annotated[Union[tuple(DATA_CLASSES.values())], Field(discriminator="dataset")]


def data_config(**fields) -> _DataSection:
    """The data section for ``fields["dataset"]`` (validated like the ``data`` section of a YAML file)."""
    return TypeAdapter(DataConfig).validate_python(fields)


class TrainingSection(_Section):
    """Hugging Face ``TrainingArguments`` names where one exists."""

    num_train_epochs: float = Field(1.0, gt=0, description="Epochs over the training split.")
    max_steps: int = Field(-1, description="If > 0, stop after this many optimizer steps (overrides epochs).")
    effective_batch_size: int = Field(
        16,
        gt=0,
        description="Examples per optimizer step over all GPUs (per_device_train_batch_size x "
        "gradient_accumulation_steps x GPUs) when per_device_train_batch_size is left to the default: the "
        "memory choice keeps this and splits it into micro-batches that fit the card (docs/small_gpus.md). The "
        "resolved config records the effective batch that ran.",
    )
    per_device_train_batch_size: int | None = Field(
        None,
        gt=0,
        description="Micro-batch per GPU. Default: the largest share of effective_batch_size that fits the GPU's "
        "memory (xray_train.memory: a model of MedGemma-4B's peak, fit to measurements); on CPU the whole share. "
        "A batch set here that does not fit is refused with the largest that does.",
    )
    per_device_eval_batch_size: int = Field(8, gt=0, description="Evaluation batch per GPU.")
    gradient_accumulation_steps: int | None = Field(
        None,
        gt=0,
        description="Micro-batches per optimizer step. Default: effective_batch_size / (micro-batch x GPUs) when "
        "the micro-batch is chosen from the memory, 1 when per_device_train_batch_size is set.",
    )
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
    fp16: bool | None = Field(
        None,
        description="fp16 autocast. Default: on where the GPU has no native bf16 (T4, V100, P100), with "
        "model.compute_dtype float16.",
    )
    gradient_checkpointing: bool | None = Field(
        None,
        description="Recompute decoder-layer activations in backward instead of keeping them (less GPU memory). "
        "Default: on with CUDA when the micro-batch does not fit without it (see checkpoint_layers); off on CPU "
        "(memory is not what limits there and recomputation only costs time).",
    )
    checkpoint_layers: int | Literal["all"] | None = Field(
        None,
        description="With gradient_checkpointing: how many decoder layers recompute (spread evenly over the "
        "stack; MedGemma-4B has 34); the others keep their activations. \"all\": every layer. null: the fewest "
        "that let the micro-batch fit the GPU's memory (xray_train.memory), per phase; with "
        "gradient_checkpointing also null, none when everything fits.",
    )
    dataloader_num_workers: int | None = Field(
        None,
        ge=0,
        description="Data-loading worker processes, for the epochs that read images. Default: one per CPU to "
        "decode images, including while the steps fill the vision-feature cache (fill_cache_during_epoch); 0 "
        "when that cache is built before the steps (batches are gathered in-process, workers would only add "
        "copies). An epoch that reads no image, every feature being cached (the epochs after the one that "
        "filled the cache, a rerun), runs without workers whatever this says.",
    )
    pad_last_batch: bool = Field(
        True,
        description="Fill the epoch's last training batch with label-free copies of examples: a short batch is "
        "a new shape that makes the compiled layers recompile. The copies carry no supervised token, so the "
        "loss and gradients are those of the short batch.",
    )
    group_by_length: bool = Field(True, description="Batch examples of similar length (less padding).")
    report_to: list[str] = Field(
        ["tensorboard"],
        description="Loggers: any of tensorboard, wandb, mlflow, or none; a list, one name, or names joined by "
        "commas (wandb,tensorboard). Each must be installed.",
    )
    max_length: int = Field(1024, gt=0, description="Longest tokenised example; longer answers are skipped.")
    # xray-train speed levers (each benchmarked in benchmarks/bench_train.py)
    cache_vision_features: bool = Field(
        True,
        description="Precompute the frozen vision tower's pooled output once per image and train on it.",
    )
    fill_cache_during_epoch: bool = Field(
        True,
        description="Fill the vision-feature cache during the first epoch instead of building it before the first "
        "step: each step runs SigLIP on the images of its batch that have no row yet, and later epochs and "
        "reruns read the rows. Images no step reached are computed when training ends, which leaves the same "
        "cache a build makes. Images are read by DataLoader workers, alongside the steps; the later epochs read "
        "no image and run without them, as after a build. On by default: a first epoch overlaps reading with "
        "the GPU instead of waiting for a build (0.80 h against 0.84 h projected for 100k films from one H200's "
        "measurements). false builds first. One process only: with several, the cache is built first. `xray-train "
        "cache-features` always builds.",
    )
    feature_cache_batch_size: int = Field(
        32, gt=0, description="Images per SigLIP forward while building the vision-feature cache (bf16)."
    )
    compile_vision_cache: bool | None = Field(
        None,
        description="torch.compile SigLIP's encoder layers for the vision-feature cache build. Default: on "
        "with CUDA when there are at least 8000 images to cache (below that the compile costs more than it saves), "
        "off below compute capability 7.0.",
    )
    vision_attention: VisionAttention = Field(
        "default",
        description="The SDPA kernel SigLIP's attention tries first wherever the cache's features are made (a "
        "build, or the steps that fill it); when it cannot run, the others follow (flash, cudnn, efficient, math). "
        "`default`: PyTorch's own choice, which on an H200 is already cuDNN's kernel, the fastest for SigLIP's "
        "16 heads of 72 (eager tower 63.3 films/s, 53.3 held to FlashAttention).",
    )
    loss_on_targets_only: bool = Field(
        True, description="Compute the LM head only at supervised positions (chunked cross-entropy)."
    )
    head_chunk_rows: int = Field(
        256,
        gt=0,
        description="Supervised positions per LM-head chunk. A chunk's logits (rows x 262k, in bf16, fp32 and "
        "their fp32 gradient: ~3.7 GB per 1024 rows) exist on top of every saved activation at the step's "
        "memory peak; 256 keeps that under 1 GB at no measurable speed cost.",
    )
    head_grad_in_forward: bool = Field(
        True,
        description="Make the LM head's gradient chunk by chunk during the forward (softmax minus one-hot, "
        "through the head), so no chunk's logits are recomputed in backward. Needs a frozen head: Phase 2's "
        "trainable <loc> rows keep the recomputing path.",
    )
    loc_label_sigma: float = Field(
        12.0,
        ge=0,
        description="Distance-aware <loc> targets: the cross-entropy of a <loc> position is taken against a "
        "Gaussian over the <loc> bins centred on the true bin, with this standard deviation in bins (e.g. 12 "
        "of 1024, about 1.2 % of the image side), so a near miss costs less than a far one. 0: one-hot "
        "targets. Other positions are unchanged. See docs/learning.md.",
    )
    loc_l1_weight: float = Field(
        1.0,
        ge=0,
        description="Adds weight x |expected coordinate - true coordinate| (0-1 units) at each <loc> position, "
        "the expectation taken under the softmax over the <loc> rows. 0: off. Other positions are unchanged. "
        "See docs/learning.md.",
    )
    lora_start_step: int = Field(
        0,
        ge=0,
        description="Two-stage Phase 2: for the first N optimizer steps only the <loc> rows and the projector "
        "are updated (LoRA's gradients are dropped before the optimizer step), then LoRA joins. 0 (default): "
        "everything trains from the first step. See docs/learning.md.",
    )
    split_image_attention: bool = Field(
        True,
        description="Run Gemma 3's text-causal, image-bidirectional attention as two mask-free SDPA calls "
        "when every row of a batch has its image at the same place (one prompt per phase): no dense "
        "[batch, seq, seq] mask built each step and no K/V copied to every query head (+3.9 % and 0.5 GB less "
        "at batch 16 on MedGemma-4B). Same outputs; other batches use transformers' mask.",
    )
    torch_compile: bool | None = Field(
        None,
        description="torch.compile each decoder layer: removes most of the host overhead that bounds a QLoRA "
        "step (measured 2.2x at batch 32 on an H200); the first steps compile. Default: on with CUDA on GPUs of "
        "compute capability 7.0 or more (Triton's minimum; off on a P100).",
    )
    dequantize_in_graph: bool | None = Field(
        None,
        description="Dequantise the 4-bit weights with torch ops inside the compiled decoder layers instead of "
        "bitsandbytes' Python-level op (about 480 calls a step, whose host time bounds the step). Same "
        "weights bit for bit. Default: on when the decoder layers are compiled (uncompiled it would keep a "
        "bf16 copy of every weight for backward, so true with torch_compile: false is refused).",
    )

    _report_to_list = field_validator("report_to", mode="before")(as_name_list)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "TrainingSection":
        if (info.context or {}).get("saved"):
            # A run directory's config was checked when its run started; ``resolve`` may have paired an
            # explicit lever with an "auto" one the way a user may not (e.g. in-graph NF4 on a CPU run).
            return self
        # Only what the user set: a default checkpoint_layers beside gradient_checkpointing=false is no conflict.
        levers = {k: getattr(self, k) for k in _LEVER_KEYS if k in self.model_fields_set}
        _raise_conflicts(_training_conflicts(self.bf16, self.fp16, self.report_to, levers), prefix="training.")
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
        problems = _run_conflicts(self.phase, self.data.dataset, self.training.fp16, self.model.compute_dtype)
        _raise_conflicts(problems + self.data.phase_problems(self.phase), prefix="")
        return self

    @property
    def add_loc_tokens(self) -> bool:
        flag = self.model.add_loc_tokens
        return self.phase == "phase2" and self.data.box_format == "loc" if flag is None else flag

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
        if len(problems) == 1:
            super().__init__(f"{source}: {problems[0]}")
        else:
            super().__init__(f"{source}: {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems))


def _dotted(loc: tuple) -> str:
    parts = [str(p) for p in loc if not str(p).startswith("function-after")]
    if parts[:1] == ["data"] and len(parts) > 1 and parts[1] in DATA_CLASSES:
        del parts[1]  # the union member (data.dataset's value) is not part of the key the user wrote
    return ".".join(parts)


def _format_validation_error(err: ValidationError, from_set: set[str] = frozenset()) -> list[str]:
    problems = []
    for e in err.errors():
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, _Conflicts):
            problems.extend(_mark_set(p, from_set) for p in cause.problems)
            continue
        key = _dotted(e["loc"]) or "<top level>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("union_tag_not_found", "union_tag_invalid"):
            key = f"{key}.dataset"
            if e["type"] == "union_tag_not_found":
                problems.append(_mark_set(f"{key}: Field required", from_set))
                continue
            names = [repr(k) for k in DATA_CLASSES]
            msg = f"Input should be {', '.join(names[:-1])} or {names[-1]}"
            e = {**e, "input": (e.get("ctx") or {}).get("tag")}
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + did_you_mean(str(e["loc"][-1]), _known_keys(e["loc"]))
        elif e["type"] != "missing" and not isinstance(e.get("input"), (dict, list)):
            msg += f" (got {_short(e.get('input'))})"
            if isinstance(e.get("input"), bool) and e["type"] != "bool_type":
                msg += " (YAML reads unquoted no/yes/on/off as booleans: quote the value)"
        problems.append(_mark_set(f"{key}: {msg}", from_set))
    return problems


def _known_keys(loc: tuple) -> list[str]:
    """The keys allowed beside the unknown one at ``loc``: the fields of the section it sits in."""
    section: type[BaseModel] | None = RunConfig
    path = loc[:-1]
    if len(path) >= 2 and path[0] == "data" and path[1] in DATA_CLASSES:
        section, path = DATA_CLASSES[path[1]], path[2:]  # the data section's class, chosen by data.dataset
    for part in path:
        field = section.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        section = annotation
    return list(section.model_fields)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mark_set(problem: str, from_set: set[str]) -> str:
    """Say which problems came from ``--set`` (their key is not in the YAML the user is looking at)."""
    key = problem.split(":", 1)[0]
    # A misspelt section (``--set trainig.lr=1``) is reported at the section's key.
    if key in from_set or any(k.startswith(key + ".") for k in from_set):
        return f"{problem} [from --set]"
    return problem


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
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        # YAML 1.1 reads no/yes/on/off as booleans; on a command line `eval_strategy=no` means "no".
        value = raw.strip()
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set`` overrides to a raw dict; types are checked by the schema afterwards.
    Every malformed override is reported at once."""
    data = copy.deepcopy(raw)
    problems = []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        node = data
        for i, part in enumerate(path[:-1]):
            if not isinstance(node.get(part, {}), dict):
                problems.append(f"{'.'.join(path)}: {'.'.join(path[: i + 1])} is a value, not a section")
                break
            node = node.setdefault(part, {})
        else:
            node[path[-1]] = value
    if problems:
        raise ConfigError("--set", problems)
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
    except UnicodeDecodeError as exc:
        raise XrayTrainError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise XrayTrainError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise XrayTrainError(f"{path}: expected a mapping of sections at the top level")
    return data


def _check_paths(raw: dict, check_model: bool = True) -> list[str]:
    """Existence checks the schema cannot do, on the (possibly invalid) raw config so they are reported
    with the schema's errors, before any loading."""
    problems = []
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    dataset = data.get("dataset")
    entry = DATASETS.get(dataset) if isinstance(dataset, str) else None
    wanted = list(entry.required_paths) if entry is not None else ["image_root"]
    if dataset == "indiana" and data.get("box_source") == "box_file":
        wanted.append("box_file")
    for name in wanted:
        value = data.get(name)
        if value is None:
            if dataset is not None:
                problems.append(f"data.{name}: required for data.dataset={dataset}")
        elif isinstance(value, (str, Path)) and str(value) and not Path(value).exists():
            problems.append(f"data.{name}: not found: {value}")
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    base = model.get("base")
    if check_model and isinstance(base, str) and looks_like_local_path(base) and not Path(base).expanduser().is_dir():
        problems.append(f"model.base: local model directory not found: {base} (if it moved, set model.base=DIR)")
    out = raw.get("output_dir")
    if isinstance(out, (str, Path)) and str(out) and Path(out).exists() and not Path(out).is_dir():
        problems.append(f"output_dir: exists and is not a directory: {out}")
    return problems


def _override_keys(overrides: list[str]) -> set[str]:
    return {text.split("=", 1)[0].strip() for text in overrides if "=" in text}


def _raw_conflicts(raw: dict) -> list[str]:
    """The cross-field rules on the raw dict, for sections whose validator pydantic never reached."""
    def section(name):
        value = raw.get(name)
        return value if isinstance(value, dict) else {}

    data, training, model = section("data"), section("training"), section("model")
    found = [f"data.{k}: {m}" for k, m in _data_conflicts(data.get("val_fraction"), data.get("test_fraction"))]
    found += [
        f"training.{k}: {m}"
        for k, m in _training_conflicts(
            training.get("bf16"), training.get("fp16"), training.get("report_to"),
            {k: training.get(k) for k in _LEVER_KEYS},
        )
    ]
    found += [
        f"{k}: {m}"
        for k, m in _run_conflicts(raw.get("phase"), data.get("dataset"), training.get("fp16"), model.get("compute_dtype"))
    ]
    return found


def load_config(
    path: Path | str, overrides: list[str] | None = None, check_paths: bool = True, check_model: bool = True
) -> RunConfig:
    """Read, override and validate a run config; raise ``ConfigError`` listing every problem (schema,
    conflicting options and missing paths together), each naming its dotted key. ``check_model=False``
    skips what only training needs (the base model, transformers' names, installed loggers) for commands
    that only read data (``data check``)."""
    path = Path(path)
    overrides = overrides or []
    raw = _resolve_paths(apply_overrides(read_yaml(path), overrides), path.parent.resolve())
    from_set = _override_keys(overrides)
    cfg = None
    try:
        cfg = RunConfig.model_validate(raw)
        problems = []
    except ValidationError as err:
        problems = _format_validation_error(err, from_set)
        reported = {p.split(":", 1)[0] for p in problems}
        problems += [_mark_set(p, from_set) for p in _raw_conflicts(raw) if p.split(":", 1)[0] not in reported]
    if check_paths:
        problems += [_mark_set(p, from_set) for p in _check_paths(raw, check_model)]
    if problems:
        raise ConfigError(str(path), list(dict.fromkeys(problems)))
    if check_model:
        # Needs transformers (seconds to import): only once the config itself is clean.
        from xray_train.preflight import environment_problems

        problems = [_mark_set(p, from_set) for p in environment_problems(cfg, check_base=check_paths)]
        if problems:
            raise ConfigError(str(path), problems)
    return cfg


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (saved beside every output)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
