"""The ``xray-train`` command line: every command's help, one-line user errors (exit 2, no traceback),
``config validate`` on the demo configs, and the evaluate / predict / merge / push-to-hub glue."""

from __future__ import annotations

import json
import re
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
    ["make-tiny-model"], ["cache-features"], ["data"], ["data", "check"], ["config"], ["config", "validate"],
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
    result = runner.invoke(cli.app, ["push-to-hub", str(adapters["phase2"]), "--repo-id", "my-lab/cxr-lora", "--dry-run", str(staged),
                                     # the tiny base is a local folder, and not MedGemma: published knowingly
                                     "--base-model", "google/medgemma-4b-it", "--force"])
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


def test_the_readme_says_how_to_get_cpu_torch_before_the_install_a_newcomer_pastes():
    readme = (REPO / "README.md").read_text()
    first_install = readme.index("pip install -e")
    hint = readme.find("download.pytorch.org/whl/cpu")
    assert 0 <= hint < readme.rfind("```bash", 0, first_install), "the CPU-torch hint comes after the install block"


# ---------------------------------------------------------------------------------------------
# Conventions: --version, -h, --config everywhere, flags, --set help, Ctrl-C, --num-gpus


def test_version_names_xray_train_and_the_libraries_bug_reports_need():
    import torch

    import xray_train

    result = runner.invoke(cli.app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"xray-train {xray_train.__version__} (Python ")
    # torch's own string, build tag included, whichever build (CPU or CUDA) is installed.
    assert f"torch {torch.__version__}" in result.output and "transformers " in result.output
    assert ("CUDA usable" in result.output) == torch.cuda.is_available()


@pytest.mark.parametrize("build", ["cuda_gpu", "cuda_no_gpu", "cpu"])
def test_version_says_torchs_build_tag_whether_cuda_is_usable_and_the_gpu(monkeypatch, build):
    import torch

    # PyPI's CUDA wheel: its metadata says "2.14.1", torch itself "2.14.1+cu130".
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130" if build != "cpu" else "2.14.1+cpu")
    monkeypatch.setattr(torch.version, "cuda", None if build == "cpu" else "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: build == "cuda_gpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    output = " ".join(runner.invoke(cli.app, ["--version"]).output.split())
    if build == "cuda_gpu":
        assert "torch 2.14.1+cu130 (CUDA 13.0), CUDA usable: 1 GPU (NVIDIA H100 80GB HBM3)" in output
    elif build == "cuda_no_gpu":
        assert "torch 2.14.1+cu130 (CUDA 13.0), CUDA not usable here" in output and "H100" not in output
    else:
        assert "torch 2.14.1+cpu, CPU-only build (no CUDA)" in output


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_short_help_everywhere_and_flags_take_no_value(command):
    result = runner.invoke(cli.app, [*command, "-h"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and "-h, --help" in result.output
    assert "<bool>" not in result.output  # a flag is --overwrite, never --overwrite true


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help_shows_arguments_in_plain_notation(command):
    output = runner.invoke(cli.app, [*command, "-h"], terminal_width=100).output
    usage = output.splitlines()[0]
    assert "{" not in usage and "}" not in usage, usage
    assert "<list[" not in output


def test_predict_usage_names_its_arguments():
    output = runner.invoke(cli.app, ["predict", "-h"], terminal_width=100).output
    assert output.startswith("Usage: xray-train predict [OPTIONS] ADAPTER_DIR IMAGES...\n")
    assert "IMAGES... <path>" in output


def test_set_help_fits_the_command_and_says_how_to_write_a_list():
    helps = {name: runner.invoke(cli.app, [*name.split(), "-h"], terminal_width=200).output
             for name in ("phase1", "evaluate", "data check", "config validate")}
    for name, text in helps.items():
        assert "--set KEY=VALUE" in text and "[a,b]" in text, name
    assert "training.learning_rate" in helps["phase1"] and "training.learning_rate" in helps["config validate"]
    for name in ("evaluate", "data check"):  # commands that never train
        assert "training.learning_rate" not in helps[name] and "data.image_root=" in helps[name], name
    for name in ("predict", "merge", "push-to-hub", "demo", "make-tiny-model"):
        assert "--set" not in runner.invoke(cli.app, [*name.split(), "-h"]).output, name


def test_config_validate_takes_config_like_every_command(tiny_model_dir):
    base = ["--set", f"model.base={tiny_model_dir}", "--no-example"]
    for args in (["--config", str(DEMO / "phase1.yaml")], ["-c", str(DEMO / "phase1.yaml")], [str(DEMO / "phase1.yaml")]):
        result = runner.invoke(cli.app, ["config", "validate", *args, *base])
        assert result.exit_code == 0 and "valid" in result.output, (args, result.output)
    result = runner.invoke(cli.app, ["config", "validate", *base])
    assert result.exit_code == 2 and "--config" in result.output


def test_a_flag_given_a_value_is_refused():
    result = runner.invoke(cli.app, ["phase1", "--config", str(DEMO / "phase1.yaml"), "--overwrite", "true"])
    assert result.exit_code == 2 and "unexpected extra argument" in result.output


def _interrupt_training(monkeypatch):
    import xray_train.train

    def interrupted(cfg, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(xray_train.train, "run", interrupted)


def test_ctrl_c_before_any_checkpoint_says_a_rerun_starts_over(monkeypatch, capsys, tmp_path, tiny_model_dir):
    _interrupt_training(monkeypatch)
    code, out, err = run_main(monkeypatch, capsys, "phase1", "--config", str(DEMO / "phase1.yaml"),
                              "--set", f"model.base={tiny_model_dir}", "--set", f"output_dir={tmp_path / 'run'}")
    assert code == 130
    assert "interrupted before the first checkpoint" in err and "starts from the beginning" in err
    assert "Traceback" not in out + err and len(err.strip().splitlines()) == 1


def test_ctrl_c_names_the_checkpoint_a_rerun_resumes_from(monkeypatch, capsys, tmp_path, tiny_model_dir):
    from xray_train.run_dir import CHECKPOINT_COMPLETE

    run_dir = tmp_path / "run"
    for step, complete in ((2, True), (4, True), (6, False)):  # checkpoint-6 was being written
        (run_dir / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (run_dir / f"checkpoint-{step}" / CHECKPOINT_COMPLETE).write_text(str(step))
    _interrupt_training(monkeypatch)
    code, _, err = run_main(monkeypatch, capsys, "phase2", "--config", str(DEMO / "phase2.yaml"),
                            "--set", f"model.base={tiny_model_dir}", "--set", f"output_dir={run_dir}")
    assert code == 130
    assert "rerun the same command to resume from checkpoint-4" in err


def test_num_gpus_without_gpus_is_a_one_line_error(monkeypatch, capsys):
    import os

    import torch

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(os, "execvp", lambda *a: pytest.fail("must not launch CPU ranks"))
    code, out, err = run_main(monkeypatch, capsys, "phase1", "--num-gpus", "2", "--config", str(DEMO / "phase1.yaml"))
    assert code == 2 and "Traceback" not in out + err
    assert err.startswith("error: --num-gpus 2: this machine has no CUDA GPU") and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, _, err = run_main(monkeypatch, capsys, "phase1", "--num-gpus", "2", "--config", str(DEMO / "phase1.yaml"))
    assert code == 2 and "only 1 CUDA GPU" in err


# ---------------------------------------------------------------------------------------------
# Outputs on shared machines, and nothing printed that a user cannot act on


def _modes(root: Path) -> tuple[set[int], set[int]]:
    paths = [root, *root.rglob("*")]
    return ({p.stat().st_mode & 0o777 for p in paths if p.is_dir()},
            {p.stat().st_mode & 0o777 for p in paths if p.is_file()})


@pytest.mark.slow
def test_a_training_run_is_quiet_and_its_outputs_are_readable_by_others(tiny_model_dir, tmp_path):
    import os
    import subprocess

    out, cache = tmp_path / "run", tmp_path / "features"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", XRAY_TRAIN_FEATURE_CACHE=str(cache),
               MPLCONFIGDIR=str(tmp_path / "mpl"))  # an empty matplotlib cache: the font cache is built
    args = [sys.executable, "-m", "xray_train.cli", "phase1", "--config", str(DEMO / "phase1.yaml"),
            "--set", f"model.base={tiny_model_dir}", "--set", f"output_dir={out}", "--set", "training.max_steps=2",
            "--set", "training.save_steps=1", "--set", "training.eval_strategy=no", "--set", "training.report_to=[none]"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, cwd=tmp_path, umask=0o022, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout + proc.stderr
    for noise in ("pip install kernels", "is deprecated", "font cache"):
        assert noise not in printed, noise
    assert (out / "checkpoint-1").is_dir() and (out / "adapter_model.safetensors").is_file()
    assert not list(out.rglob("README.md"))  # no empty "Model Card for Model ID" from peft
    for root in (out, cache):
        assert _modes(root) == ({0o755}, {0o644}), root


@pytest.mark.slow  # builds a model
def test_make_tiny_model_writes_a_folder_others_can_read(tmp_path):
    from xray_train.outputs import DIR_MODE, FILE_MODE

    result = runner.invoke(cli.app, ["make-tiny-model", str(tmp_path / "tiny"), "--hidden-size", "32", "--layers", "1"])
    assert result.exit_code == 0, result.output
    assert _modes(tmp_path / "tiny") == ({DIR_MODE}, {FILE_MODE})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-")]  # no staging left behind


@pytest.mark.slow
def test_demo_says_what_it_shows_and_prints_no_pages_of_gibberish(tiny_model_dir, tmp_path, monkeypatch):
    import xray_train.config
    import xray_train.demo

    real_load_config = xray_train.config.load_config

    def quick(path, overrides=(), **kwargs):  # the demo's chain, at a few steps and tokens
        return real_load_config(path, [*overrides, "training.max_steps=2", "training.save_steps=2",
                                       "training.eval_strategy=no", "training.report_to=[none]"], **kwargs)

    monkeypatch.setattr(xray_train.config, "load_config", quick)
    monkeypatch.setattr(xray_train.demo, "DEMO_MAX_NEW_TOKENS", 8)
    workdir = tmp_path / "demo"
    workdir.mkdir()
    (workdir / "tiny-medgemma").symlink_to(tiny_model_dir)  # an existing demo model is reused
    result = runner.invoke(cli.app, ["demo", "--workdir", str(workdir)], terminal_width=120)
    assert result.exit_code == 0, result.output[-3000:]
    out = result.output
    assert out.index("It cannot show") < out.index("Data check")  # said before anything runs
    assert "phase1:" in out and "phase2:" in out and "in the trained format" in out
    assert re.search(r"predictions: \d+ box(es)? on 3 images", out)
    for run in ("phase1", "phase2"):
        assert (workdir / run / "eval_results.md").is_file() and (workdir / run / "f1_bars.png").is_file()
    results = [json.loads((workdir / run / "eval_results.json").read_text()) for run in ("phase1", "phase2")]
    # The summary, eval_results.json and the staged card agree on every count.
    from xray_train.hub import push_to_hub

    flat = " ".join(out.split())
    for run, r in zip(("phase1", "phase2"), results):
        assert r["n_parsed"] + r["n_unparsed"] == r["n_examples"] == r["findings"]["n_studies"]
        assert r["parse_rate"] == r["n_parsed"] / r["n_examples"] and r["findings"]["n_unparsed"] == r["n_unparsed"]
        base = r["baseline"]
        assert f"{run}: {r['n_parsed']} of {r['n_examples']} test" in flat
        assert f"in the trained format (base {base['n_parsed']} of {r['n_examples']})" in flat
        staged = push_to_hub(workdir / run, "my-lab/demo", dry_run_dir=tmp_path / f"staged-{run}",
                             base_model="google/medgemma-4b-it", force=True)
        card = (Path(staged) / "README.md").read_text()
        assert (f"| metric | adapter ({r['n_parsed']} of {r['n_examples']} parsed) | base model, no adapter "
                f"({base['n_parsed']} of {r['n_examples']} parsed) |") in card
        assert "Trained on synthetic samples" in card and r["synthetic_sample"]
    nothing_readable = all(r["n_unparsed"] == r["n_examples"] for r in results)
    assert ("No answer was in the trained format, so the scores are 0" in out) == nothing_readable
    assert len(list((workdir / "predictions").glob("*_pred.png"))) == 3


def test_the_ctrl_c_message_starts_on_its_own_line_after_a_progress_bar(monkeypatch):
    """In a terminal, a bar that Ctrl-C stopped leaves the cursor at the end of its line."""
    import io

    from rich.console import Console

    terminal = io.StringIO()
    monkeypatch.setattr(cli, "err_console", Console(file=terminal, force_terminal=True, width=120))
    for raised in (KeyboardInterrupt(), cli.Interrupted("interrupted: rerun the same command to resume")):
        terminal.truncate(0)
        terminal.seek(0)

        def app(raised=raised):
            terminal.write("Predicting ━━━━━━━━━━       1/2 0:00:03^C")  # the bar's last state, no newline
            raise raised

        monkeypatch.setattr(cli, "app", app)
        with pytest.raises(SystemExit) as exc:
            cli.main()
        assert exc.value.code == 130
        assert terminal.getvalue().startswith("Predicting ━━━━━━━━━━       1/2 0:00:03^C\ninterrupted")
