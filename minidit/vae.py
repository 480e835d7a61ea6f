"""The Stable Diffusion VAE that DiT works in (diffusers' AutoencoderKL, e.g. stabilityai/sd-vae-ft-ema), forward only.

DiT never trains the VAE: images are encoded once to latents (4 x H/8 x W/8, scaled by 0.18215) and the
transformer's samples are decoded back to pixels. This module is that encoder and decoder in the same array code as
the rest of minidit (NumPy or CuPy), reading the published weights by name from their safetensors file.

    encoder: conv_in -> down blocks (ResNet blocks; a stride-2 conv after every block but the last)
             -> mid (ResNet, self-attention over pixels, ResNet) -> GroupNorm, SiLU, conv_out -> (mean, log var)
    decoder: conv_in -> mid -> up blocks (ResNet blocks; nearest x2 + conv after every block but the last)
             -> GroupNorm, SiLU, conv_out
    ResNet block: h = conv2(silu(GN(conv1(silu(GN(x)))))); out = shortcut(x) + h  (1x1 conv shortcut when C changes)

Layout of the weights (diffusers names): encoder.down_blocks.{i}.resnets.{j}.{norm1,conv1,norm2,conv2,conv_shortcut},
encoder.down_blocks.{i}.downsamplers.0.conv, {encoder,decoder}.mid_block.{resnets.{0,1},attentions.0.{group_norm,
to_q,to_k,to_v,to_out.0}}, decoder.up_blocks.{i}.resnets.{j}, decoder.up_blocks.{i}.upsamplers.0.conv,
{encoder,decoder}.{conv_in,conv_norm_out,conv_out}, quant_conv, post_quant_conv. Older files name the attention
query/key/value/proj_attn; they are renamed on load. The original CompVis (ldm) layout is not read.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct

import numpy as np

from .backend import get_backend
from .xp import get_xp, to_backend
from .layers import attend_forward, silu_forward

SCALE = 0.18215  # latents = SCALE * the VAE's posterior (DiT's train.py and sample.py)
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # older diffusers
LEGACY_RE = re.compile(r"(mid_block\.attentions\.0\.)(query|key|value|proj_attn)(?=\.)")


# ----------------------------------------------------------------------------------------------
# safetensors: an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets), raw data
# ----------------------------------------------------------------------------------------------
SAFETENSORS_DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "F64": ("<f8", 8), "BF16": ("<u2", 2)}


def read_safetensors(path):
    """name -> float32 numpy array, for F32 / F16 / BF16 / F64 tensors. Raises ValueError, naming the file and the
    tensor, for anything else: a short or non-JSON header, an entry without dtype/shape/offsets, offsets outside the
    data or not matching the shape, another dtype."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path!r} is not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path!r} is not a safetensors file (header length {n})")
        text = f.read(n)
        if len(text) != n:
            raise ValueError(f"{path!r} is truncated: its header says {n} bytes, the file holds {len(text)}")
        try:
            header = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path!r} is not a safetensors file (header is not JSON: {e})") from None
        data = f.read()
    if not isinstance(header, dict):
        raise ValueError(f"{path!r} is not a safetensors file (its header is not a JSON object)")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path!r}: the header entry of tensor {name!r} is malformed ({info!r}); expected "
                             f"dtype, shape and data_offsets") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path!r}: tensor {name!r} has dtype {dtype}, not a float type a VAE uses")
        code, size = SAFETENSORS_DTYPES[dtype]
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= len(data)) \
                or end - start != size * math.prod(shape) or min(shape, default=0) < 0:
            raise ValueError(f"{path!r}: tensor {name!r} ({dtype} {list(shape)}) has byte offsets [{start}, {end}) "
                             f"that do not fit its shape or the file's {len(data)} data bytes: the file is damaged")
        a = np.frombuffer(data[start:end], dtype=code)
        if dtype == "BF16":  # the upper half of a float32
            a = (a.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = a.astype(np.float32).reshape(shape)
    return tensors


# ----------------------------------------------------------------------------------------------
# Layers (forward only)
# ----------------------------------------------------------------------------------------------
def conv2d(x, w, b, stride=1, padding=0):
    """x (N, C, H, W), w (O, C, k, k), b (O,) -> (N, O, Ho, Wo): a sum of k*k shifted matmuls (no im2col copy).

    out[n, o, i, j] = b[o] + sum_{c, dy, dx} w[o, c, dy, dx] x_pad[n, c, stride i + dy, stride j + dx]
    """
    xp = get_xp(x)
    N, C, H, W = x.shape
    O, _, k, _ = w.shape
    if padding:
        x = xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    Ho, Wo = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    out = xp.zeros((N, O, Ho * Wo), dtype=x.dtype)
    for dy in range(k):
        for dx in range(k):
            tap = x[:, :, dy:dy + stride * (Ho - 1) + 1:stride, dx:dx + stride * (Wo - 1) + 1:stride]
            out += w[:, :, dy, dx] @ tap.reshape(N, C, Ho * Wo)  # (O, C) @ (N, C, P) -> (N, O, P)
    out += b[:, None]
    return out.reshape(N, O, Ho, Wo)


def group_norm(x, groups, w, b, eps=1e-6):
    """x (N, C, H, W): normalise over each group of C / groups channels and all pixels, then scale and shift."""
    N, C, H, W = x.shape
    g = x.reshape(N, groups, -1)
    mean = g.mean(axis=-1, keepdims=True)
    var = g.var(axis=-1, keepdims=True)
    g = (g - mean) / get_xp(x).sqrt(var + eps)
    return g.reshape(N, C, H, W) * w[:, None, None] + b[:, None, None]


def silu(x):
    return silu_forward(x)[0]


class VAE:
    """AutoencoderKL forward passes with weights read by name.

        vae = VAE.from_file("diffusion_pytorch_model.safetensors")
        z = vae.encode(images)            # (N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8), scaled by 0.18215
        images = vae.decode(z)            # and back (unclipped)
    """

    def __init__(self, weights: dict, norm_groups=32, backend="numpy"):
        self.xp = get_backend(backend)
        self.norm_groups = norm_groups
        self.P = {LEGACY_RE.sub(lambda m: m.group(1) + LEGACY_ATTENTION[m.group(2)], k): v for k, v in weights.items()}
        need = ("encoder.conv_in.weight", "decoder.conv_in.weight", "quant_conv.weight", "post_quant_conv.weight")
        missing = [k for k in need if k not in self.P]
        if missing:
            raise ValueError("these weights are not a Stable Diffusion VAE in diffusers' layout (AutoencoderKL): "
                             f"missing {', '.join(missing)}" + (
                                 " (found CompVis/ldm names such as 'encoder.down.0...': use the diffusers "
                                 "release of the VAE, e.g. stabilityai/sd-vae-ft-ema)"
                                 if any(k.startswith("encoder.down.") for k in self.P) else ""))
        self.num_levels = 1 + max(int(m.group(1)) for k in self.P
                                  if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
        self.layers_per_block = 1 + max(int(m.group(1)) for k in self.P
                                        if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)))
        self.latent_channels = self.P["post_quant_conv.weight"].shape[0]
        channels = {self.P[k].shape[0] for k in self.P if k.endswith("norm1.weight")}
        bad = [c for c in channels if c % norm_groups]
        if bad:
            raise ValueError(f"GroupNorm with {norm_groups} groups does not divide {bad} channels; pass the "
                             "VAE's norm_num_groups")
        self.P = {k: to_backend(v, self.xp, np.float32) for k, v in self.P.items()}

    @classmethod
    def from_file(cls, path, norm_groups=32, backend="numpy"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no VAE weights at {path!r} (the diffusers safetensors file of the VAE, e.g. "
                                    "stabilityai/sd-vae-ft-ema's diffusion_pytorch_model.safetensors)")
        return cls(read_safetensors(path), norm_groups=norm_groups, backend=backend)

    # -- blocks ----------------------------------------------------------------------------------
    def conv(self, x, name, stride=1, padding=None):
        w = self.P[name + ".weight"]
        return conv2d(x, w, self.P[name + ".bias"], stride, w.shape[-1] // 2 if padding is None else padding)

    def norm(self, x, name):
        return group_norm(x, self.norm_groups, self.P[name + ".weight"], self.P[name + ".bias"])

    def resnet(self, x, name):
        h = self.conv(silu(self.norm(x, name + ".norm1")), name + ".conv1")
        h = self.conv(silu(self.norm(h, name + ".norm2")), name + ".conv2")
        if name + ".conv_shortcut.weight" in self.P:
            x = self.conv(x, name + ".conv_shortcut")
        return x + h

    def attention(self, x, name):
        """Single-head self-attention over the H*W pixels, channels as features; residual."""
        N, C, H, W = x.shape
        h = self.norm(x, name + ".group_norm").reshape(N, C, H * W).transpose(0, 2, 1)  # (N, HW, C)
        q, k, v = ((h @ self.P[f"{name}.{n}.weight"].T + self.P[f"{name}.{n}.bias"])[:, None]  # (N, 1, HW, C)
                   for n in ("to_q", "to_k", "to_v"))
        y, _ = attend_forward(q, k, v)  # one head of size C: softmax(q k^T / sqrt(C)) v
        o = y[:, 0] @ self.P[name + ".to_out.0.weight"].T + self.P[name + ".to_out.0.bias"]
        return x + o.transpose(0, 2, 1).reshape(N, C, H, W)

    def mid(self, x, side):
        x = self.resnet(x, f"{side}.mid_block.resnets.0")
        x = self.attention(x, f"{side}.mid_block.attentions.0")
        return self.resnet(x, f"{side}.mid_block.resnets.1")

    # -- encoder / decoder -----------------------------------------------------------------------
    def encode_moments(self, x):
        """images (N, 3, H, W) in [-1, 1] -> the posterior's mean and log-variance (N, 4, H/8, W/8), unscaled."""
        h = self.conv(x, "encoder.conv_in")
        for i in range(self.num_levels):
            for j in range(self.layers_per_block):
                h = self.resnet(h, f"encoder.down_blocks.{i}.resnets.{j}")
            if i < self.num_levels - 1:  # pad right and bottom by one, then a stride-2 3x3 conv
                h = self.xp.pad(h, ((0, 0), (0, 0), (0, 1), (0, 1)))
                h = self.conv(h, f"encoder.down_blocks.{i}.downsamplers.0.conv", stride=2, padding=0)
        h = self.mid(h, "encoder")
        h = self.conv(silu(self.norm(h, "encoder.conv_norm_out")), "encoder.conv_out")
        h = self.conv(h, "quant_conv")
        mean, logvar = h[:, :self.latent_channels], h[:, self.latent_channels:]
        return mean, self.xp.clip(logvar, -30.0, 20.0)

    def encode(self, x, rng=None):
        """images -> SCALE * latent. With a generator `rng` (xp.random.default_rng), a sample of the posterior, as
        DiT's extract_features does; without, its mean."""
        mean, logvar = self.encode_moments(x)
        if rng is not None:
            mean = mean + self.xp.exp(0.5 * logvar) * rng.standard_normal(mean.shape, dtype=mean.dtype)
        return SCALE * mean

    def decode(self, z):
        """SCALE * latents (N, 4, h, w) -> images (N, 3, 8h, 8w), about [-1, 1] (not clipped)."""
        h = self.conv(z / SCALE, "post_quant_conv")
        h = self.conv(h, "decoder.conv_in")
        h = self.mid(h, "decoder")
        for i in range(self.num_levels):
            for j in range(self.layers_per_block + 1):
                h = self.resnet(h, f"decoder.up_blocks.{i}.resnets.{j}")
            if i < self.num_levels - 1:  # nearest-neighbour x2, then a 3x3 conv
                h = h.repeat(2, axis=2).repeat(2, axis=3)
                h = self.conv(h, f"decoder.up_blocks.{i}.upsamplers.0.conv")
        return self.conv(silu(self.norm(h, "decoder.conv_norm_out")), "decoder.conv_out")


def random_weights(channels=(128, 256, 512, 512), layers=2, latent=4, seed=0):
    """Random weights with diffusers' AutoencoderKL names and shapes: block_out_channels=channels,
    layers_per_block=layers, latent_channels=latent (the defaults are the Stable Diffusion VAE's, 83.7 M numbers).
    For tests and memory/speed measurements: no file to download."""
    rng = np.random.default_rng(seed)
    W = {}

    def conv(name, o, i, k=3):
        W[name + ".weight"] = rng.normal(0, 0.3 / np.sqrt(i * k * k), (o, i, k, k)).astype(np.float32)
        W[name + ".bias"] = rng.normal(0, 0.05, o).astype(np.float32)

    def norm(name, c):
        W[name + ".weight"] = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
        W[name + ".bias"] = (0.1 * rng.standard_normal(c)).astype(np.float32)

    def resnet(name, i, o):
        norm(name + ".norm1", i), conv(name + ".conv1", o, i), norm(name + ".norm2", o), conv(name + ".conv2", o, o)
        if i != o:
            conv(name + ".conv_shortcut", o, i, 1)

    def mid(side, c):
        resnet(f"{side}.mid_block.resnets.0", c, c), resnet(f"{side}.mid_block.resnets.1", c, c)
        norm(f"{side}.mid_block.attentions.0.group_norm", c)
        for n in ("to_q", "to_k", "to_v", "to_out.0"):
            W[f"{side}.mid_block.attentions.0.{n}.weight"] = rng.normal(0, 0.3 / np.sqrt(c), (c, c)).astype(np.float32)
            W[f"{side}.mid_block.attentions.0.{n}.bias"] = rng.normal(0, 0.05, c).astype(np.float32)

    conv("encoder.conv_in", channels[0], 3)
    c = channels[0]
    for i, o in enumerate(channels):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", c if j == 0 else o, o)
        c = o
        if i < len(channels) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", o, o)
    mid("encoder", c)
    norm("encoder.conv_norm_out", c), conv("encoder.conv_out", 2 * latent, c)
    conv("quant_conv", 2 * latent, 2 * latent, 1), conv("post_quant_conv", latent, latent, 1)
    rev = channels[::-1]
    conv("decoder.conv_in", rev[0], latent)
    mid("decoder", rev[0])
    c = rev[0]
    for i, o in enumerate(rev):
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", c if j == 0 else o, o)
        c = o
        if i < len(rev) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", o, o)
    norm("decoder.conv_norm_out", c), conv("decoder.conv_out", 3, c)
    return W
