"""One writer per output_dir: a second run is refused while the first holds the lock; a lock left by a
killed run is taken over."""

from __future__ import annotations

import errno
import json
import logging
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from xray_train import run_lock
from xray_train.errors import XrayTrainError
from xray_train.run_lock import LOCK, OutputDirLock

HOLD = textwrap.dedent(
    """
    import sys, time
    from xray_train.run_lock import OutputDirLock
    OutputDirLock(sys.argv[1]).acquire()
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
    assert run_lock._process_start(1) is not None
    assert run_lock._alive({"pid": 1, "pid_start": run_lock._process_start(1)})
    assert not run_lock._alive({"pid": 1, "pid_start": "not-its-start"})
