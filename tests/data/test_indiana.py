import numpy as np
import pytest
from PIL import Image

from xray_train.config import data_config
from xray_train.data import indiana
from xray_train.data.records import Finding
from xray_train.errors import DataError

REPORTS = (
    "uid,MeSH,Problems,image,indication,comparison,findings,impression\n"
    "1,normal,normal,Xray Chest PA and Lateral,XXXX,None.,The lungs are clear.,No acute disease.\n"
    '2,"Opacity/lung/base/left/mild;Aorta, Thoracic/tortuous",Opacity,Xray,XXXX,,"Left base opacity, mild.",x\n'
    "3,Cardiomegaly/borderline,Cardiomegaly,Xray,,,,\n"
    "4,No Indexing,No Indexing,Xray,,,,\n"
    "5,Nodule/lung/upper lobe/right,Nodule,Xray,,,,\n"
)
PROJECTIONS = (
    "uid,filename,projection\n"
    "1,1_IM-0001-4001.dcm.png,Frontal\n"
    "1,1_IM-0001-3001.dcm.png,Lateral\n"
    "2,2_IM-0652-1001.dcm.png,Frontal\n"
    "3,3_IM-1384-1001.dcm.png,Frontal\n"
    "4,4_IM-2050-1001.dcm.png,Frontal\n"
    "5,5_IM-2117-1001.dcm.png,Frontal\n"
    "6,6_IM-9999-1001.dcm.png,Frontal\n"  # uid not in reports
    "1,../escape.png,Frontal\n"
    "2,2_missing.png,Frontal\n"
)


@pytest.fixture
def layout(tmp_path):
    (tmp_path / "indiana_reports.csv").write_text(REPORTS)
    (tmp_path / "indiana_projections.csv").write_text(PROJECTIONS)
    root = tmp_path / "images" / "images_normalized"
    root.mkdir(parents=True)
    for line in PROJECTIONS.splitlines()[1:]:
        name = line.split(",")[1]
        if "missing" not in name and ".." not in name and "IM-9999" not in name:
            # 16-bit on purpose: readers must only read headers, never care about depth.
            Image.fromarray(np.zeros((60, 50), np.uint16)).save(root / name)
    return tmp_path, root


def cfg_for(tmp_path, root, **kw):
    return data_config(dataset="indiana", image_root=root, reports_csv=tmp_path / "indiana_reports.csv",
                      projections_csv=tmp_path / "indiana_projections.csv", **kw)


def test_mesh_atlas_reader(layout):
    tmp_path, root = layout
    res = indiana.read(cfg_for(tmp_path, root))
    assert res.rows_total == 9
    assert len(res.examples) + sum(res.skipped.values()) == res.rows_total
    assert res.skipped == {"filtered_projection": 1, "abnormal_without_box": 1, "no_mesh": 1, "unknown_uid": 1,
                           "path_escape": 1, "missing_image": 1}
    by_id = {e.image_id: e for e in res.examples}
    assert set(by_id) == {"1_IM-0001-4001.dcm.png", "2_IM-0652-1001.dcm.png", "5_IM-2117-1001.dcm.png"}
    normal = by_id["1_IM-0001-4001.dcm.png"]
    assert normal.findings == [] and normal.boxes == [] and normal.group_id == "1"
    e2 = by_id["2_IM-0652-1001.dcm.png"]
    assert e2.findings == [Finding("opacity", ("lung", "base", "left")), Finding("aorta, thoracic", ())]
    assert [b.label for b in e2.boxes] == ["opacity", "aorta, thoracic"]
    assert e2.boxes[0].x_min > 0.5  # patient's left = image right
    assert e2.source_row == 4
    assert "weak_boxes" in res.notes


def test_projection_filter_rule(layout):
    tmp_path, root = layout
    assert indiana.kept_projections(cfg_for(tmp_path, root)) == {"Frontal"}
    both = cfg_for(tmp_path, root, projections=["Frontal", "Lateral"])
    res = indiana.read(both)
    assert "filtered_projection" not in res.skipped
    assert "1_IM-0001-3001.dcm.png" in {e.image_id for e in res.examples}


def test_box_file_by_filename_and_uid(layout):
    tmp_path, root = layout
    bf = tmp_path / "boxes.csv"
    bf.write_text("filename,label,x_min,y_min,x_max,y_max\n"
                  "3_IM-1384-1001.dcm.png,cardiomegaly,10,30,40,54\n"
                  "3_IM-1384-1001.dcm.png,bad,10,30,5,54\n"
                  "nowhere.png,x,1,1,2,2\n")
    res = indiana.read(cfg_for(tmp_path, root, box_source="box_file", box_file=bf))
    e3 = next(e for e in res.examples if e.group_id == "3")
    assert [(b.x_min, b.y_min, b.x_max, b.y_max) for b in e3.boxes] == [(0.2, 0.5, 0.8, 0.9)]  # 50x60 image
    assert res.notes["boxes_skipped"] == {"box_inverted": 1}
    assert res.notes["box_keys_unmatched"] == 1
    # abnormal studies with no box rows are not turned into "no localisable finding" examples
    assert res.skipped["abnormal_without_box"] == 2
    assert len(res.examples) + sum(res.skipped.values()) == res.rows_total

    bf.write_text("uid,label,x_min,y_min,x_max,y_max\n5,nodule,0.1,0.1,0.2,0.2\n")
    res = indiana.read(cfg_for(tmp_path, root, box_source="box_file", box_file=bf, box_coords="normalized",
                               projections=["Frontal", "Lateral"]))
    e5 = [e for e in res.examples if e.group_id == "5"]
    assert len(e5) == 1 and e5[0].boxes[0].x_max == 0.2


def test_errors_name_file_and_column(layout, tmp_path):
    base, root = layout
    with pytest.raises(DataError, match="indiana_projections.csv"):
        indiana.read(data_config(dataset="indiana", image_root=root, reports_csv=base / "indiana_reports.csv",
                                projections_csv=base / "nope" / "indiana_projections.csv"))
    (base / "indiana_projections.csv").write_text("uid,file,projection\n")
    with pytest.raises(DataError, match=r"indiana_projections\.csv: missing column 'filename'"):
        indiana.read(cfg_for(base, root))


def test_strict_fails_on_bad_row_but_not_on_filter(layout):
    tmp_path, root = layout
    with pytest.raises(DataError, match=r"indiana_projections\.csv row \d+: .*--strict"):
        indiana.read(cfg_for(tmp_path, root, strict=True))
    (tmp_path / "indiana_projections.csv").write_text(
        "uid,filename,projection\n1,1_IM-0001-4001.dcm.png,Frontal\n1,1_IM-0001-3001.dcm.png,Lateral\n")
    res = indiana.read(cfg_for(tmp_path, root, strict=True))
    assert len(res.examples) == 1 and res.skipped == {"filtered_projection": 1}


def test_reads_generated_sample_layout(tmp_path):
    from xray_train.testing.synthetic import write_indiana

    paths = write_indiana(tmp_path, n=6, seed=1)
    cfg = data_config(dataset="indiana", image_root=paths["image_root"], reports_csv=paths["reports_csv"],
                     projections_csv=paths["projections_csv"], box_source="box_file", box_file=paths["box_file"])
    res = indiana.read(cfg)
    assert len(res.examples) == 6 and res.notes["boxes_skipped"] == {}
    for e in res.examples:
        assert {b.label for b in e.boxes} == {f.name for f in e.findings}
