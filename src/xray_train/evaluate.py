"""``xray-train evaluate``: score an adapter on the held-out, patient-grouped split, next to its base model.

(Over 400 lines: the command, its three kinds of numbers and the files it writes are read together.)

Three kinds of numbers, each for the adapter and for the base with the adapter disabled:

* teacher-forced token accuracy (the seed recipe's only metric, kept for comparison: on template-heavy
  targets it is high whatever the model knows) from ``loss.targets_only_loss`` counts, so the LM head
  runs only at supervised positions;
* generation metrics from greedy answers: the share of answers in the trained format, finding-level
  precision / recall / F1 (``metrics.finding_scores``) and, for Phase 1, location accuracy;
* for Phase 2, box metrics (``metrics.box_scores``) with predicted boxes mapped back to the ORIGINAL
  image (``Geometry.to_original``), where the references (``Example.boxes``) live.

What counts as a prediction (``metrics`` treats ``None`` as "said nothing usable"): only an answer in
the trained format is read (:func:`report_prediction`, :func:`detection_prediction`); any other answer
(garbage, empty, cut off by ``max_new_tokens``, a run of ``<loc>`` tokens without a label) is *unparsed*:
counted, and scored as predicting nothing, never as "normal" or as any finding.

* Phase 1: the findings of a ``well_formed`` report; ``[]`` (the ``normal`` class) only for a report
  that states a normal study.
* Phase 2: the boxes of a well-formed detect answer; ``[]`` (the ``normal`` class for finding scores)
  only for the exact "no localisable finding" answer. Predicted findings are the labels of the boxes,
  reference findings the labels of ``Example.boxes``.

``parse_rate``, ``n_parsed`` and ``n_unparsed`` come from ``metrics.answer_counts`` over the same
predictions the scores use, so they agree by construction.

The split is rebuilt with the same reader and ``split_examples`` as training, so a patient seen in
training is never scored.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from xray_train.bundled import reads_bundled_samples
from xray_train.collate import PHASE_TASK, Collator, PromptEncoder, batch_to
from xray_train.config import RunConfig
from xray_train.data.images import Geometry, read_image_size
from xray_train.data.loc import BOX_ITEM_RE, BOX_SEPARATOR, NO_BOX_ANSWER, decode_boxes
from xray_train.data.records import Box, Example, Finding
from xray_train.data.registry import read_dataset
from xray_train.data.reports import canonical_findings, parse_report
from xray_train.data.splits import SPLITS, cap_examples, split_examples
from xray_train.errors import XrayTrainError
from xray_train.generate import DEFAULT_MAX_NEW_TOKENS, Generator, Request, Variant
from xray_train.inputs import encode_examples
from xray_train.gemma3 import unwrap_gemma3
from xray_train.loss import targets_only_loss
from xray_train.metrics import UNPARSED_RULE, answer_counts, box_scores, finding_scores, parsed_of
from xray_train.outputs import atomic_write_json, atomic_write_text
from xray_train.run_dir import EVAL_MARKDOWN, EVAL_RESULTS, RunDir
from xray_train.report_plots import F1_BARS, IOU_HISTOGRAM, plot_f1_bars, plot_iou_histogram

logger = logging.getLogger(__name__)

#: 2: an answer not in the trained format is unparsed (never "normal"); n_parsed added; parse_rate is
#: n_parsed / n_examples.
SCHEMA_VERSION = 2
#: Headline metrics, in table order: (key, description for the markdown table).
HEADLINE = [
    ("token_accuracy", "teacher-forced token accuracy"),
    ("parse_rate", "answers in the trained format"),
    ("precision", "finding precision (micro)"),
    ("recall", "finding recall (micro)"),
    ("f1", "finding F1 (micro)"),
    ("f1_macro", "finding F1 (macro)"),
    ("f1_abnormal", "finding F1 (micro, abnormal findings only)"),
    ("exact_match", "studies with exactly the right findings"),
    ("location_accuracy", "location accuracy (correct findings)"),
    ("iou", "mean IoU per reference box"),
    ("hit_rate_50", "reference boxes found at IoU >= 0.5"),
    ("precision_50", "predicted boxes correct at IoU >= 0.5"),
    ("map50", "mAP@0.5"),
]
# A whole detect answer: boxes joined by ' ; ', each four coordinates (either box format) and a label.
_BOX_ITEM = BOX_ITEM_RE


# ---------------------------------------------------------------------------------------------
# Data


def select_examples(cfg: RunConfig, split: str, max_samples: int | None = None) -> tuple[list[Example], dict]:
    """The held-out examples of ``split``, exactly as training split them; capped deterministically."""
    if split not in SPLITS:
        raise XrayTrainError(f"--split: {split!r} is not one of {', '.join(SPLITS)}")
    read = read_dataset(cfg.data)
    splits = split_examples(read.examples, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    examples = cap_examples(splits[split], max_samples, cfg.training.seed)
    if not examples:
        raise XrayTrainError(
            f"the {split} split of {cfg.data.dataset} is empty ({len(read.examples)} usable examples; "
            f"data.test_fraction={cfg.data.test_fraction}, data.val_fraction={cfg.data.val_fraction})"
        )
    counts = {"rows_total": read.rows_total, "examples": len(read.examples), "splits": {k: len(v) for k, v in splits.items()}}
    return examples, counts


# ---------------------------------------------------------------------------------------------
# Scoring answers (pure: texts + examples -> metrics)


def detect_answer_well_formed(text: str) -> bool:
    """True for exactly the trained detect format: ``no localisable finding`` or ``box ; box ; ...``."""
    text = text.strip()
    if text == NO_BOX_ANSWER:
        return True
    parts = [p.strip() for p in text.split(BOX_SEPARATOR.strip())]
    return bool(parts) and all(_BOX_ITEM.fullmatch(p) for p in parts)


def boxes_from_answer(text: str, geometry: Geometry) -> list[Box] | None:
    """Every box found in the answer, mapped to the original image; [] for "no localisable finding"; None
    when there is neither. Tolerant (``predict`` draws what it can); scoring uses :func:`detection_prediction`."""
    boxes = decode_boxes(text)
    if boxes:
        return [geometry.to_original(b) for b in boxes]
    return [] if text.strip() == NO_BOX_ANSWER else None


def detection_prediction(text: str, geometry: Geometry) -> list[Box] | None:
    """What a detect answer predicts: its boxes in original coordinates when the whole answer is in the
    trained format, [] for exactly "no localisable finding", None (unparsed) for anything else."""
    if not detect_answer_well_formed(text):
        return None
    return boxes_from_answer(text, geometry)


def report_prediction(text: str) -> list[Finding] | None:
    """What a report predicts: the findings of a well-formed report, [] for a well-formed report that says
    the study is normal, None (unparsed) for anything else."""
    parsed = parse_report(text)
    if not parsed.well_formed or not (parsed.findings or parsed.is_normal):
        return None
    return parsed.findings


def score_reports(texts: list[str], examples: list[Example]) -> dict:
    """Phase-1 generation metrics."""
    predictions = [report_prediction(t) for t in texts]
    # The model is trained on canonical names (format_report); score against the same.
    references = [canonical_findings(ex.findings) for ex in examples]
    return {**answer_counts(predictions), "findings": finding_scores(predictions, references), "boxes": None}


def score_detections(texts: list[str], examples: list[Example], geometries: list[Geometry]) -> dict:
    """Phase-2 generation metrics: finding scores over box labels and box scores in original coordinates."""
    predicted = [detection_prediction(t, g) for t, g in zip(texts, geometries)]
    references = [list(ex.boxes or []) for ex in examples]
    pred_findings = [None if p is None else [Finding(b.label) for b in p] for p in predicted]
    ref_findings = [[Finding(b.label) for b in r] for r in references]
    findings = finding_scores(pred_findings, ref_findings)
    # Box answers carry no locations: the location scores would be vacuous 1.0s.
    for key in ("location_accuracy", "location_f1"):
        findings[key] = None
    findings["location_pairs"] = 0
    return {**answer_counts(predicted), "findings": findings, "boxes": box_scores(predicted, references)}


def headline(block: dict, token_accuracy: float | None) -> dict:
    f, b = block["findings"], block["boxes"]
    return {
        "token_accuracy": token_accuracy,
        "parse_rate": block["parse_rate"],
        "precision": f["micro"]["precision"],
        "recall": f["micro"]["recall"],
        "f1": f["micro"]["f1"],
        "f1_macro": f["macro"]["f1"],
        "f1_abnormal": f["micro_abnormal"]["f1"],
        "exact_match": f["exact_match"],
        "location_accuracy": f["location_accuracy"],
        "iou": b["mean_iou"] if b else None,
        "hit_rate_50": b["hit_rate_50"] if b else None,
        "precision_50": b["precision_50"] if b else None,
        "map50": b["map50"] if b else None,
        "n_parsed": block["n_parsed"],
        "n_unparsed": block["n_unparsed"],
    }


def _model_block(block: dict, token_accuracy: float | None, token_counts: dict) -> dict:
    """Headline numbers at the top, the full metric blocks beneath; per-finding table lifted out."""
    findings = dict(block["findings"])
    per_finding = findings.pop("per_finding")
    boxes = dict(block["boxes"]) if block["boxes"] else None
    if boxes:
        boxes.pop("ious")  # one float per reference box: the histogram shows them
    return {**headline(block, token_accuracy), "per_finding": per_finding, "findings": findings,
            "boxes": boxes, "teacher_forced": token_counts}


# ---------------------------------------------------------------------------------------------
# Running the model


@dataclass
class ModelRun:
    texts: list[str | None]
    finished: list[bool]
    token_correct: int
    token_total: int
    token_examples: int
    token_loss_sum: float  # summed cross-entropy over the supervised tokens (nats)


class TeacherForcedCounts:
    """Teacher-forced accuracy (argmax == label over the supervised tokens), counted per model state from the
    batches generation runs over (``Generator.answer``'s ``on_batch``): the images' SigLIP rows made for the
    answers serve this pass too. Sub-batches of ``batch_size`` rows, the head in ``chunk_rows`` chunks."""

    def __init__(self, model, encoder: PromptEncoder, examples: list[Example], cfg: RunConfig, batch_size: int):
        encoded, _ = encode_examples(examples, cfg.phase, encoder, cfg.training.max_length, cfg.data.box_format)
        by_example = {id(it.example): it for it in encoded}
        # Request i is examples[i]; those whose target does not fit max_length are not scored here.
        self.items = [by_example.get(id(ex)) for ex in examples]
        self.model = model
        self.collator = Collator(encoder.ids)
        self.batch_size = batch_size
        self.chunk_rows = cfg.training.head_chunk_rows
        self.counts: dict[str, list] = {}

    @torch.inference_mode()
    def __call__(self, label: str, indices: list[int], image_inputs: dict) -> None:
        counts = self.counts.setdefault(label, [0, 0, 0, 0.0])
        rows = [(self.items[i], r) for r, i in enumerate(indices) if self.items[i] is not None]
        device = unwrap_gemma3(self.model).device
        for start in range(0, len(rows), self.batch_size):
            part = rows[start : start + self.batch_size]
            items = [{"input_ids": it.input_ids, "labels": it.labels, "image_features": image_inputs["image_features"][r]}
                     for it, r in part]
            out = targets_only_loss(self.model, batch_to(self.collator(items), device), self.chunk_rows,
                                    grad_in_forward=False)
            counts[0] += int(out.n_correct)
            counts[1] += int(out.n_tokens)
            counts[2] += len(part)
            counts[3] += float(out.loss_sum)

    def run(self, label: str, generations: list) -> ModelRun:
        correct, total, scored, loss_sum = self.counts.get(label, (0, 0, 0, 0.0))
        return ModelRun([g.text for g in generations], [g.finished for g in generations], correct, total, scored,
                        loss_sum)


# ---------------------------------------------------------------------------------------------
# Output


def check_output_targets(adapter_dir: Path, out_dir: Path, json_out: Path | None, overwrite: bool) -> None:
    """Before any loading: existing results are replaced only with ``overwrite``. In the adapter dir they
    are what ``push-to-hub`` publishes, so a second evaluation must not swap them silently."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise XrayTrainError(f"--out: {out_dir} exists and is not a directory")
    if overwrite:
        return
    for target in [Path(out_dir) / EVAL_RESULTS] + ([Path(json_out)] if json_out is not None else []):
        if not target.exists():
            continue
        if target.parent.resolve() == Path(adapter_dir).resolve():
            raise XrayTrainError(
                f"{target} exists (push-to-hub publishes it with the adapter); pass --overwrite to replace "
                "it, or --out DIR to write these results elsewhere"
            )
        raise XrayTrainError(f"{target} exists; pass --overwrite to replace it or choose another --out/--json")


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _delta(a, b) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return f"{a - b:+.3f}"
    return ""


def markdown_report(results: dict) -> str:
    """The side-by-side table (adapter vs base model) plus per-finding and per-label tables; every score
    column names how many of that model's answers parsed."""
    base = results.get("baseline") or {}
    n = results["n_examples"]
    adapter_parsed = f"{parsed_of(results, n)} parsed"
    base_parsed = f"{parsed_of(base, n)} parsed" if base else "not run"
    lines = [
        f"# Evaluation: {results['adapter']}",
        "",
        f"{results['phase']} ({results['task']} prompt) on the **{results['split']}** split of "
        f"{results['dataset']}{' (the bundled synthetic samples, not real X-rays)' if results.get('synthetic_sample') else ''}: "
        f"{n} images (patients held out from training).",
        "",
        f"Answers in the trained format: adapter {parsed_of(results, n)}"
        + (f", base model {parsed_of(base, n)}" if base else "") + f". {UNPARSED_RULE}",
        "",
        f"| metric | adapter ({adapter_parsed}) | base model, no adapter ({base_parsed}) | change |",
        "|---|---|---|---|",
    ]
    for key, text in HEADLINE:
        if results.get(key) is None and base.get(key) is None:
            continue
        lines.append(f"| {text} (`{key}`) | {_fmt(results.get(key))} | {_fmt(base.get(key))} | "
                     f"{_delta(results.get(key), base.get(key))} |")
    per = results.get("per_finding") or {}
    if per:
        base_per = base.get("per_finding") or {}
        rows = sorted(per.items(), key=lambda kv: (-kv[1]["support"], kv[0]))[:25]
        lines += ["", "## Per finding (top 25 by support)", "",
                  f"| finding | support | predicted | F1 adapter ({adapter_parsed}) | F1 base ({base_parsed}) |",
                  "|---|---|---|---|---|"]
        for name, v in rows:
            lines.append(f"| {name} | {v['support']} | {v['predicted']} | {_fmt(v['f1'])} | "
                         f"{_fmt((base_per.get(name) or {}).get('f1'))} |")
    labels = (results.get("boxes") or {}).get("per_label") or {}
    if labels:
        base_labels = (base.get("boxes") or {}).get("per_label") or {}
        lines += ["", "## Boxes per label", "",
                  f"| label | reference boxes | predicted | AP@0.5 adapter ({adapter_parsed}) | mean IoU adapter "
                  f"({adapter_parsed}) | AP@0.5 base ({base_parsed}) |",
                  "|---|---|---|---|---|---|"]
        for name, v in sorted(labels.items(), key=lambda kv: (-kv[1]["n_reference"], kv[0])):
            lines.append(f"| {name} | {v['n_reference']} | {v['n_predicted']} | {_fmt(v['ap50'])} | "
                         f"{_fmt(v['mean_iou'])} | {_fmt((base_labels.get(name) or {}).get('ap50'))} |")
    lines += [f"\n{note}" for note in unparsed_notes(results)]
    lines += ["", "Metric definitions: `xray_train.metrics` and `xray_train.evaluate`. "
              "Generation is greedy; `n/a` means undefined (nothing to score), never zero."]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, ious: list[float] | None, out_dir: Path, json_out: Path | None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"json": out_dir / EVAL_RESULTS, "markdown": out_dir / EVAL_MARKDOWN, "f1_bars": out_dir / F1_BARS}
    atomic_write_json(written["json"], results)
    atomic_write_text(written["markdown"], markdown_report(results))
    plot_f1_bars(results["per_finding"], written["f1_bars"], title=f"F1 per finding ({results['split']} split)")
    if ious is not None:
        written["iou_histogram"] = plot_iou_histogram(ious, out_dir / IOU_HISTOGRAM)
    if json_out is not None:
        atomic_write_json(Path(json_out), results)
        written["json_copy"] = Path(json_out)
    return written


# ---------------------------------------------------------------------------------------------
# The command


def evaluate(
    adapter_dir: Path | str,
    cfg: RunConfig,
    split: str = "test",
    max_samples: int | None = None,
    baseline: bool = True,
    out_dir: Path | str | None = None,
    json_out: Path | str | None = None,
    overwrite: bool = False,
    batch_size: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    model=None,
    processor=None,
    progress: bool = True,
    echo=print,
) -> dict:
    """Score the adapter (and the base without it) on ``split``; write JSON, markdown and plots.

    ``model``/``processor`` reuse an adapter already loaded with ``model.load_adapter``. Returns the
    results dict, with ``written`` (name -> path) added.
    """
    run_dir = RunDir(adapter_dir).require_adapter()
    adapter_dir = run_dir.path
    out_dir = Path(out_dir) if out_dir is not None else adapter_dir
    json_out = Path(json_out) if json_out is not None else None
    check_output_targets(adapter_dir, out_dir, json_out, overwrite)
    if cfg.phase == "phase2" and cfg.add_loc_tokens and not run_dir.has_loc_rows():
        raise XrayTrainError(
            f"{adapter_dir} has no trained <loc> tokens (a Phase-1 adapter?); box metrics need a Phase-2 "
            "adapter. Evaluate it with a phase1 (PadChest) config instead."
        )
    examples, counts = select_examples(cfg, split, max_samples)
    echo(f"Evaluating {adapter_dir} on {len(examples)} {split} images of {cfg.data.dataset} ({cfg.phase})")

    weights = "as loaded by the caller"
    if model is None:
        from xray_train.inference import load_for_inference

        # The fastest weights that fit the card (xray_train.inference); the log says which.
        model, processor, plan = load_for_inference(adapter_dir, cfg.model, base=cfg.model.base, echo=echo)
        weights = plan.weights
    generate_rows = batch_size or cfg.model.generate_batch_size  # None: what the free memory holds
    batch_size = batch_size or cfg.training.per_device_eval_batch_size
    if baseline and not hasattr(model, "disable_adapter"):
        raise XrayTrainError("baseline needs a peft model (load it with xray_train.load_adapter)")
    generator = Generator(model, processor, cfg.system_prompt, cfg.data.image_size, max_new_tokens, generate_rows,
                          cfg.data.decode_workers, loc_decode=cfg.model.loc_decode,
                          decode_cache=cfg.model.decode_cache)
    teacher_forced = TeacherForcedCounts(model, generator.encoder, examples, cfg, batch_size)
    # One pass over the films: each batch's images read and encoded by SigLIP once, then answered (and
    # scored teacher-forced) by the adapter and by the base model with the adapter disabled.
    variants = [Variant("adapter")] + ([Variant("baseline", model.disable_adapter)] if baseline else [])
    started = time.time()
    answers = generator.answer([Request(ex.image_path, PHASE_TASK[cfg.phase]) for ex in examples], variants,
                               progress=progress, on_batch=teacher_forced,
                               description="Evaluating" + (" (adapter and base model)" if baseline else ""))
    runs = {label: teacher_forced.run(label, generations) for label, generations in answers.items()}
    elapsed = time.time() - started

    # Images that could not be read are nobody's answer: left out of every metric, counted.
    keep = [i for i, t in enumerate(runs["adapter"].texts) if t is not None and all(r.texts[i] is not None for r in runs.values())]
    scored_examples = [examples[i] for i in keep]
    geometries = None
    if cfg.phase == "phase2":
        geometries = [Geometry(*read_image_size(ex.image_path), 0) for ex in scored_examples]

    blocks, ious = {}, None
    for name, run in runs.items():
        texts = [run.texts[i] for i in keep]
        block = score_detections(texts, scored_examples, geometries) if geometries is not None \
            else score_reports(texts, scored_examples)
        if name == "adapter" and block["boxes"] is not None:
            ious = block["boxes"]["ious"]
        acc = run.token_correct / run.token_total if run.token_total else None
        token_counts = {"correct": run.token_correct, "total": run.token_total, "examples": run.token_examples,
                        # Mean cross-entropy per supervised token: the held-out loss, comparable to training's.
                        "loss": round(run.token_loss_sum / run.token_total, 6) if run.token_total else None}
        blocks[name] = _model_block(block, acc, token_counts)

    results = {
        "schema_version": SCHEMA_VERSION,
        "adapter": adapter_dir.resolve().name,
        "phase": cfg.phase,
        "task": PHASE_TASK[cfg.phase],
        "dataset": cfg.data.dataset,
        # The bundled synthetic samples (the demo's data) are said to be that, not the dataset they imitate.
        "synthetic_sample": reads_bundled_samples(cfg.data.model_dump(mode="json")),
        "split": split,
        "n_examples": len(scored_examples),
        "n_unreadable": len(examples) - len(scored_examples),
        **blocks["adapter"],
        "baseline": blocks.get("baseline"),
        "generation": {
            "decoding": "greedy",
            "max_new_tokens": max_new_tokens,
            "batch_size": generator.rows,
            "weights": weights,
            "elapsed_s": round(elapsed, 2),
            # Answers cut off by max_new_tokens: raise it if this is more than a few.
            "truncated_answers": {name: sum(not run.finished[i] for i in keep) for name, run in runs.items()},
        },
        "data": counts,
    }
    written = write_outputs(results, ious, out_dir, json_out)
    return results | {"written": written}


def summary_lines(results: dict) -> list[str]:
    """A few lines for the console: the headline numbers, adapter vs base."""
    base = results.get("baseline") or {}
    n = results["n_examples"]
    lines = [f"{'answers parsed':>42}: {parsed_of(results, n)}"
             + (f"  (base {parsed_of(base, n)})" if base else "")]
    for key, text in HEADLINE:
        if results.get(key) is None and base.get(key) is None:
            continue
        extra = f"  (base {_fmt(base.get(key))})" if base else ""
        lines.append(f"{text:>42}: {_fmt(results.get(key))}{extra}")
    return lines + unparsed_notes(results)


def unparsed_notes(results: dict) -> list[str]:
    """Why a column of scores is all zero when no answer could be read: an unparsed answer is scored as
    missing every reference finding and box, so 0.000 there is a fact about the answers, not a bug."""
    n = results.get("n_examples") or 0
    who = [name for name, block in (("the adapter", results), ("the base model", results.get("baseline")))
           if block and n and block.get("n_unparsed") == n]
    if not who:
        return []
    return [
        f"Note: none of the {n} answers of {' or '.join(who)} could be parsed into findings or boxes, so "
        f"{'its' if len(who) == 1 else 'their'} finding and box scores are 0: the model has not learnt the "
        "answer format (see the answers with `xray-train predict`)."
    ]
