"""The run directory's guards: one writer per output_dir (a second run is refused while the first holds the
lock; a lock left by a killed run is taken over), and a rerun resumes only checkpoints of the adapter it
would build itself."""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_preflight import no_weights, run_main  # noqa: F401 (fixture)
from xray_train import run_dir
from xray_train.errors import XrayTrainError
from xray_train.run_dir import DONE_MARKER, LOCK, OutputDirLock, RunDir

REPO = Path(__file__).resolve().parents[1]

HOLD = textwrap.dedent(
    """
    import sys, time
    from xray_train.run_dir import RunDir
    RunDir(sys.argv[1]).lock().acquire()
    print("locked", flush=True)
    time.sleep(600)
    """
)


@pytest.fixture
def holder(tmp_path):
    """``holder(dir)``: another process holding dir's lock, as a running phase1 would; killed at the end."""
    procs = []

    def start(directory: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path, holder):
    out = tmp_path / "run"
    proc = holder(out)
    with pytest.raises(XrayTrainError) as err:
        OutputDirLock(out).acquire()
    text = str(err.value)
    assert f"output_dir: {out} is in use by another run (pid {proc.pid} on {socket.gethostname()} since" in text
    assert json.loads((out / LOCK).read_text())["pid"] == proc.pid  # the holder's record is untouched


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, holder, caplog):
    out = tmp_path / "run"
    proc = holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / LOCK).is_file()  # a SIGKILLed run cannot clean up
    with caplog.at_level(logging.WARNING, logger="xray_train"):
        lock = OutputDirLock(out).acquire()
    assert f"pid {proc.pid}" in caplog.text and "taking over" in caplog.text
    assert json.loads((out / LOCK).read_text())["pid"] != proc.pid
    lock.release()
    assert not (out / LOCK).exists()
    with OutputDirLock(out):  # released: free again
        pass


def test_the_lock_is_per_run_even_within_one_process(tmp_path):
    with OutputDirLock(tmp_path / "a"):
        with pytest.raises(XrayTrainError, match="is in use by another run"):
            OutputDirLock(tmp_path / "a").acquire()
        with OutputDirLock(tmp_path / "b"):  # another directory is another lock
            pass


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without flock (some network mounts): the exclusive-create fallback is used."""
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)


def test_without_flock_a_live_holder_is_refused_and_a_dead_one_taken_over(tmp_path, no_flock, caplog):
    out = tmp_path / "run"
    with OutputDirLock(out):
        with pytest.raises(XrayTrainError, match="is in use by another run"):
            OutputDirLock(out).acquire()
    assert not (out / LOCK).exists()

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {"pid": int(finished.stdout), "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}
    (out / LOCK).write_text(json.dumps(dead))
    with caplog.at_level(logging.WARNING, logger="xray_train"), OutputDirLock(out):
        assert json.loads((out / LOCK).read_text())["pid"] != dead["pid"]
    assert "no longer running" in caplog.text

    # A live pid that now belongs to another process (reused) is not the holder either.
    reused = {"pid": 1, "host": socket.gethostname(), "pid_start": "-1"}
    (out / LOCK).write_text(json.dumps(reused))
    with OutputDirLock(out):
        pass

    # A holder on another host cannot be checked from here: refused, with the file to delete if it is gone.
    (out / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(XrayTrainError, match=rf"pid 1 on elsewhere .* delete {out / LOCK}"):
        OutputDirLock(out).acquire()


def test_process_start_distinguishes_a_reused_pid():
    assert run_dir._process_start(1) is not None
    assert run_dir._alive({"pid": 1, "pid_start": run_dir._process_start(1)})
    assert not run_dir._alive({"pid": 1, "pid_start": "not-its-start"})


# ---------------------------------------------------------------------------------------------
# Through the CLI


def phase1_args(tiny: Path, out: Path, *sets: str) -> list[str]:
    args = ["phase1", "--config", str(REPO / "configs" / "demo" / "phase1.yaml")]
    for text in (f"model.base={tiny}", f"output_dir={out}", "training.report_to=[none]", *sets):
        args += ["--set", text]
    return args


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}  # fmt: skip


def test_phase1_into_a_busy_output_dir_is_refused_before_loading(tiny_model_dir, tmp_path, holder, monkeypatch,
                                                                 capsys, no_weights):
    out = tmp_path / "run"
    proc = holder(out)
    before = snapshot(out)
    code, _, err = run_main(monkeypatch, capsys, *phase1_args(tiny_model_dir, out))
    assert code == 2 and "Traceback" not in err
    assert f"output_dir: {out} is in use by another run (pid {proc.pid}" in " ".join(err.split())
    assert snapshot(out) == before  # no config written over the running one's


@pytest.fixture
def interrupted_run(make_config, tmp_path_factory, tmp_path) -> Path:
    """A copy of a 4-step Phase-1 run (lora.r=32, alpha=64) with its checkpoints, as if killed before the end."""
    from tests.test_evaluate import trained_adapters

    out = tmp_path / "interrupted"
    shutil.copytree(trained_adapters(make_config, tmp_path_factory)["phase1"], out)
    (out / DONE_MARKER).unlink()
    assert (out / "checkpoint-4").is_dir()
    return out


def test_rerun_with_other_adapter_settings_stops_and_changes_nothing(interrupted_run, tiny_model_dir, monkeypatch,
                                                                     capsys, no_weights):
    before = snapshot(interrupted_run)
    code, out, err = run_main(monkeypatch, capsys, *phase1_args(tiny_model_dir, interrupted_run, "lora.r=8",
                                                                "lora.alpha=16"))
    err = " ".join(err.split())
    assert code == 2 and "Traceback" not in err and "Resuming" not in out
    assert f"output_dir: {interrupted_run} holds checkpoint-4, made with other adapter settings" in err
    assert "lora.r 32 -> 8; lora.alpha 64 -> 16" in err
    assert "pass --overwrite to start this run over, or restore these settings" in err
    assert snapshot(interrupted_run) == before  # the saved config still describes the checkpoints


def test_rerun_settings_only_adapter_shaping_ones_stop_a_resume(interrupted_run, make_config):
    def check_rerun_settings(cfg):
        RunDir(cfg.output_dir).check_rerun(cfg)

    # Training longer or at another learning rate is a resume, not another adapter.
    check_rerun_settings(make_config("phase1", "training.max_steps=8", "training.learning_rate=1e-3",
                                     output_dir=interrupted_run))
    for setting, change in [("lora.dropout=0.2", "lora.dropout 0.05 -> 0.2"),
                            ("lora.target_modules=[q_proj, k_proj, v_proj]", "lora.target_modules"),
                            ("model.add_loc_tokens=true", "model.add_loc_tokens False -> True")]:  # fmt: skip
        with pytest.raises(XrayTrainError, match=re.escape(change)):
            check_rerun_settings(make_config("phase1", setting, output_dir=interrupted_run))
    # The targets are a set: the same names in another order are the same adapter.
    check_rerun_settings(make_config("phase1", "lora.target_modules=[v_proj, q_proj]", output_dir=interrupted_run))


# ---------------------------------------------------------------------------------------------
# A run directory reads the same from any working directory


def _fake_base(folder: Path, seed: int = 0) -> Path:
    """A local base as far as recording it goes: a config.json and a safetensors weight file."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"]}))
    rng = np.random.default_rng(seed)
    save_file({"w": rng.standard_normal((64, 64)).astype(np.float32)}, str(folder / "model.safetensors"))
    return folder


def _run_with_relative_base(tmp_path, monkeypatch) -> tuple[RunDir, Path]:
    """A run written from tmp_path/work with ``model.base: models/demo/tiny`` (relative, as the demo writes it)."""
    from xray_train.config import RunConfig

    from .conftest import SAMPLES

    work = tmp_path / "work"
    base = _fake_base(work / "models" / "demo" / "tiny")
    monkeypatch.chdir(work)
    cfg = RunConfig.model_validate({
        "phase": "phase1", "output_dir": "runs/p1", "model": {"base": "models/demo/tiny"},
        "data": {"dataset": "padchest", "image_root": str(SAMPLES), "csv": "relative/labels.csv"},
    })
    run = RunDir(work / "runs" / "p1")
    run.path.mkdir(parents=True)
    run.write_config(cfg)
    return run, base


def test_a_local_base_is_recorded_absolute_with_its_fingerprint(tmp_path, monkeypatch):
    run, base = _run_with_relative_base(tmp_path, monkeypatch)
    saved = run.config_dict()
    assert saved["model"]["base"] == str(base)
    assert saved["model"]["base_fingerprint"] == run_dir.base_fingerprint(base)
    assert saved["data"]["csv"] == str(tmp_path / "work" / "relative" / "labels.csv")
    # From anywhere else, the run names the same folder.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert RunDir(run.path).base_to_load() == (str(base), None)


def test_the_fingerprint_tells_a_moved_copy_from_another_model(tmp_path):
    a = _fake_base(tmp_path / "a")
    shutil.copytree(a, tmp_path / "copy")
    other = _fake_base(tmp_path / "other", seed=1)
    assert run_dir.base_fingerprint(tmp_path / "copy") == run_dir.base_fingerprint(a)
    assert run_dir.base_fingerprint(other) != run_dir.base_fingerprint(a)


def test_a_moved_base_is_one_line_that_says_how_to_point_at_it(tmp_path, monkeypatch):
    run, base = _run_with_relative_base(tmp_path, monkeypatch)
    moved = base.with_name("moved")
    base.rename(moved)
    with pytest.raises(XrayTrainError) as exc:
        run.base_to_load()
    message = str(exc.value)
    assert f"not at {base}" in message and "--base DIR" in message and "base=DIR" in message
    assert "\n" not in message
    assert run.base_to_load(str(moved)) == (str(moved), None)  # pointed at, it loads
    # Another model where the base was: refused, not loaded silently.
    _fake_base(base, seed=1)
    with pytest.raises(XrayTrainError, match="no longer holds the model this adapter was trained on.*--base DIR"):
        run.base_to_load()


def test_a_base_recorded_relative_by_an_older_run_is_found_from_another_folder(tmp_path, monkeypatch):
    run, base = _run_with_relative_base(tmp_path, monkeypatch)
    config = run.config_dict()
    config["model"].update(base="models/demo/tiny", base_fingerprint=None)  # as runs recorded it before
    run.file(run_dir.RESOLVED_CONFIG).write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    assert run.base_to_load() == (str(base), None)


def test_a_rerun_from_the_same_folder_sees_the_same_base(tmp_path, monkeypatch):
    run, base = _run_with_relative_base(tmp_path, monkeypatch)
    current = run.config().model_copy(update={"model": run.config().model.model_copy(update={"base": "models/demo/tiny"})})
    assert run_dir.adapter_setting_changes(run_dir._adapter_view(run.config_dict()),
                                           run_dir._adapter_view(current.model_dump(mode="json"))) == []


def test_load_adapter_raises_one_line_without_library_frames(tmp_path, monkeypatch):
    import traceback

    import xray_train

    run, base = _run_with_relative_base(tmp_path, monkeypatch)
    (run.path / "adapter_config.json").write_text("{}")
    shutil.rmtree(base)
    with pytest.raises(XrayTrainError) as exc:
        xray_train.load_adapter(run.path)
    assert "base=DIR" in str(exc.value) and "\n" not in str(exc.value)
    assert exc.value.__cause__ is None and exc.value.__suppress_context__
    frames = [Path(f.filename).name for f in traceback.extract_tb(exc.value.__traceback__)]
    assert frames[-1] == "__init__.py" and "model.py" not in frames and "run_dir.py" not in frames
    with pytest.raises(XrayTrainError, match="not an adapter dir"):
        xray_train.load_adapter(tmp_path / "no-such-run")
