"""Metrics on hand-made cases whose answers are worked out in the comments."""

from __future__ import annotations

import json

import pytest

from xray_train.data.loc import decode_boxes
from xray_train.data.records import Box, Finding
from xray_train.metrics import (
    answer_counts,
    average_precision,
    box_iou,
    box_scores,
    finding_scores,
    match_boxes,
    token_accuracy,
)

approx = pytest.approx


def F(name, *locs):
    return Finding(name, tuple(locs))


def B(label, x0, y0, x1, y1):
    return Box(label, x0, y0, x1, y1)


# ---------------------------------------------------------------------------------------------
# Phase 1


def test_findings_perfect():
    refs = [[F("cardiomegaly", "loc cardiac")], [], [F("pleural effusion", "loc left")]]
    s = finding_scores(refs, refs)
    assert s["micro"]["f1"] == 1.0
    assert s["macro"]["f1"] == 1.0
    assert s["exact_match"] == 1.0
    assert s["location_accuracy"] == 1.0
    assert s["location_f1"] == 1.0
    assert s["per_finding"]["normal"]["tp"] == 1


def test_findings_worked_example():
    refs = [
        [F("cardiomegaly", "loc cardiac")],
        [F("pleural effusion", "loc left", "loc basal"), F("scoliosis")],
        [],  # normal
        [],  # normal
        [F("cardiomegaly")],
    ]
    preds = [
        [F("  Cardiomegaly", "cardiac")],  # case, spaces and the "loc " prefix are normalised away
        [F("pleural effusion", "left")],
        [],  # normal for normal: a true positive of the synthetic class
        [F("pneumonia")],  # FP pneumonia + FN normal
        None,  # unparseable: FN cardiomegaly, and NOT credited as "normal"
    ]
    s = finding_scores(preds, refs)
    # TP: cardiomegaly, effusion, normal = 3; FP: pneumonia = 1; FN: scoliosis, normal, cardiomegaly = 3
    assert (s["micro"]["tp"], s["micro"]["fp"], s["micro"]["fn"]) == (3, 1, 3)
    assert s["micro"]["precision"] == approx(3 / 4)
    assert s["micro"]["recall"] == approx(1 / 2)
    assert s["micro"]["f1"] == approx(0.6)
    # Per class F1: cardiomegaly 2/3, effusion 1, normal 2/3, pneumonia 0, scoliosis 0
    assert s["macro"]["n_classes"] == 5
    assert s["macro"]["f1"] == approx(7 / 15)
    assert s["macro"]["precision"] == approx(3 / 5)
    assert s["macro"]["recall"] == approx(2 / 5)
    # Without the normal class: TP 2, FP 1, FN 2
    assert s["micro_abnormal"]["precision"] == approx(2 / 3)
    assert s["micro_abnormal"]["f1"] == approx(4 / 7)
    assert s["per_finding"]["pneumonia"] == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 1, "tp": 0,
    }
    assert s["per_finding"]["cardiomegaly"]["support"] == 2
    assert s["exact_match"] == approx(2 / 5)
    assert s["n_unparsed"] == 1
    # Locations over TP findings: cardiomegaly equal, effusion {left} vs {left, basal} not equal.
    assert s["location_pairs"] == 2
    assert s["location_accuracy"] == approx(1 / 2)
    # Location triples: TP 2 (cardiac, left), FN 1 (basal) -> P 1, R 2/3, F1 0.8
    assert s["location_f1"] == approx(0.8)
    json.dumps(s)  # serialisable as eval_results.json


def test_findings_empty_predictions_mean_normal():
    refs = [[F("cardiomegaly")], [], [F("scoliosis"), F("kyphosis")]]
    s = finding_scores([[], [], []], refs)
    # Predicted normal three times: 1 TP (study 2), 2 FP normal, FN cardiomegaly/scoliosis/kyphosis.
    assert (s["micro"]["tp"], s["micro"]["fp"], s["micro"]["fn"]) == (1, 2, 3)
    assert s["micro_abnormal"]["f1"] == 0.0
    assert s["location_accuracy"] is None  # no true-positive abnormal finding to judge


def test_findings_unparsed_normal_study_is_not_credited():
    s = finding_scores([None], [[]])
    assert s["micro"]["tp"] == 0 and s["micro"]["fn"] == 1
    assert s["n_unparsed"] == 1


def test_findings_no_studies_is_undefined_not_zero():
    s = finding_scores([], [])
    assert s["n_studies"] == 0
    assert s["micro"]["f1"] is None
    assert s["macro"]["f1"] is None
    assert s["exact_match"] is None


def test_findings_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        finding_scores([[], []], [[]])


def test_answer_counts_count_unparsed_answers_once():
    counts = answer_counts([[], None, ["a"], [B("a", 0, 0, 1, 1)]])
    assert counts == {"n_answers": 4, "n_parsed": 3, "n_unparsed": 1, "parse_rate": approx(0.75)}
    assert answer_counts([])["parse_rate"] is None


def test_token_accuracy():
    assert token_accuracy(845, 1000) == approx(0.845)
    assert token_accuracy(0, 0) is None
    with pytest.raises(ValueError):
        token_accuracy(5, 3)


# ---------------------------------------------------------------------------------------------
# Phase 2


def test_box_iou_by_hand():
    a = B("x", 0.0, 0.0, 0.5, 0.5)
    # Overlap 0.25 x 0.25 = 0.0625; union 0.25 + 0.25 - 0.0625 = 0.4375 -> 1/7
    assert box_iou(a, B("y", 0.25, 0.25, 0.75, 0.75)) == approx(1 / 7)
    assert box_iou(a, a) == approx(1.0)
    assert box_iou(a, B("x", 0.6, 0.6, 0.9, 0.9)) == 0.0
    assert box_iou(a, B("x", 0.5, 0.0, 1.0, 0.5)) == 0.0  # touching edges
    assert box_iou(B("x", 0.2, 0.2, 0.2, 0.2), B("x", 0.2, 0.2, 0.2, 0.2)) == 0.0  # no area


def test_shifted_box():
    ref = B("nodule", 0.0, 0.0, 0.4, 0.4)
    shifted = B("nodule", 0.1, 0.0, 0.5, 0.4)
    # Intersection 0.3 x 0.4 = 0.12; union 0.16 + 0.16 - 0.12 = 0.20 -> IoU 0.6
    assert box_iou(ref, shifted) == approx(0.6)
    s = box_scores([[shifted]], [[ref]])
    assert s["mean_iou"] == approx(0.6)
    assert s["hit_rate_50"] == 1.0
    s = box_scores([[shifted]], [[ref]], iou_threshold=0.7)
    assert s["hit_rate_50"] == 0.0 and s["map50"] == 0.0
    assert s["mean_iou"] == approx(0.6)  # mean IoU does not depend on the threshold


def test_boxes_perfect():
    refs = [
        [B("cardiomegaly", 0.3, 0.4, 0.7, 0.8)],
        [B("effusion", 0.0, 0.6, 0.3, 0.9), B("nodule", 0.6, 0.2, 0.7, 0.3)],
    ]
    s = box_scores(refs, refs)
    assert s["mean_iou"] == approx(1.0)
    assert s["hit_rate_50"] == 1.0
    assert s["precision_50"] == 1.0
    assert s["map50"] == approx(1.0)
    assert set(s["per_label"]) == {"cardiomegaly", "effusion", "nodule"}
    assert s["agnostic"]["map50"] == approx(1.0)


def test_boxes_empty_predictions():
    refs = [[B("nodule", 0.1, 0.1, 0.2, 0.2)], [B("nodule", 0.5, 0.5, 0.6, 0.6)]]
    s = box_scores([[], []], refs)
    assert s["mean_iou"] == 0.0
    assert s["hit_rate_50"] == 0.0
    assert s["precision_50"] == 0.0
    assert s["map50"] == 0.0
    assert s["fn_50"] == 2
    assert s["ious"] == [0.0, 0.0]


def test_boxes_empty_references():
    s = box_scores([[B("nodule", 0.1, 0.1, 0.2, 0.2)], []], [[], []])
    assert s["mean_iou"] is None and s["hit_rate_50"] is None and s["map50"] is None
    assert s["precision_50"] == 0.0 and s["fp_50"] == 1
    assert s["per_label"]["nodule"]["ap50"] is None
    # One of the two box-free images was answered "no localisable finding"
    assert s["empty_images"] == {"n_reference_empty": 2, "n_predicted_empty": 1}


def test_boxes_nothing_at_all_is_undefined():
    s = box_scores([[]], [[]])
    assert s["precision_50"] is None and s["f1_50"] is None and s["map50"] is None


def test_wrong_label_right_place():
    ref = [[B("effusion", 0.1, 0.5, 0.4, 0.9)]]
    pred = [[B("pneumonia", 0.1, 0.5, 0.4, 0.9)]]
    s = box_scores(pred, ref)
    assert s["hit_rate_50"] == 0.0 and s["mean_iou"] == 0.0 and s["map50"] == 0.0
    assert s["per_label"]["pneumonia"]["n_predicted"] == 1
    # The label-agnostic view credits the location.
    assert s["agnostic"]["hit_rate_50"] == 1.0
    assert s["agnostic"]["mean_iou"] == approx(1.0)
    assert s["agnostic"]["map50"] == approx(1.0)


def test_label_case_and_spaces_do_not_matter():
    s = box_scores([[B(" Pleural  Effusion", 0, 0, 1, 1)]], [[B("pleural effusion", 0, 0, 1, 1)]])
    assert s["hit_rate_50"] == 1.0


def test_duplicate_predictions_only_one_matches():
    ref = B("nodule", 0.2, 0.2, 0.4, 0.4)
    s = box_scores([[ref, ref]], [[ref]])
    assert (s["tp_50"], s["fp_50"], s["fn_50"]) == (1, 1, 0)
    assert s["hit_rate_50"] == 1.0
    assert s["precision_50"] == 0.5
    # Ranked by appearance: TP then FP -> (R=1, P=1), (R=1, P=0.5): AP = 1
    assert s["map50"] == approx(1.0)
    assert match_boxes([ref, ref], [ref]) == [(0, 0, approx(1.0))]


def test_match_boxes_greedy_by_iou():
    ref = [B("a", 0.0, 0.0, 0.4, 0.4)]
    loose = B("a", 0.1, 0.0, 0.5, 0.4)  # IoU 0.6
    tight = B("a", 0.0, 0.0, 0.4, 0.38)  # IoU 0.95
    assert match_boxes([loose, tight], ref) == [(1, 0, approx(0.95))]
    assert match_boxes([loose], ref, iou_threshold=0.61) == []
    assert match_boxes([B("b", 0.0, 0.0, 0.4, 0.4)], ref) == []
    assert match_boxes([B("b", 0.0, 0.0, 0.4, 0.4)], ref, by_label=False) == [(0, 0, 1.0)]


def test_malformed_output_counted():
    text_ok = "<loc0000><loc0000><loc0511><loc0511> nodule"
    outputs = [text_ok, "the nodule is somewhere on the left"]
    parsed = [decode_boxes(t) or None for t in outputs]  # caller marks a parse failure as None
    refs = [[B("nodule", 0.0, 0.0, 0.5, 0.5)], [B("nodule", 0.5, 0.5, 1.0, 1.0)]]
    s = box_scores(parsed, refs)
    assert s["n_unparsed"] == 1
    assert s["hit_rate_50"] == 0.5
    assert answer_counts(parsed)["parse_rate"] == 0.5 and answer_counts(parsed)["n_unparsed"] == s["n_unparsed"]


def test_map_worked_by_hand():
    n0 = B("nodule", 0.1, 0.1, 0.3, 0.3)
    n1 = B("nodule", 0.6, 0.6, 0.8, 0.8)
    n2 = B("nodule", 0.4, 0.1, 0.6, 0.3)
    eff = B("effusion", 0.0, 0.0, 0.4, 0.4)
    refs = [[n0], [n1, eff], [n2]]
    miss = B("nodule", 0.0, 0.6, 0.1, 0.7)
    preds = [
        [n0, n0],  # scores 0.9 (TP) and 0.6 (duplicate: FP)
        [miss, B("effusion", 0.1, 0.0, 0.5, 0.4), B("mass", 0, 0, 1, 1)],  # 0.8 FP, effusion IoU 0.6, mass no ref
        [n2],  # 0.7 TP
    ]
    scores = [[0.9, 0.6], [0.8, 0.5, 0.4], [0.7]]
    s = box_scores(preds, refs, scores=scores)
    # nodule ranked TP, FP, TP, FP over 3 references:
    #   points (1/3, 1), (1/3, 1/2), (2/3, 2/3), (2/3, 1/2); interpolated precision 1, 2/3, 2/3, 1/2
    #   AP = 1/3 * 1 + (2/3 - 1/3) * 2/3 = 5/9
    assert s["per_label"]["nodule"]["ap50"] == approx(5 / 9)
    assert s["per_label"]["effusion"]["ap50"] == approx(1.0)
    assert s["per_label"]["mass"]["ap50"] is None  # never in the references: not in the mean
    assert s["map50"] == approx((5 / 9 + 1) / 2)
    # mean IoU over the 4 reference boxes: 1 (n0), 0 (n1), 0.6 (effusion), 1 (n2)
    assert s["mean_iou"] == approx(0.65)
    assert s["hit_rate_50"] == approx(3 / 4)
    assert s["ranking"] == "scores"


def test_ap_ties_are_one_operating_point():
    # One box per answer, no scores: all tie. One TP and one FP over 2 references: AP = P*R = 0.25,
    # whichever image comes first.
    a, b = B("n", 0.0, 0.0, 0.2, 0.2), B("n", 0.5, 0.5, 0.7, 0.7)
    far = B("n", 0.8, 0.0, 0.9, 0.1)
    s1 = box_scores([[a], [far]], [[a], [b]])
    s2 = box_scores([[far], [a]], [[b], [a]])
    assert s1["map50"] == approx(0.25) and s2["map50"] == approx(0.25)
    assert s1["ranking"] == "order_of_appearance"


def test_average_precision_direct():
    assert average_precision([], 0) is None
    assert average_precision([], 3) == 0.0
    # TP, TP, FP with 2 references: (0.5, 1), (1, 1), (1, 2/3) -> 1.0
    assert average_precision([(3, True), (2, True), (1, False)], 2) == approx(1.0)
    # FP first then TP: (0, 0), (1, 0.5) -> 0.5
    assert average_precision([(2, False), (1, True)], 1) == approx(0.5)


def test_scores_shape_checked():
    with pytest.raises(ValueError, match="item 0 has 1 boxes but 2 scores"):
        box_scores([[B("n", 0, 0, 1, 1)]], [[]], scores=[[0.1, 0.2]])


# ---------------------------------------------------------------------------------------------
# Report plots (they consume the metric dicts above)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temp file


def test_plots_written(tmp_path):
    from xray_train.report_plots import plot_f1_bars, plot_iou_histogram, plot_loss_curve

    refs = [[F("cardiomegaly")], [], [F("scoliosis")]]
    per_finding = finding_scores([[F("cardiomegaly")], [], []], refs)["per_finding"]
    _assert_png(plot_f1_bars(per_finding, tmp_path / "f1.png"))
    _assert_png(plot_f1_bars({f"f{i}": 0.5 for i in range(60)}, tmp_path / "many.png"))  # plain floats
    _assert_png(plot_iou_histogram([0.0, 0.2, 0.55, 0.9, 1.0], tmp_path / "iou.png"))
    history = [
        {"loss": 2.0, "step": 10},
        {"loss": 1.5, "step": 20},
        {"eval_loss": 1.7, "step": 20},
        {"loss": float("nan"), "step": 30},  # diverged step is skipped, not plotted
        {"train_loss": 1.6, "step": 30},  # Trainer's final summary entry
    ]
    _assert_png(plot_loss_curve(history, tmp_path / "sub" / "loss.png"))


def _figure_texts(fig) -> str:
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts)


def test_f1_bars_without_a_correct_finding_say_why_instead_of_drawing_empty_bars():
    from xray_train.report_plots import f1_bars_figure

    refs = [[F("cardiomegaly")], [F("scoliosis")]]
    unparsed = f1_bars_figure(finding_scores([None, None], refs)["per_finding"])
    assert "no findings predicted" in _figure_texts(unparsed)
    wrong = f1_bars_figure(finding_scores([[F("scoliosis")], [F("cardiomegaly")]], refs)["per_finding"])
    assert "no predicted finding matched" in _figure_texts(wrong)
    per_finding = finding_scores([[F("cardiomegaly")], []], refs)["per_finding"]
    some = f1_bars_figure(per_finding)
    assert not _figure_texts(some) and len(some.axes[0].patches) == len(per_finding)  # a bar per finding


def test_plots_empty_input_gives_placeholder(tmp_path):
    from xray_train.report_plots import plot_f1_bars, plot_iou_histogram, plot_loss_curve

    _assert_png(plot_f1_bars({}, tmp_path / "f1.png"))
    _assert_png(plot_iou_histogram([], tmp_path / "iou.png"))
    _assert_png(plot_loss_curve([], tmp_path / "loss.png"))
    _assert_png(plot_loss_curve([{"train_loss": 1.0, "step": 5}, "junk"], tmp_path / "loss2.png"))
