"""``xray_train.evaluate``: scoring of hand-made answers with known results, and the command end to end on
the tiny model (real adapters, trained for a few steps, shared with the predict/merge/CLI tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from xray_train.data.images import Geometry
from xray_train.data.loc import NO_BOX_ANSWER, encode_boxes
from xray_train.data.records import Box, Example, Finding
from xray_train.data.reports import format_report
from xray_train.errors import XrayTrainError
from xray_train.evaluate import (
    _model_block,
    boxes_from_answer,
    detect_answer_well_formed,
    detection_prediction,
    evaluate,
    markdown_report,
    report_prediction,
    score_detections,
    score_reports,
    select_examples,
    summary_lines,
)
from xray_train.generate import Generation, Generator
from xray_train.inputs import build_target
from xray_train.run_dir import DONE_MARKER, EVAL_RESULTS

# ---------------------------------------------------------------------------------------------
# Shared trained adapters (imported by test_predict, test_merge and test_cli)

_LOADED: dict = {}


def trained_adapters(make_config, tmp_path_factory) -> dict[str, Path]:
    """Phase-1 and Phase-2 adapters (4 steps each), trained once per test process. Treat as read-only."""
    from xray_train.train import run

    root = tmp_path_factory.getbasetemp() / "shared-adapters"
    dirs = {"phase1": root / "phase1", "phase2": root / "phase2"}
    if not (dirs["phase1"] / DONE_MARKER).is_file():
        run(make_config("phase1", output_dir=dirs["phase1"]), overwrite=True, echo=lambda *a: None)
    if not (dirs["phase2"] / DONE_MARKER).is_file():
        run(make_config("phase2", output_dir=dirs["phase2"]), resume_from=dirs["phase1"], overwrite=True,
            echo=lambda *a: None)
    return dirs


def loaded_adapter(adapter_dir: Path):
    """(model, processor) of an adapter, loaded once per test process (read-only use)."""
    if adapter_dir not in _LOADED:
        from xray_train.model import load_adapter

        _LOADED[adapter_dir] = load_adapter(adapter_dir)
    return _LOADED[adapter_dir]


def copy_adapter(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
    return dest


@pytest.fixture
def adapters(make_config, tmp_path_factory):
    return trained_adapters(make_config, tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# Scoring hand-made answers


def _example(findings=(), boxes=None, path=Path("x.png")) -> Example:
    return Example(path, path.name, "p", list(findings), boxes)


def test_perfect_reports_score_one_and_junk_is_unparsed():
    refs = [
        _example([Finding("cardiomegaly"), Finding("pleural effusion", ("left", "costophrenic angle"))]),
        _example([]),  # normal
        _example([Finding("nodule", ("right upper lobe",))]),
    ]
    perfect = [format_report(ex.findings) for ex in refs]
    scores = score_reports(perfect, refs)
    assert scores["parse_rate"] == 1.0
    assert scores["findings"]["micro"]["f1"] == 1.0 and scores["findings"]["location_accuracy"] == 1.0

    junk = ["the heart is big", perfect[1], "FINDINGS:\n- nodule: left lower lobe\nLOCATIONS: left lower lobe\nIMPRESSION: nodule."]
    scores = score_reports(junk, refs)
    f = scores["findings"]
    assert scores["parse_rate"] == pytest.approx(2 / 3)
    assert f["n_unparsed"] == 1  # the junk answer predicts nothing; it is not credited as "normal"
    assert f["per_finding"]["normal"]["tp"] == 1
    assert f["per_finding"]["nodule"]["tp"] == 1
    assert f["location_accuracy"] == 0.0  # right finding, wrong location


# Hand-written answers of every kind: what is read, what is unparsed, and that the counts agree everywhere.
NORMAL_REPORT = format_report([])
ABNORMAL_FINDINGS = [Finding("cardiomegaly"), Finding("pleural effusion", ("left",))]
ABNORMAL_REPORT = format_report(ABNORMAL_FINDINGS)
REPORT_ANSWERS = {
    "garbage": "the heart is big and I like turtles",
    "empty": "",
    "truncated": ABNORMAL_REPORT[: ABNORMAL_REPORT.index("IMPRESSION")],
    "loc_run": "<loc0001><loc0002><loc0003><loc0004><loc0005><loc0006><loc0007><loc0008>",
    "correct_normal": NORMAL_REPORT,
    "correct_abnormal": ABNORMAL_REPORT,
}


@pytest.mark.parametrize("kind", list(REPORT_ANSWERS))
def test_only_a_report_in_the_trained_format_is_read(kind):
    predicted = report_prediction(REPORT_ANSWERS[kind])
    if kind == "correct_normal":
        assert predicted == []  # normal: the answer says so
    elif kind == "correct_abnormal":
        assert [f.name for f in predicted] == ["cardiomegaly", "pleural effusion"]
    else:
        assert predicted is None  # unparsed: never "normal", never a finding


def test_unreadable_reports_earn_nothing_on_normal_studies():
    # Every study is normal: a model answering garbage must not score on any of them.
    refs = [_example([]) for _ in REPORT_ANSWERS]
    s = score_reports(list(REPORT_ANSWERS.values()), refs)
    f = s["findings"]
    assert (s["n_answers"], s["n_parsed"], s["n_unparsed"]) == (6, 2, 4)
    assert s["parse_rate"] == pytest.approx(2 / 6) and f["n_unparsed"] == s["n_unparsed"]
    assert f["per_finding"]["normal"]["tp"] == 1 and f["per_finding"]["normal"]["predicted"] == 1
    assert f["per_finding"]["normal"]["support"] == 6
    assert f["exact_match"] == pytest.approx(1 / 6)


DETECT_REF = Box("pleural effusion", 0.1, 0.6, 0.4, 0.9)


def _detect_answers(geometry):
    good = encode_boxes([geometry.to_prepared(DETECT_REF)])
    return {
        "garbage": "there is something on the left",
        "empty": "",
        "truncated": good + " ; <loc0010><loc00",
        # What the demo's Phase-2 model wrote: label-less <loc> runs once decoded into boxes and "normal".
        "loc_run": "<loc0100><loc0200><loc0300><loc0400><loc0100><loc0200><loc0300><loc0400>",
        "correct_normal": NO_BOX_ANSWER,
        "correct_abnormal": good,
    }


def test_only_a_detect_answer_in_the_trained_format_is_read():
    geometry = Geometry(300, 300, 64)
    for kind, text in _detect_answers(geometry).items():
        predicted = detection_prediction(text, geometry)
        if kind == "correct_normal":
            assert predicted == [], kind
        elif kind == "correct_abnormal":
            assert [b.label for b in predicted] == ["pleural effusion"], kind
        else:
            assert predicted is None, kind


def test_loc_runs_are_unparsed_not_normal_and_the_counts_agree():
    geometry = Geometry(300, 300, 64)
    answers = _detect_answers(geometry)
    # Four normal images answered with garbage: nothing may be credited.
    refs = [_example(boxes=[]) for _ in range(4)]
    bad = [answers[k] for k in ("garbage", "empty", "truncated", "loc_run")]
    s = score_detections(bad, refs, [geometry] * 4)
    assert (s["parse_rate"], s["n_parsed"], s["n_unparsed"]) == (0.0, 0, 4)
    assert s["findings"]["n_unparsed"] == s["boxes"]["n_unparsed"] == 4
    assert "normal" not in s["findings"]["per_finding"] or s["findings"]["per_finding"]["normal"]["tp"] == 0
    assert s["findings"]["micro"]["f1"] == 0.0 and s["findings"]["exact_match"] == 0.0
    assert s["boxes"]["empty_images"]["n_predicted_empty"] == 0


def _results_with_baseline(adapter_texts, base_texts, refs, geometries):
    """The results dict ``evaluate`` writes, from hand-written answers of the adapter and the base."""
    blocks = {name: _model_block(score_detections(texts, refs, geometries), None, {})
              for name, texts in (("adapter", adapter_texts), ("baseline", base_texts))}
    return {"adapter": "a", "phase": "phase2", "task": "detect", "split": "test", "dataset": "indiana",
            "n_examples": len(refs), **blocks["adapter"], "baseline": blocks["baseline"]}


def test_adapter_and_base_rows_show_their_own_parse_counts_next_to_every_score():
    geometry = Geometry(300, 300, 64)
    answers = _detect_answers(geometry)
    refs = [_example(boxes=[DETECT_REF]), _example(boxes=[]), _example(boxes=[]), _example(boxes=[DETECT_REF])]
    adapter = [answers["correct_abnormal"], answers["correct_normal"], answers["loc_run"], answers["truncated"]]
    base = [answers["loc_run"], answers["garbage"], answers["empty"], answers["loc_run"]]
    results = _results_with_baseline(adapter, base, refs, [geometry] * 4)
    assert (results["n_parsed"], results["n_unparsed"], results["parse_rate"]) == (2, 2, 0.5)
    base_block = results["baseline"]
    assert (base_block["n_parsed"], base_block["n_unparsed"], base_block["parse_rate"]) == (0, 4, 0.0)
    assert base_block["f1"] == 0.0 and base_block["per_finding"].get("normal", {}).get("tp", 0) == 0

    table = markdown_report(results)
    assert "Answers in the trained format: adapter 2 of 4, base model 0 of 4." in table
    assert "| metric | adapter (2 of 4 parsed) | base model, no adapter (0 of 4 parsed) | change |" in table
    assert "| finding | support | predicted | F1 adapter (2 of 4 parsed) | F1 base (0 of 4 parsed) |" in table
    assert "AP@0.5 adapter (2 of 4 parsed)" in table and "AP@0.5 base (0 of 4 parsed)" in table
    assert "| answers in the trained format (`parse_rate`) | 0.500 | 0.000 | +0.500 |" in table
    lines = summary_lines(results)
    assert lines[0].split(": ", 1)[1] == "2 of 4  (base 0 of 4)"
    assert any("none of the 4 answers of the base model could be parsed" in line for line in lines)


def test_references_are_canonicalised_like_training_targets():
    ref = _example([Finding("  Pleural  Effusion", ("loc left",))])
    scores = score_reports([format_report(ref.findings)], [ref])
    assert scores["findings"]["micro"]["f1"] == 1.0 and scores["findings"]["location_accuracy"] == 1.0


def test_detect_format_check():
    assert detect_answer_well_formed(NO_BOX_ANSWER)
    assert detect_answer_well_formed("<loc0001><loc0002><loc0500><loc0600> mass ; <loc0010><loc0020><loc0030><loc0040> nodule")
    assert not detect_answer_well_formed("<loc0001><loc0002><loc0500><loc0600>")  # no label
    assert not detect_answer_well_formed("<loc0001><loc0002><loc0500> mass")
    assert not detect_answer_well_formed("I see a mass <loc0001><loc0002><loc0500><loc0600> mass")
    assert not detect_answer_well_formed("")


def test_boxes_come_back_in_original_image_coordinates():
    # 200 wide x 400 high: padded 100 px left and right to a 400 square.
    geometry = Geometry(200, 400, 64)
    original = Box("mass", 0.25, 0.5, 0.75, 0.75)
    answer = encode_boxes([geometry.to_prepared(original)])
    (box,) = boxes_from_answer(answer, geometry)
    assert box.label == "mass"
    for attr in ("x_min", "y_min", "x_max", "y_max"):
        assert getattr(box, attr) == pytest.approx(getattr(original, attr), abs=2 / 1023 * 2)
    assert boxes_from_answer(NO_BOX_ANSWER, geometry) == []
    assert boxes_from_answer("nothing here", geometry) is None


def test_detection_scores_perfect_shifted_wrong_label_and_empty():
    geometry = Geometry(300, 300, 64)
    ref_box = Box("pleural effusion", 0.1, 0.6, 0.4, 0.9)
    refs = [_example(boxes=[ref_box]), _example(boxes=[])]
    perfect = [encode_boxes([ref_box]), NO_BOX_ANSWER]
    s = score_detections(perfect, refs, [geometry, geometry])
    assert s["parse_rate"] == 1.0
    assert s["boxes"]["hit_rate_50"] == 1.0 and s["boxes"]["mean_iou"] > 0.99
    assert s["findings"]["micro"]["f1"] == 1.0  # the empty image counts as a correct "normal"
    assert s["findings"]["location_accuracy"] is None  # boxes have no location words to score

    shifted = Box("pleural effusion", 0.3, 0.6, 0.6, 0.9)  # IoU 1/5 with the reference
    s = score_detections([encode_boxes([shifted]), NO_BOX_ANSWER], refs, [geometry, geometry])
    assert s["boxes"]["mean_iou"] == pytest.approx(0.2, abs=0.01) and s["boxes"]["hit_rate_50"] == 0.0
    assert s["findings"]["micro"]["f1"] == 1.0  # right label, wrong place

    wrong = [encode_boxes([Box("mass", 0.1, 0.6, 0.4, 0.9)]), "junk"]
    s = score_detections(wrong, refs, [geometry, geometry])
    assert s["boxes"]["hit_rate_50"] == 0.0 and s["boxes"]["agnostic"]["hit_rate_50"] == 1.0
    assert s["findings"]["n_unparsed"] == 1 and s["parse_rate"] == 0.5


# ---------------------------------------------------------------------------------------------
# The command on the tiny model


def _perfect_generation(monkeypatch, cfg):
    """Make every generate call answer with the training target of its image (a perfect model)."""
    examples, _ = select_examples(cfg, "test")
    answers = {ex.image_path: build_target(ex, cfg.phase) for ex in examples}

    def fake(self, requests, image_inputs):
        return [Generation(answers[r.image], 5) for r in requests]

    monkeypatch.setattr(Generator, "decode", fake)


def test_evaluate_phase2_writes_results_plots_and_baseline(adapters, make_config, tmp_path):
    adapter = copy_adapter(adapters["phase2"], tmp_path / "adapter")
    model, processor = loaded_adapter(adapters["phase2"])
    cfg = make_config("phase2")
    results = evaluate(adapter, cfg, max_new_tokens=6, model=model, processor=processor, progress=False,
                       echo=lambda *a: None)

    saved = json.loads((adapter / EVAL_RESULTS).read_text())
    for key in ("token_accuracy", "f1", "iou", "baseline", "per_finding", "n_examples", "split",
                "parse_rate", "hit_rate_50", "map50", "location_accuracy", "boxes", "findings"):
        assert key in saved, key
    assert saved["split"] == "test" and saved["phase"] == "phase2" and saved["n_examples"] > 0
    assert saved["n_examples"] == len(select_examples(cfg, "test")[0])
    assert 0.0 <= saved["token_accuracy"] <= 1.0 and saved["teacher_forced"]["total"] > 0
    assert saved["baseline"]["teacher_forced"]["total"] == saved["teacher_forced"]["total"]
    assert saved["baseline"]["iou"] is not None and "per_finding" in saved["baseline"]
    assert "ious" not in saved["boxes"]
    assert saved["generation"]["max_new_tokens"] == 6
    for name in ("eval_results.md", "f1_bars.png", "iou_histogram.png"):
        assert (adapter / name).stat().st_size > 0
    table = (adapter / "eval_results.md").read_text()
    assert "| mean IoU per reference box (`iou`) |" in table and "base model" in table
    assert results["written"]["json"] == adapter / EVAL_RESULTS
    # The adapter dir's results are what push-to-hub publishes: a rerun replaces them only on request.
    with pytest.raises(XrayTrainError, match="push-to-hub publishes it.*--overwrite"):
        evaluate(adapter, cfg, max_new_tokens=2, baseline=False, model=model, processor=processor,
                 progress=False, echo=lambda *a: None)
    assert json.loads((adapter / EVAL_RESULTS).read_text())["baseline"] is not None
    evaluate(adapter, cfg, max_new_tokens=2, baseline=False, overwrite=True, model=model, processor=processor,
             progress=False, echo=lambda *a: None)
    assert json.loads((adapter / EVAL_RESULTS).read_text())["baseline"] is None


def _plain_teacher_forced(model, processor, cfg, examples) -> tuple[int, int, float]:
    """(correct, total, mean loss) by the plain path: HF's full-logits forward on each example's pixels, one at a time."""
    import torch

    from xray_train.collate import Collator, PromptEncoder, batch_to
    from xray_train.inputs import PixelLoader, encode_examples
    from xray_train.loss import full_logits_loss

    encoder = PromptEncoder(processor, cfg.system_prompt)
    pixels = PixelLoader(processor, cfg.data.image_size)
    encoded, _ = encode_examples(examples, cfg.phase, encoder, cfg.training.max_length, cfg.data.box_format)
    correct = total = 0
    loss = 0.0
    with torch.inference_mode():
        for it in encoded:
            item = {"input_ids": it.input_ids, "labels": it.labels, "pixel_values": pixels(it.example.image_path)}
            out = full_logits_loss(model, batch_to(Collator(encoder.ids)([item]), model.device))
            correct, total = correct + int(out.n_correct), total + int(out.n_tokens)
            loss += float(out.loss_sum)
    return correct, total, loss / total


def test_teacher_forced_counts_from_the_shared_siglip_rows_equal_the_plain_forward(adapters, make_config, tmp_path):
    model, processor = loaded_adapter(adapters["phase2"])
    cfg = make_config("phase2")
    examples, _ = select_examples(cfg, "test", max_samples=5)
    results = evaluate(adapters["phase2"], cfg, max_samples=5, max_new_tokens=2, out_dir=tmp_path, model=model,
                       processor=processor, progress=False, echo=lambda *a: None)
    adapter = _plain_teacher_forced(model, processor, cfg, examples)
    with model.disable_adapter():
        base = _plain_teacher_forced(model, processor, cfg, examples)
    assert abs(adapter[2] - base[2]) > 1e-3  # the adapter changes the loss: the two models are told apart
    got = results["teacher_forced"], results["baseline"]["teacher_forced"]
    assert [(c["correct"], c["total"]) for c in got] == [adapter[:2], base[:2]]
    assert [c["loss"] for c in got] == pytest.approx([adapter[2], base[2]], rel=1e-5)
    assert got[0]["examples"] == len(examples)


def test_perfect_phase2_model_scores_perfectly_in_original_coordinates(adapters, make_config, tmp_path, monkeypatch):
    cfg = make_config("phase2")
    _perfect_generation(monkeypatch, cfg)
    model, processor = loaded_adapter(adapters["phase2"])
    r = evaluate(adapters["phase2"], cfg, baseline=False, out_dir=tmp_path / "out", model=model,
                 processor=processor, progress=False, echo=lambda *a: None)
    assert r["parse_rate"] == 1.0 and r["f1"] == 1.0 and r["n_unparsed"] == 0
    assert r["hit_rate_50"] == 1.0 and r["iou"] > 0.95 and r["map50"] == 1.0
    assert not (adapters["phase2"] / EVAL_RESULTS).exists()  # --out elsewhere leaves the adapter dir alone


def test_perfect_phase1_model_scores_perfectly(adapters, make_config, tmp_path, monkeypatch):
    cfg = make_config("phase1")
    _perfect_generation(monkeypatch, cfg)
    model, processor = loaded_adapter(adapters["phase1"])
    r = evaluate(adapters["phase1"], cfg, baseline=False, out_dir=tmp_path, json_out=tmp_path / "copy.json",
                 model=model, processor=processor, progress=False, echo=lambda *a: None)
    assert r["parse_rate"] == 1.0 and r["f1"] == 1.0 and r["exact_match"] == 1.0
    assert r["iou"] is None and r["boxes"] is None
    assert not (tmp_path / "iou_histogram.png").exists()
    assert json.loads((tmp_path / "copy.json").read_text())["f1"] == 1.0


def test_refuses_to_clobber_results_outside_the_adapter_dir(adapters, make_config, tmp_path):
    (tmp_path / EVAL_RESULTS).write_text("{}")
    with pytest.raises(XrayTrainError, match="--overwrite"):
        evaluate(adapters["phase1"], make_config("phase1"), out_dir=tmp_path, echo=lambda *a: None)
    assert (tmp_path / EVAL_RESULTS).read_text() == "{}"


def test_box_metrics_need_a_phase2_adapter(adapters, make_config):
    with pytest.raises(XrayTrainError, match="Phase-2 adapter"):
        evaluate(adapters["phase1"], make_config("phase2"), echo=lambda *a: None)


def test_unknown_split_is_a_user_error(make_config):
    with pytest.raises(XrayTrainError, match="--split"):
        select_examples(make_config("phase1"), "train-ish")


def test_markdown_report_shows_missing_numbers_as_na():
    results = {
        "adapter": "a", "phase": "phase1", "task": "report", "split": "test", "dataset": "padchest",
        "n_examples": 1, "token_accuracy": 0.5, "f1": None, "per_finding": {},
        "baseline": {"token_accuracy": 0.25, "f1": 0.1},
    }
    text = markdown_report(results)
    assert "| 0.500 | 0.250 | +0.250 |" in text
    assert "| n/a | 0.100 |" in text
