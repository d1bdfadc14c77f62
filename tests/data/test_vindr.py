import numpy as np
import pytest
from PIL import Image

from xray_train.config import data_config
from xray_train.data import vindr
from xray_train.errors import DataError

CSV = (
    "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"
    "aaa,No finding,14,R1,,,,\n"
    "aaa,No finding,14,R2,,,,\n"
    "aaa,No finding,14,R3,,,,\n"
    "bbb,Cardiomegaly,3,R8,50,120,150,180\n"
    "bbb,Cardiomegaly,3,R9,52,118,148,182\n"
    "bbb,Nodule/Mass,8,R9,20,20,30,30\n"
    "bbb,No finding,14,R10,,,,\n"
    "ccc,Aortic enlargement,0,R1,10,10,5,20\n"
    "ddd,No finding,14,R1,,,,\n"
)


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "train.csv").write_text(CSV)
    # non-square on purpose: x is normalised by width, y by height
    Image.fromarray(np.zeros((200, 160), np.uint16)).save(tmp_path / "aaa.png")
    Image.fromarray(np.zeros((200, 160), np.uint16)).save(tmp_path / "bbb.png")
    Image.fromarray(np.zeros((200, 160), np.uint16)).save(tmp_path / "ccc.png")
    return data_config(dataset="vindr", csv=tmp_path / "train.csv", image_root=tmp_path)


def test_radiologist_with_most_boxes_is_kept(cfg):
    res = vindr.read(cfg)
    assert res.rows_total == 4 and res.notes["csv_rows"] == 9
    assert len(res.examples) + sum(res.skipped.values()) == res.rows_total
    assert res.skipped == {"no_valid_box": 1, "missing_image": 1}
    assert res.notes["boxes_skipped"] == {"box_inverted": 1}
    by_id = {e.group_id: e for e in res.examples}
    assert by_id["aaa"].boxes == [] and by_id["aaa"].findings == []
    bbb = by_id["bbb"]
    assert [b.label for b in bbb.boxes] == ["cardiomegaly", "nodule/mass"]  # R9's two boxes
    assert (bbb.boxes[0].x_min, bbb.boxes[0].y_min) == (52 / 160, 118 / 200)
    assert [f.name for f in bbb.findings] == ["cardiomegaly", "nodule/mass"]


def test_dicom_suffix_found(cfg, tmp_path):
    (tmp_path / "aaa.png").rename(tmp_path / "aaa.dcm")  # only the name matters until a header is needed
    res = vindr.read(cfg)
    assert any(e.image_path.name == "aaa.dcm" for e in res.examples)


def test_missing_column(cfg):
    cfg.csv.write_text("image_id,class_name,x_min,y_min,x_max\n")
    with pytest.raises(DataError, match=r"train\.csv: missing column 'y_max'"):
        vindr.read(cfg)
