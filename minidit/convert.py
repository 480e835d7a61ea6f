"""Official DiT and Latte checkpoints, and diffusers' SD3 transformer folders, -> minidit's own safe format, once:

    python -m minidit.convert DiT-XL-2-256x256.pt dit-xl2-256.npz
    python -m minidit.sample --ckpt dit-xl2-256.npz --class-labels 207 360 387 974 --guide-channels 3 ...
    python -m minidit.convert ucf101.pt latte-ucf101.npz          # Latte (maxin-cn/Latte): a video DiT
    python -m minidit.convert stable-diffusion-3-medium-diffusers/transformer sd3-medium.npz

A Latte .pt (published as {"ema": state dict}; the unconditional FaceForensics / SkyTimelapse / Taichi models and
the 101-class UCF101 one) is told from a DiT by its temp_embed; from_latte_state_dict says how it is read.

An SD3 folder is diffusers' SD3Transformer2DModel layout: config.json and diffusion_pytorch_model.safetensors (or
its shards with diffusion_pytorch_model.safetensors.index.json). It is read without PyTorch; the weights become a
minidit.mmdit.MMDiT with the rectified-flow objective, its time shift taken from ../scheduler/scheduler_config.json
when that file is there (SD3 ships 3.0), else 1. minidit ships no text encoder: sampling such a model needs the
CLIP / T5 embeddings (`context`, `pooled`) computed elsewhere.

Reads what facebookresearch/DiT publishes and writes: a pretrained `DiT-XL-2-256x256.pt` / `-512x512.pt` (a plain
state dict), or a checkpoint of its train.py (a dict with "model", "ema", "opt", "args": the "ema" weights are used,
as its sample.py does). The .pt is opened with `torch.load(weights_only=True)`, which refuses to run code from the
file (argparse.Namespace, for the "args" entry, is the one class allowed). This is the only place minidit uses
PyTorch, and only here; converted files load without it.

The model is read from the weights' shapes: depth, hidden size and patch size name the variant (the number of heads
comes from it), the patch embedding gives the channels, pos_embed the input size, the label table the classes (one
row is the null class of guidance) and the final layer whether sigma is learned.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re

import numpy as np

from .checkpoint import save_weights
from .cli import output_file, run
from .diffusion import Diffusion
from .flow import RectifiedFlow
from .mmdit import MMDiTSpec, from_diffusers_state_dict
from .mmdit import param_shapes as mmdit_param_shapes
from .model import VARIANTS, DiTSpec, param_shapes
from .params import check_keys
from .vae import read_safetensors
from .video import VideoDiTSpec, frame_code, grid_code
from .video import param_shapes as video_param_shapes


def read_torch_checkpoint(path):
    """path to a .pt -> (name -> float32 numpy array, which entry was used: "ema", "model" or "state dict")."""
    try:
        import torch
    except ImportError:
        raise RuntimeError('converting a PyTorch checkpoint needs PyTorch: pip install -e ".[torch]" '
                           "(the converted file then loads without it)") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path!r} is not a PyTorch checkpoint that can be read safely "
                             f"(torch.load with weights_only=True failed: {e})") from None
    used = "state dict"
    if isinstance(obj, dict):
        for key in ("ema", "model"):  # the official sample.py prefers "ema"
            if isinstance(obj.get(key), dict):
                obj, used = obj[key], key
                break
    if not isinstance(obj, dict) or not all(hasattr(v, "detach") for v in obj.values()):
        raise ValueError(f"{path!r} holds no DiT state dict (expected name -> tensor, or a dict with an 'ema' or "
                         f"'model' entry)")
    state = {k.removeprefix("module."): v.detach().float().numpy() for k, v in obj.items()}  # DDP's prefix
    return state, used


def infer_model(state):
    """The DiT constructor arguments that match a state dict's names and shapes."""
    need = ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"not a DiT state dict: missing {', '.join(missing)}")
    D, C, p, _ = state["x_embedder.proj.weight"].shape
    T = state["pos_embed"].shape[1]
    out_c = state["final_layer.linear.weight"].shape[0] // (p * p)
    return dict(variant=variant_of(state, D, p), input_size=int(math.isqrt(T)) * p, in_channels=int(C),
                num_classes=int(state["y_embedder.embedding_table.weight"].shape[0]) - 1,  # minus the null class
                learn_sigma=bool(out_c == 2 * C), class_dropout_prob=0.1)


def from_latte_state_dict(state, variant=None):
    """(VideoDiTSpec, minidit parameters) of an official Latte state dict (maxin-cn/Latte `Latte`, any size):

    * the size from the shapes: depth, hidden size and patch name the variant (or give `variant`, a name or a
      DiTConfig, for a size that is none of VARIANTS: the heads cannot be read off the weights), pos_embed the input size, temp_embed
      the frame count, the label table the classes (its last row the null label; no table: unconditional, extras=1),
      the final layer whether sigma is learned;
    * pos_embed and temp_embed are fixed tables: they are checked against minidit's (grid_code, frame_code; stored
      in float32 by Latte) and dropped, minidit computes them per clip shape;
    * x_embedder.proj.weight (D, C, p, p), a per-frame Conv2d, becomes the (D, C, 1, p, p) Conv3d weight of
      temporal_patch 1. Every other name is minidit's already."""
    need = ("pos_embed", "temp_embed", "x_embedder.proj.weight", "final_layer.linear.weight")
    if missing := [k for k in need if k not in state]:
        raise ValueError(f"not a Latte state dict: missing {', '.join(missing)}")
    D, C, p, _ = state["x_embedder.proj.weight"].shape
    S, F = state["pos_embed"].shape[1], state["temp_embed"].shape[1]
    labels = state.get("y_embedder.embedding_table.weight")
    out_c = state["final_layer.linear.weight"].shape[0] // (p * p)
    spec = VideoDiTSpec(variant=variant or variant_of(state, D, p), num_frames=int(F), input_size=int(math.isqrt(S)) * p,
                        in_channels=int(C), num_classes=0 if labels is None else int(labels.shape[0]) - 1,
                        learn_sigma=bool(out_c == 2 * C), class_dropout_prob=0.0 if labels is None else 0.1)
    g = int(math.isqrt(S))
    for name, table in (("pos_embed", grid_code(D, g, g)), ("temp_embed", frame_code(D, F)[:, 0])):
        err = float(np.abs(state[name][0] - table).max())
        if err > 1e-5:  # float32 rounding of values in [-1, 1] is below 1e-7
            raise ValueError(f"the checkpoint's {name} is not the sin-cos table minidit computes (largest difference "
                             f"{err:.2g}): not an official Latte, or one whose positions were trained")
    params = {k: v for k, v in state.items() if k not in ("pos_embed", "temp_embed")}
    params["x_embedder.proj.weight"] = params["x_embedder.proj.weight"][:, :, None]  # (D, C, 1, p, p)
    expected = video_param_shapes(spec)
    check_keys(params, expected, f"the state dict does not match Latte {spec.variant} as minidit reads it", expected)
    return spec, {k: params[k] for k in expected}


def variant_of(state, D, p):
    """The name in VARIANTS of a transformer with this many blocks, hidden size D and patch p."""
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    names = [n for n, c in VARIANTS.items() if (c.depth, c.hidden_size, c.patch_size) == (depth, D, p)]
    if not names:
        raise ValueError(f"no DiT variant has depth {depth}, hidden size {D} and patch size {p}; known: "
                         + ", ".join(f"{n} ({c.depth}, {c.hidden_size}, {c.patch_size})" for n, c in VARIANTS.items()))
    return names[0]


def convert(src, dst):
    """Convert src (.pt: an official DiT or Latte) to dst (.npz); returns the spec written and the entry used. Every
    name and shape is checked against the inferred model first, so a file that is neither fails here, not later."""
    if not dst.endswith(".npz"):
        raise ValueError(f"the output {dst!r} must be an .npz file: minidit writes its checkpoints as .npz "
                         f"(name it e.g. {os.path.splitext(dst)[0] + '.npz'!r})")
    output_file(dst, (".npz",), "the output")
    state, used = read_torch_checkpoint(src)
    if "temp_embed" in state:  # Latte: a video model
        spec, params = from_latte_state_dict(state)
        save_weights(dst, spec.to_dict(), Diffusion("", learn_sigma=spec.learn_sigma).spec(), params,
                     source=os.path.basename(src), weights=used)
        return spec, used
    meta = infer_model(state)
    spec = DiTSpec(**meta)
    expected = param_shapes(spec)
    check_keys(state, expected, f"{src!r} does not match DiT {meta['variant']}", expected)
    save_weights(dst, spec.to_dict(), Diffusion("", learn_sigma=spec.learn_sigma).spec(), state,
                 source=os.path.basename(src), weights=used)
    return spec, used


SD3_WEIGHTS = "diffusion_pytorch_model.safetensors"


def read_sd3_folder(folder):
    """(MMDiTSpec, diffusers state dict as float32 arrays, time shift) of a diffusers SD3Transformer2DModel folder."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder!r} has no config.json: give the transformer folder of a diffusers SD3 "
                                f"model (config.json + {SD3_WEIGHTS})")
    with open(config_path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path!r} is not JSON ({e})") from None
    if config.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
        raise ValueError(f"{config_path!r} describes a {config['_class_name']}, not an SD3Transformer2DModel")
    spec = MMDiTSpec.of(config)
    single, index = os.path.join(folder, SD3_WEIGHTS), os.path.join(folder, SD3_WEIGHTS + ".index.json")
    if os.path.isfile(single):
        state = read_safetensors(single)
    elif os.path.isfile(index):  # sharded: the index maps every tensor to its file
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {k: v for name in files for k, v in read_safetensors(os.path.join(folder, name)).items()}
    else:
        raise FileNotFoundError(f"{folder!r} has no {SD3_WEIGHTS} (nor its .index.json shards)")
    shift = 1.0
    scheduler = os.path.join(os.path.dirname(os.path.abspath(folder)), "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler):
        with open(scheduler) as f:
            shift = float(json.load(f).get("shift", 1.0))
    return spec, state, shift


def convert_sd3(src, dst):
    """Convert a diffusers SD3 transformer folder to dst (.npz); every name and shape checked first."""
    output_file(dst, (".npz",), "the output")
    spec, state, shift = read_sd3_folder(src)
    params = from_diffusers_state_dict(state)
    expected = mmdit_param_shapes(spec)
    check_keys(params, expected, f"{src!r} does not match the MM-DiT its config.json describes", expected)
    save_weights(dst, spec.to_dict(), RectifiedFlow(shift=shift).spec(), params, source=os.path.basename(
        os.path.normpath(src)), weights="diffusers")
    return spec, shift


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minidit.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="an official DiT .pt (pretrained, or a train.py checkpoint), an official Latte .pt "
                                "({'ema': state dict} as published, or a bare state dict), or a diffusers "
                                "SD3Transformer2DModel folder (config.json + diffusion_pytorch_model.safetensors)")
    ap.add_argument("dst", help="the minidit checkpoint (.npz) to write")
    args = ap.parse_args(argv)
    if os.path.isdir(args.src):
        spec, shift = run(convert_sd3, args.src, args.dst)
        print(f"wrote {args.dst}: MM-DiT, {spec.num_layers} layers, hidden {spec.inner_dim}, qk_norm {spec.qk_norm}, "
              f"rectified flow with shift {shift:g}; it needs CLIP/T5 embeddings to sample (no text encoder here)")
        return
    spec, used = run(convert, args.src, args.dst)
    what = "video DiT (Latte)" if isinstance(spec, VideoDiTSpec) else "DiT"
    frames = f"{spec.num_frames} frames of " if isinstance(spec, VideoDiTSpec) else ""
    print(f"wrote {args.dst}: {what} {spec.variant} at input {frames}{spec.input_size}, {spec.in_channels} channels, "
          f"{spec.num_classes or 'no'} classes, learn_sigma={spec.learn_sigma} (weights: {used}); sample it with "
          f"python -m minidit.sample --ckpt {args.dst}")


if __name__ == "__main__":
    main()
