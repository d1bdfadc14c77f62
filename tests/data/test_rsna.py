import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from xray_train.config import data_config
from xray_train.data import rsna
from xray_train.errors import DataError

CSV = (
    "patientId,x,y,width,height,Target\n"
    "0004cfab-14fd-4e49-80ba-63a80b6bddd6,,,,,0\n"
    "00436515-870c-4b36-a041-de91049b9ab4,264.0,152.0,213.0,379.0,1\n"
    "00436515-870c-4b36-a041-de91049b9ab4,562.0,152.0,256.0,453.0,1\n"
    "00704310-78a8-4b38-8475-49f4573b2dbb,,,,,1\n"
    "ffffffff-0000-0000-0000-000000000000,,,,,0\n"
)


def write_dicom(path, rows=1024, cols=1024):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.zeros((rows, cols), np.uint8).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "labels.csv").write_text(CSV)
    for pid in ("0004cfab-14fd-4e49-80ba-63a80b6bddd6", "00704310-78a8-4b38-8475-49f4573b2dbb"):
        write_dicom(tmp_path / f"{pid}.dcm", 64, 64)
    write_dicom(tmp_path / "00436515-870c-4b36-a041-de91049b9ab4.dcm")
    return data_config(dataset="rsna", csv=tmp_path / "labels.csv", image_root=tmp_path)


def test_reads_targets_and_boxes(cfg):
    res = rsna.read(cfg)
    assert res.rows_total == 4 and res.notes["csv_rows"] == 5
    assert len(res.examples) + sum(res.skipped.values()) == res.rows_total
    assert res.skipped == {"no_valid_box": 1, "missing_image": 1}
    assert res.notes["boxes_skipped"] == {"box_nan": 1}
    neg, pos = res.examples
    assert neg.boxes == [] and neg.findings == []
    assert pos.group_id == "00436515-870c-4b36-a041-de91049b9ab4"
    assert [b.label for b in pos.boxes] == ["pneumonia", "pneumonia"]
    assert pos.boxes[1].x_max == pytest.approx((562 + 256) / 1024)
    assert pos.boxes[0].y_max == pytest.approx((152 + 379) / 1024)


def test_size_comes_from_the_dicom_header(cfg, tmp_path):
    write_dicom(tmp_path / "00436515-870c-4b36-a041-de91049b9ab4.dcm", rows=2048, cols=2048)
    pos = rsna.read(cfg).examples[1]
    assert pos.boxes[1].x_max == pytest.approx((562 + 256) / 2048)


def test_strict_and_missing_column(cfg):
    with pytest.raises(DataError, match=r"labels\.csv row \d+"):
        rsna.read(cfg.model_copy(update={"strict": True}))
    cfg.csv.write_text("patientId,x,y,width,height\n")
    with pytest.raises(DataError, match="missing column 'Target'"):
        rsna.read(cfg)
