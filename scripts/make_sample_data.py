"""Regenerate the committed synthetic sample data (deterministic; same output on every run).

    python scripts/make_sample_data.py            # writes data/samples/{padchest,indiana}
    python scripts/make_sample_data.py --out DIR  # elsewhere (tests compare the two)

``data/samples/padchest/``: PadChest layout (real 36-column CSV, nested ImageDir folders, 16-bit PNGs).
``data/samples/indiana/``: Indiana Kaggle layout (reports, projections, 8-bit PNGs) + exact ``boxes.csv``.
Nothing here is patient data: every film is drawn by ``xray_train.testing.synthetic``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from xray_train.testing.synthetic import write_indiana, write_padchest

PADCHEST_SEED = 20190201
INDIANA_SEED = 3851
N_IMAGES = 48
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "samples"


def make_samples(out: Path) -> None:
    for name, writer, seed in (("padchest", write_padchest, PADCHEST_SEED), ("indiana", write_indiana, INDIANA_SEED)):
        target = out / name
        # Start clean so files from an older generator version cannot linger beside the new ones.
        if target.exists():
            shutil.rmtree(target)
        writer(target, n=N_IMAGES, seed=seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder receiving padchest/ and indiana/")
    args = parser.parse_args(argv)
    make_samples(args.out)
    print(f"wrote {args.out / 'padchest'} and {args.out / 'indiana'}")


if __name__ == "__main__":
    main()
