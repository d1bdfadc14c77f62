"""The registry is the one place a dataset is named: config.py's data sections, phase check and path
checks, and the model card all follow it."""

from __future__ import annotations

import typing

import pytest

from xray_train import config
from xray_train.config import ConfigError, load_config
from xray_train.data import registry
from xray_train.data.registry import DATASETS, datasets_for


@pytest.mark.parametrize("name", list(DATASETS))
def test_entry_resolves(name):
    entry = DATASETS[name]
    cls = config.DATA_CLASSES[name]
    assert cls.__name__ == entry.config
    assert typing.get_args(cls.model_fields["dataset"].annotation) == (name,)
    assert callable(__import__(entry.reader, fromlist=["read"]).read)
    assert set(entry.phases) <= {"phase1", "phase2"} and entry.phases
    assert set(entry.required_paths) <= set(cls.model_fields)


def test_phase_lists_follow_the_registry():
    assert datasets_for("phase1")[0] == "padchest" and "nih" not in datasets_for("phase1")
    assert "padchest" not in datasets_for("phase2") and "indiana" in datasets_for("phase2")


def test_a_new_entry_is_asked_by_the_phase_and_path_checks(monkeypatch):
    """A dataset added to the table only is known to the phase check and the path check."""
    entry = registry.DatasetEntry("nih2", "NihData", "xray_train.data.nih", ("phase1", "phase2"), "NIH again",
                                  ("image_root", "csv"))
    monkeypatch.setitem(DATASETS, "nih2", entry)
    assert "nih2" in datasets_for("phase1")
    assert config._run_conflicts("phase1", "nih2", None, None) == []
    problems = config._check_paths({"data": {"dataset": "nih2", "image_root": "/nope"}})
    assert "data.csv: required for data.dataset=nih2" in problems
    assert "data.image_root: not found: /nope" in problems
    assert registry.title("nih2") == "NIH again"


def test_phase_check_names_the_datasets_of_the_phase(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"phase: phase1\noutput_dir: {tmp_path}/out\ndata: {{dataset: nih, image_root: {tmp_path}, csv: {path}}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, check_model=False)
    assert f"phase1 trains on report targets: must be one of {', '.join(datasets_for('phase1'))}, not nih" in str(err.value)


def test_card_names_datasets_from_the_registry():
    from xray_train.hub import card

    assert card.dataset_title("vindr", synthetic=False) == DATASETS["vindr"].title
    assert card.dataset_title("unknown-set", synthetic=False) == "unknown-set"
    assert DATASETS["indiana"].title in card.dataset_title("indiana", synthetic=True)
