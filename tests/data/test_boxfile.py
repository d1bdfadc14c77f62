import pytest

from xray_train.data.boxfile import EDGE_TOLERANCE, make_box, read_box_file
from xray_train.data.records import SkipCounter
from xray_train.errors import DataError


def test_make_box_normalises_and_rejects_by_reason():
    box, why = make_box("nodule", 10, 20, 30, 60, 100, 200)
    assert why == "" and (box.x_min, box.y_min, box.x_max, box.y_max) == (0.1, 0.1, 0.3, 0.3)
    assert make_box("a", float("nan"), 0, 1, 1)[1] == "box_nan"
    assert make_box("a", "", 0, 1, 1)[1] == "box_nan"
    assert make_box("a", 0.5, 0, 0.4, 1)[1] == "box_inverted"
    assert make_box("a", 0.5, 0.2, 0.5, 0.4)[1] == "box_zero_area"
    assert make_box("a", 0, 0, 1.5, 1)[1] == "box_outside"
    assert make_box("a", 1.1, 0.2, 1.3, 0.4)[1] == "box_outside"


def test_small_overshoot_is_clipped():
    box, why = make_box("a", -EDGE_TOLERANCE / 2, 0, 1 + EDGE_TOLERANCE / 2, 1)
    assert why == "" and box.x_min == 0.0 and box.x_max == 1.0


def test_read_box_file_filename_and_pixels(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text("filename,label,x_min,y_min,x_max,y_max,extra\n"
                 "a.png,nodule,10,10,20,20,x\n"
                 "a.png,mass,30,30,20,40,x\n"  # inverted
                 "a.png,nodule,10,10,20,20,x\n"  # duplicate, merged
                 "b.png,,1,1,2,2,x\n"  # empty label
                 "c.png,mass,abc,1,2,2,x\n")
    bf = read_box_file(p)
    assert bf.key_column == "filename" and bf.rows_total == 5
    assert bf.skipped == {"empty_label": 1, "box_nan": 1}
    counter = SkipCounter(p)
    boxes = bf.boxes_for("a.png", 100, 50, counter)
    assert [(b.label, b.x_min, b.y_min, b.x_max, b.y_max) for b in boxes] == [("nodule", 0.1, 0.2, 0.2, 0.4)]
    assert counter.counts == {"box_inverted": 1}
    with pytest.raises(DataError, match=r"b\.csv row 3: box_inverted"):
        bf.boxes_for("a.png", 100, 50, SkipCounter(p, strict=True))


def test_read_box_file_uid_normalized(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text("uid,label,x_min,y_min,x_max,y_max\n7,opacity,0.1,0.2,0.3,0.4\n")
    bf = read_box_file(p, coords="normalized")
    assert bf.key_column == "uid"
    assert bf.boxes_for("7", None, None)[0].x_max == 0.3


def test_box_file_errors_name_file_and_column(tmp_path):
    with pytest.raises(DataError, match="box file not found"):
        read_box_file(tmp_path / "nope.csv")
    p = tmp_path / "b.csv"
    p.write_text("filename,label,x_min,y_min,x_max\n")
    with pytest.raises(DataError, match=r"b\.csv: missing column 'y_max'"):
        read_box_file(p)
    p.write_text("image,label,x_min,y_min,x_max,y_max\n")
    with pytest.raises(DataError, match="missing column 'filename'"):
        read_box_file(p)
    p.write_text("filename,label,x_min,y_min,x_max,y_max\n,a,1,1,2,2\n")
    with pytest.raises(DataError, match="row 2: empty_key"):
        read_box_file(p, strict=True)


def test_boxed_examples_skeleton(tmp_path):
    """The box tables' shared skeleton: groups by key, keeps the annotator with the most valid boxes,
    counts images whose boxes all fail as no_valid_box and every row once."""
    from PIL import Image

    from xray_train.data.boxfile import BoxedExamples, RawBox

    Image.new("L", (100, 50)).save(tmp_path / "a.png")
    Image.new("L", (100, 50)).save(tmp_path / "b.png")
    rows = [(2, ("a", "r1", 10, 10, 20, 20)), (3, ("a", "r2", 0, 0, 50, 25)), (4, ("a", "r2", 60, 0, 90, 25)),
            (5, ("b", "r1", 10, 10, 5, 20)), (6, ("", "r1", 1, 1, 2, 2)), (7, ("c", "", 1, 1, 2, 2))]
    out = BoxedExamples(tmp_path / "t.csv", strict=False)
    for key, row, group in out.groups(rows, lambda r: r[0], "empty_key"):
        path = out.locate(tmp_path, key, row, (".png",))
        if path is not None:
            raw = [RawBox("nodule", *r[2:], row=n, reader=r[1]) for n, r in group]
            out.add(path, raw, row=row, image_id=path.name, group_id=key, key=key)
    result = out.result(csv_rows=len(rows))
    assert [ex.image_id for ex in result.examples] == ["a.png"]
    assert [(b.x_min, b.y_max) for b in result.examples[0].boxes] == [(0.0, 0.5), (0.6, 0.5)]  # r2 drew two
    assert result.skipped == {"no_valid_box": 1, "empty_key": 1, "missing_image": 1}
    assert result.first_skipped["missing_image"] == (7, str((tmp_path / "c.png").resolve()))
    assert len(result.examples) + sum(result.skipped.values()) == result.rows_total == 4
    assert result.notes == {"csv_rows": 6, "boxes_skipped": {"box_inverted": 1}}
    normalised = BoxedExamples("t", strict=False)
    ex = normalised.add(tmp_path / "nope.png", [RawBox("x", 0.1, 0.1, 0.2, 0.2, row=1)], row=1, image_id="n",
                        group_id="n", key="n", size=(1, 1))
    assert ex.boxes[0].x_max == 0.2  # normalised boxes need no image header
