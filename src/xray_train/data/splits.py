"""Patient-grouped train/validation/test split.

Each group (patient) is placed by a hash of (seed, group_id) alone, so adding or removing other rows
never moves a patient between splits, and no patient is in two splits.
"""

from __future__ import annotations

import hashlib

from xray_train.data.records import Example

SPLITS = ("train", "validation", "test")


def group_position(group_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, group_id); independent of Python's hash seed."""
    digest = hashlib.sha256(f"{seed}\x00{group_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(group_id: str, val_fraction: float, test_fraction: float, seed: int) -> str:
    u = group_position(group_id, seed)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


def split_examples(
    examples: list[Example], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Example]]:
    """{"train", "validation", "test"} -> examples, input order kept within each split.

    Fractions are of patients, not images; with few patients the realised shares vary. An example whose
    source names its split (``Example.split``) stays in it.
    """
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(f"bad split fractions: val={val_fraction}, test={test_fraction} (each >= 0, sum < 1)")
    out: dict[str, list[Example]] = {name: [] for name in SPLITS}
    cache: dict[str, str] = {}
    for ex in examples:
        split = ex.split or cache.get(ex.group_id)
        if split is None:
            split = cache[ex.group_id] = assign_split(ex.group_id, val_fraction, test_fraction, seed)
        out[split].append(ex)
    return out


def cap_examples(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """At most ``limit`` of ``examples``, chosen by ``seed`` and kept in their order (training and evaluation
    cap the same way, so both see the same subset)."""
    if limit is None or len(examples) <= limit:
        return examples
    import torch

    rng = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=rng)[:limit].sort().values
    return [examples[i] for i in order]
