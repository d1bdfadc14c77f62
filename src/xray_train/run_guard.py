"""What keeps a run directory's contents true: one writer at a time (a lock file held for the whole run),
and a rerun resumes only checkpoints of the adapter it would build itself."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

from xray_train.errors import XrayTrainError

logger = logging.getLogger("xray_train")

LOCK = "xray_train.lock"  # present while a run writes the directory: who holds it (pid, host, start time)


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell a live run from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(holder: dict) -> bool:
    """Is the holder, a process on this host, still running? A reused pid is not the holder."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    started = holder.get("pid_start")
    return started is None or _process_start(pid) in (None, started)


def _flock_works(directory: Path) -> bool:
    """Some network file systems have no ``flock`` (or refuse it): probed on the directory itself."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF):
            return False
        raise
    finally:
        os.close(fd)
    return True


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"


class OutputDirLock:
    """Held by the one process that writes an output_dir, from before it decides to create, overwrite or
    resume the directory until the run ends, so a second run into the same directory is refused instead
    of training over the first.

    ``fcntl.flock`` on the lock file: the kernel releases it when the holder dies, even by SIGKILL, so a
    lock left by a killed run is taken over at once (with a warning naming it). On file systems without
    ``flock`` the file is created with ``O_EXCL`` and a holder on this host whose pid is gone (or reused)
    is taken over; a holder on another host cannot be checked from here and is refused.
    """

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self._fd: int | None = None

    def _busy(self, holder: dict) -> XrayTrainError:
        return XrayTrainError(
            f"output_dir: {self.directory} is in use by another run ({_describe(holder)}); wait for it to "
            f"finish or choose another output_dir (if that run is gone, delete {self.path})"
        )

    def _me(self) -> bytes:
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pid_start": _process_start(os.getpid()),
        }
        return json.dumps(me).encode()

    @staticmethod
    def _holder(fd: int) -> dict:
        try:
            data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def acquire(self) -> "OutputDirLock":
        import fcntl

        self.directory.mkdir(parents=True, exist_ok=True)
        if not _flock_works(self.directory):
            return self._acquire_exclusive_create()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise self._busy(holder) from None
            # A run that releases deletes the file before unlocking it: lock the file at the path, not a
            # deleted one.
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        previous = self._holder(fd)
        if previous:
            logger.warning("output_dir: taking over the lock of a run that ended without releasing it (%s)",
                           _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._me(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _acquire_exclusive_create(self) -> "OutputDirLock":
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                holder = self._holder(fd)
                os.close(fd)
                if holder.get("host") != socket.gethostname() or _alive(holder):
                    raise self._busy(holder) from None
                logger.warning("output_dir: taking over the lock of a run that is no longer running (%s)",
                               _describe(holder))
                self.path.unlink(missing_ok=True)
                continue
            os.write(fd, self._me())
            os.fsync(fd)
            self._fd = fd
            return self
        raise self._busy({})

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: nobody may lock a file about to vanish
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# A rerun resumes only what it would build itself

#: Settings that decide what adapter a checkpoint holds. Resumed under other values, the checkpoint fails to
#: load (rank, targets, loc rows, projector) or quietly trains on as something else (scale, dropout, base).
ADAPTER_SETTINGS = (
    "phase", "model.base", "model.revision", "model.load_in_4bit", "model.quant_type", "model.double_quant",
    "model.add_loc_tokens", "model.train_projector", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules",
)  # fmt: skip


def _setting(config: dict, key: str):
    node = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return sorted(set(node)) if key == "lora.target_modules" and isinstance(node, list) else node


def adapter_setting_changes(saved: dict, current: dict) -> list[str]:
    """``["lora.r 32 -> 8"]``: each adapter setting that ``current`` changes from ``saved`` (resolved config
    dicts, as ``dump_config`` writes them)."""
    return [
        f"{key} {_setting(saved, key)!r} -> {_setting(current, key)!r}"
        for key in ADAPTER_SETTINGS
        if _setting(saved, key) != _setting(current, key)
    ]
