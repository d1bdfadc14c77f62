"""Names of the files an xray-train output directory holds, and safe writing of them."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

RESOLVED_CONFIG = "xray_train_config.yaml"  # the validated config of the run that wrote this dir
SUMMARY = "training_summary.json"  # steps, time, samples/s, final metrics, data counts
EVAL_RESULTS = "eval_results.json"  # written by `xray-train evaluate`
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DONE_MARKER = "xray_train_complete.json"  # written last: its presence means the run finished
LOSS_CURVE = "loss_curve.png"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
