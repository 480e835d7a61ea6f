"""Smoke tests of the command lines: a few training steps, exact resume, Ctrl-C, a NaN stop, sampling."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from minidit import train as train_mod
from minidit.checkpoint import load_checkpoint, load_model
from minidit.sample import main as sample_main

FAST = ["--variant", "mini/4", "--batch-size", "4", "--log-every", "1", "--sample-steps", "2"]


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [x for line in f for x in json.loads(line)["losses"]]


def test_train_resume_reproduces_the_uninterrupted_run(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_mod.main(FAST + ["--steps", "6", "--ckpt-every", "3", "--out", a])
    train_mod.main(FAST + ["--steps", "3", "--out", b])
    assert len(losses(b)) == 3
    with open(os.path.join(b, "metrics.jsonl"), "a") as f:  # a window logged after the checkpoint, then a crash
        f.write(json.dumps({"step": 5, "loss": 1.0, "losses": [9.0, 9.0]}) + "\n")
    train_mod.main(["--resume", b, "--steps", "6"])  # rewrites what came after its checkpoint
    assert losses(b) == losses(a)  # bit-identical, not merely close
    arr_a, meta_a = load_checkpoint(os.path.join(a, "checkpoint.npz"))
    arr_b, meta_b = load_checkpoint(os.path.join(b, "checkpoint.npz"))
    assert meta_a["step"] == meta_b["step"] == 6
    for k in arr_a:
        np.testing.assert_array_equal(arr_a[k], arr_b[k], err_msg=k)
    assert os.path.exists(os.path.join(a, "samples.png"))
    log = open(os.path.join(a, "log.txt")).read()
    assert "(step=0000006) Train Loss: " in log and "Train Steps/Sec: " in log


def test_resume_refuses_changed_options(tmp_path):
    run = str(tmp_path / "r")
    train_mod.main(FAST + ["--steps", "1", "--out", run])
    with pytest.raises(SystemExit, match="--lr"):
        train_mod.main(["--resume", run, "--lr", "0.1"])


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = str(tmp_path / "n")
    real = train_mod.Run.train_step

    def poisoned(self, step):
        loss = real(self, step)
        return loss * np.float32("nan") if step == 4 else loss

    monkeypatch.setattr(train_mod.Run, "train_step", poisoned)
    with pytest.raises(SystemExit, match="at step 4"):
        train_mod.main(FAST + ["--steps", "8", "--ckpt-every", "2", "--log-every", "3", "--out", run])
    _, meta = load_checkpoint(os.path.join(run, "checkpoint.npz"))
    assert meta["step"] == 4  # written after step index 3 (the 4th step); the poisoned step never reached disk


def test_ctrl_c_writes_a_checkpoint(tmp_path):
    run = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-m", "minidit.train", *FAST, "--steps", "100000", "--ckpt-every",
                             "100000", "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "interrupted at step" in out
    _, meta = load_checkpoint(run / "checkpoint.npz")
    assert 0 < meta["step"] < 100000


def test_sample_cli(tmp_path):
    run = str(tmp_path / "s")
    train_mod.main(FAST + ["--steps", "2", "--out", run])
    grid, npz = str(tmp_path / "g.png"), str(tmp_path / "g.npz")
    sample_main(["--ckpt", run, "--class-labels", "1", "7", "3", "--num-sampling-steps", "3", "--out", grid,
                 "--npz", npz, "--sampler", "ddim"])
    assert Image.open(grid).size[0] > 3 * 32
    z = np.load(npz)
    assert z["arr_0"].shape == (3, 16, 16, 1) and z["arr_0"].dtype == np.uint8  # the default: 16 px grayscale digits
    assert z["labels"].tolist() == [1, 7, 3]
    model = load_model(run)
    assert model.spec.num_classes == 10 and model.in_channels == 1 and model.spec.input_size == 16
    with pytest.raises(SystemExit, match=r"class labels must lie in \[0, 9\]"):
        sample_main(["--ckpt", run, "--class-labels", "12", "--out", grid])
    with pytest.raises(SystemExit, match="no checkpoint"):
        sample_main(["--ckpt", str(tmp_path / "missing.npz"), "--out", grid])
    with pytest.raises(SystemExit, match="a .gif is for clips"):
        sample_main(["--ckpt", run, "--out", str(tmp_path / "g.gif")])


@pytest.mark.parametrize("block", ["in-context", "cross-attention"])
def test_block_type_travels_through_training_checkpoint_and_sampling(tmp_path, block):
    run = str(tmp_path / "c")
    train_mod.main(FAST + ["--steps", "2", "--block", block, "--out", run])
    _, meta = load_checkpoint(os.path.join(run, "checkpoint.npz"))
    assert meta["model"]["block"] == meta["args"]["block"] == block
    model = load_model(run)
    assert model.spec.block == block and any("cross_attn" in k for k in model.params) == (block == "cross-attention")
    grid = str(tmp_path / "g.png")
    sample_main(["--ckpt", run, "--class-labels", "1", "2", "--num-sampling-steps", "2", "--out", grid])
    train_mod.main(["--resume", run, "--steps", "3"])  # resuming keeps the block type
    assert load_model(run).spec.block == block


def test_unknown_variant_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown DiT variant 'Q/3'"):
        train_mod.main(["--variant", "Q/3", "--out", str(tmp_path)])


def test_out_of_memory_suggests_a_smaller_batch(tmp_path, monkeypatch):
    def oom(self, step):
        raise MemoryError("Unable to allocate 12.0 GiB")

    monkeypatch.setattr(train_mod.Run, "train_step", oom)
    with pytest.raises(SystemExit, match="out of memory at batch size 4 .*try a smaller --batch-size"):
        train_mod.main(FAST + ["--steps", "2", "--out", str(tmp_path / "o")])


def test_memory_report_reads_the_cupy_pool():
    import types

    from minidit.backend import memory_report

    pool = types.SimpleNamespace(used_bytes=lambda: 3 * 2**30, total_bytes=lambda: 4 * 2**30)
    fake_cupy = types.SimpleNamespace(__name__="cupy", get_default_memory_pool=lambda: pool)
    assert memory_report(fake_cupy) == "GPU memory pool: 3.00 GiB used / 4.00 GiB held"
    assert memory_report(np) == ""


@pytest.mark.parametrize("when", ["before the first step", "while a sample grid is drawn"])
def test_ctrl_c_at_any_moment_writes_the_checkpoint_it_announces(tmp_path, monkeypatch, when):
    """An interrupt that lands where no checkpoint is due (before the first step, or while a grid is sampled between
    checkpoints) still leaves the checkpoint of the step the message names."""
    run = str(tmp_path / "early")
    interrupt = lambda *a, **k: os.kill(os.getpid(), signal.SIGINT)  # noqa: E731  the handler: stop after this
    if when == "before the first step":
        class InterruptingBar(train_mod.tqdm):
            def __init__(self, *args, **kwargs):
                interrupt()
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(train_mod, "tqdm", InterruptingBar)
    else:
        monkeypatch.setattr(train_mod, "write_grid", interrupt)
    train_mod.main(FAST + ["--steps", "50", "--ckpt-every", "100", "--sample-every", "1", "--out", run])
    _, meta = load_checkpoint(os.path.join(run, "checkpoint.npz"))
    step = 0 if when == "before the first step" else 1
    assert meta["step"] == step
    assert f"interrupted at step {step}; checkpoint written" in open(os.path.join(run, "log.txt")).read()


@pytest.mark.parametrize("argv, match", [
    (["--model", "video", "--dynamic", "width"], "--dynamic is an option of DynamicDiT; these options train a VideoDiT"),
    (["--model", "mmdit", "--temporal-patch", "2"], "--temporal-patch is an option of VideoDiT; these options train a "
                                                   "CaptionMMDiT"),
    (["--block", "adaln", "--text-dim", "8"], "--text-dim is an option of CaptionMMDiT; these options train a "
                                              "ConditioningDiT"),
])
def test_an_option_of_another_kind_is_an_error(tmp_path, argv, match):
    """Each kind owns its options (minidit.models.choose): one that the chosen kind does not read is refused, before
    any data is rendered, rather than silently ignored."""
    with pytest.raises(SystemExit, match=match):
        train_mod.main(argv + ["--steps", "1", "--out", str(tmp_path / "r")])
