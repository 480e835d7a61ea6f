"""Every command meets a user mistake with one clear line, as a table: (command, arguments, exit status, a phrase the
message must contain). Each row runs the command's main() in this process; a Python exception other than SystemExit
(what a traceback would show) fails the row, and the message must be a single line that names the problem.

Rows use {placeholders} for files the fixtures make: a tiny trained run, latents, samples, damaged files.
"""
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from minidit import train as train_mod
from minidit.checkpoint import add_prefix, load_checkpoint, save_checkpoint, split_prefix
from minidit.convert import main as convert_main
from minidit.dev import bench, evaluate, experiments
from minidit.encode import main as encode_main
from minidit.sample import main as sample_main

FAST = ["--variant", "mini/4", "--batch-size", "4", "--log-every", "1", "--no-final-samples"]
COMMANDS = {"train": train_mod.main, "sample": sample_main, "evaluate": evaluate.main, "encode": encode_main,
            "convert": convert_main, "bench": bench.main, "experiments": experiments.main}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    run = d / "run"
    train_mod.main(FAST + ["--steps", "2", "--out", str(run)])
    f = {"run": str(run), "dir": str(d), "ckpt": str(run / "checkpoint.npz"), "other": str(d / "other")}
    (d / "other").mkdir()
    (d / "other" / "checkpoint.npz").write_bytes((run / "checkpoint.npz").read_bytes())  # another run's folder
    arrays, meta = load_checkpoint(run / "checkpoint.npz")

    def variant(name, change_arrays=None, change_meta=None):
        a, m = dict(arrays), json.loads(json.dumps(meta))
        if change_arrays:
            change_arrays(a)
        if change_meta:
            change_meta(m)
        save_checkpoint(d / name, a, m)
        f[name.split(".")[0]] = str(d / name)

    variant("nan.npz", lambda a: a.__setitem__("ema.params.final_layer.linear.bias",
                                               np.full_like(a["ema.params.final_layer.linear.bias"], np.nan)))
    variant("ints.npz", lambda a: a.__setitem__("ema.params.pos_embed", a["ema.params.pos_embed"].astype(np.int32)))
    variant("nomodel.npz", change_meta=lambda m: m.pop("model"))
    variant("badspec.npz", change_meta=lambda m: m["model"].__setitem__("input_size", "sixteen"))
    variant("badstep.npz", change_meta=lambda m: m.__setitem__("step", "two"))
    variant("future.npz", change_meta=lambda m: m.__setitem__("format", "minidit-99"))
    save_checkpoint(d / "weights.npz", add_prefix(split_prefix(arrays, "ema.params."), "ema.params."),
                    {k: meta[k] for k in ("format", "model", "objective")})
    f["weights"] = str(d / "weights.npz")
    with open(run / "checkpoint.npz", "rb") as src:
        (d / "truncated.npz").write_bytes(src.read()[:5000])
    f["truncated"] = str(d / "truncated.npz")
    (d / "junk.npz").write_text("not an npz")
    f["junk"] = str(d / "junk.npz")
    (d / "notes.txt").write_text("hello")
    f["txt"] = str(d / "notes.txt")
    np.savez(d / "latents.npz", latents=np.zeros((8, 4, 4, 4), np.float32), labels=np.arange(8) % 2)
    f["latents"] = str(d / "latents.npz")
    np.savez(d / "huge.npz", latents=np.zeros((4, 4, 4, 4), np.float32), labels=np.array([0, 1, 2, 10**9]))
    f["huge"] = str(d / "huge.npz")
    np.savez(d / "nanlat.npz", latents=np.full((4, 4, 4, 4), np.inf, np.float32), labels=np.zeros(4, int))
    f["nanlat"] = str(d / "nanlat.npz")
    np.savez(d / "nolabels.npz", arr_0=np.zeros((2, 32, 32, 1), np.uint8))
    f["nolabels"] = str(d / "nolabels.npz")
    np.savez(d / "floatimgs.npz", arr_0=np.zeros((2, 32, 32, 1)), labels=np.zeros(2, int))
    f["floatimgs"] = str(d / "floatimgs.npz")
    (d / "badheader.safetensors").write_bytes((8).to_bytes(8, "little") + b'{"a": 1}')
    f["badheader"] = str(d / "badheader.safetensors")
    entry = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 9999]}}).encode()
    (d / "badoffsets.safetensors").write_bytes(len(entry).to_bytes(8, "little") + entry + b"\0" * 16)
    f["badoffsets"] = str(d / "badoffsets.safetensors")
    (d / "images" / "cat").mkdir(parents=True)
    f["images"] = str(d / "images")
    (d / "afile").write_text("x")
    f["afile"] = str(d / "afile")
    return f


ROWS = [
    # train: counts and intervals
    ("train", ["--steps", "0"], 2, "positive integer"),
    ("train", ["--batch-size", "-3"], 2, "positive integer"),
    ("train", ["--log-every", "0"], 2, "positive integer"),
    ("train", ["--ckpt-every", "0"], 2, "positive integer"),
    ("train", ["--epochs", "0"], 2, "positive integer"),
    ("train", ["--threads", "0"], 2, "positive integer"),
    ("train", ["--sample-steps", "1"], 2, "sampling steps in [2, 1000]"),
    ("train", ["--image-size", "0"], 2, "positive integer"),
    ("train", ["--steps", "ten"], 2, "not an integer"),
    # train: numbers and probabilities
    ("train", ["--lr", "0"], 2, "positive number"),
    ("train", ["--lr", "nan"], 2, "positive number"),
    ("train", ["--weight-decay", "-1"], 2, "non-negative"),
    ("train", ["--class-dropout-prob", "1.5"], 2, "probability in [0, 1)"),
    ("train", ["--ema-decay", "2"], 2, "in [0, 1]"),
    ("train", ["--cfg-scale", "inf"], 2, "non-negative number"),
    # train: words and data
    ("train", ["--variant", "Q/3", "--out", "{dir}/q"], 1, "unknown DiT variant 'Q/3'"),
    ("train", ["--block", "adaLN"], 2, "invalid choice"),
    ("train", ["--backend", "tpu"], 2, "invalid choice"),
    ("train", ["--data", "{dir}/missing", "--out", "{dir}/m"], 1, "no dataset at"),
    ("train", ["--data", "{txt}", "--out", "{dir}/t"], 1, "don't know how to read"),
    ("train", ["--data", "{huge}", "--out", "{dir}/h"], 1, "largest label is 1000000000"),
    ("train", ["--data", "{nanlat}", "--out", "{dir}/n"], 1, "NaN or Inf"),
    ("train", ["--data", "{junk}", "--out", "{dir}/j"], 1, "could not read"),
    ("train", ["--data", "{images}", "--out", "{dir}/i"], 1, "found no images"),
    ("train", ["--data", "{latents}", "--variant", "mini/4", "--batch-size", "100", "--out", "{dir}/b"], 1,
     "larger than the dataset"),
    ("train", ["--data", "{latents}", "--variant", "mini/8", "--out", "{dir}/p"], 1, "not divisible by the patch size"),
    ("train", ["--image-size", "5000", "--out", "{dir}/s"], 1, "out of range"),
    # train: run folders and resume
    ("train", FAST + ["--steps", "1", "--out", "{run}"], 1, "already holds a run"),
    ("train", ["--resume", "{run}", "--steps", "5", "--out", "{other}"], 1, "already holds a run"),
    ("train", ["--out", "{afile}"], 1, "is a file"),
    ("train", ["--resume", "{dir}/nothing"], 1, "no checkpoint at"),
    ("train", ["--resume", "{latents}"], 1, "not a minidit checkpoint"),
    ("train", ["--resume", "{weights}"], 1, "not a training checkpoint"),
    ("train", ["--resume", "{run}", "--steps", "2"], 1, "at step 2 already"),
    ("train", ["--resume", "{run}", "--lr", "0.5"], 1, "--lr"),
    ("train", ["--resume", "{badstep}", "--out", "{dir}/r"], 1, "'step' is 'two'"),
    ("train", ["--resume", "{future}", "--out", "{dir}/f"], 1, "format 'minidit-99'"),
    # sample
    ("sample", ["--ckpt", "{dir}/nothing.npz"], 1, "no checkpoint at"),
    ("sample", ["--ckpt", "{latents}", "--out", "{dir}/x.png"], 1, "not a minidit checkpoint"),
    ("sample", ["--ckpt", "{junk}", "--out", "{dir}/x.png"], 1, "not a minidit checkpoint"),
    ("sample", ["--ckpt", "{truncated}", "--out", "{dir}/x.png"], 1, "truncated or corrupt"),
    ("sample", ["--ckpt", "{nan}", "--out", "{dir}/x.png"], 1, "NaN or Inf"),
    ("sample", ["--ckpt", "{ints}", "--out", "{dir}/x.png"], 1, "not a float type"),
    ("sample", ["--ckpt", "{nomodel}", "--out", "{dir}/x.png"], 1, "does not say which model"),
    ("sample", ["--ckpt", "{badspec}", "--out", "{dir}/x.png"], 1, "does not describe a model"),
    ("sample", ["--ckpt", "{future}", "--out", "{dir}/x.png"], 1, "format 'minidit-99'"),
    ("sample", ["--ckpt", "{run}", "--out", "{dir}"], 1, "is a folder"),
    ("sample", ["--ckpt", "{run}", "--out", "{dir}/x.jpg"], 1, "must end in .png"),
    ("sample", ["--ckpt", "{run}", "--out", "{afile}/x.png"], 1, "is a file, not a folder"),
    ("sample", ["--ckpt", "{run}", "--npz", "{dir}/x.png", "--out", "{dir}/x.png"], 1, "must end in .npz"),
    ("sample", ["--ckpt", "{run}", "--guide-channels", "5", "--out", "{dir}/x.png"], 1, "1 noise channels"),
    ("sample", ["--ckpt", "{run}", "--class-labels", "12", "--out", "{dir}/x.png"], 1, "must lie in [0, 9]"),
    ("sample", ["--ckpt", "{run}", "--class-labels", "-1"], 2, "non-negative integer"),
    ("sample", ["--ckpt", "{run}", "--num-sampling-steps", "0"], 2, "sampling steps in [2, 1000]"),
    ("sample", ["--ckpt", "{run}", "--per-class", "0"], 2, "positive integer"),
    ("sample", ["--ckpt", "{run}", "--per-class", "100000000", "--out", "{dir}/x.png"], 1, "GiB in one call"),
    ("sample", ["--ckpt", "{run}", "--sampler", "dpm"], 2, "invalid choice"),
    ("sample", ["--ckpt", "{run}", "--sampler", "euler", "--out", "{dir}/x.png"], 1, "unknown sampler 'euler'"),
    ("sample", ["--ckpt", "{run}", "--shift", "3", "--out", "{dir}/x.png"], 1, "--shift is for rectified-flow"),
    ("sample", ["--ckpt", "{run}", "--shift", "0"], 2, "positive number"),
    ("train", ["--objective", "flow", "--learn-sigma", "--out", "{dir}/ls"], 1, "--learn-sigma is for"),
    ("train", ["--objective", "score"], 2, "invalid choice"),
    ("sample", ["--ckpt", "{run}", "--no-ema", "--ckpt", "{weights}", "--out", "{dir}/x.png"], 1, "raw model"),
    ("sample", ["--ckpt", "{run}", "--vae", "{dir}/vae.safetensors", "--out", "{dir}/x.png"], 1, "no such file"),
    # evaluate
    ("evaluate", ["{dir}/nothing.npz"], 1, "no file at"),
    ("evaluate", ["{junk}"], 1, "could not read"),
    ("evaluate", ["{nolabels}"], 1, "has no 'labels'"),
    ("evaluate", ["{floatimgs}"], 1, "uint8"),
    ("evaluate", ["{ckpt}"], 1, "has no 'arr_0' or 'labels'"),
    # encode
    ("encode", ["--data", "{images}", "--vae", "{dir}/none", "--out", "{dir}/z.png"], 1, "must end in .npz"),
    ("encode", ["--data", "{images}", "--vae", "{dir}/none", "--out", "{dir}/z.npz"], 1, "no VAE weights"),
    ("encode", ["--data", "{images}", "--vae", "{badheader}", "--out", "{dir}/z.npz"], 1, "malformed"),
    ("encode", ["--data", "{images}", "--vae", "{badoffsets}", "--out", "{dir}/z.npz"], 1, "damaged"),
    ("encode", ["--data", "{images}", "--vae", "{junk}", "--out", "{dir}/z.npz"], 1, "safetensors"),
    ("encode", ["--image-size", "0", "--data", "x", "--vae", "y", "--out", "z.npz"], 2, "positive integer"),
    # convert
    ("convert", ["{dir}/model.pt", "{dir}/out.safetensors"], 1, "must be an .npz file"),
    ("convert", ["{dir}/model.pt", "{dir}"], 1, "must be an .npz file"),
    ("convert", ["{images}", "{dir}/sd3.npz"], 1, "has no config.json"),
    # bench
    ("bench", ["--steps", "0"], 2, "positive integer"),
    ("bench", ["--variant", "Q/3", "--no-memory"], 1, "unknown DiT variant"),
    ("bench", ["--sampling", "--sample-steps", "1"], 2, "sampling steps"),
    # experiments
    ("experiments", ["scaling", "--steps", "0"], 2, "positive integer"),
    ("experiments", ["sizes"], 2, "invalid choice"),
    ("experiments", ["conditioning", "--blocks", "adaLN"], 2, "invalid choice"),
]


@pytest.mark.parametrize("command, argv, status, phrase", ROWS,
                         ids=[f"{c}:{' '.join(a)[:60]}" for c, a, _, _ in ROWS])
def test_a_mistake_is_one_clear_line(files, capsys, command, argv, status, phrase):
    argv = [a.format(**files) for a in argv]
    with pytest.raises(SystemExit) as e:  # any other exception would be a traceback for the user
        COMMANDS[command](argv)
    code = e.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert (1 if isinstance(code, str) else code) == status, message
    assert phrase in message, message
    assert "\n" not in message.strip() and "Traceback" not in message, message


def test_no_traceback_in_a_real_process(files):
    """The same through the real entry point: stderr is one `error:` line, exit status 1."""
    proc = subprocess.run([sys.executable, "-m", "minidit.sample", "--ckpt", files["nan"], "--out",
                           os.path.join(files["dir"], "x.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")


def test_a_mistake_costs_no_work(files, monkeypatch):
    """Outputs are checked before the work: a bad --out fails before the model is even loaded."""
    import minidit.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "load", lambda *a, **k: pytest.fail("loaded the model before checking --out"))
    with pytest.raises(SystemExit, match="must end in .png or .gif"):
        sample_main(["--ckpt", files["run"], "--out", os.path.join(files["dir"], "x.jpg")])


def test_damaged_zip_entry_is_named(files, tmp_path):
    """A checkpoint whose zip entry is corrupt (a bad disk, an interrupted copy) is refused, not half-loaded."""
    bad = tmp_path / "bitrot.npz"
    with zipfile.ZipFile(files["ckpt"]) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.startswith("ema.params.pos_embed"):
                data = data[:len(data) // 2]
            dst.writestr(info, data)
    with pytest.raises(SystemExit, match="truncated or corrupt"):
        sample_main(["--ckpt", str(bad), "--out", str(tmp_path / "x.png")])
