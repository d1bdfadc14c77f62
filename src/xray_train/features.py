"""The frozen vision path, computed once per image and cached on disk.

Gemma 3's projector is ``avg_pool(4096 -> 256 patches) -> RMSNorm -> matmul``. The SigLIP tower and the
pooling are frozen in both phases, so their output (256 x 1152 per image at MedGemma's size, 0.6 MB in
bf16) is cached; the norm + matmul tail runs in the training step, which keeps the projector trainable
in Phase 2 and lets one cache serve both phases. SigLIP at 896 px costs about as much compute as the
language model's forward and backward together, so this roughly halves a step.

The cache key covers the vision weights (a numeric fingerprint of every tensor), the vision config,
the preprocessing settings and every image file's path, size and mtime: changing any of them builds a
new cache instead of reusing a stale one.

``FeatureSource`` is what the rest of the project asks for a run's image features (the dataset, the collator
through ``FeatureRef``, the trainer and ``xray-train cache-features``); its ``mode`` says where they come
from: no cache (pixels every step), a finished cache, or a cache the first epoch's steps fill.

Over 400 lines because it is one contract: the cache's key, its files, the build that writes them (and
continues after a kill), the training steps that can fill them instead, and the source that hands their rows
to a run all describe the same folder.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import os
import shutil
import time
import typing
from pathlib import Path

import numpy as np
import torch

from xray_train.cache import feature_cache_root
from xray_train.config import VisionAttention
from xray_train.errors import XrayTrainError
from xray_train.gemma3 import (
    active_projector,
    gemma3_core,
    text_model,
    vision_device,
    vision_dtype,
    vision_encoder_layers,
    vision_tower,
)

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1


def pool_vision_outputs(projector, vision_last_hidden: torch.Tensor) -> torch.Tensor:
    """The frozen first half of ``Gemma3MultiModalProjector.forward``: patches -> pooled tokens."""
    batch, _, hidden = vision_last_hidden.shape
    side = projector.patches_per_image
    grid = vision_last_hidden.transpose(1, 2).reshape(batch, hidden, side, side).contiguous()
    return projector.avg_pool(grid).flatten(2).transpose(1, 2)


def project_pooled(projector, pooled: torch.Tensor) -> torch.Tensor:
    """The (possibly trainable) second half: RMSNorm + projection to the language model's width."""
    weight = projector.mm_input_projection_weight
    # In the projector's dtype, as Gemma 3's own image path runs it: a float16 tower's cache holds float32
    # rows, and a float16 base without autocast has no other place to meet them.
    normed = projector.mm_soft_emb_norm(pooled.to(weight.dtype))
    return torch.matmul(normed, weight).type_as(pooled)


#: The SDPA kernels ``training.vision_attention`` can name, in the order they are tried after the named one.
VISION_ATTENTION_BACKENDS = typing.get_args(VisionAttention)[1:]  # without "default"


def vision_attention(backend: str = "default", only: bool = False):
    """A context in which SDPA tries ``backend`` first, then the other ``VISION_ATTENTION_BACKENDS`` in their
    order (``default``: PyTorch's own choice, untouched); ``only``: no fallback, so a backend that cannot run
    raises.

    Attention over SigLIP-896's 4096 patches is over a third of the tower's work, and the kernels differ
    widely on its 16 heads of 72 channels (``attention_only`` in benchmarks/results/vision_speed.json, from
    ``benchmarks/bench_vision.py``).
    """
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [getattr(SDPBackend, f"{name.upper()}_ATTENTION" if name != "math" else "MATH")
             for name in (backend, *(b for b in VISION_ATTENTION_BACKENDS if b != backend))]
    return sdpa_kernel(order[:1]) if only else sdpa_kernel(order, set_priority=True)


@torch.no_grad()
def pooled_vision_features(gemma3_model, pixel_values: torch.Tensor, attention: str = "default") -> torch.Tensor:
    """Pixel values -> pooled SigLIP features (what the cache stores), with ``attention`` tried first."""
    tower = vision_tower(gemma3_model)
    with vision_attention(attention):
        out = tower(pixel_values=pixel_values.to(vision_dtype(gemma3_model)), return_dict=True).last_hidden_state
    return pool_vision_outputs(active_projector(gemma3_model), out)


def with_image_rows(embeds: torch.Tensor, index: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``embeds`` [batch, seq, hidden] with the rows at flat positions ``index`` (the image soft tokens)
    replaced by the projected image ``features``, one row per position, in order."""
    features = features.to(embeds.dtype).reshape(-1, embeds.shape[-1])
    if features.shape[0] != index.shape[0]:
        raise ValueError(f"{features.shape[0]} image features for {index.shape[0]} image tokens")
    flat = embeds.reshape(-1, embeds.shape[-1]).index_copy(0, index.to(embeds.device), features)
    return flat.reshape(embeds.shape)


@contextlib.contextmanager
def image_features_at_prefill(model, input_ids: torch.Tensor, pooled: torch.Tensor):
    """Inside the block, the first call of ``model``'s text model (a ``generate`` call's prefill of
    ``input_ids``, given without pixels) gets its image soft tokens from ``pooled`` SigLIP rows, projected by
    the projector active then: what Gemma 3 computes from the pixels, without running SigLIP again.

    A forward pre-hook on the text model, put before any other (the fp16 residual scale divides what enters
    the stream, image rows included); it removes itself after the prefill, so decode steps run untouched.
    """
    core = gemma3_core(model)
    index = (input_ids == core.config.image_token_id).flatten().nonzero().squeeze(1)

    def fill(stream, args, kwargs):
        handle.remove()
        embeds = kwargs.get("inputs_embeds")
        if args or embeds is None or embeds.shape[:2] != input_ids.shape:
            raise RuntimeError("the text model's first call is not the prefill of the prompt it was given")
        features = project_pooled(active_projector(core), pooled)
        return args, {**kwargs, "inputs_embeds": with_image_rows(embeds, index, features)}

    handle = text_model(model).register_forward_pre_hook(fill, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def vision_fingerprint(gemma3_model) -> str:
    """Cheap content hash of the frozen vision path: per-tensor name, shape, dtype, sum and sum of squares."""
    h = hashlib.sha256()
    h.update(json.dumps(gemma3_model.config.vision_config.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(gemma3_model.config.mm_tokens_per_image).encode())
    for name, tensor in sorted(vision_tower(gemma3_model).state_dict().items()):
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


def cache_folders(root: Path, key: str) -> tuple[Path, Path]:
    """The finished cache's folder and the ``.{key}.partial`` folder a build or a fill writes before it."""
    root = Path(root)
    return root / key, root / f".{key}.partial"


def cache_rows_and_key(gemma3_model, preprocessing: dict, image_paths) -> tuple[list[Path], str]:
    """The cache's images in row order (sorted, each once) and its key: a build and a fill of the same run
    agree on both, so either finds the other's cache."""
    unique = sorted({Path(p) for p in image_paths}, key=str)
    return unique, cache_key(vision_fingerprint(gemma3_model), preprocessing, unique)


class _FeatureRows:
    """Reading rows by image path; the subclass sets ``index``, ``torch_dtype`` and the memmap ``_array``."""

    index: dict[str, int]

    def row_of(self, image_path) -> int:
        return self.index[str(image_path)]

    def rows(self, rows) -> torch.Tensor:
        """Features of several images (``rows``: a list or an integer array) in one gather (one copy, instead
        of one per image)."""
        block = torch.from_numpy(np.ascontiguousarray(self._array[np.asarray(rows)]))
        return block.view(torch.bfloat16) if self.torch_dtype == torch.bfloat16 else block

    def __contains__(self, image_path) -> bool:
        return str(image_path) in self.index


class VisionFeatureCache(_FeatureRows):
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
        batch_size: int = 32,
        workers: int = 0,
        compile_vision: bool = False,
        progress: bool = True,
        attention: str = "default",
    ) -> "VisionFeatureCache":
        """Load the cache for exactly these images and weights, or compute it (then rename into place).

        The build writes into ``.{key}.partial`` and records after every batch how far it got, so a build
        that is killed loses at most the batch in flight and the next call continues it. A lock on the
        partial folder keeps two processes from writing the same cache at once.
        """
        unique, key = cache_rows_and_key(gemma3_model, preprocessing, image_paths)
        root = Path(root)
        folder, partial = cache_folders(root, key)
        cache = cls._load_existing(folder)
        if cache is not None:
            return cache
        try:
            root.mkdir(parents=True, exist_ok=True)
            done = _read_progress(partial).get("done", 0)
            check_free_space(root, len(unique) - done, feature_row_bytes(gemma3_model))
            partial.mkdir(exist_ok=True)
            with open(partial / "lock", "a") as lock:
                _lock(lock)
                cache = cls._load_existing(folder)  # another process may have finished it meanwhile
                if cache is not None:
                    shutil.rmtree(partial, ignore_errors=True)
                    return cache
                build_features(partial, gemma3_model, unique, pixel_loader, batch_size, workers, compile_vision,
                               progress, attention)
                os.replace(partial, folder)
        except OSError as exc:
            if not _read_progress(partial).get("done"):
                shutil.rmtree(partial, ignore_errors=True)  # nothing worth continuing

            raise XrayTrainError(
                f"cannot write the vision-feature cache in {root}: {exc.strerror or exc}; free space there, point "
                "XRAY_TRAIN_FEATURE_CACHE at a larger disk, or set training.cache_vision_features=false"
            ) from None
        return cls(folder)

    @classmethod
    def _load_existing(cls, folder: Path) -> "VisionFeatureCache | None":
        if not (folder / "meta.json").is_file():
            return None
        try:
            cache = cls(folder)
            logger.info("Using cached vision features in %s", folder)
            return cache
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Damaged after it was written (disk trouble, a partial copy): rebuild it.
            logger.warning("vision-feature cache %s is damaged (%s); rebuilding it", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
            return None


def _lock(fh) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: one process per cache is then the user's business
        return
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)


PROGRESS_FILE = "progress.json"
BUILD_FILE = "build.json"
FILLED_FILE = "filled.bin"  # CacheFill's marks: one byte per row, 1 once the row is on the disk


def _read_progress(folder: Path) -> dict:
    try:
        state = json.loads((folder / PROGRESS_FILE).read_text())
        return state if isinstance(state, dict) and isinstance(state.get("done"), int) else {}
    except (OSError, ValueError):
        return {}


def _write_progress(folder: Path, state: dict) -> None:
    tmp = folder / f"{PROGRESS_FILE}.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, folder / PROGRESS_FILE)


def feature_row_shape(gemma3_model) -> tuple[int, int]:
    """(pooled tokens, vision width) of one cached image: 256 x 1152 for MedGemma-4B."""
    return int(gemma3_model.config.mm_tokens_per_image), int(gemma3_model.config.vision_config.hidden_size)


def _storage(gemma3_model) -> tuple[str, type]:
    dtype = vision_dtype(gemma3_model)
    return ("bfloat16", np.uint16) if dtype == torch.bfloat16 else ("float32", np.float32)


def feature_row_bytes(gemma3_model) -> int:
    tokens, width = feature_row_shape(gemma3_model)
    return tokens * width * np.dtype(_storage(gemma3_model)[1]).itemsize


def check_free_space(root: Path, films: int, row_bytes: int) -> None:
    """Refuse to start a build that cannot fit (a full disk halfway through a multi-hour build is worse)."""
    need = films * row_bytes
    free = shutil.disk_usage(root).free
    if need > free:
        raise XrayTrainError(
            f"the vision-feature cache needs {need / 1e9:.1f} GB for {films} images ({row_bytes / 1e6:.2f} MB each) "
            f"but {root} has {free / 1e9:.1f} GB free; point XRAY_TRAIN_FEATURE_CACHE at a larger disk or set "
            "training.cache_vision_features=false"
        )


def compile_vision_layers(gemma3_model, mode: str | None = None) -> None:
    """Compile each SigLIP encoder layer in place (fused layer norms, GELU and residual adds around the SDPA
    attention): ``training.compile_vision_cache``, for a cache build or the steps that fill the cache.
    ``mode``: torch.compile's (``benchmarks/bench_vision.py`` times Inductor's GEMM autotuning with it)."""
    for layer in vision_encoder_layers(gemma3_model):
        layer.compile(mode=mode)


def _vision_forward(gemma3_model, compile_vision: bool, attention: str = "default"):
    """Pixel values -> pooled features, through compiled encoder layers with ``compile_vision``."""
    if compile_vision:
        compile_vision_layers(gemma3_model)
    return lambda pixel_values: pooled_vision_features(gemma3_model, pixel_values, attention)


@contextlib.contextmanager
def host_threads_for(device: torch.device):
    """One intra-op thread in this process while it only hands batches to a GPU.

    The reading workers take every core; PyTorch's intra-op threads in this process, waking for each batch's
    stacking and pinning and spinning after it, take cores from them and slow the build down (the cache rows
    of benchmarks/results/e2e_speed.json, with and without, and their note). On a CPU the tower's forward needs
    its threads: unchanged.
    """
    if device.type != "cuda":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def build_features(  # noqa: PLR0913
    folder: Path, gemma3_model, paths: list[Path], pixel_loader, batch_size: int, workers: int,
    compile_vision: bool = False, progress: bool = True, attention: str = "default",
) -> None:
    """Fill ``folder`` with one feature row per path (row i = paths[i]), continuing a killed build.

    Three things overlap, so the GPU never waits for the host: ``workers`` processes read images ahead
    (each batch goes to the GPU as uint8 and is normalised there); the host collects batch k+1 while the GPU
    runs batch k, whose features come back by an asynchronous copy; a writer thread puts batch k-1's rows
    into ``features.bin``, syncs them to the disk and only then records them in ``progress.json``. A build
    killed at any point therefore loses at most the two batches in flight (on the GPU, in the writer), and
    never records a row that is not on the disk. Every batch has ``batch_size`` rows (the last one is padded) so a compiled
    tower never sees a new shape.
    """
    from concurrent.futures import ThreadPoolExecutor

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from xray_train.data.loader import prepared_batches

    device, dtype = vision_device(gemma3_model), vision_dtype(gemma3_model)
    dtype_name, storage = _storage(gemma3_model)
    shape = (len(paths), *feature_row_shape(gemma3_model))
    state = _read_progress(folder)
    done, failed = state.get("done", 0), dict(state.get("failed", {}))
    bin_path = folder / "features.bin"
    expected = int(np.prod(shape)) * np.dtype(storage).itemsize
    if done and bin_path.is_file() and bin_path.stat().st_size == expected:
        logger.info("continuing the vision-feature cache build at image %d of %d", done, len(paths))
    else:
        done, failed = 0, {}
        _reserved_memmap(bin_path, storage, shape)
    # Rows a training run had filled here (CacheFill) are recomputed; its marks would now lie.
    (folder / FILLED_FILE).unlink(missing_ok=True)
    forward = _vision_forward(gemma3_model, compile_vision, attention)
    cuda = device.type == "cuda"
    # Host copies of the features of the batches in flight: on the GPU, written back by the writer, free.
    slots = [torch.empty((batch_size, *shape[1:]), dtype=dtype, pin_memory=cuda) for _ in range(3)]
    started, films, first_batch_s, first_batch_films = time.perf_counter(), 0, None, 0
    first_batch_done_s = None
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
    )
    fd = os.open(bin_path, os.O_WRONLY)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feature-cache-writer")
    writes: list = []  # the writer's futures, oldest first

    def write(slot: torch.Tensor | None, rows: np.ndarray, record: dict) -> None:
        """In the writer thread: rows to the disk (GIL released), then the progress that covers them."""
        if slot is not None and len(rows):
            _write_rows(fd, slot[: len(rows)], rows)
        _write_progress(folder, record)

    try:
        with host_threads_for(device), Progress(*columns, disable=not progress, transient=True) as bar:
            task = bar.add_task("Caching vision features", total=len(paths), completed=done, rate="")
            offset = done  # batch indices count from here
            batches = prepared_batches(paths[offset:], pixel_loader.prepare, batch_size, workers, pin_memory=cuda)
            in_flight = None  # the batch whose features the GPU is making: (slot, rows, event, record)
            for number, batch in enumerate(batches):  # read while the GPU runs the batch in flight
                for i, err in batch.failed.items():
                    failed[str(paths[offset + i])] = err
                    logger.warning("skipping unreadable image: %s", err)
                if in_flight is not None:
                    # Its features reach the host a moment before this batch is queued behind them: the GPU
                    # idles for the time of a few kernel launches.
                    _hand_to_writer(in_flight, writer, write, writes)
                    if first_batch_done_s is None:
                        first_batch_done_s = time.perf_counter() - started
                slot, event = None, None
                rows = np.asarray(batch.indices, dtype=np.int64) + offset
                if batch.pixels is not None:
                    n = len(batch.indices)
                    pixels = batch.pixels.to(device, non_blocking=True)
                    if n < batch_size:
                        pixels = torch.cat([pixels, pixels[-1:].expand(batch_size - n, *pixels.shape[1:])])
                    slot = slots[number % len(slots)]
                    slot[:n].copy_(forward(pixel_loader.normalize(pixels, dtype))[:n], non_blocking=cuda)
                    if cuda:
                        event = torch.cuda.Event()
                        event.record()
                step = len(batch.indices) + len(batch.failed)
                done += step
                films += step
                in_flight = (slot, rows, event, {"done": done, "failed": dict(failed)})
                if first_batch_s is None:
                    first_batch_s, first_batch_films = time.perf_counter() - started, step
                rate = films / max(time.perf_counter() - started, 1e-9)
                bar.update(task, advance=step, rate=f"{rate:.1f} films/s")
            if in_flight is not None:
                _hand_to_writer(in_flight, writer, write, writes)
            for future in writes:
                future.result()
    finally:
        writer.shutdown(wait=True)
        os.close(fd)
    elapsed = time.perf_counter() - started
    if films:
        logger.info("vision features: %d images in %.1f s (%.1f images/s)", films, elapsed, films / max(elapsed, 1e-9))
    failed_paths = set(failed)
    index = {str(p): i for i, p in enumerate(paths) if str(p) not in failed_paths}
    if not index:
        raise XrayTrainError("no readable image to cache vision features for")
    # Unreadable images keep an unused row: rows stay at their path's position, which a resumed build needs.
    meta = {"shape": list(shape), "dtype": dtype_name, "index": index, "failed": failed}
    # How fast the build (its last part, if continued) ran: the first batch (worker start-up and the GPU's
    # first forward included), and all.
    build = {"films": films, "seconds": round(elapsed, 3), "first_batch_films": first_batch_films,
             "first_batch_s": round(first_batch_s or 0.0, 3),  # read and queued
             "first_batch_done_s": round(first_batch_done_s or elapsed, 3)}  # its features back on the host
    (folder / BUILD_FILE).write_text(json.dumps(build))
    (folder / "meta.json").write_text(json.dumps(meta))


def _write_rows(fd: int, features: torch.Tensor, rows: np.ndarray) -> None:
    """``features[i]`` (host memory) into row ``rows[i]`` of ``features.bin``, then synced to the disk."""
    raw = (features.view(torch.uint16) if features.dtype == torch.bfloat16 else features.float()).numpy()
    row_bytes = raw[0].nbytes
    runs = np.split(np.arange(len(rows)), np.flatnonzero(np.diff(rows) != 1) + 1)
    for run in runs:  # consecutive rows in one write; unreadable images (or a batch's order) leave gaps
        data = memoryview(np.ascontiguousarray(raw[run[0] : run[-1] + 1])).cast("B")
        offset, written = int(rows[run[0]]) * row_bytes, 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], offset + written)
    os.fdatasync(fd)


def _hand_to_writer(batch, writer, write, writes: list) -> None:
    """Wait for ``batch``'s features to reach the host, then queue them for the writer thread.

    One write at most is pending when the next batch is queued, so a slot is free again three batches on.
    """
    slot, rows, event, record = batch
    if event is not None:
        event.synchronize()
    while writes:
        writes.pop(0).result()
    writes.append(writer.submit(write, slot, rows, record))


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


class CacheFill(_FeatureRows):
    """A vision-feature cache that the training steps fill (``training.fill_cache_during_epoch``).

    Instead of a pass over every image before the first step, each step's SigLIP forward runs on the images
    of its batch that have no row yet and hands the rows here; later epochs and reruns read them. It lives in
    the same ``.{key}.partial`` folder, with the same ``features.bin`` layout, as a build would (row i =
    sorted path i), plus ``filled.bin`` (one byte per row, set once its row is on the disk). ``finish``
    computes the rows no step reached (validation images that were never evaluated, a run stopped early)
    and moves the folder into place as a finished cache, the same files a build makes. One process: several
    would each write rows of the same folder, which the lock forbids.
    """

    def __init__(self, root: Path, key: str, gemma3_model, paths: list[Path], attention: str = "default"):
        """``paths``: sorted, unique (the order of the rows); ``key``: the cache key of them and the model;
        ``attention``: the SDPA kernel the steps' SigLIP forward tries first, as a build's would."""
        from concurrent.futures import ThreadPoolExecutor

        self.paths = paths
        self.attention = attention
        self.final, self.partial = cache_folders(root, key)
        self.index = {str(p): i for i, p in enumerate(self.paths)}
        self.failed: dict[str, str] = {}  # unreadable images are found by the steps, and counted at the end
        self.dtype_name, self._storage = _storage(gemma3_model)
        self.torch_dtype = getattr(torch, self.dtype_name)
        self.shape = (len(self.paths), *feature_row_shape(gemma3_model))
        self.partial.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.partial / "lock", "a")  # noqa: SIM115 - held until finish()
        _lock(self._lock)
        # A build that held the lock meanwhile (`xray-train cache-features`) may have finished the cache.
        self.superseded = (self.final / "meta.json").is_file()
        if self.superseded:
            self._lock.close()
            return
        bin_path, filled_path = self.partial / "features.bin", self.partial / FILLED_FILE
        expected = int(np.prod(self.shape)) * np.dtype(self._storage).itemsize
        if not (bin_path.is_file() and bin_path.stat().st_size == expected):
            check_free_space(self.partial, len(self.paths), feature_row_bytes(gemma3_model))
            _reserved_memmap(bin_path, self._storage, self.shape)
            filled_path.unlink(missing_ok=True)
        if not (filled_path.is_file() and filled_path.stat().st_size == len(self.paths)):
            filled = np.zeros(len(self.paths), dtype=np.uint8)
            filled[: _read_progress(self.partial).get("done", 0)] = 1  # a build stopped part-way
            filled.tofile(filled_path)
        self._open(writable=True)
        self._fd = os.open(bin_path, os.O_WRONLY)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feature-cache-fill")
        self._writes: list = []
        self._writes_here = True  # the filling process; a DataLoader worker's copy only reads

    def _open(self, writable: bool = False) -> None:
        self._array = np.memmap(self.partial / "features.bin", dtype=self._storage, mode="r", shape=self.shape)
        self._filled = np.memmap(self.partial / FILLED_FILE, dtype=np.uint8, mode="r+" if writable else "r",
                                 shape=(self.shape[0],))

    def __getstate__(self):
        # DataLoader workers only read: fresh memmaps, no lock, no writer.
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_array", "_filled", "_lock", "_fd", "_writer", "_writes")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._writes_here = False
        self._open()

    def is_filled(self, row: int) -> bool:
        return bool(self._filled[row])

    def all_filled(self, rows) -> bool:
        """Whether every one of ``rows`` is on the disk, once the rows queued so far have reached it."""
        if self._writes_here:  # a worker's copy has nothing queued
            self.flush()
        return bool(self._filled[np.asarray(rows, dtype=np.int64)].all())

    def write(self, rows, features: torch.Tensor) -> None:
        """Queue ``features`` (pooled rows, on any device) for ``rows``; returns before they reach the disk."""
        rows = np.asarray(rows, dtype=np.int64)
        host = features.detach().to("cpu", non_blocking=features.is_cuda)
        event = None
        if features.is_cuda:
            event = torch.cuda.Event()
            event.record()
        while len(self._writes) > 2:  # at most a few steps' rows in host memory
            self._writes.pop(0).result()
        self._writes.append(self._writer.submit(self._write, rows, host, event))

    def _write(self, rows: np.ndarray, host: torch.Tensor, event) -> None:
        if event is not None:
            event.synchronize()
        _write_rows(self._fd, host, rows)
        self._filled[rows] = 1  # only once the rows are on the disk

    def flush(self) -> None:
        while self._writes:
            self._writes.pop(0).result()

    def finish(self, gemma3_model, pixel_loader, batch_size: int, workers: int) -> "VisionFeatureCache":
        """Compute the rows no step filled, then move the folder into place: a finished cache."""
        from xray_train.data.loader import prepared_batches

        self.flush()
        missing = np.flatnonzero(self._filled == 0)
        failed: dict[str, str] = {}
        if len(missing):
            device, dtype = vision_device(gemma3_model), vision_dtype(gemma3_model)
            paths = [self.paths[i] for i in missing]
            with torch.no_grad(), host_threads_for(device):
                for batch in prepared_batches(paths, pixel_loader.prepare, batch_size, workers):
                    failed.update({str(paths[i]): err for i, err in batch.failed.items()})
                    if batch.pixels is not None:
                        pixels = pixel_loader.normalize(batch.pixels.to(device), dtype)
                        self.write(missing[batch.indices], pooled_vision_features(gemma3_model, pixels, self.attention))
            self.flush()
            logger.info("vision features: %d images no step reached, computed at the end", len(missing))
        self._writer.shutdown(wait=True)
        os.close(self._fd)
        del self._filled, self._array
        index = {str(p): i for i, p in enumerate(self.paths) if str(p) not in failed}
        meta = {"shape": list(self.shape), "dtype": self.dtype_name, "index": index, "failed": failed}
        (self.partial / FILLED_FILE).unlink()
        (self.partial / "meta.json").write_text(json.dumps(meta))
        os.replace(self.partial, self.final)
        self._lock.close()
        return VisionFeatureCache(self.final)


class FeatureMode(enum.Enum):
    """Where a run's image features come from."""

    NONE = "none"  # no cache: every step runs SigLIP on the pixels
    CACHED = "cached"  # a finished cache: every step reads rows
    FILLING = "filling"  # the first epoch's steps make the rows the cache is missing, later steps read them


class FeatureSource:
    """A run's image features, whatever their ``mode``: the one object the dataset, the collator (through
    ``collate.FeatureRef``), the trainer and ``xray-train cache-features`` ask.

    ``image_inputs(path)`` is a dataset item's image part: ``pixel_values`` without a cache, a ``FeatureRef``
    to the image's row where it is cached, and the uint8 image with its row number (``fill_pixels``,
    ``fill_row``) where a filling cache has no row for it yet; the step then makes the row (``make_rows``).
    ``finish`` completes a fill once training ends. Picklable: DataLoader workers get a read-only copy.
    """

    def __init__(self, mode: FeatureMode, pixel_loader, cache=None, root: Path | None = None):
        self.mode = mode
        self.pixel_loader = pixel_loader
        self._cache = cache  # VisionFeatureCache (CACHED), CacheFill (FILLING), or None
        self.root = root

    @classmethod
    def pixels(cls, pixel_loader) -> "FeatureSource":
        """No cache: the images' pixels, prepared for every step."""
        return cls(FeatureMode.NONE, pixel_loader)

    @property
    def folder(self) -> Path | None:
        """The finished cache's folder (where a fill moves once it is finished)."""
        if self.mode is FeatureMode.NONE:
            return None
        return self._cache.final if self.mode is FeatureMode.FILLING else self._cache.folder

    @property
    def failed(self) -> dict[str, str]:
        """Images that could not be read, by path (found by a build; a fill finds them when it finishes)."""
        return {} if self._cache is None else self._cache.failed

    @property
    def cached_images(self) -> int:
        return 0 if self._cache is None else len(self._cache.index)

    def __contains__(self, image_path) -> bool:
        """Whether ``image_path`` can be trained on: every image without a cache; one the cache could read."""
        return self._cache is None or image_path in self._cache

    def rows(self, rows) -> torch.Tensor:
        """Features of several cached rows in one gather."""
        return self._cache.rows(rows)

    def reads_images(self, image_paths) -> bool:
        """Whether an epoch over ``image_paths`` would read an image file: not once each has its row."""
        if self.mode is FeatureMode.NONE:
            return True
        if self.mode is FeatureMode.CACHED:
            return False
        return not self._cache.all_filled([self._cache.row_of(p) for p in image_paths])

    def image_inputs(self, image_path) -> dict:
        """A dataset item's image part (see the class docstring)."""
        from xray_train.collate import FeatureRef

        if self.mode is FeatureMode.NONE:
            return {"pixel_values": self.pixel_loader(image_path)}
        row = self._cache.row_of(image_path)
        if self.mode is FeatureMode.FILLING and not self._cache.is_filled(row):
            # No row yet: the step makes it from the uint8 image (see trainer.XrayTrainer.fill_features).
            return {"fill_pixels": torch.from_numpy(self.pixel_loader.prepare(image_path)), "fill_row": row}
        # The collator gathers the whole batch's rows at once (see collate.FeatureRef).
        return {"image_features": FeatureRef(self, row)}

    def gathered_in_trainer(self, dataloader_workers: int, reads_images: bool) -> bool:
        """Whether the training process, not the collator, gathers a batch's cached rows: where the collator
        runs in DataLoader workers (reading images while the steps fill the cache, or asked for), features sent
        from workers cost more step time than they save. Without workers the collator gathers them."""
        return self.mode is not FeatureMode.NONE and dataloader_workers > 0 and reads_images

    def make_rows(self, gemma3_model, pixels: torch.Tensor, rows) -> torch.Tensor:
        """The features of ``pixels`` (uint8 images, on the step's device) as a build makes them (SigLIP in its
        own dtype, outside the step's mixed-precision autocast), handed to the filling cache as ``rows``."""
        if self.mode is not FeatureMode.FILLING:
            raise RuntimeError(f"a {self.mode.value} feature source makes no rows")
        dtype = vision_dtype(gemma3_model)
        with torch.no_grad(), torch.autocast(pixels.device.type, enabled=False):
            made = pooled_vision_features(gemma3_model, self.pixel_loader.normalize(pixels, dtype),
                                          self._cache.attention)
        self._cache.write(rows, made)
        return made

    def finish(self, gemma3_model, batch_size: int, workers: int) -> None:
        """After training: a filling cache computes the rows no step reached and becomes a finished cache."""
        if self.mode is FeatureMode.FILLING:
            self._cache = self._cache.finish(gemma3_model, self.pixel_loader, batch_size, workers)
            self.mode = FeatureMode.CACHED


def open_feature_source(cfg, gemma3_model, pixel_loader, image_paths: list[Path], progress: bool = True,
                        fill: bool = False) -> FeatureSource:
    """The run's features: ``pixels`` without ``training.cache_vision_features``; else its cache, built (or
    continued) with the resolved config's reading, batching and compile settings, or with ``fill`` a
    finished cache if there is one, else one the steps fill."""
    t = cfg.training
    if not t.cache_vision_features:
        return FeatureSource.pixels(pixel_loader)
    root = feature_cache_root()
    if fill:
        unique, key = cache_rows_and_key(gemma3_model, pixel_loader.preprocessing(), image_paths)
        folder, _ = cache_folders(root, key)
        cache = VisionFeatureCache._load_existing(folder)
        if cache is not None:
            return FeatureSource(FeatureMode.CACHED, pixel_loader, cache, root)
        filling = CacheFill(root, key, gemma3_model, unique, t.vision_attention)
        if filling.superseded:  # a build finished it while this run waited for the lock
            return FeatureSource(FeatureMode.CACHED, pixel_loader, VisionFeatureCache(folder), root)
        if t.compile_vision_cache:
            # The steps run SigLIP on full batches (the last one is padded), so it compiles once.
            compile_vision_layers(gemma3_model)
        return FeatureSource(FeatureMode.FILLING, pixel_loader, filling, root)
    cache = VisionFeatureCache.build_or_load(
        root,
        gemma3_model,
        image_paths,
        pixel_loader,
        pixel_loader.preprocessing(),
        batch_size=t.feature_cache_batch_size,
        workers=cfg.data.decode_workers,
        compile_vision=t.compile_vision_cache,
        progress=progress,
        attention=t.vision_attention,
    )
    return FeatureSource(FeatureMode.CACHED, pixel_loader, cache, root)
