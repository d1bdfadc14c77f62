"""How long reading and checking a large ``dataset: hf`` set takes, and how its memory grows with the rows.

    python benchmarks/bench_hf_read.py --out benchmarks/results/hf_read.json             # 100k rows, ~5 min
    python benchmarks/bench_hf_read.py --rows 2000 --sizes 1000,2000 --out /tmp/hf.json  # a quick run

Builds (in a temporary folder) a parquet set of ``--rows`` rows with image paths as text, a report column
in the Phase-1 form, a labels list and a patient id, over small 16-bit PNG films (``--films`` distinct
contents, hard-linked under one name per row, so the files are many but the disk stays small). Then, each in
a fresh process so its peak memory is its own:

- ``read``: ``registry.read_dataset`` (``datasets`` prepares its Arrow copy on the first read: ``first_read``
  includes that, ``read`` is a second read from the prepared copy);
- ``check_no_images``: ``data check --no-images`` (read, split, summarise);
- ``check``: ``data check`` (every image opened and decoded): the figure in docs/your_data.md. The films are
  small, so this is the reader's and the checker's own cost; decoding full-size films costs what
  ``reading_speed.json`` measures, per film;
- ``streaming``: ``read`` with ``data.streaming: true``;
- ``memory``: peak resident memory of ``read`` at each of ``--sizes`` rows: its growth per row is the
  examples kept (paths, ids, findings), not the table, which is read ``hf.BATCH_ROWS`` rows at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

REPORT = "FINDINGS:\n- {finding}: {where}\nLOCATIONS: {where}\nIMPRESSION: {finding}."
FINDINGS = ["cardiomegaly", "pleural effusion", "nodule", "atelectasis"]
PLACES = ["left", "right", "basal", "apical"]


def build(folder: Path, rows: int, films: int) -> Path:
    """A parquet of ``rows`` rows whose images are ``images/<k>/<i>.png`` (hard links to ``films`` PNGs)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder.mkdir(parents=True)
    originals = []
    for k in range(films):
        yy, xx = np.mgrid[:64, :64]
        arr = ((xx * 37 + yy * 11 + k * 101) * 13 % 4096).astype(np.uint16)
        path = folder / f"film{k}.png"
        Image.fromarray(arr).save(path)
        originals.append(path)
    names, reports, labels, patients = [], [], [], []
    for i in range(rows):
        name = f"images/{i % 100}/{i}.png"
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(originals[i % films], target)
        finding, where = FINDINGS[i % 4], PLACES[(i // 4) % 4]
        names.append(name)
        reports.append(REPORT.format(finding=finding, where=where))
        labels.append([finding])
        patients.append(f"patient{i // 3}")
    table = pa.table({"image": names, "report": reports, "labels": labels, "patient": patients})
    out = folder / "data" / "train.parquet"
    out.parent.mkdir()
    pq.write_table(table, out, row_group_size=10_000)
    return out


def data_section(parquet: Path, streaming: bool = False):
    from xray_train.config import data_config

    return data_config(
        dataset="hf", source=str(parquet), image_root=parquet.parent.parent, streaming=streaming,
        columns={"image": "image", "report": "report", "labels": "labels", "patient_id": "patient"},
    )


def measure(parquet: Path, what: str) -> dict:
    """One measurement in this process: seconds, peak RSS, and the row accounting it saw."""
    from xray_train.data.check import check_dataset
    from xray_train.data.registry import read_dataset

    cfg = data_section(parquet, streaming=what == "streaming")
    started = time.perf_counter()
    if what in ("read", "streaming", "first_read"):
        result = read_dataset(cfg)
        counts = {"rows_total": result.rows_total, "examples": len(result.examples),
                  "skipped": sum(result.skipped.values())}
    else:
        summary = check_dataset(cfg, open_images=what == "check", progress=False)
        counts = {"rows_total": summary["rows_total"], "examples": summary["examples"],
                  "skipped": sum(summary["skipped"].values())}
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_mb, 1), **counts}


def in_child(parquet: Path, what: str, cache: Path) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "XRAY_TRAIN_CACHE": str(cache / "xray"),
           "PYTHONPATH": str(REPO / "src"), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", str(parquet), what], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    import datasets
    import pyarrow

    return {"cpu": model, "cpus": os.cpu_count(), "memory_mb": mem, "load_average_at_start": os.getloadavg(),
            "python": platform.python_version(), "datasets": datasets.__version__, "pyarrow": pyarrow.__version__,
            "device": "CPU only (no GPU used)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--sizes", default="10000,50000,100000", help="Row counts for the memory curve.")
    parser.add_argument("--films", type=int, default=16)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), args.child[1])))
        return
    if args.out is None:
        parser.error("--out is required")

    record = {"machine": machine(), "rows": args.rows, "films_distinct": args.films, "film_px": "64x64 16-bit PNG"}
    with tempfile.TemporaryDirectory(prefix="bench_hf_") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        parquet = build(tmp / f"set{args.rows}", args.rows, args.films)
        record["build_seconds"] = round(time.perf_counter() - started, 1)
        cache = tmp / "cache"
        record["runs"] = {what: in_child(parquet, what, cache)
                          for what in ("first_read", "read", "check_no_images", "check", "streaming")}
        memory = {}
        for size in sorted(int(s) for s in args.sizes.split(",")):
            if size == args.rows:
                memory[size] = record["runs"]["read"]["peak_rss_mb"]
                continue
            part = build(tmp / f"set{size}", size, args.films)
            memory[size] = in_child(part, "read", cache)["peak_rss_mb"]
        record["memory_peak_rss_mb_by_rows"] = memory
        sizes = sorted(memory)
        if len(sizes) > 1:
            slope = (memory[sizes[-1]] - memory[sizes[0]]) / (sizes[-1] - sizes[0])
            record["memory_kb_per_row"] = round(slope * 1024, 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
