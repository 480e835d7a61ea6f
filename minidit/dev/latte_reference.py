"""Writes tests/fixtures/tiny_latte_f64.npz: a float64 forward + backward of the OFFICIAL Latte video model
(github.com/maxin-cn/Latte, models/latte.py, class Latte), for testing minidit's video model against it.

    python -m minidit.dev.latte_reference --latte-src /path/to/Latte --out tests/fixtures/tiny_latte_f64.npz

Needs, none of which minidit depends on:
  * a checkout of the official Latte repository (--latte-src: the folder that holds models/latte.py). The fixture
    was written from commit f8980c5a2bc60b5aff4a5ed9a40c993b3b2e2e0c (models/latte.py last changed in 9cd5bc0);
    the commit is read with `git -C PATH rev-parse HEAD`, or given with --latte-commit for a plain copy, and stored in
    the fixture's config together with the sha256 of models/latte.py;
  * torch, timm (which imports torchvision) and einops, as models/latte.py imports them.
models/latte.py is loaded as a file (importlib), not through the package models/, whose __init__ imports the
text-to-video model and its diffusers dependencies. Nothing is copied from it: it runs as it is, with two changes
made from outside so that float64 stays float64 (the official code computes both in float32):
  * TimestepEmbedder.timestep_embedding, the float32 sinusoid [cos(t f), sin(t f)], f_i = exp(-ln(10000) i / half),
    is computed in NumPy's float32 (minidit.dev.torch_reference.numpy_sinusoid: torch's and NumPy's float32 exp and
    cos differ by an ulp, so the fixture fixes NumPy's, as the DiT fixture does) and cast to float64, where the
    official code would hand float32 to the float64 MLP;
  * pos_embed and temp_embed are set to the official get_2d_sincos_pos_embed / get_1d_sincos_temp_embed tables,
    which are float64 numpy, without the official .float() rounding.

What it writes, for two tiny models (depth 4, hidden 16, 2 heads, patch 2, 4 frames, 8x8 input, 3 channels,
learn_sigma, mlp_ratio 4, attention_mode 'math'): mode "cond" is extras=2 (class-conditional, num_classes=5,
class_dropout_prob=0.1, so the label table has 6 rows, the null label is 5), mode "uncond" is extras=1.
Each model is .double().eval(); every parameter is drawn N(0, 0.3^2) from numpy's default_rng(seed), in
named_parameters() order, cond first (not the official init, whose adaLN-Zero zeros make most gradients zero),
except pos_embed / temp_embed (frozen, requires_grad False) which hold the float64 tables. The input x (2, 4, 3, 8, 8)
and dout (the output's shape) are N(0, 1) from the same generator; t = [17, 600] (int64, as training passes it);
y = [3, 5] (cond only). out = model(x, t, y) in eval mode (no label dropout), then (out * dout).sum().backward().

Keys ({m} is cond or uncond; every array float64 except t, y int64):
    config                 0-d str: JSON of the sizes, seed, std, versions, the Latte commit and file hash
    {m}/x  {m}/t  {m}/y    inputs (x: N, F, C, H, W); {m}/y only for cond
    {m}/out                model output (N, F, 2C, H, W)
    {m}/dout               the cotangent; the loss is (out * dout).sum()
    {m}/dx                 d loss / d x
    {m}/param/NAME         every entry of the official state_dict (names as in models/latte.py + timm)
    {m}/grad/NAME          d loss / d param, for every parameter with requires_grad (all but pos_embed, temp_embed)

minidit never imports this module; torch is imported inside main() only.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np

FIXTURE = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=4, num_heads=2, mlp_ratio=4.0,
               num_frames=4, class_dropout_prob=0.1, num_classes=5, learn_sigma=True, attention_mode="math")
MODES = {"cond": 2, "uncond": 1}  # Latte's `extras`: 2 = timestep + class label, 1 = timestep only
PARAM_STD = 0.3
T = [17, 600]
Y = [3, 5]  # 5 = num_classes: the null (classifier-free guidance) label
BATCH = 2
FROZEN = ("pos_embed", "temp_embed")


def load_latte_module(latte_src):
    """models/latte.py of the checkout, loaded as a stand-alone module."""
    path = os.path.join(latte_src, "models", "latte.py")
    if not os.path.isfile(path):
        raise SystemExit(f"--latte-src {latte_src}: no models/latte.py there")
    spec = importlib.util.spec_from_file_location("latte_official", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return mod, path, sha


def latte_commit(latte_src, given):
    if given:
        return given
    try:
        out = subprocess.run(["git", "-C", latte_src, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_fixture(latte_src, out_path, seed=0, commit=None):
    import torch

    mod, path, sha = load_latte_module(latte_src)

    from .torch_reference import numpy_sinusoid

    def timestep_embedding(t, dim, max_period=10000):
        # The official float32 sinusoid (NumPy's float32, as the DiT fixture fixes it), cast to the float64 weights
        return numpy_sinusoid(t, dim, max_period).double()

    mod.TimestepEmbedder.timestep_embedding = staticmethod(timestep_embedding)

    c = FIXTURE
    rng = np.random.default_rng(seed)
    arrays = {}
    for mode, extras in MODES.items():
        model = mod.Latte(input_size=c["input_size"], patch_size=c["patch_size"], in_channels=c["in_channels"],
                          hidden_size=c["hidden_size"], depth=c["depth"], num_heads=c["num_heads"],
                          mlp_ratio=c["mlp_ratio"], num_frames=c["num_frames"],
                          class_dropout_prob=c["class_dropout_prob"], num_classes=c["num_classes"],
                          learn_sigma=c["learn_sigma"], extras=extras, attention_mode=c["attention_mode"])
        model = model.double().eval()
        D, S = c["hidden_size"], model.x_embedder.num_patches
        pos = mod.get_2d_sincos_pos_embed(D, int(S ** 0.5))
        temp = mod.get_1d_sincos_temp_embed(D, c["num_frames"])
        assert pos.dtype == np.float64 and temp.dtype == np.float64
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in FROZEN:
                    assert not p.requires_grad, name
                    continue
                p.copy_(torch.from_numpy(rng.normal(0.0, PARAM_STD, size=tuple(p.shape))))
            model.pos_embed.copy_(torch.from_numpy(pos)[None])
            model.temp_embed.copy_(torch.from_numpy(temp)[None])
        state = model.state_dict()
        assert set(state) == {k for k, _ in model.named_parameters()}, "buffers besides parameters"
        assert all(v.dtype == torch.float64 for v in state.values())

        F, C, H = c["num_frames"], c["in_channels"], c["input_size"]
        x = rng.standard_normal((BATCH, F, C, H, H))
        t = np.array(T, dtype=np.int64)
        y = np.array(Y, dtype=np.int64)
        x_in = torch.from_numpy(x).requires_grad_(True)
        if extras == 2:
            out = model(x_in, torch.from_numpy(t), torch.from_numpy(y))
        else:
            out = model(x_in, torch.from_numpy(t))
        assert out.dtype == torch.float64
        dout = rng.standard_normal(tuple(out.shape))
        (out * torch.from_numpy(dout)).sum().backward()

        p = f"{mode}/"
        arrays[p + "x"] = x
        arrays[p + "t"] = t
        if extras == 2:
            arrays[p + "y"] = y
        arrays[p + "out"] = out.detach().numpy().copy()
        arrays[p + "dout"] = dout
        arrays[p + "dx"] = x_in.grad.numpy().copy()
        for name, v in state.items():
            arrays[p + "param/" + name] = v.detach().numpy().copy()
        for name, prm in model.named_parameters():
            if prm.requires_grad:
                arrays[p + "grad/" + name] = prm.grad.numpy().copy()

    import einops
    import timm

    config = dict(FIXTURE, extras=MODES, batch=BATCH, t=T, y=Y, null_label=c["num_classes"],
                  label_table_rows=c["num_classes"] + 1, frequency_embedding_size=256, param_std=PARAM_STD,
                  seed=seed, latte_repo="github.com/maxin-cn/Latte", latte_commit=latte_commit(latte_src, commit),
                  latte_file="models/latte.py", latte_file_sha256=sha, torch=torch.__version__,
                  timm=timm.__version__, einops=einops.__version__,
                  written_by="python -m minidit.dev.latte_reference --latte-src PATH --out " + out_path)
    arrays["config"] = np.array(json.dumps(config, sort_keys=True))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    np.savez_compressed(out_path, **arrays)
    return arrays, config


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minidit.dev.latte_reference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latte-src", required=True, help="checkout of github.com/maxin-cn/Latte (holds models/latte.py)")
    ap.add_argument("--out", default="tests/fixtures/tiny_latte_f64.npz")
    ap.add_argument("--latte-commit", default=None,
                    help="commit of that checkout, when it is not a git work tree (else read with git rev-parse)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sys.dont_write_bytecode = True  # leave no __pycache__ in the Latte checkout
    arrays, config = write_fixture(args.latte_src, args.out, args.seed, args.latte_commit)
    print(f"Latte commit {config['latte_commit']}, models/latte.py sha256 {config['latte_file_sha256']}")
    for mode in MODES:
        n = sum(1 for k in arrays if k.startswith(mode + "/param/"))
        g = sum(1 for k in arrays if k.startswith(mode + "/grad/"))
        o = arrays[mode + "/out"]
        print(f"{mode}: out {o.shape} |out| max {np.abs(o).max():.3g}, {n} params, {g} grads")
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
