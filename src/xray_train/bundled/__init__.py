"""Files shipped with xray-train: the run configs (``configs/``) and the synthetic sample datasets
(``data/samples/``) that ``xray-train demo`` trains on.

In a source checkout ``configs`` and ``data`` here are links to the repository's own folders; a built
wheel holds copies, so the same paths work after ``pip install .`` and from any working directory.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs"
SAMPLES = ROOT / "data" / "samples"


def is_bundled_sample(path) -> bool:
    """Does ``path`` lie in the bundled synthetic samples (a source checkout's ``data/samples`` or a wheel's
    copy)? Such data is drawn by xray-train, not taken from the dataset whose format it has."""
    try:
        return Path(path).expanduser().resolve().is_relative_to(SAMPLES.resolve())
    except (OSError, RuntimeError, TypeError, ValueError):
        return False


#: The data-section keys that name files a dataset reader opens.
DATA_FILE_KEYS = ("csv", "reports_csv", "projections_csv", "box_file", "image_root")


def reads_bundled_samples(data: dict | None) -> bool:
    """Does a data config section (as a dict) read the bundled synthetic samples (``xray-train demo``)?"""
    return any(data.get(key) and is_bundled_sample(data[key]) for key in DATA_FILE_KEYS) if data else False
