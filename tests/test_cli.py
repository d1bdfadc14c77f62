"""The ``xray-train`` command line: every command's help, one-line user errors (exit 2, no traceback),
``config validate`` on the demo configs, and the evaluate / predict / merge / push-to-hub glue."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.test_evaluate import copy_adapter, trained_adapters
from xray_train import cli

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"
COMMANDS = [
    [], ["phase1"], ["phase2"], ["evaluate"], ["predict"], ["merge"], ["push-to-hub"], ["demo"],
    ["make-tiny-model"], ["data"], ["data", "check"], ["config"], ["config", "validate"],
]

runner = CliRunner()


@pytest.fixture
def adapters(make_config, tmp_path_factory):
    return trained_adapters(make_config, tmp_path_factory)


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The installed entry point (``cli.main``: XrayTrainError -> one line, exit 2), output captured."""
    monkeypatch.setattr(sys, "argv", ["xray-train", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_every_command_has_help(command):
    result = runner.invoke(cli.app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output) > 200


def test_bad_config_is_one_line_naming_the_key(monkeypatch, capsys, tmp_path, tiny_model_dir):
    raw = yaml.safe_load((DEMO / "phase1.yaml").read_text())
    raw["data"]["csv"] = str((DEMO / raw["data"]["csv"].replace("${CONFIG_DIR}/", "")).resolve())
    raw["data"]["image_root"] = str((DEMO / raw["data"]["image_root"].replace("${CONFIG_DIR}/", "")).resolve())
    raw["training"]["learning_rate"] = -1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    code, out, err = run_main(monkeypatch, capsys, "config", "validate", str(bad), "--set", f"model.base={tiny_model_dir}")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "training.learning_rate" in lines[0] and lines[0].startswith("error:")
    assert "Traceback" not in out + err


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_config_validate_on_the_demo_configs_shows_the_supervised_example(phase, tiny_model_dir):
    result = runner.invoke(cli.app, ["config", "validate", str(DEMO / f"{phase}.yaml"), "--set", f"model.base={tiny_model_dir}"])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "supervised" in result.output
    assert "<image_soft_token> x 16" in result.output  # the image run is collapsed, never a target
    if phase == "phase2":
        assert "<loc" in result.output


def test_push_to_hub_dry_run_lists_the_staged_files(adapters, tmp_path):
    staged = tmp_path / "staged"
    result = runner.invoke(cli.app, ["push-to-hub", str(adapters["phase2"]), "--repo-id", "my-lab/cxr-lora", "--dry-run", str(staged)])
    assert result.exit_code == 0, result.output
    for name in ("README.md", "adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        assert name in result.output and (staged / name).is_file()
    assert "nothing uploaded" in result.output
    assert not any(p.name.startswith("checkpoint") for p in staged.iterdir())


def test_push_to_hub_bad_repo_id_is_exit_2(adapters, monkeypatch, capsys, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, "push-to-hub", str(adapters["phase1"]), "--repo-id", "no-slash",
                            "--dry-run", str(tmp_path / "s"))
    assert code == 2 and "ORG/NAME" in err and "Traceback" not in err


def test_evaluate_command_writes_results(adapters, tmp_path):
    adapter = copy_adapter(adapters["phase1"], tmp_path / "adapter")
    result = runner.invoke(cli.app, ["evaluate", str(adapter), "--no-baseline", "--max-samples", "2",
                                     "--max-new-tokens", "3", "--split", "validation"])
    assert result.exit_code == 0, result.output
    saved = json.loads((adapter / "eval_results.json").read_text())
    assert saved["split"] == "validation" and saved["n_examples"] <= 2 and saved["baseline"] is None
    assert "teacher-forced token accuracy" in result.output


def test_predict_and_merge_user_errors_exit_2(adapters, monkeypatch, capsys, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, "predict", str(adapters["phase1"]), str(REPO / "data" / "samples"),
                            "--task", "detect", "--out", str(tmp_path / "p"))
    assert code == 2 and "Phase-1 adapter" in err and "Traceback" not in err
    code, _, err = run_main(monkeypatch, capsys, "merge", str(adapters["phase1"]), str(adapters["phase1"] / "m"))
    assert code == 2 and "must not be the adapter dir" in err
    code, _, err = run_main(monkeypatch, capsys, "predict", str(adapters["phase1"]), "x.png", "--task", "nope")
    assert code == 2  # click rejects the choice itself


@pytest.mark.parametrize("name, boxes", [("phase1", False), ("phase2", True)])
def test_data_check_on_the_bundled_samples_needs_no_model(tmp_path, name, boxes):
    """The README's first step works before any model is downloaded: the demo configs name a tiny model
    that does not exist yet, and data check must not care."""
    out = tmp_path / "summary.json"
    result = runner.invoke(cli.app, ["data", "check", "--config", str(REPO / "configs" / "demo" / f"{name}.yaml"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["examples"] > 0
    assert summary["examples"] + sum(summary["skipped"].values()) == summary["rows_total"]
    assert ("boxes_total" in summary and summary["boxes_total"] > 0) == boxes
