"""What the benchmark scripts share: the checkout's paths, the project's sources first on the import path,
and the facts every results file records (device, package versions).

The benchmarks are scripts run from a checkout (``python benchmarks/bench_x.py``), so Python puts this
folder on the path and ``import common`` finds this module; importing it puts the checkout's ``src/``
ahead of any installed copy, here and in the subprocesses that ``pythonpath()`` is handed to, so a
benchmark always measures the code beside it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
RESULTS = BENCHMARKS / "results"
SRC = REPO / "src"

if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def pythonpath() -> str:
    """PYTHONPATH for a benchmark's subprocess: the project's sources first, then whatever the caller put
    on the path (wheels carried to a GPU host)."""
    return os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(*packages: str) -> dict:
    """Python, torch and CUDA, then each named package's installed version (None where it is missing)."""
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    return out | {name: package_version(name) for name in packages}


def device_name() -> str:
    """The GPU every results file names (``cpu`` where there is none)."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_json(path: Path, report: dict) -> None:
    """A results file: indented JSON, its folder made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
