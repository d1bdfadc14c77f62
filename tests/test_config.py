"""Shipped configs load, say how to run them, and keep the settings the product promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from xray_train.config import ConfigError, dump_config, load_config

from .conftest import REPO

RUN_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_run_config_validates_and_starts_with_its_command(path: Path, tmp_path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run: xray-train "), first
    phase = first.split()[3]  # the command the config's first line gives is the config's own phase
    assert f"xray-train {phase} --config {path.relative_to(REPO)}" in first
    cfg = load_config(path, check_paths=False)
    assert cfg.phase == phase
    # Round trip: the resolved config saved beside outputs loads back to the same config.
    saved = tmp_path / "resolved.yaml"
    saved.write_text(dump_config(cfg))
    assert load_config(saved, check_paths=False) == cfg


@pytest.mark.parametrize("name", ["phase1_padchest.yaml", "phase2_indiana.yaml"])
def test_real_configs_use_the_seed_quantisation_and_lora(name):
    cfg = load_config(REPO / "configs" / name, check_paths=False)
    assert cfg.model.base == "google/medgemma-4b-it"
    assert (cfg.model.load_in_4bit, cfg.model.quant_type, cfg.model.double_quant) == (True, "nf4", True)
    # Precision, micro-batch and checkpointing are left to resolve (the card decides): only the effective batch.
    assert cfg.model.compute_dtype is None and cfg.training.fp16 is None and cfg.training.bf16 is None
    assert cfg.training.per_device_train_batch_size is None and cfg.training.checkpoint_layers is None
    assert cfg.training.effective_batch_size == 16
    assert (cfg.lora.r, cfg.lora.alpha, sorted(cfg.lora.target_modules)) == (32, 64, ["q_proj", "v_proj"])
    assert cfg.add_loc_tokens == cfg.train_projector == (cfg.phase == "phase2")


def test_set_overrides_are_typed_and_every_problem_is_reported(tmp_path):
    path = REPO / "configs" / "phase1_padchest.yaml"
    cfg = load_config(path, ["training.learning_rate=5e-5", "lora.r=16", "training.report_to=[none]"], check_paths=False)
    assert cfg.training.learning_rate == 5e-5 and cfg.lora.r == 16
    with pytest.raises(ConfigError) as err:
        load_config(path, ["training.learning_rate=fast", "lora.rank=8", "training.bf16=true", "training.fp16=true"],
                    check_paths=False)
    text = str(err.value)
    for key in ("training.learning_rate", "lora.rank", "fp16"):
        assert key in text
    assert len(err.value.problems) >= 3


def test_in_graph_dequantisation_refused_without_compile():
    path = REPO / "configs" / "phase1_padchest.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(path, ["training.dequantize_in_graph=true", "training.torch_compile=false"], check_paths=False)
    assert any(p.startswith("training.dequantize_in_graph") for p in err.value.problems)
    # Either alone is fine; left unset, in-graph dequantisation follows compile.
    assert load_config(path, ["training.torch_compile=false"], check_paths=False).training.dequantize_in_graph is None
    assert load_config(path, ["training.dequantize_in_graph=true"], check_paths=False).training.dequantize_in_graph


def test_checkpoint_layers_conflicts_only_with_checkpointing_switched_off():
    path = REPO / "configs" / "phase1_padchest.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(path, ["training.checkpoint_layers=6", "training.gradient_checkpointing=false",
                           "training.lora_typo=1"], check_paths=False)
    # checkpoint_layers is set, so switching checkpointing off must say to drop one of them,
    # in the same report as the other problems.
    assert any(p.startswith("training.checkpoint_layers") for p in err.value.problems)
    assert any("lora_typo" in p for p in err.value.problems)
    cfg = load_config(path, ["training.gradient_checkpointing=false", "training.checkpoint_layers=null"],
                      check_paths=False)
    assert cfg.training.gradient_checkpointing is False
    demo = load_config(REPO / "configs" / "demo" / "phase1.yaml", ["training.gradient_checkpointing=false"],
                       check_paths=False)
    assert demo.training.checkpoint_layers is None  # the default alone is no conflict


@pytest.mark.parametrize("config, setting, expected", [
    ("phase1", "data.csvv=/x", "data.csvv: unknown key (did you mean csv?)"),
    ("phase2", "data.reports_cvs=/x", "data.reports_cvs: unknown key (did you mean reports_csv?)"),
    ("phase2", "data.box_sorce=box_file", "data.box_sorce: unknown key (did you mean box_source?)"),
    ("phase1", "data.val_fractoin=0.1", "(did you mean val_fraction?)"),
])  # fmt: skip
def test_a_misspelt_data_key_suggests_a_key_of_its_dataset(config, setting, expected):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "demo" / f"{config}.yaml", [setting], check_paths=False)
    assert expected in str(err.value)
    # Another dataset's key is unknown here, with no suggestion from that dataset.
    with pytest.raises(ConfigError, match=r"data.reports_csv: unknown key \[from --set\]"):
        load_config(REPO / "configs" / "demo" / "phase1.yaml", ["data.reports_csv=/x"], check_paths=False)


def test_plain_text_boxes_add_no_loc_tokens_unless_asked():
    path = REPO / "configs" / "phase2_indiana.yaml"
    assert load_config(path, check_paths=False).add_loc_tokens
    text = load_config(path, ["data.box_format=text"], check_paths=False)
    assert text.data.box_format == "text" and not text.add_loc_tokens
    assert load_config(path, ["data.box_format=text", "model.add_loc_tokens=true"], check_paths=False).add_loc_tokens
    with pytest.raises(ConfigError) as err:
        load_config(path, ["data.box_format=json", "training.loc_label_sigma=-1"], check_paths=False)
    assert {p.split(":")[0] for p in err.value.problems} >= {"data.box_format", "training.loc_label_sigma"}
