"""Where a cache build's host side tops out: reading full-size films, alone and through the project's reader.

    python benchmarks/bench_reading.py --out benchmarks/results/reading_speed.json     # a GPU host
    python benchmarks/bench_reading.py --films 8 --out /tmp/reading.json              # a quick local run

The vision-feature cache build overlaps reading with SigLIP, so it runs at the slower of the two. This
separates the host's part, on PadChest-size 16-bit films (``bench_e2e.make_films``), each figure in films/s:

- ``decode_1_process`` / ``prepare_1_process``: PIL's decode alone, and ``PixelLoader.prepare`` (decode,
  window, pad, resize: what a worker does per film), in this process;
- ``prepare_pool_N``: ``prepare`` in a plain process pool of N, results discarded: the cores' capacity;
- ``reader_N``: ``data.loader.prepared_batches`` with N workers, batches of 32 stacked and pinned, as the
  cache build reads them (N = the CPUs, the default, and fewer, leaving cores to the main process), from
  the call (worker start-up included) and, under ``films_per_s_after_first_batch``, after its first batch;
- ``reader_N_to_gpu``: the same, each batch copied to the GPU (asynchronously, as the build does).

A reader rate well under the pool's points at the reader's own plumbing (the main process collecting,
stacking and pinning); a pool rate near the reader's points at the cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

from common import REPO, device_name, write_json  # noqa: E402 - also puts the checkout's src/ first on the path


def _decode(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.size


def _physical_cores() -> int | None:
    """Distinct (socket, core) pairs in /proc/cpuinfo: fewer than the CPUs means hyperthreads share cores."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    pairs, socket = set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            socket = value.strip()
        elif key.strip() == "core id":
            pairs.add((socket, value.strip()))
    return len(pairs) or None


def _rate(n: int, fn) -> float:
    started = time.perf_counter()
    fn()
    return round(n / (time.perf_counter() - started), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "reading_speed.json")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/xray-reading"))
    ap.add_argument("--films", type=int, default=96, help="distinct films")
    ap.add_argument("--reads", type=int, default=3, help="times each film is read per pass")
    args = ap.parse_args()

    from multiprocessing import Pool

    import torch

    from bench_e2e import make_films
    from xray_train.data.loader import available_cpus, prepared_batches
    from xray_train.features import host_threads_for
    from xray_train.inputs import PixelLoader

    cpus = available_cpus()
    films = make_films(args.workdir, args.films, 2, (2000, 3000), cpus)
    paths = sorted(Path(films["padchest_images"]).rglob("*.png"))[: args.films] * args.reads
    loader = PixelLoader(SimpleNamespace(image_processor=None), 896)  # prepare() needs only the size
    cuda = torch.cuda.is_available()
    results = {"decode_1_process": _rate(8, lambda: [_decode(p) for p in paths[:8]]),
               "prepare_1_process": _rate(8, lambda: [loader.prepare(p) for p in paths[:8]])}
    with Pool(cpus) as pool:
        pool.map(loader.prepare, paths[:cpus])  # workers started and warm
        results[f"prepare_pool_{cpus}"] = _rate(len(paths), lambda: pool.map(loader.prepare, paths, chunksize=1))

    steady = {}

    def read(workers: int, to_gpu: bool) -> float:
        """films/s from the call (worker start-up included); the rate after the first batch goes to ``steady``."""
        started = time.perf_counter()
        first = None
        # As a GPU cache build reads: this process keeps one intra-op thread meanwhile.
        with host_threads_for(torch.device("cuda" if cuda else "cpu")):
            for batch in prepared_batches(paths, loader.prepare, 32, workers, pin_memory=cuda):
                if to_gpu:
                    batch.pixels.to("cuda", non_blocking=True)
                if first is None:
                    first = (time.perf_counter(), len(batch.indices))
        if to_gpu:
            torch.cuda.synchronize()
        ended = time.perf_counter()
        name = f"reader_{workers}" + ("_to_gpu" if to_gpu else "")
        after = len(paths) - first[1]
        steady[name] = round(after / (ended - first[0]), 1) if after else None  # one batch: no steady part
        return round(len(paths) / (ended - started), 1)

    for workers in sorted({cpus, max(1, cpus - 1), max(1, cpus - 2), max(1, cpus // 2)}, reverse=True):
        results[f"reader_{workers}"] = read(workers, False)
    if cuda:
        results[f"reader_{cpus}_to_gpu"] = read(cpus, True)
    report = {"device": device_name(), "cpus": cpus,
              "physical_cores": _physical_cores(), "films_per_s_after_first_batch": steady,
              "film_px": films["film_px"], "film_mb_median": films["film_mb_median"],
              "paths_per_pass": len(paths), "films_per_s": results}
    write_json(args.out, report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
