"""Kill and resume through the real CLI, for both phases; checkpoint validation on damaged saves.

A run is SIGKILLed (Phase 2: interrupted with Ctrl-C, which must name the checkpoint a rerun resumes
from) once a complete checkpoint exists, rerun with the same command, and must say
"Resuming from checkpoint-N", finish, and log at every later step the same loss, gradient norm and
learning rate as an uninterrupted run: equal losses after the resume need the adapter weights, the
optimizer moments, the scheduler, the data order and the dropout RNG all restored (LoRA dropout
is on). Subprocesses run single-threaded so both runs do bit-identical float work.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xray_train.run_dir import ADAPTER_WEIGHTS, CHECKPOINT_COMPLETE, DONE_MARKER, LOCK, checkpoint_problem, find_resumable_checkpoint

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 4


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def train_args(phase: str, tiny: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "xray_train.cli", phase, "--config", str(REPO / "configs" / "demo" / f"{phase}.yaml"),
        "--set", f"model.base={tiny}", "--set", f"output_dir={out}",
        "--set", f"training.max_steps={MAX_STEPS}", "--set", "training.save_steps=2",
        "--set", "training.logging_steps=1", "--set", "training.eval_strategy=no",
        "--set", "training.report_to=[none]", "--set", "training.save_total_limit=5", *extra,
    ]  # fmt: skip


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    return out, err


def kill_after_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 240, sig=signal.SIGKILL) -> str:
    marker = out / "checkpoint-2" / CHECKPOINT_COMPLETE
    deadline = time.monotonic() + timeout
    while not marker.is_file():
        if proc.poll() is not None:
            pytest.fail(f"run ended (exit {proc.returncode}) before checkpoint-2:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "no checkpoint-2 in time"
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc.communicate()[1]


def step_logs(out: Path) -> dict[int, dict]:
    state = json.loads((out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    return {h["step"]: h for h in state["log_history"] if "loss" in h}


def assert_resumed_like_uninterrupted(reference: Path, resumed: Path, stdout: str) -> None:
    match = re.search(r"Resuming from checkpoint-(\d+)", stdout)
    assert match, stdout[-2000:]
    start_step = int(match.group(1))
    assert 2 <= start_step < MAX_STEPS
    assert (resumed / DONE_MARKER).is_file() and (resumed / ADAPTER_WEIGHTS).is_file()
    ref, got = step_logs(reference), step_logs(resumed)
    after = [s for s in range(start_step + 1, MAX_STEPS + 1)]
    assert set(after) <= set(got), sorted(got)
    for s in after:
        for key in ("loss", "grad_norm", "learning_rate"):
            assert got[s][key] == pytest.approx(ref[s][key], rel=1e-4, abs=1e-7), (s, key, got[s], ref[s])
    # The losses move from step to step, so equality above is not a constant being compared.
    assert len({round(ref[s]["loss"], 6) for s in ref}) > 1
    summary = json.loads((resumed / "training_summary.json").read_text())
    assert summary["global_steps"] == MAX_STEPS and summary["resumed_from_step"] == start_step


@pytest.mark.slow
def test_kill_and_resume_phase1_then_phase2(tiny_model_dir, tmp_path, feature_cache_dir):
    env = cli_env(XRAY_TRAIN_FEATURE_CACHE=str(feature_cache_dir))

    # Phase 1: the uninterrupted reference and the run to be killed, side by side.
    ref1, run1 = tmp_path / "p1-ref", tmp_path / "p1"
    reference = start(train_args("phase1", tiny_model_dir, ref1), env)
    victim = start(train_args("phase1", tiny_model_dir, run1), env)
    kill_after_checkpoint(victim, run1)
    assert not (run1 / DONE_MARKER).exists()
    assert (run1 / LOCK).is_file()  # a SIGKILLed run leaves its lock behind
    finish(reference)
    # A rerun that would build another adapter than the checkpoints hold stops and changes nothing (but the
    # dead run's lock, which it takes over and releases).
    def contents():
        return {p: p.read_bytes() for p in run1.rglob("*") if p.is_file() and p.name != LOCK}

    before = contents()
    changed = subprocess.run(train_args("phase1", tiny_model_dir, run1, "--set", "lora.r=8"), env=env,
                             capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert "lora.r 32 -> 8" in changed.stderr and "--overwrite" in changed.stderr
    assert contents() == before
    # The same command takes the killed run's lock over and resumes.
    resumed_out, _ = finish(start(train_args("phase1", tiny_model_dir, run1), env))
    assert_resumed_like_uninterrupted(ref1, run1, resumed_out)
    assert not (run1 / LOCK).exists()

    # Phase 2 continues the finished Phase-1 adapter, and is itself killed and resumed.
    ref2, run2 = tmp_path / "p2-ref", tmp_path / "p2"
    reference = start([*train_args("phase2", tiny_model_dir, ref2), "--resume", str(ref1)], env)
    victim = start([*train_args("phase2", tiny_model_dir, run2), "--resume", str(ref1)], env)
    err = kill_after_checkpoint(victim, run2, sig=signal.SIGINT)  # Ctrl-C this time
    assert victim.returncode == 130, err[-3000:]
    match = re.search(r"rerun the same command to resume from (checkpoint-\d+)", err)
    assert match and (run2 / match.group(1) / CHECKPOINT_COMPLETE).is_file(), err[-3000:]
    assert "Traceback" not in err
    finish(reference)
    resumed_out, _ = finish(start([*train_args("phase2", tiny_model_dir, run2), "--resume", str(ref1)], env))
    assert_resumed_like_uninterrupted(ref2, run2, resumed_out)


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints (no training: files shaped like a real save)


def _fake_checkpoint(out: Path, step: int) -> Path:
    """A checkpoint with real-format files: safetensors weights, torch zip archives, trainer state."""
    import torch
    from safetensors.torch import save_file

    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"a.lora_A.weight": torch.ones(4, 8), "a.lora_B.weight": torch.zeros(8, 4)}, ckpt / ADAPTER_WEIGHTS)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"x": torch.arange(10)}, ckpt / name)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    (ckpt / CHECKPOINT_COMPLETE).write_text(str(step))
    return ckpt


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "damage",
    [
        "no_marker",
        "truncated_weights",
        "truncated_state",
        "garbage_state",
        "truncated_optimizer",
        "missing_scheduler",
        "empty_rng",
    ],
)
def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, damage):
    good = _fake_checkpoint(tmp_path, 2)
    bad = _fake_checkpoint(tmp_path, 4)
    assert checkpoint_problem(bad) is None
    if damage == "no_marker":  # killed during the save: the marker is written after every file
        (bad / CHECKPOINT_COMPLETE).unlink()
    elif damage == "truncated_weights":
        _truncate(bad / ADAPTER_WEIGHTS, 0.9)
    elif damage == "truncated_state":
        _truncate(bad / "trainer_state.json")
    elif damage == "garbage_state":
        (bad / "trainer_state.json").write_text("[1, 2]")
    elif damage == "truncated_optimizer":
        _truncate(bad / "optimizer.pt", 0.8)
    elif damage == "missing_scheduler":
        (bad / "scheduler.pt").unlink()
    elif damage == "empty_rng":
        (bad / "rng_state.pth").write_bytes(b"")
    assert checkpoint_problem(bad)
    assert find_resumable_checkpoint(tmp_path) == good
    # Moved aside under a name neither resume nor the Trainer's checkpoint rotation matches.
    assert not bad.exists()
    assert [p.name.startswith("incomplete-checkpoint-4-") for p in tmp_path.iterdir() if p != good] == [True]


def test_no_usable_checkpoint_starts_fresh(tmp_path):
    bad = _fake_checkpoint(tmp_path, 2)
    _truncate(bad / ADAPTER_WEIGHTS, 0.3)
    assert find_resumable_checkpoint(tmp_path) is None
