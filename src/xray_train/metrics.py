"""Evaluation metrics: pure functions over parsed predictions and references, no model.

(Over 400 lines: every metric's definition and its edge cases live side by side, under the conventions
below.)

Conventions shared by every function here
-----------------------------------------
* **Undefined is ``None``, never a made-up number.** A ratio with a zero denominator that cannot be
  given a meaning (no studies, no reference boxes, ``token_accuracy(0, 0)``) is ``None`` so that JSON
  output shows ``null`` rather than a 0 or 1 that reads like a measurement. Within a non-empty
  evaluation, precision with no predictions and recall with no references are 0.0 (scikit-learn's
  ``zero_division=0``), because there the class exists and the model simply failed on it.
* **Unparseable outputs are ``None`` entries** in ``predictions``. They count as "predicted nothing":
  every reference label / box of that item is a false negative (a normal study's ``normal`` included),
  and ``n_unparsed`` reports how many (:func:`answer_counts`). This matters because an empty list
  means "normal": a malformed answer must never be credited as a correct "normal" on a normal study,
  so the caller gives ``[]`` only for an answer that says so.
* Names and labels are compared after :func:`normalise_name` (case-folded, whitespace collapsed), since
  PadChest labels carry stray leading spaces and a model may change case.

Phase 1 (findings)
------------------
Each study is a *set* of finding names. An empty set (or an explicit ``normal`` finding) is the
synthetic class ``normal``, so "predicted normal for a normal study" is a true positive and
"predicted normal for an abnormal study" is a false positive of ``normal`` plus false negatives of
every missed finding. Per study: TP = |P ∩ R|, FP = |P \\ R|, FN = |R \\ P|.

* ``micro``: P = ΣTP / (ΣTP + ΣFP), R = ΣTP / (ΣTP + ΣFN), F1 = 2PR / (P + R), summed over studies
  and classes (``normal`` included). ``micro_abnormal`` is the same with the ``normal`` class dropped
  (PadChest is ~1/3 normal; that class alone can carry the micro score).
* ``macro``: unweighted mean of per-class P, R, F1 over every class that appears in the references
  **or** the predictions (scikit-learn's label set), so a hallucinated class lowers macro scores.
* ``per_finding[name]``: precision, recall, f1, support (# reference studies with it), predicted
  (# studies predicted with it), tp.
* ``exact_match``: share of studies whose predicted set equals the reference set.
* ``location_accuracy``: over true-positive (study, finding) pairs, ``normal`` excluded, the share whose
  predicted location set equals the reference location set (two empty sets are equal: a finding
  without a location in the reference is correct only if the model gives none either).
  ``location_f1``: micro F1 over (study, finding, location) triples, restricted to those true-positive
  findings, so location is judged only where the finding itself was right. ``None`` when there is
  nothing to judge. Locations are normalised and a PadChest ``loc `` prefix is dropped.

Phase 2 (boxes)
---------------
Boxes are compared within one image. ``box_iou`` is plain intersection over union of normalised
coordinates. Matching and AP use the same-label rule (labels normalised); the ``agnostic`` block
repeats the box metrics with every label replaced by one class (did the model find *where*, whatever
it called it).

* ``mean_iou``: for each **reference** box, the best IoU with any same-label predicted box in the
  same image (0.0 when there is none), averaged over all reference boxes. A missed box pulls the mean
  down; extra predictions do not (precision and AP cover those). ``ious`` lists these per-reference
  values (for the histogram).
* ``hit_rate_50``: share of reference boxes matched one-to-one (:func:`match_boxes`, IoU >= 0.5), i.e.
  recall at IoU 0.5. A duplicate prediction cannot match a second time. ``precision_50`` and ``f1_50``
  come from the same matching.
* ``map50``: mean over labels **with at least one reference box** of per-label AP at IoU 0.5. Per
  label, predictions over all images are ranked by confidence; each, in rank order, matches the
  highest-IoU still-unmatched reference box of its image at IoU >= 0.5 (TP) or is a FP. AP is the
  VOC (2010+) all-point interpolated area: with operating points (R_k, P_k),
  AP = Σ_k (R_k − R_{k−1}) · max_{j>=k} P_j. Predictions with equal confidence form **one** operating
  point (one cannot threshold between ties), so the result never depends on image order. Labels only
  ever predicted (no reference) have no AP and are left out of the mean.
* Confidence: a generative model emits no score, so unless ``scores`` is given, a box's confidence is
  its order of appearance in the answer (first emitted = most confident; all first boxes tie, all
  second boxes tie, ...). With one box per answer this reduces AP to precision x recall.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

from xray_train.data.records import Box, Finding

NORMAL = "normal"
IOU_THRESHOLD = 0.5
AGNOSTIC_LABEL = "<any>"


# ---------------------------------------------------------------------------------------------
# Small helpers


def normalise_name(name: str) -> str:
    """Case-folded, whitespace-collapsed name: ``"  Pleural  Effusion"`` -> ``"pleural effusion"``."""
    return " ".join(str(name).casefold().split())


def _normalise_location(loc: str) -> str:
    text = normalise_name(loc)
    return text[4:] if text.startswith("loc ") else text


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall, F1 with scikit-learn's ``zero_division=0``."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def _check_lengths(predictions: Sequence, references: Sequence, what: str) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{what}: {len(predictions)} predictions for {len(references)} references")


def answer_counts(predictions: Sequence[object | None]) -> dict:
    """How many answers could be read: ``n_answers``, ``n_parsed``, ``n_unparsed`` and ``parse_rate``
    (``n_parsed / n_answers``, ``None`` for no answers), all from the same ``None`` entries that the
    scores below treat as "predicted nothing". The one place these counts are made, so the parse rate, the
    unparsed count and every line that reports them cannot disagree."""
    unparsed = sum(p is None for p in predictions)
    return {
        "n_answers": len(predictions),
        "n_parsed": len(predictions) - unparsed,
        "n_unparsed": unparsed,
        "parse_rate": _ratio(len(predictions) - unparsed, len(predictions)),
    }


UNPARSED_RULE = (
    "An answer not in the trained format is unparsed: it counts as predicting nothing (never as a normal "
    "study), so every score below is read beside how many answers parsed."
)


def parsed_of(block: dict | None, n_examples: int) -> str:
    """``"3 of 4"``: a model's answers in the trained format, from the counts :func:`answer_counts` made
    (``block``: an evaluation results block, adapter or baseline)."""
    block = block or {}
    n_parsed = block.get("n_parsed")
    # Results written before n_parsed was recorded (schema 1): their parse_rate counted the answers in
    # the trained format, their n_unparsed did not.
    if n_parsed is None and block.get("parse_rate") is not None:
        n_parsed = round(block["parse_rate"] * n_examples)
    if n_parsed is None:
        return f"? of {n_examples}"
    return f"{n_parsed} of {n_examples}"


def token_accuracy(correct: int, total: int) -> float | None:
    """Teacher-forced next-token accuracy over supervised tokens; ``None`` when nothing was scored.

    Reported for continuity only: on template-heavy targets it is high whatever the model knows.
    """
    if total < 0 or correct < 0 or correct > total:
        raise ValueError(f"token_accuracy: need 0 <= correct <= total, got {correct}/{total}")
    return _ratio(correct, total)


# ---------------------------------------------------------------------------------------------
# Phase 1: findings


def _finding_sets(findings: list[Finding]) -> dict[str, set[str]]:
    """name -> location set; repeated names merge their locations; empty -> {normal: {}}."""
    out: dict[str, set[str]] = {}
    for f in findings:
        name = normalise_name(f.name)
        if not name:
            continue
        out.setdefault(name, set()).update(_normalise_location(loc) for loc in f.locations if loc.strip())
    if not out:
        out[NORMAL] = set()
    return out


def finding_scores(
    predictions: Sequence[list[Finding] | None], references: Sequence[list[Finding]]
) -> dict:
    """Phase-1 finding-level scores (see the module docstring for exact definitions)."""
    _check_lengths(predictions, references, "finding_scores")
    tp_c: dict[str, int] = defaultdict(int)
    fp_c: dict[str, int] = defaultdict(int)
    fn_c: dict[str, int] = defaultdict(int)
    exact = 0
    loc_pairs = loc_equal = 0
    loc_tp = loc_fp = loc_fn = 0

    for pred, ref in zip(predictions, references):
        r = _finding_sets(ref)
        if pred is None:
            p: dict[str, set[str]] = {}
        else:
            p = _finding_sets(pred)
        for name in r.keys() & p.keys():
            tp_c[name] += 1
            if name != NORMAL:
                loc_pairs += 1
                loc_equal += p[name] == r[name]
                loc_tp += len(p[name] & r[name])
                loc_fp += len(p[name] - r[name])
                loc_fn += len(r[name] - p[name])
        for name in p.keys() - r.keys():
            fp_c[name] += 1
        for name in r.keys() - p.keys():
            fn_c[name] += 1
        exact += p.keys() == r.keys()

    classes = sorted(set(tp_c) | set(fp_c) | set(fn_c))
    per_finding = {}
    for name in classes:
        p_, r_, f_ = _prf(tp_c[name], fp_c[name], fn_c[name])
        per_finding[name] = {
            "precision": p_,
            "recall": r_,
            "f1": f_,
            "support": tp_c[name] + fn_c[name],
            "predicted": tp_c[name] + fp_c[name],
            "tp": tp_c[name],
        }

    def micro(names: list[str]) -> dict:
        tp = sum(tp_c[n] for n in names)
        fp = sum(fp_c[n] for n in names)
        fn = sum(fn_c[n] for n in names)
        if not predictions:
            return {"precision": None, "recall": None, "f1": None, "tp": 0, "fp": 0, "fn": 0}
        p_, r_, f_ = _prf(tp, fp, fn)
        return {"precision": p_, "recall": r_, "f1": f_, "tp": tp, "fp": fp, "fn": fn}

    def macro(key: str) -> float | None:
        return sum(per_finding[n][key] for n in classes) / len(classes) if classes else None

    loc_f1 = None
    if loc_tp + loc_fp + loc_fn:
        loc_f1 = _prf(loc_tp, loc_fp, loc_fn)[2]
    return {
        "n_studies": len(references),
        "n_unparsed": answer_counts(predictions)["n_unparsed"],
        "micro": micro(classes),
        "micro_abnormal": micro([n for n in classes if n != NORMAL]),
        "macro": {
            "precision": macro("precision"),
            "recall": macro("recall"),
            "f1": macro("f1"),
            "n_classes": len(classes),
        },
        "exact_match": _ratio(exact, len(references)),
        "per_finding": per_finding,
        "location_accuracy": _ratio(loc_equal, loc_pairs),
        "location_f1": loc_f1,
        "location_pairs": loc_pairs,
    }


# ---------------------------------------------------------------------------------------------
# Phase 2: boxes


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (labels ignored); 0.0 when the union has no area."""
    iw = min(a.x_max, b.x_max) - max(a.x_min, b.x_min)
    ih = min(a.y_max, b.y_max) - max(a.y_min, b.y_min)
    inter = max(0.0, iw) * max(0.0, ih)
    area_a = max(0.0, a.x_max - a.x_min) * max(0.0, a.y_max - a.y_min)
    area_b = max(0.0, b.x_max - b.x_min) * max(0.0, b.y_max - b.y_min)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _same_label(a: Box, b: Box) -> bool:
    return normalise_name(a.label) == normalise_name(b.label)


def match_boxes(
    pred: Sequence[Box],
    ref: Sequence[Box],
    iou_threshold: float = IOU_THRESHOLD,
    by_label: bool = True,
) -> list[tuple[int, int, float]]:
    """One-to-one greedy matching within one image: ``[(pred_index, ref_index, iou), ...]``.

    All (pred, ref) pairs with the same label (any label when ``by_label`` is False) and
    IoU >= ``iou_threshold`` are taken in order of decreasing IoU (ties: lower pred index, then lower
    ref index); a pair is kept when neither box is already used. Duplicated predictions therefore
    match at most one reference box.
    """
    pairs = []
    for i, p in enumerate(pred):
        for j, r in enumerate(ref):
            if by_label and not _same_label(p, r):
                continue
            iou = box_iou(p, r)
            if iou >= iou_threshold:
                pairs.append((-iou, i, j))
    pairs.sort()
    used_p: set[int] = set()
    used_r: set[int] = set()
    matches = []
    for neg_iou, i, j in pairs:
        if i in used_p or j in used_r:
            continue
        used_p.add(i)
        used_r.add(j)
        matches.append((i, j, -neg_iou))
    return sorted(matches, key=lambda m: m[0])


def average_precision(
    detections: Sequence[tuple[float, bool]], n_references: int
) -> float | None:
    """VOC all-point interpolated AP from ``(confidence, is_true_positive)`` pairs.

    Equal confidences form one operating point. ``None`` when there are no references.
    """
    if n_references <= 0:
        return None
    ranked = sorted(detections, key=lambda d: -d[0])
    points: list[tuple[float, float]] = []  # (recall, precision) at the end of each tie group
    tp = fp = 0
    for k, (conf, hit) in enumerate(ranked):
        tp += bool(hit)
        fp += not hit
        if k + 1 == len(ranked) or ranked[k + 1][0] != conf:
            points.append((tp / n_references, tp / (tp + fp)))
    ap = 0.0
    best_precision_after = 0.0
    # Walking backwards gives max_{j>=k} P_j (the interpolated precision) in one pass.
    for k in range(len(points) - 1, -1, -1):
        best_precision_after = max(best_precision_after, points[k][1])
        prev_recall = points[k - 1][0] if k else 0.0
        ap += (points[k][0] - prev_recall) * best_precision_after
    return ap


def _confidences(
    predictions: Sequence[Sequence[Box] | None], scores: Sequence[Sequence[float]] | None
) -> list[list[float]]:
    if scores is None:
        # Earlier in the answer = more confident; see the module docstring.
        return [[-float(k) for k in range(len(p or ()))] for p in predictions]
    _check_lengths(predictions, scores, "box_scores scores")
    out = []
    for n, (p, s) in enumerate(zip(predictions, scores)):
        p = p or ()
        if len(s) != len(p) and len(p):
            raise ValueError(f"box_scores: item {n} has {len(p)} boxes but {len(s)} scores")
        if any(not math.isfinite(float(x)) for x in s):
            raise ValueError(f"box_scores: item {n} has a non-finite score")
        out.append([float(x) for x in s][: len(p)])
    return out


def _box_block(
    predictions: Sequence[Sequence[Box] | None],
    references: Sequence[Sequence[Box]],
    conf: list[list[float]],
    key: Callable[[Box], str],
    iou_threshold: float,
) -> dict:
    by_label = key is not _agnostic_key
    ious: list[float] = []
    per_ref_label: list[str] = []
    tp = n_pred = n_ref = 0
    tp_by_label: dict[str, int] = defaultdict(int)
    n_ref_by_label: dict[str, int] = defaultdict(int)
    n_pred_by_label: dict[str, int] = defaultdict(int)
    iou_sum_by_label: dict[str, float] = defaultdict(float)
    # per label: list of (confidence, image index, box index) for AP
    dets: dict[str, list[tuple[float, int, int]]] = defaultdict(list)

    for img, (pred, ref) in enumerate(zip(predictions, references)):
        pred = list(pred or ())
        ref = list(ref)
        n_pred += len(pred)
        n_ref += len(ref)
        for j, r in enumerate(ref):
            best = max((box_iou(p, r) for p in pred if key(p) == key(r)), default=0.0)
            ious.append(best)
            per_ref_label.append(key(r))
            n_ref_by_label[key(r)] += 1
            iou_sum_by_label[key(r)] += best
        for i, p in enumerate(pred):
            n_pred_by_label[key(p)] += 1
            dets[key(p)].append((conf[img][i], img, i))
        for i, j, _ in match_boxes(pred, ref, iou_threshold, by_label=by_label):
            tp += 1
            tp_by_label[key(ref[j])] += 1

    # AP: rank each label's predictions by confidence; match greedily to unmatched references.
    ap_by_label: dict[str, float | None] = {}
    for label in sorted(set(n_ref_by_label) | set(dets)):
        used: set[tuple[int, int]] = set()
        scored = []
        # Ties keep image and in-answer order; they are one operating point in AP anyway.
        for c, img, i in sorted(dets.get(label, []), key=lambda d: (-d[0], d[1], d[2])):
            p = predictions[img][i]
            best_j, best_iou = None, iou_threshold
            for j, r in enumerate(references[img]):
                if key(r) != label or (img, j) in used:
                    continue
                iou = box_iou(p, r)
                if iou >= best_iou and (best_j is None or iou > best_iou):
                    best_j, best_iou = j, iou
            if best_j is not None:
                used.add((img, best_j))
            scored.append((c, best_j is not None))
        ap_by_label[label] = average_precision(scored, n_ref_by_label.get(label, 0))

    valid_ap = [ap for ap in ap_by_label.values() if ap is not None]
    precision, recall, f1 = _prf(tp, n_pred - tp, n_ref - tp)
    per_label = {
        label: {
            "ap50": ap_by_label.get(label),
            "n_reference": n_ref_by_label.get(label, 0),
            "n_predicted": n_pred_by_label.get(label, 0),
            "tp_50": tp_by_label.get(label, 0),
            "mean_iou": _ratio(iou_sum_by_label.get(label, 0.0), n_ref_by_label.get(label, 0)),
        }
        for label in sorted(set(n_ref_by_label) | set(n_pred_by_label))
    }
    return {
        "n_reference_boxes": n_ref,
        "n_predicted_boxes": n_pred,
        "mean_iou": _ratio(sum(ious), len(ious)),
        "hit_rate_50": _ratio(tp, n_ref),
        "precision_50": precision if n_pred else (None if not n_ref else 0.0),
        "f1_50": f1 if (n_pred or n_ref) else None,
        "tp_50": tp,
        "fp_50": n_pred - tp,
        "fn_50": n_ref - tp,
        "map50": sum(valid_ap) / len(valid_ap) if valid_ap else None,
        "per_label": per_label,
        "ious": ious,
    }


def _label_key(box: Box) -> str:
    return normalise_name(box.label)


def _agnostic_key(box: Box) -> str:
    return AGNOSTIC_LABEL


def box_scores(
    predictions: Sequence[list[Box] | None],
    references: Sequence[list[Box]],
    scores: Sequence[Sequence[float]] | None = None,
    iou_threshold: float = IOU_THRESHOLD,
) -> dict:
    """Phase-2 box scores (see the module docstring for exact definitions).

    ``predictions[i]`` is None for an answer that did not parse; ``[]`` for "no localisable finding".
    ``scores``, when given, holds one confidence per predicted box; otherwise order of appearance ranks.
    """
    _check_lengths(predictions, references, "box_scores")
    conf = _confidences(predictions, scores)
    labelled = _box_block(predictions, references, conf, _label_key, iou_threshold)
    agnostic = _box_block(predictions, references, conf, _agnostic_key, iou_threshold)
    agnostic.pop("per_label")
    agnostic.pop("ious")
    empty_refs = [i for i, r in enumerate(references) if not r]
    return {
        "n_images": len(references),
        "n_unparsed": answer_counts(predictions)["n_unparsed"],
        "ranking": "scores" if scores is not None else "order_of_appearance",
        "iou_threshold": iou_threshold,
        **labelled,
        "agnostic": agnostic,
        # Images with no reference box: did the model correctly answer "no localisable finding"?
        "empty_images": {
            "n_reference_empty": len(empty_refs),
            "n_predicted_empty": sum(predictions[i] is not None and not predictions[i] for i in empty_refs),
        },
    }
