"""``dataset: hf``: parquet, JSON-lines and image-folder sets built here (nothing is fetched), read with the
native readers' guarantees, and carried through check, training, evaluation and prediction."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray_train.config import ConfigError, data_config, load_config
from xray_train.data.check import check_dataset
from xray_train.data.images import prepare_image
from xray_train.data.registry import read_dataset
from xray_train.data.reports import format_report
from xray_train.data.records import Finding
from xray_train.errors import DataError

datasets = pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[2]
CATEGORIES = ["nodule", "pleural effusion", "cardiomegaly"]


@pytest.fixture(autouse=True)
def _private_caches(tmp_path, monkeypatch):
    """The Arrow cache of ``datasets`` and the embedded-image folder go under tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("XRAY_TRAIN_CACHE", str(tmp_path / "xray-cache"))


def film(i: int, wide: bool = True) -> np.ndarray:
    """A 16-bit (or 8-bit) film with a bright disc; sizes differ so pixel boxes need each header."""
    h, w = 60 + 4 * (i % 3), 80 - 2 * (i % 4)
    yy, xx = np.mgrid[:h, :w]
    base = (xx * 7 + yy * 3 + i * 11).astype(np.float64)
    base[(yy - h // 2) ** 2 + (xx - w // 3) ** 2 < 80] += 400
    return (base * 40).astype(np.uint16) if wide else (base % 256).astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def report(findings: list[str]) -> str:
    return format_report([Finding(f) for f in findings])


#: One good row per kind of example, then one broken row per skip reason (what breaks, reason).
GOOD = [
    # findings, boxes xywh pixels, categories, patient
    (["nodule"], [[10, 10, 20, 15]], [0], "p1"),
    (["pleural effusion", "nodule"], [[5, 30, 30, 20], [40, 5, 10, 10]], [1, 0], "p2"),
    ([], [], [], "p3"),
    (["cardiomegaly"], [[20, 20, 30, 25]], [2], "p1"),
    ([], [], [], "p4"),
    (["nodule"], [[50, 40, 8, 8]], [0], "p5"),
]
BROKEN = ["missing_image", "unreadable_image", "missing_patient_id", "empty_report", "missing_boxes",
          "box_labels_mismatch", "no_valid_box", "abnormal_without_box"]


def rows(image_of) -> list[dict]:
    """Good rows then one row per entry of BROKEN; ``image_of(i, arr_or_None)`` gives the image cell."""
    out = []
    for i, (findings, boxes, cats, patient) in enumerate(GOOD):
        out.append({"image": image_of(i, film(i, wide=i % 2 == 0)), "findings": "; ".join(findings) or "normal",
                    "impression": "", "report": report(findings), "labels": [CATEGORIES.index(f) for f in findings],
                    "objects": {"bbox": boxes, "category": cats}, "patient": patient})
    base = {"findings": "nodule", "impression": "", "report": report(["nodule"]), "labels": [0],
            "objects": {"bbox": [[10, 10, 5, 5]], "category": [0]}, "patient": "p9"}
    for j, reason in enumerate(BROKEN):
        i = len(GOOD) + j
        arr = {"missing_image": None, "unreadable_image": b"not a png"}.get(reason, film(i))
        row = {**json.loads(json.dumps(base)), "image": image_of(i, arr)}
        if reason == "missing_patient_id":
            row["patient"] = None
        elif reason == "empty_report":
            row.update(report="", findings="", impression=None)
        elif reason == "missing_boxes":
            row["objects"] = {"bbox": None, "category": None}
        elif reason == "box_labels_mismatch":
            row["objects"] = {"bbox": [[1, 1, 5, 5], [2, 2, 5, 5]], "category": [0]}
        elif reason == "no_valid_box":
            row["objects"] = {"bbox": [[500, 500, 10, 10]], "category": [0]}  # outside the image
        elif reason == "abnormal_without_box":
            row["objects"] = {"bbox": [], "category": []}
        out.append(row)
    return out


def features(image_feature) -> "datasets.Features":
    return datasets.Features({
        "image": image_feature,
        "findings": datasets.Value("string"),
        "impression": datasets.Value("string"),
        "report": datasets.Value("string"),
        "labels": datasets.List(datasets.ClassLabel(names=CATEGORIES)),
        "objects": {"bbox": datasets.List(datasets.List(datasets.Value("float32"))),
                    "category": datasets.List(datasets.ClassLabel(names=CATEGORIES))},
        "patient": datasets.Value("string"),
    })


@pytest.fixture
def parquet_set(tmp_path) -> Path:
    """Hub-style parquet: images embedded as bytes (``Image`` feature), COCO boxes with a ClassLabel."""
    def image_of(i, arr):
        if arr is None:
            return None
        return {"bytes": arr if isinstance(arr, bytes) else png_bytes(arr), "path": f"film{i}.png"}

    folder = tmp_path / "pq"
    folder.mkdir()
    datasets.Dataset.from_list(rows(image_of), features=features(datasets.Image())).to_parquet(
        folder / "train-00000-of-00001.parquet")
    return folder


@pytest.fixture
def jsonl_set(tmp_path) -> Path:
    """JSON lines with image paths as text relative to the file, the report as several columns."""
    folder = tmp_path / "js"
    (folder / "images").mkdir(parents=True)

    def image_of(i, arr):
        name = f"images/film{i}.png"
        if arr is not None:
            (folder / name).write_bytes(arr if isinstance(arr, bytes) else png_bytes(arr))
        return name

    with open(folder / "data.jsonl", "w") as fh:
        for row in rows(image_of):
            row["labels"] = [CATEGORIES[k] for k in row["labels"]]
            row["objects"]["category"] = (
                None if row["objects"]["category"] is None else [CATEGORIES[k] for k in row["objects"]["category"]])
            fh.write(json.dumps(row) + "\n")
    return folder / "data.jsonl"


@pytest.fixture
def imagefolder_set(tmp_path) -> Path:
    """An image folder with metadata.jsonl (MedGemma's fine-tuning notebook's layout)."""
    folder = tmp_path / "imf"
    (folder / "train").mkdir(parents=True)
    meta = []
    for i, row in enumerate(rows(lambda i, arr: arr)):
        arr = row.pop("image")
        name = f"film{i}.png"
        if arr is None:
            continue  # an image folder lists the files it has: no row without an image
        (folder / "train" / name).write_bytes(arr if isinstance(arr, bytes) else png_bytes(arr))
        row["labels"] = [CATEGORIES[k] for k in row["labels"]]
        cats = row["objects"]["category"]
        row["objects"]["category"] = None if cats is None else [CATEGORIES[k] for k in cats]
        meta.append({"file_name": name, **row})
    with open(folder / "train" / "metadata.jsonl", "w") as fh:
        fh.writelines(json.dumps(m) + "\n" for m in meta)
    return folder


def hf(source, **fields):
    """The data section of an hf set shaped like ``rows``: COCO boxes in pixels, report + labels + patient."""
    columns = {"report": "report", "labels": "labels", "boxes": "objects.bbox", "box_labels": "objects.category",
               "patient_id": "patient", **fields.pop("columns", {})}
    return data_config(dataset="hf", source=str(source), columns=columns, val_fraction=0.2, test_fraction=0.2,
                       **fields)


def expected_skips(*absent: str) -> dict:
    return {reason: 1 for reason in BROKEN if reason not in absent}


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "imagefolder"])
def test_every_row_is_an_example_or_counted_by_reason(kind, request):
    source = request.getfixturevalue(f"{kind}_set")
    result = read_dataset(hf(source))
    # An image folder has no row for a missing file; the garbage PNG is found unreadable reading its header.
    assert result.skipped == expected_skips(*(["missing_image"] if kind == "imagefolder" else []))
    assert len(result.examples) + sum(result.skipped.values()) == result.rows_total
    assert len(result.examples) == len(GOOD)
    for ex, (findings, boxes, cats, patient) in zip(result.examples, GOOD):
        assert [f.name for f in ex.findings] == findings and ex.report is None  # structured: canonical target
        assert [b.label for b in ex.boxes] == [CATEGORIES[c] for c in cats]
        w, h = Image.open(ex.image_path).size
        for box, (x, y, bw, bh) in zip(ex.boxes, boxes):
            assert (box.x_min, box.y_min, box.x_max, box.y_max) == pytest.approx((x / w, y / h, (x + bw) / w, (y + bh) / h))
        assert ex.group_id == patient
    assert result.notes["boxes_skipped"] == {"box_outside": 1}
    assert result.notes["reports"] == {"structured": len(GOOD), "verbatim": 0}


def test_16_bit_films_reach_the_one_image_path_unclipped(parquet_set, jsonl_set):
    """Embedded bytes and text paths both give the film's own pixels, windowed as PadChest's are."""
    for source in (parquet_set, jsonl_set):
        for i, ex in enumerate(read_dataset(hf(source)).examples):
            original = film(i, wide=i % 2 == 0)
            assert np.array_equal(prepare_image(ex.image_path, 32).pixels, prepare_image(original, 32).pixels)
            if i % 2 == 0:
                assert Image.open(ex.image_path).mode.startswith("I")  # still 16 bits on disk


def test_report_columns_joined_by_a_template_and_free_text_verbatim(jsonl_set):
    joined = read_dataset(hf(jsonl_set, columns={"report": ["findings", "impression"], "labels": None}))
    first = joined.examples[0]
    # Not the Phase-1 form (no bullets): trained verbatim; its findings as far as the parser reads them.
    assert first.report == "FINDINGS: nodule\nIMPRESSION:" and [f.name for f in first.findings] == ["nodule"]
    assert joined.notes["reports"] == {"structured": 0, "verbatim": len(GOOD)}
    templated = read_dataset(hf(jsonl_set, report_template="Seen: {findings}.", columns={"report": ["findings"]}))
    assert templated.examples[1].report == "Seen: pleural effusion; nodule."
    # Free text keeps the labels column's findings, which evaluation scores.
    assert [f.name for f in templated.examples[1].findings] == ["pleural effusion", "nodule"]
    from xray_train.inputs import build_target

    assert build_target(templated.examples[1], "phase1") == "Seen: pleural effusion; nodule."
    structured = read_dataset(hf(jsonl_set)).examples[1]
    assert build_target(structured, "phase1") == report(["pleural effusion", "nodule"])


def test_labels_alone_give_phase1_reports(parquet_set):
    result = read_dataset(hf(parquet_set, columns={"report": None, "boxes": None, "box_labels": None}))
    from xray_train.inputs import build_target

    assert [build_target(ex, "phase1") for ex in result.examples[: len(GOOD)]] == [report(g[0]) for g in GOOD]
    assert all(ex.boxes is None for ex in result.examples)  # no box column: Phase-1 data
    # Rows broken only in their reports or boxes are examples here (the garbage PNG is found by `data check`).
    assert result.skipped == {"missing_image": 1, "missing_patient_id": 1}
    assert len(result.examples) == len(GOOD) + len(BROKEN) - 2


def test_strict_fails_on_the_first_broken_row_naming_it(jsonl_set):
    with pytest.raises(DataError, match=rf"{jsonl_set} row {len(GOOD) + 1}: missing_image \(.*film6.png\) \[--strict\]"):
        read_dataset(hf(jsonl_set, strict=True))


@pytest.mark.parametrize("columns, message", [
    ({"report": "reprot"}, "data.columns.report: no column 'reprot' (columns: image, findings, impression, report, "
                           "labels, objects, patient)"),
    ({"boxes": "objects.bbx"}, "data.columns.boxes: no field 'bbx' in 'objects' (fields: bbox, category)"),
    ({"patient_id": "patient_id"}, "data.columns.patient_id: no column 'patient_id' (columns: image,"),
])
def test_a_wrong_column_is_named_with_the_columns_that_exist(parquet_set, columns, message):
    with pytest.raises(DataError) as err:
        read_dataset(hf(parquet_set, columns=columns))
    assert message in str(err.value)


def test_data_check_and_config_validate_name_the_wrong_column(parquet_set, tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from xray_train.cli import app

    config = tmp_path / "hf.yaml"
    config.write_text(
        f"phase: phase1\noutput_dir: {tmp_path / 'out'}\nmodel: {{base: {tiny_model_dir}}}\n"
        f"data: {{dataset: hf, source: {parquet_set}, columns: {{report: reprot, patient_id: patient}}}}\n")
    for args in (["data", "check", "--config", str(config)], ["config", "validate", str(config), "--no-example"]):
        result = CliRunner().invoke(app, args)
        # ``main`` prints an XrayTrainError as one line, no traceback.
        assert isinstance(result.exception, DataError), result.output
        assert "data.columns.report: no column 'reprot' (columns: image, findings," in str(result.exception)


def test_check_opens_every_film_and_keeps_the_row_invariant(parquet_set):
    summary = check_dataset(hf(parquet_set), open_images=True, progress=False, workers=1)
    assert summary["examples"] == len(GOOD) and summary["dataset"] == "hf"
    assert summary["examples"] + sum(summary["skipped"].values()) == summary["rows_total"] == len(GOOD) + len(BROKEN)
    assert summary["box_labels"] == {"nodule": 3, "pleural effusion": 1, "cardiomegaly": 1}
    assert summary["examples_without_boxes"] == 2


def test_streaming_gives_the_same_examples_and_split(parquet_set, jsonl_set, imagefolder_set):
    from xray_train.data.splits import split_examples

    for source in (parquet_set, jsonl_set, imagefolder_set):
        plain, streamed = (read_dataset(hf(source, streaming=s)) for s in (False, True))
        assert streamed.notes["streaming"] and not plain.notes["streaming"]
        key = lambda ex: (ex.image_path, ex.image_id, ex.group_id, ex.findings, ex.boxes, ex.report, ex.source_row)
        assert [key(e) for e in plain.examples] == [key(e) for e in streamed.examples]
        assert (plain.skipped, plain.rows_total) == (streamed.skipped, streamed.rows_total)
        splits = [{k: [e.image_id for e in v] for k, v in split_examples(r.examples, 0.2, 0.2, 0).items()}
                  for r in (plain, streamed)]
        assert splits[0] == splits[1] and splits[0]["train"] and splits[0]["validation"]


def test_named_held_out_splits_are_kept_and_patients_split_the_rest(tmp_path, parquet_set):
    import shutil

    from xray_train.data.splits import split_examples

    shutil.copy(parquet_set / "train-00000-of-00001.parquet", parquet_set / "test-00000-of-00001.parquet")
    cfg = hf(parquet_set, test_split="test")
    result = read_dataset(cfg)
    assert result.notes["rows_per_split"] == {"train": len(GOOD) + len(BROKEN), "test": len(GOOD) + len(BROKEN)}
    splits = split_examples(result.examples, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    assert len(splits["test"]) == len(GOOD)  # exactly the test split's examples, none from train
    assert len(splits["train"]) + len(splits["validation"]) == len(GOOD)
    with pytest.raises(DataError, match="data.validation_split: .* has no split 'valid'"):
        read_dataset(hf(parquet_set, validation_split="valid"))


def test_config_rules_of_the_hf_source(tmp_path):
    def problems(phase, **data):
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps({"phase": phase, "output_dir": str(tmp_path / "o"),
                                    "data": {"dataset": "hf", "source": "org/cxr", **data}}))
        with pytest.raises(ConfigError) as err:
            load_config(path, check_model=False)
        return str(err.value)

    assert "data.revision: required for a Hub dataset" in problems("phase1", format="hub", columns={"report": "r"})
    assert "data.columns.boxes: phase2 trains on boxes: map a boxes column" in problems("phase2")
    assert "data.columns.report: phase1 trains on report targets" in problems("phase1")
    assert "data.report_template: names ['impresion'], not columns" in problems(
        "phase1", columns={"report": ["findings", "impression"]}, report_template="{findings} {impresion}")
    assert "data.columns.boxs: unknown key (did you mean boxes?)" in problems("phase2", columns={"boxs": "x"})
    with pytest.raises(DataError, match="data.revision: required for the Hub dataset org/cxr"):
        read_dataset(data_config(dataset="hf", source="org/cxr"))


def test_same_films_as_indiana_layout_and_image_folder_give_the_same_examples(tmp_path):
    """The bundled Indiana sample (box file in pixels, corners) written again as an image folder whose
    metadata.jsonl carries the same boxes: the two readers agree on every example, box and pixel."""
    import csv
    import shutil

    samples = REPO / "data" / "samples" / "indiana"
    indiana = read_dataset(data_config(
        dataset="indiana", reports_csv=samples / "indiana_reports.csv",
        projections_csv=samples / "indiana_projections.csv", image_root=samples / "images" / "images_normalized",
        box_source="box_file", box_file=samples / "boxes.csv"))
    raw: dict[str, list] = {}
    with open(samples / "boxes.csv") as fh:
        for row in csv.DictReader(fh):
            raw.setdefault(row["filename"], []).append(row)
    folder = tmp_path / "indiana-imf"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as fh:
        for ex in indiana.examples:
            shutil.copy(ex.image_path, folder / ex.image_id)
            boxes = raw.get(ex.image_id, [])
            fh.write(json.dumps({
                "file_name": ex.image_id, "uid": ex.group_id, "findings": [f.name for f in ex.findings],
                "objects": {"bbox": [[float(b[c]) for c in ("x_min", "y_min", "x_max", "y_max")] for b in boxes],
                            "category": [b["label"] for b in boxes]},
            }) + "\n")
    hf_read = read_dataset(data_config(
        dataset="hf", source=str(folder), box_order="xyxy",
        columns={"labels": "findings", "boxes": "objects.bbox", "box_labels": "objects.category", "patient_id": "uid"}))
    assert hf_read.skipped == {} and len(hf_read.examples) == len(indiana.examples) > 10
    assert any(ex.boxes for ex in indiana.examples) and any(not ex.boxes for ex in indiana.examples)
    by_id = {ex.image_id: ex for ex in hf_read.examples}
    for ex in indiana.examples:
        other = by_id[ex.image_id]
        assert other.group_id == ex.group_id
        assert other.boxes == ex.boxes
        assert [f.name for f in other.findings] == [f.name for f in ex.findings]
        assert np.array_equal(prepare_image(other.image_path, 64).pixels, prepare_image(ex.image_path, 64).pixels)


def test_two_sets_never_share_vision_feature_cache_entries(tmp_path):
    """Films with the same names but other pixels land at other paths, so the feature cache's key differs."""
    from xray_train.features import cache_key

    keys = []
    for k in range(2):
        folder = tmp_path / f"set{k}"
        folder.mkdir()
        datasets.Dataset.from_list(
            [{"image": {"bytes": png_bytes(film(i + 7 * k)), "path": f"film{i}.png"}, "text": "x"} for i in range(3)],
            features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
        ).to_parquet(folder / "train.parquet")
        examples = read_dataset(hf(folder / "train.parquet", columns={
            "report": "text", "labels": None, "boxes": None, "box_labels": None, "patient_id": None})).examples
        assert [ex.image_id for ex in examples] == ["film0.png", "film1.png", "film2.png"]
        keys.append(cache_key("vision", {"size": 32}, sorted(ex.image_path for ex in examples)))
    assert keys[0] != keys[1]


def _run_config(tmp_path, tiny_model_dir, phase: str, data: dict) -> Path:
    path = tmp_path / f"{phase}.yaml"
    path.write_text(json.dumps({
        "phase": phase, "output_dir": str(tmp_path / phase),
        "model": {"base": str(tiny_model_dir), "compute_dtype": "float32"},
        "data": {"dataset": "hf", "val_fraction": 0.2, "test_fraction": 0.2, "split_seed": 3, **data},
        "training": {"max_steps": 1, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
                     "eval_strategy": "no", "save_steps": 1, "logging_steps": 1, "report_to": ["none"],
                     "dataloader_num_workers": 0},
    }))
    return path


@pytest.mark.parametrize("kind, phase", [("parquet", "phase1"), ("jsonl", "phase2"), ("imagefolder", "phase2")])
def test_each_format_is_checked_trained_evaluated_and_predicted(kind, phase, request, tmp_path, tiny_model_dir,
                                                                feature_cache_dir):
    from xray_train.evaluate import evaluate
    from xray_train.predict import predict
    from xray_train.train import run

    source = request.getfixturevalue(f"{kind}_set")
    columns = {"report": "report", "labels": "labels", "patient_id": "patient"}
    if phase == "phase2":
        columns.update(boxes="objects.bbox", box_labels="objects.category")
    cfg = load_config(_run_config(tmp_path, tiny_model_dir, phase, {"source": str(source), "columns": columns}))
    summary = check_dataset(cfg.data, open_images=True, progress=False, workers=1)
    assert summary["examples"] + sum(summary["skipped"].values()) == summary["rows_total"]
    adapter = run(cfg, echo=lambda *a: None)
    results = evaluate(adapter, cfg, split="validation", max_new_tokens=4, baseline=False, progress=False,
                       echo=lambda *a: None)
    assert results["dataset"] == "hf" and results["n_examples"] > 0
    images = [ex.image_path for ex in read_dataset(cfg.data).examples[:2]]
    answers = predict(adapter, images, out_dir=tmp_path / "pred", max_new_tokens=4, progress=False,
                      echo=lambda *a: None)
    assert len(answers) == 2 and (tmp_path / "pred" / "predictions.jsonl").is_file()
