"""The frozen vision path, computed once per image and cached on disk.

Gemma 3's projector is ``avg_pool(4096 -> 256 patches) -> RMSNorm -> matmul``. The SigLIP tower and the
pooling are frozen in both phases, so their output (256 x 1152 per image at MedGemma's size, 0.6 MB in
bf16) is cached; the norm + matmul tail runs in the training step, which keeps the projector trainable
in Phase 2 and lets one cache serve both phases. SigLIP at 896 px costs about as much compute as the
language model's forward and backward together (REFERENCE.md §7), so this roughly halves a step.

The cache key covers the vision weights (a numeric fingerprint of every tensor), the vision config,
the preprocessing settings and every image file's path, size and mtime: changing any of them builds a
new cache instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from xray_train.errors import XrayTrainError

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1


def active_projector(gemma3_model):
    """The projector module actually in use (peft wraps a trainable copy in Phase 2)."""
    proj = gemma3_model.multi_modal_projector
    if hasattr(proj, "modules_to_save"):
        if getattr(proj, "disable_adapters", False):
            return proj.original_module
        name = proj.active_adapter
        name = name[0] if isinstance(name, (list, tuple)) else name
        return proj.modules_to_save[name]
    return proj


def pool_vision_outputs(projector, vision_last_hidden: torch.Tensor) -> torch.Tensor:
    """The frozen first half of ``Gemma3MultiModalProjector.forward``: patches -> pooled tokens."""
    batch, _, hidden = vision_last_hidden.shape
    side = projector.patches_per_image
    grid = vision_last_hidden.transpose(1, 2).reshape(batch, hidden, side, side).contiguous()
    return projector.avg_pool(grid).flatten(2).transpose(1, 2)


def project_pooled(projector, pooled: torch.Tensor) -> torch.Tensor:
    """The (possibly trainable) second half: RMSNorm + projection to the language model's width."""
    normed = projector.mm_soft_emb_norm(pooled)
    return torch.matmul(normed, projector.mm_input_projection_weight).type_as(pooled)


@torch.no_grad()
def pooled_vision_features(gemma3_model, pixel_values: torch.Tensor) -> torch.Tensor:
    tower = gemma3_model.vision_tower
    dtype = next(tower.parameters()).dtype
    out = tower(pixel_values=pixel_values.to(dtype), return_dict=True).last_hidden_state
    return pool_vision_outputs(active_projector(gemma3_model), out)


@torch.no_grad()
def vision_fingerprint(gemma3_model) -> str:
    """Cheap content hash of the frozen vision path: per-tensor name, shape, dtype, sum and sum of squares."""
    h = hashlib.sha256()
    h.update(json.dumps(gemma3_model.config.vision_config.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(gemma3_model.config.mm_tokens_per_image).encode())
    for name, tensor in sorted(gemma3_model.vision_tower.state_dict().items()):
        t = tensor.detach().double()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{t.sum().item():.10e}|{(t * t).sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def _file_signature(path: Path) -> list:
    try:
        st = path.stat()
        return [str(path), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(path), None, None]


def cache_key(vision_fp: str, preprocessing: dict, image_paths: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_FORMAT_VERSION, "vision": vision_fp, "pre": preprocessing}, sort_keys=True).encode())
    for path in image_paths:
        h.update(json.dumps(_file_signature(path)).encode())
    return h.hexdigest()[:24]


class VisionFeatureCache:
    """Pooled vision features, one row per image, memory-mapped (workers and ranks share the pages)."""

    def __init__(self, folder: Path):
        meta = json.loads((folder / "meta.json").read_text())
        self.folder = folder
        self.index: dict[str, int] = meta["index"]
        self.failed: dict[str, str] = meta.get("failed", {})
        self.torch_dtype = getattr(torch, meta["dtype"])
        storage = np.uint16 if meta["dtype"] == "bfloat16" else np.float32
        self._array = np.memmap(folder / "features.bin", dtype=storage, mode="r", shape=tuple(meta["shape"]))

    def __getstate__(self):
        # DataLoader workers get a fresh memmap instead of a pickled copy of every feature.
        state = self.__dict__.copy()
        state.pop("_array", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        shape = tuple(json.loads((self.folder / "meta.json").read_text())["shape"])
        storage = np.uint16 if self.torch_dtype == torch.bfloat16 else np.float32
        self._array = np.memmap(self.folder / "features.bin", dtype=storage, mode="r", shape=shape)

    def row_of(self, image_path) -> int:
        return self.index[str(image_path)]

    def rows(self, rows: list[int]) -> torch.Tensor:
        """Features of several images in one gather (one copy, instead of one per image)."""
        block = torch.from_numpy(np.ascontiguousarray(self._array[np.asarray(rows)]))
        return block.view(torch.bfloat16) if self.torch_dtype == torch.bfloat16 else block

    def __contains__(self, image_path) -> bool:
        return str(image_path) in self.index

    def __getitem__(self, image_path) -> torch.Tensor:
        row = np.array(self._array[self.index[str(image_path)]])
        tensor = torch.from_numpy(row)
        return tensor.view(torch.bfloat16) if self.torch_dtype == torch.bfloat16 else tensor

    @classmethod
    def build_or_load(
        cls,
        root: Path,
        gemma3_model,
        image_paths: list[Path],
        pixel_loader,
        preprocessing: dict,
        batch_size: int = 8,
        progress: bool = True,
    ) -> "VisionFeatureCache":
        """Load the cache for exactly these images and weights, or compute it (then rename into place)."""
        unique = sorted({Path(p) for p in image_paths}, key=str)
        key = cache_key(vision_fingerprint(gemma3_model), preprocessing, unique)
        folder = Path(root) / key
        if (folder / "meta.json").is_file():
            try:
                cache = cls(folder)
                logger.info("Using cached vision features in %s", folder)
                return cache
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                # Damaged after it was written (disk trouble, a partial copy): rebuild it.
                logger.warning("vision-feature cache %s is damaged (%s); rebuilding it", folder, exc)
                shutil.rmtree(folder, ignore_errors=True)
        tmp = None
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
            cls._compute(tmp, gemma3_model, unique, pixel_loader, batch_size, progress)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished first
                if not (folder / "meta.json").is_file():
                    raise
        except OSError as exc:
            raise XrayTrainError(
                f"cannot write the vision-feature cache in {root}: {exc.strerror or exc}; free space there, point "
                "XRAY_TRAIN_FEATURE_CACHE at a larger disk, or set training.cache_vision_features=false"
            ) from None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return cls(folder)

    @staticmethod
    def _compute(folder: Path, gemma3_model, paths: list[Path], pixel_loader, batch_size: int, progress: bool):
        from rich.progress import Progress

        from xray_train.data.images import ImageError

        device = next(gemma3_model.vision_tower.parameters()).device
        array = None
        index: dict[str, int] = {}
        failed: dict[str, str] = {}
        dtype_name = None
        row = 0
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("Caching vision features", total=len(paths))
            for start in range(0, len(paths), batch_size):
                chunk, tensors = [], []
                for path in paths[start : start + batch_size]:
                    try:
                        tensors.append(pixel_loader(path))
                        chunk.append(path)
                    except ImageError as exc:
                        failed[str(path)] = str(exc)
                        logger.warning("skipping unreadable image: %s", exc)
                if tensors:
                    feats = pooled_vision_features(gemma3_model, torch.stack(tensors).to(device)).cpu()
                    if array is None:
                        dtype_name = str(feats.dtype).removeprefix("torch.")
                        storage = np.uint16 if feats.dtype == torch.bfloat16 else np.float32
                        shape = (len(paths), *feats.shape[1:])
                        array = _reserved_memmap(folder / "features.bin", storage, shape)
                    raw = feats.view(torch.uint16) if feats.dtype == torch.bfloat16 else feats.float()
                    array[row : row + len(chunk)] = raw.numpy()
                    for path in chunk:
                        index[str(path)] = row
                        row += 1
                bar.advance(task, len(paths[start : start + batch_size]))
        if array is None:
            raise XrayTrainError("no readable image to cache vision features for")
        shape = (row, *array.shape[1:])
        array.flush()
        row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:]))
        del array
        # Rows were filled in order, so dropping the unreadable images' rows is a truncation.
        os.truncate(folder / "features.bin", row * row_bytes)
        if dtype_name != "bfloat16":
            dtype_name = "float32"
        meta = {"shape": list(shape), "dtype": dtype_name, "index": index, "failed": failed}
        (folder / "meta.json").write_text(json.dumps(meta))


def _reserved_memmap(path: Path, dtype, shape: tuple) -> np.memmap:
    """A writable memmap whose disk blocks are allocated up front.

    Writing through a memmap into a sparse file on a full disk kills the process with SIGBUS; reserving
    the blocks first turns a full disk into an OSError (ENOSPC) here, before any image is processed.
    Raw bytes + a JSON header (meta.json): memmap-able without numpy's pickle-capable loader.
    """
    nbytes = int(np.dtype(dtype).itemsize * np.prod(shape))
    with open(path, "wb") as fh:
        if nbytes and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fh.fileno(), 0, nbytes)
        else:
            fh.truncate(nbytes)
    return np.memmap(path, dtype=dtype, mode="r+", shape=shape)
