"""Fault injection: a run killed at random moments, two runs racing for one folder, a disk that fills up.

Each starts `python -m minidit.train` as a real process (mini/4 on the 16 px digits, batch 4: ~10 steps/s here) and
checks what a user would find afterwards. The full-disk test mounts a small tmpfs, so it needs root (skipped otherwise).
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minidit.checkpoint import load_checkpoint

FAST = ["--variant", "mini/4", "--batch-size", "4", "--log-every", "1", "--no-final-samples"]


def start(out, *extra):
    return subprocess.Popen([sys.executable, "-m", "minidit.train", *FAST, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def temporaries(folder):
    return [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_sigkill_at_random_moments_never_loses_the_last_checkpoint(tmp_path):
    """SIGKILL a run that checkpoints every step, at random moments (mid-save included); the last checkpoint always
    loads and resumes, and the temporaries of killed saves do not pile up."""
    out, rng = tmp_path / "k", np.random.default_rng(0)
    last_step = 0
    for kill in range(3):
        args = ["--steps", "100000", "--ckpt-every", "1"]
        proc = start(out, *(["--resume", str(out)] if kill else []), *args)
        assert wait_for(lambda: (out / "checkpoint.npz").exists() and load_checkpoint(out / "checkpoint.npz")[1]
                        ["step"] > last_step), proc.communicate()
        time.sleep(float(rng.uniform(0.0, 0.5)))  # somewhere in a step or in a save
        proc.kill()
        proc.wait(timeout=60)
        _, meta = load_checkpoint(out / "checkpoint.npz")  # never half a file
        assert meta["step"] > last_step
        last_step = meta["step"]
        assert len(temporaries(out)) <= 1  # at most the one save that was cut short
    done = subprocess.run([sys.executable, "-m", "minidit.train", "--resume", str(out), "--steps", str(last_step + 2)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(out / "checkpoint.npz")[1]["step"] == last_step + 2
    assert temporaries(out) == []  # the next save cleaned up after the killed ones


def test_two_runs_racing_for_one_folder(tmp_path):
    out = tmp_path / "race"
    first = start(out, "--steps", "100000", "--ckpt-every", "100000")
    try:
        assert wait_for(lambda: (out / "metrics.jsonl").exists()), first.communicate()
        second = subprocess.run([sys.executable, "-m", "minidit.train", *FAST, "--steps", "3", "--out", str(out)],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert f"another training (process {first.pid}) is writing into" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGINT)  # finish the step, checkpoint, exit
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    _, meta = load_checkpoint(out / "checkpoint.npz")
    assert meta["step"] >= 1
    # the lock went with the process: the folder can be continued now
    again = subprocess.run([sys.executable, "-m", "minidit.train", "--resume", str(out), "--steps",
                            str(meta["step"] + 1)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 100 MiB tmpfs: room for one checkpoint of mini/4 (67 MB) but not for the next one beside it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(small_disk):
    out = small_disk / "run"
    proc = subprocess.run([sys.executable, "-m", "minidit.train", *FAST, "--steps", "5", "--ckpt-every", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "No space left on device" in last and "disk is full" in last, proc.stderr
    assert "Traceback" not in proc.stderr
    _, meta = load_checkpoint(out / "checkpoint.npz")  # the checkpoint before the disk filled up is intact
    assert meta["step"] == 1
    assert temporaries(out) == []  # the failed save removed its own temporary
