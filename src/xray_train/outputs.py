"""Writing output files safely: whole (temp file, fsync, rename), with the user's umask's modes, and a full
disk reported as one line naming the path. Which files a run directory holds is ``run_dir``'s business."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from xray_train.errors import XrayTrainError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
#: What ``open()`` and ``mkdir()`` would give under the user's umask (0644 / 0755 under 022).
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; outputs are shared (teammates, a Hub upload job), so use the umask.
        os.fchmod(fd, FILE_MODE)
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


def staging_dir(parent: Path, prefix: str) -> Path:
    """A fresh folder under ``parent`` to build outputs in before moving them into place.

    ``mkdtemp`` makes it 0700, which a rename of the whole folder would keep: set the umask's mode.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(DIR_MODE)
    return path


def share_like_umask(root: Path) -> None:
    """Give ``root`` and everything in it the umask's modes.

    safetensors writes through a private temp file, so every ``*.safetensors`` that transformers or
    peft save is 0600; outputs are shared (teammates, a Hub upload job, a serving user).
    """
    root = Path(root)
    root.chmod(DIR_MODE if root.is_dir() else FILE_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), DIR_MODE)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), FILE_MODE)


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
