"""Smoke tests of `python -m minidit.dev.bench`: it runs on a tiny configuration and prints every field.
No timing assertions: speed is measured by the command, never by tests."""
import importlib.util

import pytest

from minidit.dev import bench

TINY = ["--variant", "mini/4", "--input-size", "8", "--in-channels", "3", "--num-classes", "4", "--batch-size", "2",
        "--steps", "1", "--warmup", "0", "--runs", "1", "--peak-size", "64"]
FIELDS = ["FLOP convention: training FLOPs/image = 3 x 2 x forward MACs", "float32 matmul peak", "forward ms",
          "backward ms", "optimizer ms", "step ms", "images/s", "GFLOP/s", "of peak", "minidit numpy",
          "memory held between steps", "step peak (tracemalloc)", "resident-set growth over the first 3 steps"]


def test_bench_numpy_smoke(capsys):
    assert bench.main(TINY) == 0
    out = capsys.readouterr().out
    for field in FIELDS:
        assert field in out, field
    assert "DiT mini/4, input 8x8x3, 4 classes, batch 2" in out
    assert "minidit " in out.split("resident-set growth")[1] and "n/a" not in out.split("resident-set growth")[1]


def test_bench_compare_torch_smoke(capsys):
    pytest.importorskip("torch")
    assert bench.main(TINY + ["--compare-torch"]) == 0
    out = capsys.readouterr().out
    for field in FIELDS + ["torch eager", "step-time ratio minidit / torch: median of 1 per-pair ratios"]:
        assert field in out, field
    assert "torch " in out.split("resident-set growth")[1]


def test_presets_and_overrides():
    args = bench.parse_args(["--preset", "all", "--batch-size", "4"])
    specs = bench.specs_from_args(args)
    assert [s["variant"] for s in specs] == ["mini/4", "S/4", "S/2"]
    assert all(s["batch_size"] == 4 for s in specs)
    assert bench.specs_from_args(bench.parse_args(["--preset", "small"]))[0] == dict(
        variant="mini/4", input_size=32, in_channels=3, num_classes=10, batch_size=32)
    assert bench.parse_args(["--image-size", "16"]).input_size == 16


def test_video_mode(capsys):
    """--video times the video DiT in Latte's layout; with torch, against TorchLatte with the same weights, memory
    included (the fresh-process children get --video too)."""
    argv = ["--video"] + TINY + ["--num-frames", "2"]
    compare = importlib.util.find_spec("torch") is not None
    assert bench.main(argv + (["--compare-torch"] if compare else [])) == 0
    out = capsys.readouterr().out
    assert "VideoDiT mini/4 (Latte's layout), 2 frames of 8x8x3, 4 classes, batch 2" in out
    for field in [f.replace("image", "clip") for f in FIELDS]:
        assert field in out, field
    growth = out.split("resident-set growth")[1]
    assert "minidit " in growth and "n/a" not in growth
    if compare:
        assert "torch eager" in out and "step-time ratio minidit / torch: median of 1 per-pair ratios" in out
        assert "torch " in growth


def test_video_options():
    spec = bench.specs_from_args(bench.parse_args(["--video", "--batch-size", "4"]))
    assert spec == [dict(variant="S/2", num_frames=8, input_size=16, in_channels=4, num_classes=101, batch_size=4)]
    for argv, match in ((["--video", "--preset", "small"], "--video has its own configuration"),
                        (["--num-frames", "4"], "--num-frames is for the video model: add --video"),
                        (["--video", "--input-size", "15"], "input size 15 is not divisible by the patch size 2")):
        with pytest.raises(SystemExit, match=match):
            bench.main(argv)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_cupy_unavailable_is_one_clear_line(capsys):
    assert bench.main(TINY + ["--backend", "cupy"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "cupy" in out[0] and ".[cuda12]" in out[0]


def test_sampling_mode_reports_time_and_memory(capsys):
    assert bench.main(TINY + ["--sampling", "--vae-decode"]) == 0
    out = capsys.readouterr().out
    assert "2 guided DDPM steps:" in out and "peak resident memory" in out
    assert "VAE decode of 2 latents -> (3, 64, 64)" in out


def test_mmdit_mode(capsys):
    """--mmdit times SD3's MM-DiT on the rectified-flow step; with torch, against diffusers' model."""
    argv = ["--mmdit", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--runs", "1"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "minidit.dev.bench --mmdit: 4 joint blocks" in out and "minidit numpy (mm-dit)" in out
    if importlib.util.find_spec("torch") and importlib.util.find_spec("diffusers"):
        assert bench.main(argv + ["--compare-torch"]) == 0
        out = capsys.readouterr().out
        assert "diffusers SD3Transformer2DModel eager" in out and "step-time ratio minidit / diffusers" in out


def test_dynamic_sampling_mode(tmp_path, capsys):
    """--sampling --dynamic RUN: the sliced sampler against the same weights dense, with MACs per call."""
    from minidit import train as train_mod

    parent, child = str(tmp_path / "p"), str(tmp_path / "d")
    train_mod.main(["--variant", "mini/4", "--batch-size", "4", "--steps", "1", "--out", parent, "--no-final-samples"])
    train_mod.main(["--finetune", parent, "--dynamic", "depth", "--batch-size", "4", "--steps", "1", "--out", child,
                    "--no-final-samples"])
    capsys.readouterr()
    assert bench.main(["--sampling", "--dynamic", child, "--batch-size", "2", "--sample-steps", "2", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "ms per step, MACs per call 1.000" in out and "speed-up " in out and "(depth, step 1)" in out
    with pytest.raises(SystemExit, match="add --sampling"):
        bench.main(["--dynamic", child])
