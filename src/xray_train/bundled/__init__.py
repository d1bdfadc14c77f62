"""Files shipped with xray-train: the run configs (``configs/``) and the synthetic sample datasets
(``data/samples/``) that ``xray-train demo`` trains on.

In a source checkout ``configs`` and ``data`` here are links to the repository's own folders; a built
wheel holds copies, so the same paths work after ``pip install .`` and from any working directory.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs"
SAMPLES = ROOT / "data" / "samples"
