"""Names of the files an xray-train output directory holds, and safe writing of them."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from xray_train.errors import XrayTrainError

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
        # mkstemp creates 0600; outputs are shared (teammates, a Hub upload job), so use the umask.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()

#: errno values that mean "the disk (or the user's quota) is full".
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# torch.save and safetensors report a full disk as RuntimeError/SafetensorError with these texts.
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "file write failed")


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    return any(text in str(exc) for text in _DISK_FULL_TEXTS)


@contextmanager
def disk_full_as_error(where: Path | str, advice: str = ""):
    """Turn a full disk while writing under ``where`` into one clear line naming the path."""
    try:
        yield
    except XrayTrainError:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        path = getattr(exc, "filename", None) or where
        extra = f"; {advice}" if advice else ""
        raise XrayTrainError(f"disk full while writing {path}{extra}") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
