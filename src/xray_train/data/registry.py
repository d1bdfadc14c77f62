"""Every dataset xray-train reads, each in one entry: the ``data.dataset`` name, its data-config class, its
reader, the phase(s) it serves and the name the model card gives it. ``config.py`` (the union of data
sections, the phase check, the path checks) and the model card ask this table; nothing else lists datasets.

Adding a dataset = its data-config class in ``config.py`` (where every option is declared) + one reader
module with ``read(cfg) -> ReadResult`` + one entry here + one fixture test. This module imports nothing
that imports ``config.py``, so ``config.py`` can ask it while its classes are being defined.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from xray_train.data.records import ReadResult


@dataclass(frozen=True)
class DatasetEntry:
    #: ``data.dataset`` in a config.
    name: str
    #: The dataset's data section: the name of a class in ``xray_train.config`` (which resolves it, in
    #: ``DATA_CLASSES``) whose ``dataset`` field is ``Literal[name]``.
    config: str
    #: Module exposing ``read(cfg) -> ReadResult``.
    reader: str
    #: Phases it gives targets for: phase1 (report text) and/or phase2 (boxes).
    phases: tuple[str, ...]
    #: The dataset as the model card names it.
    title: str
    #: Data keys that must name existing files or folders, checked with the rest of the config before any read.
    required_paths: tuple[str, ...] = ("image_root",)

    def read(self, cfg) -> ReadResult:
        """``cfg``: the validated data section (``config.DataConfig``) of this dataset."""
        return importlib.import_module(self.reader).read(cfg)


DATASETS: dict[str, DatasetEntry] = {entry.name: entry for entry in (
    DatasetEntry("padchest", "PadchestData", "xray_train.data.padchest", ("phase1",), "PadChest (BIMCV)",
                 ("image_root", "csv")),
    DatasetEntry("indiana", "IndianaData", "xray_train.data.indiana", ("phase2",),
                 "Indiana University Chest X-ray collection (OpenI)",
                 ("image_root", "reports_csv", "projections_csv")),
    DatasetEntry("nih", "NihData", "xray_train.data.nih", ("phase2",), "NIH ChestX-ray14 (bounding-box subset)",
                 ("image_root", "csv")),
    DatasetEntry("vindr", "VindrData", "xray_train.data.vindr", ("phase2",), "VinDr-CXR", ("image_root", "csv")),
    DatasetEntry("rsna", "RsnaData", "xray_train.data.rsna", ("phase2",), "RSNA Pneumonia Detection Challenge",
                 ("image_root", "csv")),
    # A Hub id, parquet / JSON lines / CSV files or an image folder, read with Hugging Face ``datasets``;
    # which phase a config can train is decided by the columns it maps (``HfData.phase_problems``).
    DatasetEntry("hf", "HfData", "xray_train.data.hf", ("phase1", "phase2"), "Hugging Face dataset", ()),
)}


def datasets_for(phase: str) -> list[str]:
    """The dataset names that give ``phase``'s targets, in table order."""
    return [name for name, entry in DATASETS.items() if phase in entry.phases]


def title(name: str | None) -> str | None:
    """The model card's name of a dataset; an unknown name (or None) is given back as it is."""
    entry = DATASETS.get(name) if isinstance(name, str) else None
    return entry.title if entry is not None else name


def read_dataset(cfg) -> ReadResult:
    """Read the configured dataset; rows that can't be used are counted (or raise under cfg.strict)."""
    return DATASETS[cfg.dataset].read(cfg)
