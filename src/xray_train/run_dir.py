"""The output-directory contract: what a run directory holds, how it is written and how it is read.

A run directory (``output_dir``) holds the adapter, the processor, the resolved config (every "auto"
decided), the lineage (which Phase-1 adapter a Phase-2 run continued, by path and sha256), the summary,
resumable ``checkpoint-N`` folders (each with the resolved config and lineage too) and, written last, the
done marker. Every file is written whole (temp file, fsync, rename), so a reader never sees half of one;
a checkpoint counts only once its own completion marker is written. One run writes a directory at a time
(a lock file held for the whole run), and a rerun resumes only checkpoints of the adapter it would build
itself. ``RunDir`` is how every other module reads one: training, evaluation, prediction, merging and
publishing.

Over 400 lines because it is one contract: the file names, how each file is checked, the lock and the
resume rule all describe the same folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from xray_train.errors import XrayTrainError
from xray_train.outputs import atomic_write_bytes, atomic_write_json, atomic_write_text, share_like_umask

if TYPE_CHECKING:
    from xray_train.config import RunConfig

logger = logging.getLogger("xray_train")

RESOLVED_CONFIG = "xray_train_config.yaml"  # the validated config of the run that wrote this dir
SUMMARY = "training_summary.json"  # steps, time, samples/s, final metrics, data counts
EVAL_RESULTS = "eval_results.json"  # written by `xray-train evaluate`
EVAL_MARKDOWN = "eval_results.md"  # the same results as tables (adapter beside the base model)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DONE_MARKER = "xray_train_complete.json"  # written last: its presence means the run finished
LOSS_CURVE = "loss_curve.png"
CHECKPOINT_COMPLETE = "xray_train_checkpoint_complete"  # written last into each checkpoint-N
LINEAGE = "xray_train_lineage.json"  # the parent run this one continued (Phase 2: the Phase-1 adapter)
LOCK = "xray_train.lock"  # present while a run writes the directory: who holds it (pid, host, start time)
PEFT_PLACEHOLDER_CARD = "README.md"  # peft's save_pretrained writes an empty model card under this name
#: Files of the run directory that each checkpoint-N carries a copy of.
CHECKPOINT_RECORDS = (RESOLVED_CONFIG, LINEAGE)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.split("-")[-1])
    except ValueError:
        return -1


def safetensors_problem(path: Path) -> str | None:
    """Header parses and the file is as long as the header says (a truncated save is not)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                return f"{path.name} is truncated"
            header = json.loads(fh.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return f"{path.name} is unreadable"
    if 8 + n + max(ends, default=0) != size:
        return f"{path.name} is truncated"
    return None


def torch_zip_problem(path: Path) -> str | None:
    """torch.save writes a zip archive whose directory is at the end: a truncated file has none.
    Checked without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as zf:
            if not zf.namelist():
                return f"{path.name} is empty"
    except (OSError, zipfile.BadZipFile):
        return f"{path.name} is truncated or unreadable"
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from, or None. The completion marker is written after every
    file of the save; the files are still checked since a disk can lose what was written before a crash."""
    if not (ckpt / CHECKPOINT_COMPLETE).is_file():
        return "its save did not complete"
    state = ckpt / "trainer_state.json"
    try:
        if not isinstance(json.loads(state.read_text(encoding="utf-8")).get("global_step"), int):
            return "trainer_state.json has no global_step"
    except (OSError, ValueError, AttributeError):
        return "trainer_state.json is missing or unreadable"
    weights = ckpt / ADAPTER_WEIGHTS
    if not weights.is_file():
        return f"{ADAPTER_WEIGHTS} is missing"
    problem = safetensors_problem(weights)
    if problem:
        return problem
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (ckpt / name).is_file():
            return f"{name} is missing"
        problem = torch_zip_problem(ckpt / name)
        if problem:
            return problem
    rng = sorted(ckpt.glob("rng_state*.pth"))
    if not rng:
        return "rng_state.pth is missing"
    for path in rng:
        problem = torch_zip_problem(path)
        if problem:
            return problem
    return None


def find_resumable_checkpoint(output_dir: Path) -> Path | None:
    """Newest checkpoint whose save completed and whose files are intact. A half-written or damaged
    one (killed while saving, disk trouble) is renamed aside, so neither we nor the Trainer (which
    rotates ``checkpoint-*``) trip over it, and the previous one is used."""
    checkpoints = sorted(
        (p for p in output_dir.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) >= 0),
        key=checkpoint_step,
        reverse=True,
    )
    for ckpt in checkpoints:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        aside = ckpt.with_name(f"incomplete-{ckpt.name}-{int(time.time())}")
        logger.warning("Not resuming from %s: %s (moved to %s)", ckpt.name, problem, aside.name)
        try:
            ckpt.rename(aside)
        except FileNotFoundError:  # another rank of the same run moved it first
            pass
    return None


def find_last_good(output_dir: Path) -> Path | None:
    done = [p for p in output_dir.glob("checkpoint-*") if (p / CHECKPOINT_COMPLETE).is_file()]
    return max(done, key=checkpoint_step) if done else None


# ---------------------------------------------------------------------------------------------
# Reading and writing one run directory


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RunDir:
    """One output directory: the names of its files, reading them typed, writing them whole."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    # -- state ---------------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.path.is_dir()

    def is_finished(self) -> bool:
        return self.file(DONE_MARKER).is_file()

    def finished_phase(self) -> str | None:
        """The phase the done marker names, or None (no marker, or an unreadable one)."""
        try:
            return json.loads(self.file(DONE_MARKER).read_text(encoding="utf-8")).get("phase")
        except (OSError, ValueError, AttributeError):
            return None

    def has_adapter(self) -> bool:
        return self.file(ADAPTER_CONFIG).is_file()

    def require_adapter(self) -> "RunDir":
        if not self.has_adapter():
            raise XrayTrainError(f"{self.path}: not an adapter dir (no {ADAPTER_CONFIG})")
        return self

    # -- typed reading -------------------------------------------------------------------------

    def has_config(self) -> bool:
        return self.file(RESOLVED_CONFIG).is_file()

    def config_dict(self) -> dict:
        """The saved config as written (a mapping), or a one-line error naming the file."""
        path = self.file(RESOLVED_CONFIG)
        if not path.is_file():
            raise XrayTrainError(f"{path}: missing (the saved run config; is this an xray-train output dir?)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise XrayTrainError(f"{path}: not readable YAML ({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise XrayTrainError(f"{path}: expected a mapping at the top level")
        return data

    def config(self) -> "RunConfig":
        """The run's config, validated (the resolved one for runs that resolved their settings)."""
        from pydantic import ValidationError

        from xray_train.config import DATA_CLASSES, RunConfig

        data = self.config_dict()
        try:
            return RunConfig.model_validate(data, context={"saved": True})
        except ValidationError as exc:
            errors = exc.errors()
        # Keys this version does not know (a config saved by another version) are not a reason to
        # refuse a finished run; anything else is.
        if all(e["type"] == "extra_forbidden" for e in errors):
            for e in errors:
                loc = [p for i, p in enumerate(e["loc"]) if not (i == 1 and p in DATA_CLASSES)]
                node = data
                for part in loc[:-1]:
                    node = node.get(part, {}) if isinstance(node, dict) else {}
                if isinstance(node, dict):
                    node.pop(loc[-1], None)
            try:
                return RunConfig.model_validate(data, context={"saved": True})
            except ValidationError as exc:
                errors = exc.errors()
        first = errors[0]
        key = ".".join(str(p) for p in first["loc"])
        raise XrayTrainError(f"{self.file(RESOLVED_CONFIG)}: {key}: {first['msg']}") from None

    def adapter_config(self) -> dict:
        path = self.require_adapter().file(ADAPTER_CONFIG)
        data = self.read_json(ADAPTER_CONFIG)
        if not isinstance(data, dict):
            raise XrayTrainError(f"{path}: expected a JSON object")
        return data

    def has_loc_rows(self) -> bool:
        """Does the adapter train ``<loc>`` token rows (a Phase-2 adapter)?"""
        try:
            return bool(self.adapter_config().get("trainable_token_indices"))
        except XrayTrainError:
            return False

    def read_json(self, name: str) -> Any:
        """A JSON file of the directory, or None if it is absent."""
        path = self.file(name)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise XrayTrainError(f"{path}: not valid JSON ({type(exc).__name__})") from None

    def adapter_sha256(self) -> str:
        path = self.file(ADAPTER_WEIGHTS)
        if not path.is_file():
            raise XrayTrainError(f"{path}: missing")
        return sha256_of(path)

    def lineage(self) -> dict | None:
        """``{"phase", "parent": {"path", "phase", "dataset", "adapter_sha256"} | None}``, or None if the
        directory records none."""
        data = self.read_json(LINEAGE)
        return data if isinstance(data, dict) else None

    def parent(self) -> dict | None:
        return (self.lineage() or {}).get("parent")

    # -- writing -------------------------------------------------------------------------------

    def write_config(self, cfg: "RunConfig") -> None:
        """The resolved config, recorded so that it reads the same from any working directory: a local base
        by its absolute path and fingerprint, data paths absolute."""
        from xray_train.config import dump_config

        atomic_write_text(self.file(RESOLVED_CONFIG), dump_config(portable_config(cfg)))

    def base_to_load(self, base: str | None = None) -> tuple[str, str | None]:
        """``(base, revision)`` to load this run's adapter on: ``base`` when given (the user's), else the base
        the run recorded. A recorded local folder must still hold the model trained on (same fingerprint); a
        relative one (written before bases were recorded absolute) is looked for under the run's ancestor
        folders too. Each failure is one line that says how to point at a moved base."""
        model = self.config().model if self.has_config() else None
        if model is None:
            from xray_train.config import ModelConfig

            model = ModelConfig()
        recorded = model.base
        if base is not None and absolute_base(base) == absolute_base(recorded):
            base = None  # the recorded base, passed on (evaluate's config): checked as recorded
        if base is not None:
            if model.base_fingerprint and looks_local(base) and base_is_there(base):
                if base_fingerprint(base) != model.base_fingerprint:
                    logger.warning("%s is not the base this adapter was trained on (%s: its fingerprint differs); "
                                   "its answers may be meaningless", base, recorded)
            return base, (model.revision if base == recorded else None)
        if not looks_local(recorded):
            return recorded, model.revision
        moved = (
            f"if it moved, point at it: `--base DIR` (xray-train predict, merge) or "
            f"`xray_train.load_adapter({str(self.path)!r}, base=DIR)`"
        )
        found = _find_recorded_base(recorded, self.path)
        if found is None:
            raise XrayTrainError(
                f"model.base: the base this adapter was trained on is not at {recorded} (no config.json; recorded "
                f"in {self.file(RESOLVED_CONFIG)}); {moved}"
            )
        if model.base_fingerprint and base_fingerprint(found) != model.base_fingerprint:
            raise XrayTrainError(
                f"model.base: {found} no longer holds the model this adapter was trained on (its fingerprint "
                f"differs from the one recorded in {self.file(RESOLVED_CONFIG)}); {moved}"
            )
        return found, None

    def write_lineage(self, phase: str, parent: "RunDir | None") -> None:
        from xray_train.bundled import reads_bundled_samples

        record: dict[str, Any] = {"phase": phase, "parent": None}
        if parent is not None:
            record["parent"] = {
                "path": str(parent.path.resolve()),
                "phase": parent.finished_phase(),
                "dataset": parent.config().data.dataset if parent.has_config() else None,
                "synthetic_sample": reads_bundled_samples(parent.config_dict().get("data")) if parent.has_config() else None,
                "adapter_sha256": parent.adapter_sha256(),
            }
        atomic_write_json(self.file(LINEAGE), record)

    def copy_records_into(self, checkpoint: Path) -> None:
        """The resolved config and lineage into ``checkpoint``: a checkpoint says how it was made."""
        for name in CHECKPOINT_RECORDS:
            if self.file(name).is_file():
                atomic_write_bytes(Path(checkpoint) / name, self.file(name).read_bytes())

    def mark_checkpoint_complete(self, checkpoint: Path, step: int) -> None:
        atomic_write_text(Path(checkpoint) / CHECKPOINT_COMPLETE, str(step))

    def mark_finished(self, phase: str, global_steps: int) -> None:
        """Written last: from here on the directory is a finished run and is never overwritten silently."""
        atomic_write_json(self.file(DONE_MARKER), {"phase": phase, "global_steps": global_steps})

    def move_in(self, staging: Path) -> None:
        """Move every item of ``staging`` into the directory, replacing what is there, one rename each."""
        share_like_umask(staging)
        for item in Path(staging).iterdir():
            target = self.path / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)

    def clear(self) -> None:
        """``--overwrite``: delete everything but the lock this run holds (deleting it would let a second
        run in)."""
        for item in self.path.iterdir():
            if item.name == LOCK:
                continue
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()

    # -- checkpoints ---------------------------------------------------------------------------

    def resumable_checkpoint(self) -> Path | None:
        return find_resumable_checkpoint(self.path)

    def last_good_checkpoint(self) -> Path | None:
        return find_last_good(self.path)

    def check_rerun(self, cfg: "RunConfig") -> None:
        """A rerun resumes the newest intact checkpoint, which holds the adapter the directory's saved config
        describes: a rerun that would build another one (other rank, targets, base, ...) stops here, naming
        the changed settings, before anything on disk changes."""
        checkpoints = sorted(
            (p for p in self.path.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) >= 0),
            key=checkpoint_step,
            reverse=True,
        )
        newest = next((c for c in checkpoints if checkpoint_problem(c) is None), None)
        if newest is None or not self.has_config():
            return
        changes = adapter_setting_changes(_adapter_view(self.config_dict()), _adapter_view(cfg.model_dump(mode="json")))
        if changes:
            raise XrayTrainError(
                f"output_dir: {self.path} holds {newest.name}, made with other adapter settings "
                f"({'; '.join(changes)}); pass --overwrite to start this run over, or restore these settings to "
                f"resume from {newest.name}"
            )

    # -- one writer at a time ------------------------------------------------------------------

    def lock(self) -> "OutputDirLock":
        """The directory's lock, not yet taken: ``with run_dir.lock(): ...`` or ``.acquire()``."""
        return OutputDirLock(self.path)


# ---------------------------------------------------------------------------------------------
# A run directory that reads the same from anywhere


def looks_local(base: str) -> bool:
    from xray_train.names import looks_like_local_path

    return looks_like_local_path(base)


def base_is_there(base: str | Path) -> bool:
    return (Path(base).expanduser() / "config.json").is_file()


def absolute_base(base: str) -> str:
    """A local base folder as an absolute path (a Hub id unchanged): how runs record and compare bases."""
    return str(Path(base).expanduser().resolve()) if looks_local(base) else base


#: Bytes of each weight file's data read into the fingerprint, at its start, middle and end.
FINGERPRINT_SAMPLE = 1 << 16


def base_fingerprint(folder: str | Path) -> str:
    """A cheap identity of a local base: sha256 over its ``config.json`` and, per ``*.safetensors`` file, the
    name, size, header (every tensor's name, dtype, shape and offsets) and three samples of the data. It
    tells a moved copy (same fingerprint) from another model in the same folder (a different one) without
    reading gigabytes; two models that differ only outside the sampled bytes are not told apart."""
    folder = Path(folder).expanduser()
    digest = hashlib.sha256()
    digest.update((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            digest.update(fh.read(min(n, size)))
            start = 8 + n
            for offset in (start, start + max(0, size - start) // 2, max(start, size - FINGERPRINT_SAMPLE)):
                fh.seek(offset)
                digest.update(fh.read(FINGERPRINT_SAMPLE))
    return digest.hexdigest()


#: Data-section keys holding a file or folder a reader opens.
_DATA_PATHS = ("csv", "reports_csv", "projections_csv", "box_file", "image_root")


def portable_config(cfg: "RunConfig") -> "RunConfig":
    """``cfg`` as a run directory records it: a local base absolute, with its fingerprint; data paths
    absolute. A relative path would only resolve from the folder the run was started in."""
    model = cfg.model
    if looks_local(model.base) and base_is_there(model.base):
        model = model.model_copy(update={"base": absolute_base(model.base),
                                         "base_fingerprint": base_fingerprint(model.base)})
    data = cfg.data.model_copy(update={
        key: Path(value).expanduser().resolve()
        for key in _DATA_PATHS
        if isinstance(value := getattr(cfg.data, key, None), Path)
    })
    return cfg.model_copy(update={"model": model, "data": data})


def _find_recorded_base(recorded: str, run_path: Path) -> str | None:
    """The recorded base folder, if it is there: as written (absolute, or relative to the working folder),
    else, for a relative one, under one of the run directory's ancestors (the folder it was trained from)."""
    if base_is_there(recorded):
        return absolute_base(recorded)
    if Path(recorded).expanduser().is_absolute():
        return None
    for ancestor in Path(run_path).resolve().parents:
        if base_is_there(ancestor / recorded):
            return str(ancestor / recorded)
    return None


def tidy_saved_adapter(folder: Path) -> None:
    """After peft's ``save_pretrained``: drop its placeholder model card ("Model Card for Model ID ...
    [More Information Needed]"; ``push-to-hub`` writes the real one) and give the files the umask's modes."""
    (Path(folder) / PEFT_PLACEHOLDER_CARD).unlink(missing_ok=True)
    share_like_umask(folder)


# ---------------------------------------------------------------------------------------------
# A rerun resumes only what it would build itself

#: Settings that decide what adapter a checkpoint holds. Resumed under other values, the checkpoint fails to
#: load (rank, targets, loc rows, projector) or quietly trains on as something else (scale, dropout, base).
ADAPTER_SETTINGS = (
    "phase", "model.base", "model.revision", "model.load_in_4bit", "model.quant_type", "model.double_quant",
    "model.add_loc_tokens", "model.train_projector", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules",
)  # fmt: skip


def _adapter_view(raw: dict) -> dict:
    """A saved or current config as a dict, with the phase defaults of the adapter switches filled in."""
    from pydantic import ValidationError

    from xray_train.config import RunConfig

    try:
        cfg = RunConfig.model_validate(raw, context={"saved": True})
    except ValidationError:
        return raw
    view = cfg.model_dump(mode="json")
    # The same base however it was written (runs record a local one absolute).
    view["model"].update(add_loc_tokens=cfg.add_loc_tokens, train_projector=cfg.train_projector,
                         base=absolute_base(cfg.model.base))
    return view


def _setting(config: dict, key: str):
    node = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return sorted(set(node)) if key == "lora.target_modules" and isinstance(node, list) else node


def adapter_setting_changes(saved: dict, current: dict) -> list[str]:
    """``["lora.r 32 -> 8"]``: each adapter setting that ``current`` changes from ``saved`` (config dicts, as
    ``dump_config`` writes them)."""
    return [
        f"{key} {_setting(saved, key)!r} -> {_setting(current, key)!r}"
        for key in ADAPTER_SETTINGS
        if _setting(saved, key) != _setting(current, key)
    ]


# ---------------------------------------------------------------------------------------------
# One writer at a time


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

