"""The model card (the Hub repo's README.md): what was trained, how it was evaluated, how to use it.

Every number comes from the files of the run directory; missing evaluation is stated, not invented. The
usage code loads Gemma 3 with ``AutoModelForImageTextToText`` (never the PaliGemma class), takes the
processor from the adapter repo (it carries the ``<locNNNN>`` tokens) and resizes the embeddings before
attaching the adapter. The text lives in ``card_template.md`` beside this module.
"""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path
from string import Template
from typing import Any

import yaml

from xray_train.bundled import reads_bundled_samples
from xray_train.collate import PHASE_TASK, TASK_PROMPTS
from xray_train.data.hf import hub_dataset_id
from xray_train.data.registry import title as registry_title
from xray_train.errors import XrayTrainError
from xray_train.names import looks_like_local_path
from xray_train.hub.adapter import AdapterInfo, published_base, validate_adapter_dir
from xray_train.hub.sanitise import sanitise, scrub
from xray_train.metrics import UNPARSED_RULE, parsed_of
from xray_train.run_dir import (
    ADAPTER_WEIGHTS, EVAL_MARKDOWN, EVAL_RESULTS, LOSS_CURVE, RESOLVED_CONFIG, SUMMARY, RunDir,
)

#: Training settings shown in the card, as saved in the resolved config.
HYPER_PARAMETERS = (
    "learning_rate", "projector_learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "warmup_steps", "lr_scheduler_type", "weight_decay", "max_grad_norm", "optim",
    "seed", "max_length", "bf16", "fp16", "gradient_checkpointing", "checkpoint_layers",
)
CARD_TAGS = ["medical", "radiology", "chest-x-ray", "lora", "qlora", "medgemma", "xray-train"]
LICENSE = {
    "license": "other",
    "license_name": "health-ai-developer-foundations",
    "license_link": "https://developers.google.com/health-ai-developer-foundations/terms",
}
CARD_TEMPLATE = Template(files("xray_train.hub").joinpath("card_template.md").read_text(encoding="utf-8"))


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


#: An absolute or home-relative path of two parts or more (``/data/pc/x.csv``, ``~/runs/a``): a folder on the
#: machine that wrote the text, which a published card must not show.
_LOCAL_PATH = re.compile(r"(?<![\w.:/])~?(?:/[\w.@+-]+){2,}/?")


def _evaluation_from_markdown(markdown: str) -> str:
    """``eval_results.md`` as a part of the card's Evaluation section: its title (the card has one) dropped,
    its headings nested under the section's, secrets and local paths removed."""
    lines = markdown.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    lines = [f"##{line}" if line.startswith("#") else line for line in lines]
    return _LOCAL_PATH.sub("(local path)", scrub("\n".join(lines).strip(), None))


SYNTHETIC = "the synthetic samples bundled with xray-train, in {name} format (drawn films, not real X-rays)"


def dataset_title(dataset: str | None, synthetic: bool, data: dict | None = None) -> str | None:
    """The data a run actually read, as the card names it; ``data``: the run's data section, which names the
    dataset behind a generic reader (``dataset: hf``: its Hub id and revision; a local source stays unnamed,
    its path being private)."""
    name = registry_title(dataset)
    if dataset == "hf" and data is not None:
        hub_id = hub_dataset_id(data)
        if hub_id:
            revision = data.get("revision")
            return f"{hub_id} (Hugging Face Hub" + (f", revision {revision})" if revision else ")")
        kind = data.get("format", "auto")
        return "local files" + (f" ({kind})" if kind != "auto" else "") + " read with Hugging Face datasets"
    return SYNTHETIC.format(name=name) if synthetic and name else name


def _parent_read_samples(parent: dict | None) -> bool:
    """The Phase-1 parent read the bundled samples: recorded in the lineage, else read from its config."""
    if not parent:
        return False
    if "synthetic_sample" in parent:
        return bool(parent["synthetic_sample"])
    folder = RunDir(str(parent.get("path") or ""))
    try:
        return folder.has_config() and reads_bundled_samples(folder.config_dict().get("data"))
    except XrayTrainError:
        return False


def _evaluation(run_dir: RunDir, results: dict | None) -> str:
    """The tables ``xray-train evaluate`` wrote (``eval_results.md``), else the numbers of
    ``eval_results.json``, else a plain statement that the adapter was not evaluated."""
    if run_dir.file(EVAL_MARKDOWN).is_file():
        tables = _evaluation_from_markdown(run_dir.file(EVAL_MARKDOWN).read_text(encoding="utf-8"))
        return f"{tables}\n\nFrom `{EVAL_MARKDOWN}`, written by `xray-train evaluate` (every number: `{EVAL_RESULTS}`)."
    if results:
        n = results.get("n_examples") or 0
        evaluation = (
            f"Answers in the trained format: adapter {parsed_of(results, n)}"
            + (f", base model {parsed_of(results['baseline'], n)}" if results.get("baseline") else "")
            + f". {UNPARSED_RULE}\n\n"
        )
        evaluation += _table(_flatten(results, skip=("per_finding", "per_label", "ious")), ("metric", "value"))
        per_class = _per_class_tables(results)
        if per_class:
            evaluation += "\n\n" + per_class
        return evaluation + (
            f"\n\nFrom `{EVAL_RESULTS}` (written by `xray-train evaluate`); metric definitions are in "
            "`xray_train.metrics`."
        )
    return (
        f"**Not evaluated.** No `{EVAL_RESULTS}` was present when this adapter was published, so no "
        "finding-level or box metric is reported (a validation loss, if one was logged, is in the "
        "training run table above; a loss is not a clinical metric). Run `xray-train evaluate` "
        "before relying on it."
    )


def _find_key(obj: Any, wanted: str, prefix: str = "", depth: int = 3):
    if not isinstance(obj, dict) or depth == 0:
        return
    for k, v in obj.items():
        if k == wanted:
            yield prefix + k, v
        elif isinstance(v, dict):
            yield from _find_key(v, wanted, prefix + k + ".", depth - 1)


PHASE_TEXT = {
    "phase1": "**Phase 1 - structured report**: the model names each finding on a frontal chest X-ray, "
    "with its location qualifiers (or states a normal study).",
    "phase2": "**Phase 2 - localisation**: the model answers with `<locYMIN><locXMIN><locYMAX><locXMAX> label` "
    "boxes.",
}


def _task_prompts() -> dict[str, str]:
    """phase -> the exact user instruction used in training, so the card's snippet asks the same."""
    return {phase: TASK_PROMPTS[task] for phase, task in PHASE_TASK.items()}


def _lineage_note(phase: str, lineage: dict | None) -> str:
    if phase != "phase2":
        return ""
    parent = (lineage or {}).get("parent")
    if lineage is None:
        return "\n\nWhether this Phase-2 adapter continued a Phase-1 adapter is not recorded in its run directory."
    if not parent:
        return "\n\nPhase 2 started from a fresh adapter: no Phase-1 adapter was continued."
    return (
        f"\n\nPhase 2 continued the Phase-1 adapter `{Path(str(parent.get('path'))).name}` (its "
        f"`{ADAPTER_WEIGHTS}` has sha256 `{parent.get('adapter_sha256')}`)."
    )


def _data_notes(cfg: dict, parent: dict | None, synthetic: bool, parent_synthetic: bool) -> str:
    notes = []
    if parent and parent.get("dataset"):
        notes.append(f"- {parent.get('phase') or 'phase1'}: {dataset_title(parent['dataset'], parent_synthetic)}")
    if synthetic or parent_synthetic:
        notes.append(
            "\n> [!WARNING]\n> **Trained on synthetic samples.** The data is the small set of drawn films bundled "
            "with xray-train for its demo and tests, not real X-rays: this adapter shows that the pipeline runs, "
            "it has learnt nothing about chest X-rays.\n"
        )
    for cfg in [cfg]:
        data = cfg.get("data") or {}
        name = dataset_title(data.get("dataset"), synthetic, data) or str(data.get("dataset"))
        line = f"- {cfg.get('phase', '?')}: {name}"
        if data.get("dataset") == "padchest" and not synthetic:
            line += (
                f"; projections {_fmt(data.get('projections'))}; label sources {_fmt(data.get('method_labels'))} "
                "(RNN_model labels were extracted automatically from Spanish reports, not by a physician)"
            )
        notes.append(line)
        if data.get("dataset") == "indiana" and not synthetic:
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


def build_model_card(
    adapter_dir: Path | str, repo_id: str | None = None, info: AdapterInfo | None = None, base_model: str | None = None
) -> str:
    """README.md for the Hub: YAML front matter + what was trained, evaluation, usage, limitations.

    Every number comes from the files in ``adapter_dir``; missing evaluation is stated, not invented.
    ``base_model``: the base's Hub id, required when the run trained from a local folder that does not
    name one (see ``published_base``).
    """
    run_dir = RunDir(adapter_dir)
    info = info or validate_adapter_dir(run_dir.path)
    config = run_dir.config()
    cfg = sanitise(config.model_dump(mode="json"))
    lineage = run_dir.lineage()
    parent = (lineage or {}).get("parent") if config.phase == "phase2" else None
    summary = sanitise(run_dir.read_json(SUMMARY) or {})
    results = sanitise(run_dir.read_json(EVAL_RESULTS))

    base = published_base(config.model.base, base_model)
    # A revision names a commit of the Hub repo; a local folder has none.
    revision = config.model.revision if not looks_like_local_path(config.model.base) else None
    phases = ["phase1", "phase2"] if parent else [config.phase]
    # The data actually read: the bundled synthetic samples are named as such, never as the real dataset.
    synthetic = reads_bundled_samples(config.data.model_dump(mode="json"))
    parent_synthetic = _parent_read_samples(parent)
    datasets, hub_datasets = [], []
    own = config.data.model_dump(mode="json")
    for name, fake, data in (((parent or {}).get("dataset"), parent_synthetic, None),
                             (config.data.dataset, synthetic, own)):
        title = dataset_title(name, fake, data)
        if title and title not in datasets:
            datasets.append(title)
            # The Hub links a card to a Hub dataset by its id; a local hf source is listed nowhere.
            listed = None if fake else hub_dataset_id(data or {}) if name == "hf" else title
            if listed:
                hub_datasets.append(listed)
    loc = config.add_loc_tokens
    projector = config.train_projector

    front = {"base_model": base, "library_name": "peft", "pipeline_tag": "image-text-to-text", **LICENSE}
    front["tags"] = CARD_TAGS
    front["datasets"] = hub_datasets

    tr = cfg.get("training") or {}
    hp_rows = [(k, tr[k]) for k in HYPER_PARAMETERS if k in tr]
    purpose = " and ".join(
        {"phase1": "write structured chest X-ray findings", "phase2": "localise findings with `<locNNNN>` boxes"}[p]
        for p in phases
    )
    output_format = ""
    if loc:
        output_format = (
            "\n### Box format\n\nA box is `<locYMIN><locXMIN><locYMAX><locXMAX> label` (y before x), boxes "
            "joined by ` ; `, or `no localisable finding`. A coordinate v in [0, 1] of the padded, square "
            "image is binned as `round(v * 1023)` and decoded as `bin / 1023` (big_vision convention). "
            "`xray_train.data.loc.decode_boxes` parses an answer.\n"
        )
    model = config.model
    quant = model.quant_type + (", double quantisation" if model.double_quant else "")
    if not model.load_in_4bit:
        quant = "not quantised"
    lora = config.lora
    system_prompt = cfg.get("system_prompt") or "You are an expert radiologist."
    prompts = _task_prompts()
    user_prompt = prompts[config.phase]
    other_prompts = "".join(
        f"\n# {p} was trained with the prompt {json.dumps(prompts[p])}" for p in phases if p != config.phase
    )
    return CARD_TEMPLATE.substitute(
        front_matter=yaml.safe_dump(front, sort_keys=False, allow_unicode=True),
        title=(repo_id.split("/")[-1] if repo_id else run_dir.path.resolve().name)
        + " - MedGemma chest X-ray LoRA adapter",
        base_id=base,
        base_text=f"`{base}`" + (f" at revision `{revision}`" if revision else ""),
        purpose=purpose,
        phases="\n".join(f"- {PHASE_TEXT[p]}" for p in phases) + _lineage_note(config.phase, lineage),
        quant=quant,
        compute_dtype=model.compute_dtype,
        lora_r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        lora_targets=" and ".join(f"`{t}`" for t in lora.target_modules),
        projector="trained and saved with the adapter" if projector else "frozen (base weights)",
        loc_tokens="1024 tokens `<loc0000>`..`<loc1023>` added to the tokenizer; their embedding rows are trained"
        if loc else "not used",
        n_tensors=info.n_tensors,
        n_params=f"{info.n_parameters:,}",
        n_trained_b=info.n_trained_lora_b,
        n_b=info.n_lora_b,
        hyper_parameters=_table(hp_rows, ("setting", "value")) if hp_rows else "Not recorded.",
        # Paths (the base, the parent run) stay out of the card: they name folders on the training machine.
        summary=_table(_flatten(summary, depth=2, skip=("base_model", "parent")), ("item", "value"))
        if summary else f"No `{SUMMARY}` was saved.",
        loss_curve=f"![Training loss]({LOSS_CURVE})\n" if run_dir.file(LOSS_CURVE).is_file() else "",
        evaluation=_evaluation(run_dir, results),
        loc_usage=" and the 1024 `<locNNNN>` box tokens" if loc else "",
        repo_id=repo_id or "ORG/NAME",
        system_prompt=json.dumps(system_prompt),
        user_prompt=json.dumps(user_prompt),
        other_prompts=other_prompts,
        output_format=output_format,
        data_notes=_data_notes(cfg, parent, synthetic, parent_synthetic),
        dataset_list=", ".join(datasets),
        license_link=LICENSE["license_link"],
    )
