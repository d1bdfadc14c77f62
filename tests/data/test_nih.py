import numpy as np
import pytest
from PIL import Image

from xray_train.config import data_config
from xray_train.data import nih
from xray_train.errors import DataError

# Real header (the bracketed name contains commas) and real-style rows with trailing empty fields.
CSV = (
    "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
    "00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661,,,\n"
    "00013118_008.png,Effusion,686.101694915254,131.543050847458,185.491525423729,313.491525423729\n"
    "00014716_007.png,Infiltrate,100,100,-5,50,,,\n"
    "00029817_009.png,Nodule,1000,1000,50,50,,,\n"
    "00099999_000.png,Mass,10,10,20,20,,,\n"
    "../etc/passwd,Mass,10,10,20,20,,,\n"
)


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "BBox_List_2017.csv").write_text(CSV)
    for name in ("00013118_008.png", "00014716_007.png", "00029817_009.png"):
        Image.fromarray(np.zeros((1024, 1024), np.uint8)).save(tmp_path / name)
    return data_config(dataset="nih", csv=tmp_path / "BBox_List_2017.csv", image_root=tmp_path)


def test_reads_boxes_grouped_per_image(cfg):
    res = nih.read(cfg)
    assert res.rows_total == 5 and res.notes["csv_rows"] == 6
    assert len(res.examples) + sum(res.skipped.values()) == res.rows_total
    assert res.skipped == {"no_valid_box": 2, "missing_image": 1, "path_escape": 1}
    assert res.notes["boxes_skipped"] == {"box_inverted": 1, "box_outside": 1}
    (ex,) = res.examples
    assert ex.group_id == "00013118" and ex.image_id == "00013118_008.png"
    assert [b.label for b in ex.boxes] == ["atelectasis", "pleural effusion"]
    b = ex.boxes[0]
    assert b.x_min == pytest.approx(225.084745762712 / 1024)
    assert b.y_max == pytest.approx((547.019216763771 + 79.1864406779661) / 1024)


def test_header_checked(cfg):
    cfg.csv.write_text("Image,Finding Label,Bbox [x,y,w,h]\n")
    with pytest.raises(DataError, match="missing column 'Image Index'"):
        nih.read(cfg)
    with pytest.raises(DataError, match="not found"):
        nih.read(cfg.model_copy(update={"csv": cfg.csv.parent / "nope.csv"}))
