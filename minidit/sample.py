"""Sample images from a trained DiT: `python -m minidit.sample --ckpt RUN/checkpoint.npz --class-labels 0 1 2`,
or from a caption model (--model mmdit): `python -m minidit.sample --ckpt RUN --prompt "a large 3" --prompt "a 7"`.

Classifier-free guidance runs the conditional and the null-class batch through one forward pass
(see diffusion.cfg_model_fn); the network sees original timestep values under respacing.
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np

from .backend import BACKENDS
from .cli import nonnegative_float, nonnegative_int, output_file, positive_float, positive_int, run, sampling_steps
from .diffusion import Diffusion, cfg_model_fn
from .flow import RectifiedFlow
from .threads import data_parallel
from .xp import make_rng, to_device, to_numpy


def generate(model, labels, *, objective=None, cfg_scale=4.0, num_sampling_steps=250, sampler=None, eta=0.0, seed=0,
             guide_channels=None, clip_denoised=False, progress=True, threads=None, frames=None, size=None,
             num_samples=None):
    """Sample one image per condition with `model` (its current params). Returns host float32 samples of
    model.sample_shape(N, frames, size): images (N, C, H, W), or for a video model (minidit.video) clips
    (N, C, F, H, W) of `frames` frames of size x size (default: its spec's). The conditions are what the model reads
    (model.check_conditions): class labels (N,), or a caption model's token ids (N, L); guidance's null condition is
    model.null_condition (the null class, or the all-padding caption). An unconditional model takes labels=None and
    makes num_samples samples (it has no null condition: cfg_scale 1).

    objective: what the model was trained with (a checkpoint says: checkpoint.load); None: the official DDPM with
    the model's learn_sigma. It samples in num_sampling_steps steps with `sampler`, one of objective.SAMPLERS
    (None: the first, DDPM's "ddpm" or rectified flow's "euler").

    The starting noise is drawn on the host from `seed`, so a seed gives the same images on every backend
    (up to floating-point differences); the per-step noise comes from a generator on the model's backend.
    guide_channels: how many leading output channels guidance mixes (None = all C noise channels;
    3 reproduces the official checkpoints' sample.py). clip_denoised clamps each step's predicted x0 to [-1, 1]:
    right for pixel data (ADM does it), off for latents (DiT's scripts sample latents unclipped).
    threads: a NumPy model runs the batch in shards on this many CPU threads (minidit.threads; None: every core).
    """
    xp = model.xp
    labels = None if labels is None else np.asarray(to_numpy(labels))  # host or device conditions: checked on the host
    model.check_conditions(labels)
    n = num_samples if labels is None else len(labels)
    if objective is None:
        objective = Diffusion("", learn_sigma=model.learn_sigma)
    sampler = objective.SAMPLERS[0] if sampler is None else sampler
    if sampler not in objective.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(objective.SAMPLERS)}")
    process = objective.for_sampling(num_sampling_steps)
    shape = model.sample_shape(n, frames, size)
    noise = to_device(np.random.default_rng(seed).standard_normal(shape).astype(model.dtype), xp)
    y = None if labels is None else to_device(labels.astype(np.int64), xp)

    net, _ = data_parallel(model, threads)

    def forward(x, t, y):
        return net.forward(x, t, y, cache=False)[0]

    if cfg_scale != 1.0:
        if model.condition_dropout_prob <= 0:
            raise ValueError("guidance needs the null condition: this model is unconditional, or was trained without "
                             "condition dropout (class_dropout_prob 0); use --cfg-scale 1")
        channels = model.in_channels if guide_channels is None else int(guide_channels)
        if not 1 <= channels <= model.in_channels:
            raise ValueError(f"--guide-channels {channels}: this model has {model.in_channels} noise channels; guide "
                             f"between 1 and {model.in_channels} of them")
        model_fn = cfg_model_fn(forward, y, model.null_condition, cfg_scale, guide_channels=channels)
    else:
        def model_fn(x, t):
            return forward(x, t, y)
    x0 = process.sample(model_fn, noise, make_rng(xp, seed + 1), sampler=sampler, eta=eta,
                        clip_denoised=clip_denoised, progress=progress)
    return to_numpy(x0).astype(np.float32)


def load_vae_for(model, vae_path, backend="numpy"):
    """The VAE of --vae, checked against the model before any sampling: its latents must be what the model makes."""
    from .vae import VAE  # only the latent pipeline needs it

    vae = VAE.from_file(vae_path, backend=backend)
    if model.in_channels != vae.latent_channels:
        raise ValueError(f"the model makes {model.in_channels}-channel samples but the VAE's latents have "
                         f"{vae.latent_channels}: --vae is for models trained on VAE latents")
    return vae


def decode_latents(latents, vae, batch_size=8):
    """Host latents (N, 4, h, w) (already scaled by 0.18215) -> host images (N, 3, 8h, 8w) through the VAE; latent
    clips (N, 4, F, h, w) -> (N, 3, F, 8h, 8w), every frame decoded as an image (as Latte's sample.py does)."""
    if latents.ndim == 5:
        N, C, F, h, w = latents.shape
        frames = decode_latents(latents.transpose(0, 2, 1, 3, 4).reshape(N * F, C, h, w), vae, batch_size)
        return frames.reshape(N, F, *frames.shape[1:]).transpose(0, 2, 1, 3, 4)  # (N, 3, F, 8h, 8w)
    return np.concatenate([to_numpy(vae.decode(to_device(latents[i:i + batch_size], vae.xp)))
                           for i in range(0, len(latents), batch_size)]).astype(np.float32)


MAX_SAMPLE_BYTES = 8 << 30  # one call holds every image in memory: past this, sample in several calls


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minidit.sample", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a checkpoint written by minidit.train (or minidit.convert)")
    ap.add_argument("--class-labels", type=nonnegative_int, nargs="+", default=None,
                    help="one image per label; default: every class, --per-class times")
    ap.add_argument("--prompt", action="append", default=None,
                    help="a text prompt, for a model trained with --model mmdit on digits-captions (repeat the flag "
                         "for more: one image per prompt, --per-class times each); default: 'a 0' ... 'a 9'")
    ap.add_argument("--per-class", type=positive_int, default=1,
                    help="images per class when --class-labels is not given (an unconditional model: images)")
    ap.add_argument("--cfg-scale", type=nonnegative_float, default=4.0,
                    help="classifier-free guidance scale (1 = none)")
    ap.add_argument("--guide-channels", type=positive_int, default=None,
                    help="guide only the first K noise channels (3 = the official DiT checkpoints' behaviour); "
                         "default: all of them")
    ap.add_argument("--num-sampling-steps", type=sampling_steps, default=250,
                    help="respaced number of diffusion steps")
    ap.add_argument("--sampler", choices=Diffusion.SAMPLERS + RectifiedFlow.SAMPLERS, default=None,
                    help="ddpm, ddim or dpm++2m (DPM-Solver++(2M), deterministic, ~20 steps) for a DDPM model; euler or "
                         "heun for a rectified-flow one (default: ddpm, or euler)")
    ap.add_argument("--shift", type=positive_float, default=None,
                    help="rectified flow: SD3's time shift a of the sampling grid, t' = a t / (1 + (a - 1) t) "
                         "(1 = none; default: the checkpoint's, 1)")
    ap.add_argument("--eta", type=nonnegative_float, default=0.0, help="DDIM eta (0 = deterministic)")
    ap.add_argument("--clip-denoised", action="store_true",
                    help="clamp the predicted x0 to [-1, 1] at every step (for pixel data; off for latents, as DiT)")
    ap.add_argument("--seed", type=nonnegative_int, default=0)
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="numpy backend: CPU threads, each running one shard of the batch (default: every core)")
    ap.add_argument("--no-ema", action="store_true", help="use the raw model weights instead of the EMA")
    ap.add_argument("--backend", choices=BACKENDS, default="numpy",
                    help="numpy (CPU), cupy (CUDA), or strict (a CPU emulation of a device, for testing)")
    ap.add_argument("--frames", type=positive_int, default=None,
                    help="a video model: frames per clip (default: the frame count it was trained at; others work)")
    ap.add_argument("--size", type=positive_int, default=None,
                    help="a video model: frame side in pixels (default: its training size)")
    ap.add_argument("--nrow", type=positive_int, default=None, help="images per grid row (default: one row per class)")
    ap.add_argument("--out", default=None, help="grid to write: a PNG (default sample.png), or for a video model an "
                                                "animated GIF (default sample.gif)")
    ap.add_argument("--npz", default=None, help="also write arr_0 (uint8 N x H x W x C; clips: N x F x H x W x C) and "
                                                "labels to this .npz")
    ap.add_argument("--vae", default=None, help="decode the samples (latents; clips frame by frame) to pixels with this "
                                                "Stable Diffusion VAE (its diffusers safetensors file), as the "
                                                "official sample.py")
    return ap.parse_args(argv)


def sample(args):
    """The command: every output path and size checked before the model runs, then sample, decode, write."""
    from .checkpoint import load  # imported here: the CLI needs it, the library function does not
    from .data import sample_file, samples_to_uint8, save_npz, save_samples

    output_file(args.out, (".png", ".gif"), "--out")  # which of the two: known once the model is
    output_file(args.npz, (".npz",), "--npz")
    if args.vae is not None and not os.path.isfile(args.vae):
        raise FileNotFoundError(f"--vae {args.vae!r}: no such file (the VAE's diffusion_pytorch_model.safetensors)")
    model, objective, _ = load(args.ckpt, ema=not args.no_ema, backend=args.backend)
    y, labels = model.conditions(args.class_labels, args.prompt, args.per_class, labelled=bool(args.npz))
    n = args.per_class if y is None else len(y)  # None: an unconditional model, --per-class samples
    shape = model.sample_shape(n, args.frames, args.size)  # an impossible --frames or --size: an error here
    suffix = sample_file("", len(shape))  # .png for images, .gif for clips
    args.out = args.out or "sample" + suffix
    if not args.out.lower().endswith(suffix):
        raise ValueError(f"--out {args.out!r}: " + ("a video model writes an animated .gif" if suffix == ".gif" else
                                                     "an image model writes a .png grid (a .gif is for clips)"))
    if args.shift is not None:
        if not isinstance(objective, RectifiedFlow):
            raise ValueError("--shift is for rectified-flow models; this checkpoint was trained with DDPM")
        objective.shift = args.shift
    vae = load_vae_for(model, args.vae, backend=args.backend) if args.vae else None
    pixels = math.prod(shape[2:]) * (64 if vae else 1)  # per channel of one sample: the VAE decodes 8x as wide, high
    need = n * max(shape[1], 3 if vae else 0) * pixels * 4
    if need > MAX_SAMPLE_BYTES:
        raise ValueError(f"{n} samples of shape {shape[1:]} need {need / 2**30:.1f} GiB in one call; sample "
                         f"fewer at a time (--class-labels or --per-class) with different --seed values")
    images = generate(model, y, objective=objective, cfg_scale=args.cfg_scale,
                      num_sampling_steps=args.num_sampling_steps, sampler=args.sampler, eta=args.eta, seed=args.seed,
                      guide_channels=args.guide_channels, clip_denoised=args.clip_denoised, threads=args.threads,
                      frames=args.frames, size=args.size, num_samples=n)
    if vae is not None:
        images = decode_latents(images, vae)
    nrow = args.nrow or (args.per_class if args.class_labels is None and (args.prompt is None or args.per_class > 1)
                         else min(n, 8))
    save_samples(images, args.out, nrow=nrow)
    print(f"wrote {args.out} ({n} {'clips' if images.ndim == 5 else 'images'})")
    if args.npz:  # the class of every sample (none for an unconditional model)
        save_npz(args.npz, arr_0=samples_to_uint8(images),
                 **({} if labels is None else {"labels": np.asarray(labels, dtype=np.int64)}))
        print(f"wrote {args.npz}")


def main(argv=None):
    run(sample, parse_args(argv))


if __name__ == "__main__":
    main()
