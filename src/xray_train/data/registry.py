"""Dataset readers by name. Adding a dataset = one reader module with ``read(cfg) -> ReadResult`` +
one entry here + one fixture test."""

from __future__ import annotations

import importlib

from xray_train.config import DataConfig
from xray_train.data.records import ReadResult

#: dataset name -> module under xray_train.data exposing ``read(cfg: DataConfig) -> ReadResult``
READERS: dict[str, str] = {
    "padchest": "xray_train.data.padchest",
    "indiana": "xray_train.data.indiana",
    "nih": "xray_train.data.nih",
    "vindr": "xray_train.data.vindr",
    "rsna": "xray_train.data.rsna",
}


def read_dataset(cfg: DataConfig) -> ReadResult:
    """Read the configured dataset; rows that can't be used are counted (or raise under cfg.strict)."""
    module = importlib.import_module(READERS[cfg.dataset])
    return module.read(cfg)
