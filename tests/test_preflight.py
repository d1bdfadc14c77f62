"""Values that transformers, peft, a logger or the Hub would reject after minutes of loading are refused by
``config validate`` and by ``phase1``/``phase2`` before any weight loads: exit 2, the key named, no traceback."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xray_train import model
from xray_train.config import load_config

from tests.test_cli import run_main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if anything gets as far as loading the base's weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded before the problem was reported")

    monkeypatch.setattr(model, "load_base", refuse)


def demo_args(command: str, tiny: Path, tmp_path: Path, *sets: str) -> list[str]:
    phase = "phase1"
    config = str(DEMO / f"{phase}.yaml")
    args = ["config", "validate", config] if command == "validate" else [phase, "--config", config]
    base = [f"model.base={tiny}", f"output_dir={tmp_path / 'out'}", "training.report_to=[none]", *sets]
    for text in base:
        args += ["--set", text]
    return args


def assert_refused(code: int, out: str, err: str) -> str:
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert "valid" not in out  # config validate never calls it valid first
    assert err.startswith("error: ")
    return " ".join(err.split())


WOULD_FAIL_LATER = [
    ("training.lr_scheduler_type=cosin", "training.lr_scheduler_type: unknown scheduler 'cosin' (did you mean cosine?)"),
    ("training.optim=adamw_torchh", "training.optim: unknown optimizer 'adamw_torchh' (did you mean adamw_torch?)"),
    ("lora.target_modules=[qproj]", "lora.target_modules: 'qproj' matches no layer of the base's language model "
     "(did you mean q_proj?)"),
    ("lora.target_modules=[q_proj, layers]", "lora.target_modules: 'layers' names a ModuleList, which LoRA cannot adapt"),
    # SigLIP has q_proj/v_proj too; LoRA only ever targets the language model, so a vision-only name matches nothing.
    ("lora.target_modules=[out_proj]", "lora.target_modules: 'out_proj' matches no layer of the base's language model"),
]  # fmt: skip


@pytest.mark.parametrize("command", ["validate", "phase1"])
@pytest.mark.parametrize("setting, expected", WOULD_FAIL_LATER, ids=[s for s, _ in WOULD_FAIL_LATER])
def test_values_hf_or_peft_would_reject_are_refused_before_loading(
    command, setting, expected, tiny_model_dir, tmp_path, monkeypatch, capsys, no_weights
):
    code, out, err = run_main(monkeypatch, capsys, *demo_args(command, tiny_model_dir, tmp_path, setting))
    assert expected in assert_refused(code, out, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
@pytest.mark.parametrize("command", ["validate", "phase1"])
def test_a_logger_that_is_not_installed_is_refused(command, tiny_model_dir, tmp_path, monkeypatch, capsys, no_weights):
    code, out, err = run_main(monkeypatch, capsys, *demo_args(command, tiny_model_dir, tmp_path, "training.report_to=wandb"))
    assert "training.report_to: wandb is not installed (pip install wandb" in assert_refused(code, out, err)


def test_report_to_takes_a_name_or_a_comma_list_like_hugging_face(tiny_model_dir):
    def report_to(value):
        return load_config(DEMO / "phase1.yaml", [f"model.base={tiny_model_dir}", f"training.report_to={value}"]
                           ).training.report_to

    assert report_to("tensorboard") == ["tensorboard"]
    assert report_to("none, tensorboard") == ["none", "tensorboard"]
    assert report_to("[tensorboard]") == ["tensorboard"]


def test_misspelt_keys_get_a_suggestion_and_each_problem_its_own_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    args = demo_args("validate", tiny_model_dir, tmp_path, "training.learning_rat=1e-4", "trainig.seed=3",
                     "lora.rank=8", "lora.alpha=-1")
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].endswith("4 problems:")
    problems = sorted(line.strip() for line in lines[1:])
    assert problems == sorted([
        "training.learning_rat: unknown key (did you mean learning_rate?) [from --set]",
        "trainig: unknown key (did you mean training?) [from --set]",
        "lora.rank: unknown key [from --set]",  # nothing close enough to suggest
        "lora.alpha: Input should be greater than 0 (got -1) [from --set]",
    ])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# A Hub base without network: fast, one line, a hint, no retry spam, no raw markup


def xray_train(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    full_env.update(COLUMNS="300", **env)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "xray_train.cli", *args], capture_output=True, text=True, env=full_env)
    return proc, time.monotonic() - started


def assert_clean_hub_failure(proc, elapsed) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "Traceback" not in text and "Retrying" not in text and "[yellow]" not in text
    assert "valid" not in proc.stdout
    assert elapsed < 60, f"took {elapsed:.0f}s"
    err = " ".join(proc.stderr.split())
    assert "hf auth login" in err and "set model.base to a local copy" in err
    return err


@pytest.mark.parametrize("command", ["validate", "phase1"])
def test_hub_base_offline_fails_fast_with_a_hint(command, tmp_path):
    args = ["config", "validate", str(DEMO / "phase1.yaml")] if command == "validate" else \
        ["phase1", "--config", str(DEMO / "phase1.yaml")]  # fmt: skip
    proc, elapsed = xray_train(*args, "--set", "model.base=google/medgemma-4b-it", "--set",
                               f"output_dir={tmp_path / 'out'}", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    err = assert_clean_hub_failure(proc, elapsed)
    assert "model.base: google/medgemma-4b-it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in err
    assert not (tmp_path / "out").exists()


def test_hub_unreachable_fails_fast_with_a_hint(tmp_path):
    # Nothing listens on port 9: the connection is refused at once, as with no network.
    proc, elapsed = xray_train("config", "validate", str(DEMO / "phase1.yaml"), "--set",
                               "model.base=google/medgemma-4b-it", HF_ENDPOINT="http://127.0.0.1:9",
                               HF_HOME=str(tmp_path / "hf"))
    err = assert_clean_hub_failure(proc, elapsed)
    assert "model.base: cannot reach the Hugging Face Hub" in err and "not in the local cache" in err


def test_hub_unreachable_uses_a_cached_base_without_retrying(tmp_path, tiny_model_dir):
    """A base in the Hub cache is checked against (its target modules here) and the run goes on offline."""
    snapshot = tmp_path / "hf" / "hub" / "models--my-lab--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    proc, _ = xray_train("config", "validate", str(DEMO / "phase1.yaml"), "--set", "model.base=my-lab/tiny",
                         "--set", "lora.target_modules=[qproj]", HF_ENDPOINT="http://127.0.0.1:9",
                         HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode == 2 and "Retrying" not in proc.stderr
    assert "lora.target_modules: 'qproj' matches no layer" in " ".join(proc.stderr.split())


def test_gated_base_says_licence_and_login(tmp_path, monkeypatch, capsys, no_weights):
    import httpx
    import huggingface_hub
    # A submodule: imported by name, not reached as an attribute that only an earlier import made exist.
    import huggingface_hub.constants
    from huggingface_hub import errors

    def gated(url, **kwargs):
        response = httpx.Response(401, request=httpx.Request("HEAD", url))
        raise errors.GatedRepoError("Access to model google/medgemma-4b-it is restricted.", response=response)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", gated)
    args = demo_args("validate", "google/medgemma-4b-it", tmp_path)
    code, out, err = run_main(monkeypatch, capsys, *args)
    err = assert_refused(code, out, err)
    assert "model.base: google/medgemma-4b-it is gated and this machine has no access" in err
    assert "https://huggingface.co/google/medgemma-4b-it" in err and "hf auth login" in err


# ---------------------------------------------------------------------------------------------
# The data is read and checked before any weight loads

SAMPLE_CSV = REPO / "data" / "samples" / "padchest" / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"


def _bad_data(kind: str, tmp_path: Path) -> tuple[str, str]:
    """(--set override, expected error text) for one kind of unusable data."""
    csv = tmp_path / f"{kind}.csv"
    if kind == "empty_csv":
        csv.write_text("")
        return f"data.csv={csv}", f"{csv}: cannot parse PadChest CSV"
    if kind == "wrong_columns":
        csv.write_text("image,label\na.png,nodule\n")
        return f"data.csv={csv}", f"{csv}: missing column(s) 'ImageID'"
    if kind == "header_only":
        csv.write_text(SAMPLE_CSV.read_text().splitlines()[0] + "\n")
        return f"data.csv={csv}", f"{csv}: no usable examples: it has no data rows"
    empty = tmp_path / "no-images-here"
    empty.mkdir()
    return f"data.image_root={empty}", f"first missing_image at row 1: {empty}/"


@pytest.mark.parametrize("command", ["validate", "phase1"])
@pytest.mark.parametrize("kind", ["empty_csv", "wrong_columns", "header_only", "empty_image_folder"])
def test_unusable_data_is_refused_before_loading(command, kind, tiny_model_dir, tmp_path, monkeypatch, capsys, no_weights):
    setting, expected = _bad_data(kind, tmp_path)
    code, out, err = run_main(monkeypatch, capsys, *demo_args(command, tiny_model_dir, tmp_path, setting))
    assert expected in assert_refused(code, out, err)
    assert not (tmp_path / "out").exists()
