"""Sample images from a trained DiT: `python -m minidit.sample --ckpt RUN/checkpoint.npz --class-labels 0 1 2`,
or from a caption model (--model mmdit): `python -m minidit.sample --ckpt RUN --prompt "a large 3" --prompt "a 7"`.

Classifier-free guidance runs the conditional and the null-class batch through one forward pass
(see diffusion.cfg_model_fn); the network sees original timestep values under respacing.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from .backend import BACKENDS
from .cli import nonnegative_float, nonnegative_int, output_file, positive_float, positive_int, run, sampling_steps
from .diffusion import Diffusion, cfg_model_fn
from .flow import RectifiedFlow
from .threads import data_parallel
from .xp import make_rng, to_device, to_numpy


def generate(model, labels, *, objective=None, cfg_scale=4.0, num_sampling_steps=250, sampler=None, eta=0.0, seed=0,
             guide_channels=None, clip_denoised=False, progress=True, threads=None, frames=None, size=None):
    """Sample one image per label with `model` (its current params). Returns host float32 (N, C, H, W), or for a
    video model (minidit.video) clips (N, C, F, H, W) of `frames` frames of size x size (default: its spec's).
    For a caption model (minidit.captions.CaptionMMDiT) the labels are token ids (N, L), and guidance's null
    condition is its all-padding caption (model.null_condition).

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
    labels = np.asarray(to_numpy(labels), dtype=np.int64)  # host or device labels: checked on the host
    null = getattr(model, "null_condition", None)  # a caption model's all-padding token ids; DiT: the null class
    if null is not None:  # labels are token ids (N, L) (minidit.text.tokenize_all)
        if labels.ndim != 2 or labels.shape[0] == 0:
            raise ValueError("give at least one prompt (token ids of shape (N, L))")
    else:
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError("give at least one class label")
        if labels.min() < 0 or labels.max() >= model.num_classes:
            raise ValueError(f"class labels must lie in [0, {model.num_classes - 1}], got {labels.tolist()}")
        null = model.num_classes
    if objective is None:
        objective = Diffusion("", learn_sigma=model.learn_sigma)
    sampler = objective.SAMPLERS[0] if sampler is None else sampler
    if sampler not in objective.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(objective.SAMPLERS)}")
    process = objective.for_sampling(num_sampling_steps)
    side = size or model.input_size
    shape = (len(labels), model.in_channels, side, side)
    if hasattr(model, "num_frames"):  # a video model: clips, channels first
        shape = (len(labels), model.in_channels, frames or model.num_frames, side, side)
        model.check_shape(*shape[2:])
    elif frames is not None or size is not None:
        raise ValueError("--frames and --size are for a video model (--model video)")
    noise = to_device(np.random.default_rng(seed).standard_normal(shape).astype(model.dtype), xp)
    y = to_device(labels, xp)

    net, _ = data_parallel(model, threads)

    def forward(x, t, y):
        return net.forward(x, t, y, cache=False)[0]

    if cfg_scale != 1.0:
        if model.class_dropout_prob <= 0:
            raise ValueError("guidance needs the null class: this model was trained with class_dropout_prob 0; "
                             "use --cfg-scale 1")
        channels = model.in_channels if guide_channels is None else int(guide_channels)
        if not 1 <= channels <= model.in_channels:
            raise ValueError(f"--guide-channels {channels}: this model has {model.in_channels} noise channels; guide "
                             f"between 1 and {model.in_channels} of them")
        model_fn = cfg_model_fn(forward, y, null, cfg_scale, guide_channels=channels)
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
    """Host latents (N, 4, h, w) (already scaled by 0.18215) -> host images (N, 3, 8h, 8w) through the VAE."""
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
                    help="images per class when --class-labels is not given")
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
    ap.add_argument("--vae", default=None, help="decode the samples (latents) to pixels with this Stable Diffusion "
                                                "VAE (its diffusers safetensors file), as the official sample.py")
    return ap.parse_args(argv)


def sample(args):
    """The command: every output path and size checked before the model runs, then sample, decode, write."""
    from .checkpoint import load  # imported here: the CLI needs it, the library function does not
    from .data import clips_to_uint8, save_gif, save_grid, save_npz, to_uint8_nhwc
    from .text import prompt_digit, tokenize_all

    output_file(args.out, (".png", ".gif"), "--out")  # which of the two: known once the model is
    output_file(args.npz, (".npz",), "--npz")
    if args.vae is not None and not os.path.isfile(args.vae):
        raise FileNotFoundError(f"--vae {args.vae!r}: no such file (the VAE's diffusion_pytorch_model.safetensors)")
    model, objective, _ = load(args.ckpt, ema=not args.no_ema, backend=args.backend)
    video = hasattr(model, "num_frames")
    args.out = args.out or ("sample.gif" if video else "sample.png")
    if args.out.lower().endswith(".gif") != video:
        raise ValueError(f"--out {args.out!r}: " + ("a video model writes an animated .gif" if video else
                                                     "an image model writes a .png grid (a .gif is for clips)"))
    if video and args.vae:
        raise ValueError("--vae decodes image latents; this is a video model on pixels")
    if args.shift is not None:
        if not isinstance(objective, RectifiedFlow):
            raise ValueError("--shift is for rectified-flow models; this checkpoint was trained with DDPM")
        objective.shift = args.shift
    vae = load_vae_for(model, args.vae, backend=args.backend) if args.vae else None
    captioned = getattr(model, "null_condition", None) is not None
    if captioned and args.class_labels is not None:
        raise ValueError("this model reads text prompts: give --prompt TEXT (e.g. --prompt 'a large 3'), not "
                         "--class-labels")
    if not captioned and args.prompt:
        raise ValueError("--prompt is for a model trained on captions (--model mmdit --data digits-captions); this "
                         "checkpoint's model takes --class-labels")
    prompts = None
    if captioned:
        prompts = [p for p in (args.prompt or [f"a {d}" for d in range(10)]) for _ in range(args.per_class)]
        tokens = tokenize_all(prompts, model.max_length)  # an unknown word or a long prompt: a clear error here
        digits = [prompt_digit(p) for p in prompts] if args.npz else None  # the labels evaluate reads
        labels = [str(p) for p in prompts]
    else:
        labels = args.class_labels
        if labels is None:
            labels = [c for c in range(model.num_classes) for _ in range(args.per_class)]
    side = (args.size or model.input_size) * (8 if args.vae else 1)
    need = len(labels) * max(model.in_channels, 3 if args.vae else 0) * side * side * 4 * (
        (args.frames or model.num_frames) if video else 1)
    if need > MAX_SAMPLE_BYTES:
        raise ValueError(f"{len(labels)} images of {side} x {side} need {need / 2**30:.1f} GiB in one call; sample "
                         f"fewer at a time (--class-labels or --per-class) with different --seed values")
    images = generate(model, tokens if captioned else labels, objective=objective, cfg_scale=args.cfg_scale,
                      num_sampling_steps=args.num_sampling_steps, sampler=args.sampler, eta=args.eta, seed=args.seed,
                      guide_channels=args.guide_channels, clip_denoised=args.clip_denoised, threads=args.threads,
                      frames=args.frames, size=args.size)
    if vae is not None:
        images = decode_latents(images, vae)
    nrow = args.nrow or (args.per_class if args.class_labels is None and (args.prompt is None or args.per_class > 1)
                         else min(len(labels), 8))
    (save_gif if video else save_grid)(images, args.out, nrow=nrow)
    print(f"wrote {args.out} ({len(labels)} {'clips' if video else 'images'})")
    if args.npz:
        save_npz(args.npz, arr_0=(clips_to_uint8 if video else to_uint8_nhwc)(images), labels=np.asarray(digits if captioned else labels,
                                                                           dtype=np.int64))
        print(f"wrote {args.npz}")


def main(argv=None):
    run(sample, parse_args(argv))


if __name__ == "__main__":
    main()
