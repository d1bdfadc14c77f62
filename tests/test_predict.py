"""``xray_train.predict``: boxes drawn where the JSONL says, in original-image pixels; output policy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_evaluate import loaded_adapter, trained_adapters
from xray_train.errors import XrayTrainError
from xray_train.generate import Generation, Generator
from xray_train.predict import PREDICTIONS_FILE, label_colour, line_width, predict

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
INDIANA = SAMPLES / "indiana" / "images" / "images_normalized"
# y_min x_min y_max x_max as bins of the padded square: bin / 1023 of the square's side.
DETECT = "<loc0100><loc0300><loc0500><loc0700> pleural effusion ; <loc0600><loc0512><loc0900><loc0900> mass"
REPORT = "FINDINGS:\n- pleural effusion: left\nLOCATIONS: left\nIMPRESSION: pleural effusion."


@pytest.fixture
def adapters(make_config, tmp_path_factory):
    return trained_adapters(make_config, tmp_path_factory)


@pytest.fixture
def fixed_answers(monkeypatch):
    """Generation replaced by known answers: the model is only needed for its device and dtype."""
    calls = []

    def fake(self, requests, prepared=None):
        calls.extend(requests)
        _, errors = self._pixels(requests)  # unreadable images still fail the real way
        return [Generation(None, 0, err) if err else Generation(DETECT if r.task == "detect" else REPORT, 9)
                for r, err in zip(requests, errors)]

    monkeypatch.setattr(Generator, "generate_batch", fake)
    return calls


def _expected_pixels(width: int, height: int) -> list[tuple[str, float, float, float, float]]:
    """The two DETECT boxes in original pixels, by hand: pad centred to a side x side square."""
    side = max(width, height)
    pad_x, pad_y = (side - width) / 2, (side - height) / 2

    def px(bin_, pad):
        return bin_ / 1023 * side - pad

    out = []
    for label, y0, x0, y1, x1 in (("pleural effusion", 100, 300, 500, 700), ("mass", 600, 512, 900, 900)):
        box = [max(0.0, min(width, px(x0, pad_x))), max(0.0, min(height, px(y0, pad_y))),
               max(0.0, min(width, px(x1, pad_x))), max(0.0, min(height, px(y1, pad_y)))]
        out.append((label, *box))
    return out


def _is(colour, pixel) -> bool:
    return tuple(int(v) for v in pixel[:3]) == colour


def test_drawn_boxes_land_where_the_jsonl_says(adapters, fixed_answers, tmp_path):
    model, processor = loaded_adapter(adapters["phase2"])
    wide = tmp_path / "in" / "wide.png"  # landscape: padded top and bottom (portrait samples pad left/right)
    wide.parent.mkdir()
    portrait = Image.open(INDIANA / "100_IM-4252-1001.dcm.png")
    Image.fromarray(np.asarray(portrait).T.copy()).save(wide)
    images = [INDIANA / "100_IM-4252-1001.dcm.png", wide]
    out = tmp_path / "out"

    records = predict(adapters["phase2"], images, out, model=model, processor=processor, progress=False,
                      echo=lambda *a: None)

    lines = [json.loads(line) for line in (out / PREDICTIONS_FILE).read_text().splitlines()]
    assert lines == json.loads(json.dumps(records))
    assert {r.task for r in fixed_answers} == {"report", "detect"}  # Phase-2 adapter: both by default
    for line, path in zip(lines, images):
        width, height = Image.open(path).size
        assert (line["width"], line["height"]) == (width, height)
        assert line["report"] == REPORT and line["findings"] == [{"name": "pleural effusion", "locations": ["left"]}]
        assert line["raw"] == {"report": REPORT, "detect": DETECT} and line["detect_well_formed"]
        expected = _expected_pixels(width, height)
        assert [b["label"] for b in line["boxes"]] == [e[0] for e in expected]
        for box, (_, x0, y0, x1, y1) in zip(line["boxes"], expected):
            assert [box["x_min"], box["y_min"], box["x_max"], box["y_max"]] == pytest.approx([x0, y0, x1, y1], abs=0.06)

        png = np.asarray(Image.open(out / line["annotated"]).convert("RGB"))
        assert png.shape[:2] == (height, width)  # drawn on the original, not on the model's square
        stroke = line_width(width, height)
        for box in line["boxes"]:
            colour = label_colour(box["label"])
            x0, y0 = round(box["x_min"]), round(box["y_min"])
            x1, y1 = min(round(box["x_max"]), width - 1), min(round(box["y_max"]), height - 1)
            mid_y, mid_x = (y0 + y1) // 2, (x0 + x1) // 2
            assert _is(colour, png[mid_y, x0]) and _is(colour, png[mid_y, x1])  # left and right edges
            assert _is(colour, png[y1, mid_x])  # bottom edge
            assert _is(colour, png[mid_y, x0 + stroke - 1]) and not _is(colour, png[mid_y, x0 + stroke + 1])
            if x0 >= 2:
                assert not _is(colour, png[mid_y, x0 - 2])  # nothing drawn outside the box
            assert not _is(colour, png[mid_y, mid_x])  # an outline, not a filled box


def test_refuses_to_overwrite_without_flag(adapters, fixed_answers, tmp_path):
    model, processor = loaded_adapter(adapters["phase2"])
    image = INDIANA / "13_IM-4562-2001.dcm.png"
    kwargs = dict(model=model, processor=processor, progress=False, echo=lambda *a: None)
    predict(adapters["phase2"], [image], tmp_path, task="detect", **kwargs)
    with pytest.raises(XrayTrainError, match="--overwrite"):
        predict(adapters["phase2"], [image], tmp_path, task="detect", **kwargs)
    (record,) = predict(adapters["phase2"], [image], tmp_path, task="detect", overwrite=True, **kwargs)
    assert record["report"] is None and record["raw"] == {"detect": DETECT}


def test_folder_input_and_unreadable_images(adapters, fixed_answers, tmp_path):
    model, processor = loaded_adapter(adapters["phase1"])
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(INDIANA / "13_IM-4562-2001.dcm.png", folder / "sub" / "a.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored")
    records = predict(adapters["phase1"], [folder], tmp_path / "out", model=model, processor=processor,
                      progress=False, echo=lambda *a: None)
    by_name = {Path(r["image"]).name: r for r in records}
    assert set(by_name) == {"a.png", "broken.png"}
    assert "error" in by_name["broken.png"]
    good = by_name["a.png"]
    assert good["boxes"] is None and good["report"] == REPORT  # Phase-1 adapter: report only
    assert (tmp_path / "out" / "a_pred.png").is_file()


def test_detect_needs_a_phase2_adapter(adapters, tmp_path):
    with pytest.raises(XrayTrainError, match="Phase-1 adapter"):
        predict(adapters["phase1"], [INDIANA], tmp_path, task="detect")


def test_missing_input_is_a_user_error(adapters, tmp_path):
    with pytest.raises(XrayTrainError, match="no such file"):
        predict(adapters["phase1"], [tmp_path / "nope.png"], tmp_path / "out")


# What an untrained model's answers look like: pages of tokens from every script.
GIBBERISH = " ".join(["dejaron", "ாகுாகு", "ruaryruary", "центри", "何况"] * 150)


def test_unreadable_answers_are_previewed_and_pictures_say_why_they_have_no_box(adapters, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from xray_train import cli
    from xray_train.data.loc import NO_BOX_ANSWER
    from xray_train.predict import render

    answers = {"report": GIBBERISH, "detect": GIBBERISH}
    monkeypatch.setattr(Generator, "generate_batch", lambda self, requests, prepared=None: [Generation(answers[r.task], 128) for r in requests])
    image = INDIANA / "13_IM-4562-2001.dcm.png"
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.app, ["predict", str(adapters["phase2"]), str(image), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(GIBBERISH) > 4000 and len(result.output) < 1500  # previews, not pages
    assert "report: not in the trained format:" in result.output
    assert "boxes: none (answer not in the box format:" in result.output
    assert f"({len(GIBBERISH)} characters; the full answer is in {PREDICTIONS_FILE})" in result.output
    (line,) = [json.loads(x) for x in (out / PREDICTIONS_FILE).read_text().splitlines()]
    assert line["raw"] == {"report": GIBBERISH, "detect": GIBBERISH}  # the whole answers, as JSON strings

    drawn = np.asarray(Image.open(out / line["annotated"]).convert("RGB"))
    bare = np.asarray(render(image, []))
    assert not (bare[1] == 0).all()  # the film's top row is not black by itself
    assert (drawn[1] == 0).all() and (drawn[:30].min(axis=-1) > 200).any()  # white text on a black band
    assert (drawn[-5:] == bare[-5:]).all()  # the rest of the film is untouched

    answers["detect"] = NO_BOX_ANSWER
    result = CliRunner().invoke(cli.app, ["predict", str(adapters["phase2"]), str(image), "--out", str(out),
                                          "--task", "detect", "--overwrite"])
    assert result.exit_code == 0 and "boxes: none (no localisable finding)" in result.output


def test_image_note_says_why_a_picture_has_no_box():
    from xray_train.predict import image_note

    box = {"label": "mass", "x_min": 1, "y_min": 1, "x_max": 5, "y_max": 5}
    assert image_note({"boxes": [box], "detect_well_formed": True}) is None
    # Boxes decoded from an answer that evaluation counts as unparsed (e.g. label-less <loc> runs) say so.
    assert image_note({"boxes": [box], "detect_well_formed": False}) == "answer not in the box format: drawn as decoded"
    assert image_note({"boxes": [], "detect_well_formed": True}) == "no box: no localisable finding"
    assert image_note({"boxes": [], "detect_well_formed": False}) == "no box: answer not in the box format"
    assert "report only" in image_note({"boxes": None, "detect_well_formed": None})


def test_console_lists_a_few_boxes_and_counts_the_rest():
    from xray_train.predict import ECHOED_BOXES, echo_record

    box = {"label": "mass", "x_min": 1.0, "x_max": 5.0, "y_min": 2.0, "y_max": 6.0}
    record = {"image": "a.png", "boxes": [box] * (ECHOED_BOXES + 3), "detect_well_formed": True,
              "annotated": "a_pred.png"}
    lines: list[str] = []
    echo_record(record, lines.append)
    assert sum(line.startswith("box: mass") for line in lines) == ECHOED_BOXES
    assert any("3 more boxes" in line for line in lines)

    lines.clear()
    echo_record({**record, "boxes": [box] * 2}, lines.append)
    assert sum(line.startswith("box: mass") for line in lines) == 2
    assert not any("more boxes" in line for line in lines)


def _fake_adapter_dir(root: Path) -> Path:
    """Enough of an adapter folder for predict's checks; loading it would fail (nothing to load)."""
    folder = root / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    return folder


def test_a_corrupt_image_fails_before_the_model_loads_and_is_said_once(tmp_path, monkeypatch, capsys):
    import xray_train.model
    from tests.test_preflight import run_main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded for an image that cannot be read")

    monkeypatch.setattr(xray_train.model, "load_adapter", no_loading)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature, then nothing readable
    adapter = _fake_adapter_dir(tmp_path)
    with pytest.raises(XrayTrainError, match="broken.png"):
        predict(adapter, [broken], tmp_path / "out", echo=lambda *a: None)

    code, out, err = run_main(monkeypatch, capsys, "predict", str(adapter), str(broken), "--out", str(tmp_path / "o2"))
    assert code == 2 and "Traceback" not in out + err
    assert (out + err).count("cannot read image") == 1 and len((out + err).strip().splitlines()) == 1, out + err


def test_progress_counts_images_not_image_task_pairs(adapters, fixed_answers, tmp_path, capsys):
    model, processor = loaded_adapter(adapters["phase2"])
    predict(adapters["phase2"], [INDIANA / "100_IM-4252-1001.dcm.png"], tmp_path / "out", model=model,
            processor=processor, progress=True, echo=lambda *a: None)
    err = capsys.readouterr().err
    assert "Predicting (report)" in err and "Predicting (detect)" in err
    assert "1/1" in err and "2/2" not in err


def test_load_adapter_prints_no_third_party_noise(adapters):
    import os
    import subprocess
    import sys

    code = f"import xray_train; xray_train.load_adapter({str(adapters['phase2'])!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FutureWarning" not in proc.stderr and "kernels-community" not in proc.stderr, proc.stderr


def test_a_run_predicts_from_any_folder_and_a_moved_base_says_how_to_point_at_it(
    adapters, fixed_answers, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from tests.test_cli import run_main
    from tests.test_evaluate import copy_adapter
    from xray_train.run_dir import RunDir

    work = tmp_path / "work"
    base = work / "models" / "demo" / "tiny"
    shutil.copytree(tiny_model_dir, base)
    run = RunDir(copy_adapter(adapters["phase2"], work / "runs" / "p2"))
    monkeypatch.chdir(work)  # trained from work/ with a relative base, as the demo does
    cfg = run.config()
    run.write_config(cfg.model_copy(update={"model": cfg.model.model_copy(update={"base": "models/demo/tiny"})}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    image = str(INDIANA / "100_IM-4252-1001.dcm.png")

    code, out, err = run_main(monkeypatch, capsys, "predict", str(run.path), image, "--out", "p1")
    assert code == 0, err
    assert (elsewhere / "p1" / PREDICTIONS_FILE).is_file()

    moved = base.rename(work / "models" / "moved")
    code, out, err = run_main(monkeypatch, capsys, "predict", str(run.path), image, "--out", "p2")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--base DIR" in err and "base=DIR" in err
    code, out, err = run_main(monkeypatch, capsys, "predict", str(run.path), image, "--out", "p3", "--base", str(moved))
    assert code == 0, err
