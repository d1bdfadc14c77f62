"""Fixtures for the data tests: tiny PadChest CSVs with the real header and quirky cells, tiny images."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray_train.config import DataConfig, data_config

PADCHEST_COLUMNS = [
    "", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
    "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric", "Modality_DICOM", "Manufacturer_DICOM",
    "PhotometricInterpretation_DICOM", "PixelRepresentation_DICOM", "PixelAspectRatio_DICOM",
    "SpatialResolution_DICOM", "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM",
    "Columns_DICOM", "XRayTubeCurrent_DICOM", "Exposure_DICOM", "ExposureInuAs_DICOM", "ExposureTime",
    "RelativeXRayExposure_DICOM", "ReportID", "Report", "MethodLabel", "Labels", "Localizations",
    "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS",
]  # fmt: skip

# Cell strings copied from the real file (torchxrayvision 1.5.7's copy of PadChest).
PHYSICIAN_ROW = {
    "Labels": "['pulmonary fibrosis', 'chronic changes', 'kyphosis', 'pseudonodule', 'ground glass pattern']",
    "Localizations": "['loc basal bilateral', 'loc basal']",
    "LabelsLocalizationsBySentence": "[['pulmonary fibrosis', 'loc basal bilateral'], ['chronic changes'], "
    "['kyphosis'], ['pseudonodule', 'ground glass pattern', 'loc basal']]",
    "MethodLabel": "Physician",
    # numpy-array repr without commas, with a newline inside the quoted cell
    "labelCUIS": "['C0034069' 'C0742362' 'C2115817' 'C3544344'\n 'C0332558']",
}
RNN_ROW = {
    "Labels": "['cardiomegaly', ' vascular hilar enlargement', 'costophrenic angle blunting', ' pleural effusion', "
    "'heart insufficiency']",
    "Localizations": "['loc left', 'loc hilar', 'loc costophrenic angle', 'loc cardiac']",
    "LabelsLocalizationsBySentence": "['cardiomegaly', ' vascular hilar enlargement', 'loc hilar', 'loc cardiac', "
    "'loc left', 'costophrenic angle blunting', ' pleural effusion', 'loc costophrenic angle', "
    "'heart insufficiency']",
    "MethodLabel": "RNN_model",
}
NORMAL_ROW = {
    "Labels": "['normal']",
    "Localizations": "[]",
    "LabelsLocalizationsBySentence": "[['normal'], ['normal']]",
    "MethodLabel": "Physician",
}


def padchest_row(i: int, **overrides) -> dict:
    """A complete 36-column row with realistic defaults (``None`` in DICOM columns, stemmed report)."""
    row = {c: "None" for c in PADCHEST_COLUMNS}
    row.update(
        {
            "": str(i),
            "ImageID": f"2053668664013634823614867989145588646{i}_k6ga29.png",
            "ImageDir": str(i % 3),
            "StudyDate_DICOM": "20140915",
            "StudyID": f"study{i}",
            "PatientID": f"patient{i}",
            "PatientBirth": "1930.0",
            "PatientSex_DICOM": "F",
            "ViewPosition_DICOM": "POSTEROANTERIOR",
            "Projection": "PA",
            "MethodProjection": "Manual review of DICOM fields",
            "Pediatric": "No",
            "Modality_DICOM": "CR",
            "PhotometricInterpretation_DICOM": "MONOCHROME2",
            "BitsStored_DICOM": "12",
            "Rows_DICOM": "1728",
            "Columns_DICOM": "1872",
            "ReportID": str(4765777 + i),
            "Report": " sin hallazg patolog edad pacient .",
            "labelCUIS": "[]",
            "LocalizationsCUIS": "[]",
        }
    )
    row.update(NORMAL_ROW)
    row.update(overrides)
    return row


def write_csv(path: Path, rows: list[dict], columns: list[str] = PADCHEST_COLUMNS) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


class PadChestFixture:
    """A tmp PadChest: CSV + one small PNG per row (nested layout unless ``layout='flat'``)."""

    COLUMNS = PADCHEST_COLUMNS
    PHYSICIAN = PHYSICIAN_ROW
    RNN = RNN_ROW
    NORMAL = NORMAL_ROW
    row = staticmethod(padchest_row)
    write_csv = staticmethod(write_csv)

    def __init__(self, root: Path):
        self.root = root
        self.image_root = root / "images"
        self.image_root.mkdir(parents=True, exist_ok=True)

    def build(
        self, rows: list[dict], layout: str = "nested", images: bool = True, name: str = "padchest.csv", **cfg
    ) -> DataConfig:
        csv_path = write_csv(self.root / name, rows)
        if images:
            for row in rows:
                rel = Path(row["ImageDir"], row["ImageID"]) if layout == "nested" else Path(row["ImageID"])
                if ".." in row["ImageID"] or row["ImageID"].startswith("/") or not row["ImageID"].strip():
                    continue
                write_png(self.image_root / rel, np.full((8, 6), 100, dtype=np.uint8))
        return data_config(dataset="padchest", csv=csv_path, image_root=self.image_root, **cfg)


@pytest.fixture
def padchest(tmp_path: Path) -> PadChestFixture:
    return PadChestFixture(tmp_path)


@pytest.fixture
def png():
    """``png(path, array)`` writes an image with PIL (mode from the array's dtype)."""
    return write_png
