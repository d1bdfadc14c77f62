"""Secrets and patients stay out of everything a run writes; only safetensors, never remote code.

One short Phase-1 run through the CLI with a (fake) ``HF_TOKEN`` in its environment and TensorBoard
logging on, then a push dry run of its output: every byte written (adapter, checkpoints including the
Trainer's pickled ``training_args.bin``, TensorBoard events, staged upload, captured stdout/stderr) is
searched for the token and for the sample CSV's PatientID and StudyID values.
"""

from __future__ import annotations

import ast
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "xray_train"
PADCHEST_CSV = REPO / "data" / "samples" / "padchest" / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
FAKE_TOKEN = "hf_FakeTokenForXrayTrainTests0123456789abc"


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def phase1_run(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("secure")
    out = work / "phase1"
    loggers = "[tensorboard]" if _has("tensorboard") or _has("tensorboardX") else "[none]"
    env = dict(
        os.environ, HF_TOKEN=FAKE_TOKEN, HUGGING_FACE_HUB_TOKEN=FAKE_TOKEN, HF_HUB_OFFLINE="1",
        XRAY_TRAIN_FEATURE_CACHE=str(work / "feature-cache"), OMP_NUM_THREADS="1",
    )  # fmt: skip
    args = [
        sys.executable, "-m", "xray_train.cli", "phase1", "-c", str(REPO / "configs" / "demo" / "phase1.yaml"),
        "--set", f"model.base={tiny_model_dir}", "--set", f"output_dir={out}", "--set", "training.max_steps=2",
        "--set", "training.save_steps=1", "--set", "training.eval_steps=2", "--set", "training.logging_steps=1",
        "--set", f"training.report_to={loggers}",
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleRun(out, work, proc.stdout + proc.stderr, loggers)


class SimpleRun:
    def __init__(self, out: Path, work: Path, console: str, loggers: str):
        self.out, self.work, self.console, self.loggers = out, work, console, loggers


def _every_file(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_token_never_written_or_printed(phase1_run, monkeypatch):
    from xray_train.hub import push_to_hub

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    staged = phase1_run.work / "staged"
    # The tiny base is not MedGemma: published under its id knowingly.
    push_to_hub(phase1_run.out, "my-lab/cxr-test", dry_run_dir=staged, base_model="google/medgemma-4b-it", force=True)
    files = _every_file(phase1_run.out, staged)
    names = {p.name for p in files}
    assert {"training_args.bin", "trainer_state.json", "README.md", "xray_train_config.yaml"} <= names
    if phase1_run.loggers == "[tensorboard]":
        assert any(p.name.startswith("events.out.tfevents") for p in files)
    token = FAKE_TOKEN.encode()
    leaks = [str(p) for p in files if token in p.read_bytes()]
    assert leaks == []
    assert FAKE_TOKEN not in phase1_run.console


def _sample_ids() -> tuple[set[str], set[str], set[str]]:
    with PADCHEST_CSV.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return ({r["PatientID"] for r in rows if r["PatientID"]}, {r["StudyID"] for r in rows if r["StudyID"]},
            {r["ImageID"] for r in rows if r["ImageID"]})  # fmt: skip


@pytest.mark.slow
def test_no_patient_identifiers_in_outputs_or_logs(phase1_run):
    patients, studies, images = _sample_ids()
    texts = {str(p): p.read_bytes().decode("latin-1") for p in _every_file(phase1_run.out)}
    texts["<console>"] = phase1_run.console
    for where, text in texts.items():
        for pid in patients:
            assert pid not in text, f"PatientID in {where}"
        # PadChest image file names start with their StudyID; the names themselves may appear.
        without_names = text
        for name in images:
            without_names = without_names.replace(name, "")
        for sid in studies:
            assert sid not in without_names, f"StudyID in {where}"


# ---------------------------------------------------------------------------------------------
# Only safetensors; never remote code (static checks of the source and of what load_base passes)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_source_never_trusts_remote_code_or_unpickles():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call, name in _calls(tree):
            kwargs = {k.arg: k.value for k in call.keywords if k.arg}
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            trc = kwargs.get("trust_remote_code")
            if trc is not None and not (isinstance(trc, ast.Constant) and trc.value is False):
                problems.append(f"{where}: trust_remote_code={ast.unparse(trc)}")
            if name.endswith("torch.load") or name == "load" and "torch" in ast.unparse(call):
                wo = kwargs.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "cloudpickle.load", "dill.load", "joblib.load"):
                problems.append(f"{where}: {name}")
            if name.endswith("np.load") or name.endswith("numpy.load"):
                ap = kwargs.get("allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    problems.append(f"{where}: np.load(allow_pickle=...)")
            if name in ("eval", "exec"):
                problems.append(f"{where}: {name}")
    assert problems == []
    assert not re.search(r"trust_remote_code\s*=\s*True", "\n".join(p.read_text() for p in SRC.rglob("*.py")))


def test_load_base_asks_for_safetensors_and_no_remote_code(tiny_model_dir, monkeypatch):
    import transformers

    from xray_train.config import ModelConfig
    from xray_train.model import load_base

    seen = {}

    class Stop(Exception):
        pass

    def fake_model(name, **kwargs):
        seen["model"] = kwargs
        raise Stop

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", staticmethod(fake_model))
    with pytest.raises(Stop):
        load_base(ModelConfig(base=str(tiny_model_dir), load_in_4bit=False))
    assert seen["model"]["use_safetensors"] is True
    assert seen["model"].get("trust_remote_code", False) is False
