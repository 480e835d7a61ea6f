"""Encode an image folder to the latents DiT trains on: python -m minidit.encode --data FOLDER --vae VAE --out z.npz

The official train.py's preprocessing, done once instead of every batch (as fast-DiT's extract_features.py does):
every image is center-cropped (ADM) to --image-size, flipped left-right with probability 0.5 (the only augmentation
DiT uses; here drawn once, before encoding), scaled to [-1, 1], encoded by the Stable Diffusion VAE, sampled from its
posterior and multiplied by 0.18215. The output .npz holds `latents`
float32 (N, 4, S/8, S/8), `labels` int64 (N,) and `num_classes`: the file `python -m minidit.train --data` reads.
"""
from __future__ import annotations

import argparse

import numpy as np
from tqdm.auto import tqdm

from .backend import BACKENDS
from .xp import make_rng, to_device, to_numpy
from .cli import nonnegative_int, output_file, positive_int, run
from .data import ImageFolder, from_uint8, save_npz
from .vae import VAE


def encode_folder(folder, vae, image_size=256, batch_size=8, seed=0, flip=True, progress=True):
    """-> latents float32 (N, C, S/8, S/8), labels int64 (N,), class names."""
    if image_size % 8:
        raise ValueError(f"--image-size must be a multiple of 8 (the VAE downsamples by 8), got {image_size}")
    ds = ImageFolder(folder, image_size)
    x_all = ds.data  # (N, 3, S, S) uint8
    if flip:
        mirror = np.random.default_rng([seed, 1]).random(len(x_all)) < 0.5
        x_all = x_all.copy()
        x_all[mirror] = x_all[mirror, :, :, ::-1]
    rng = make_rng(vae.xp, seed)
    out = []
    for i in tqdm(range(0, len(x_all), batch_size), desc="encoding", unit="batch", disable=not progress):
        x = from_uint8(x_all[i:i + batch_size])  # (B, 3, S, S) in [-1, 1]
        out.append(to_numpy(vae.encode(to_device(x, vae.xp), rng=rng)))
    return np.concatenate(out).astype(np.float32), ds.labels.astype(np.int64), ds.class_names


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minidit.encode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a folder with one sub-folder of images per class")
    ap.add_argument("--vae", required=True, help="the VAE's diffusers safetensors file "
                                                 "(e.g. sd-vae-ft-ema/diffusion_pytorch_model.safetensors)")
    ap.add_argument("--out", required=True, help="the .npz to write")
    ap.add_argument("--image-size", type=positive_int, default=256, help="center-crop size in pixels (default 256)")
    ap.add_argument("--batch-size", type=positive_int, default=8, help="images per VAE call (default 8)")
    ap.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                    help="mirror each image with probability 0.5 before encoding (official; default on)")
    ap.add_argument("--norm-groups", type=positive_int, default=32, help="the VAE's GroupNorm groups (32 for SD's)")
    ap.add_argument("--seed", type=nonnegative_int, default=0)
    ap.add_argument("--backend", choices=BACKENDS, default="numpy")
    run(encode, ap.parse_args(argv))


def encode(args):
    """The command: the output checked first, then encode and write atomically."""
    output_file(args.out, (".npz",), "--out")
    vae = VAE.from_file(args.vae, norm_groups=args.norm_groups, backend=args.backend)
    latents, labels, names = encode_folder(args.data, vae, args.image_size, args.batch_size, args.seed, args.flip)
    save_npz(args.out, latents=latents, labels=labels, num_classes=np.int64(len(names)))
    print(f"wrote {args.out}: {len(labels)} latents of shape {latents.shape[1:]}, {len(names)} classes "
          f"({', '.join(names[:5])}{' ...' if len(names) > 5 else ''}); train with "
          f"python -m minidit.train --data {args.out}")


if __name__ == "__main__":
    main()
