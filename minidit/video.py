"""A spatio-temporal DiT for short videos (SORA's step; the interleaved design of Latte, Ma et al. 2024): DiT's
blocks, alternately over the tokens of one frame and over the frames at one position.

    x (N, C, F, H, W) --3-D patches pt x p x p--> (N, F', S, D),  F' = F / pt, S = (H / p)(W / p)
                      + the 2-D sin-cos table of each frame's grid (for any H, W)
    t, y -> c (N, D)  exactly as DiT
    block 2i   (spatial):   tokens as (N F', S, D): attention within each frame,     c repeated per frame
                            after block 0 only: + the 1-D sin-cos code of each frame's index (for any F')
    block 2i+1 (temporal):  tokens as (N S, F', D): attention across frames per spot, c repeated per position
    final layer (N, F' S, D) -> (N, F' S, pt p p C_out) --un-patchify--> (N, C_out, F, H, W)

With pt = 1 and factorised attention this is the official Latte (maxin-cn/Latte `models/latte.py`, class `Latte`):
the same blocks, tables and order, the frame code entering the residual stream once, between the first spatial
block and the first temporal one (so that every temporal block sees which frame a token is in, while the first
spatial block sees the frames alike). Where minidit goes further, each a spec field, none of it in Latte:

    temporal_patch > 1    3-D patches (pt frames per token), Latte's patches are one frame each
    attention = "full"    every block over all F' S tokens: the baseline factorised attention is measured against
    frame_code = "input"  the frame code added with the 2-D table at the input (minidit's first video layout: what
                          video checkpoints written before the Latte layout were trained with)
    any F' and H, W       Latte's tables are fixed at its num_frames and input_size; here they are recomputed

Each block is DiT's own adaLN-Zero block (minidit.model.block_forward); a video adds only the 3-D patches, the
positions, and the two reshuffles of the tokens between blocks, each with its backward. Factorised attention
compares F' S^2 + S F'^2 token pairs per head instead of full 3-D attention's (F' S)^2; attention="full" runs that
baseline (every block over all F' S tokens), so the two can be measured against each other.

Videos are channels-first, (N, C, F, H, W) as a 3-D convolution reads them, so the objectives (minidit.diffusion,
minidit.flow) treat them as images with more axes. One set of weights takes any frame count divisible by pt and any
size divisible by p: the positions are recomputed for each shape.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import numpy as np

from .cli import positive_int
from .contract import check_array
from .layers import (
    FREQ_DIM, final_layer_backward, final_layer_forward, get_1d_sincos_pos_embed, get_2d_sincos_pos_embed,
    linear_backward, linear_forward, silu_backward, silu_forward,
)
from .model import (
    FINAL, DiT, DiTSpec, attention_mlp_shapes, block_backward, block_forward, block_macs, embedder_shapes, get_config,
)
from .params import linear_shapes, named, take
from .xp import get_xp, to_device

ATTENTION = ("factorised", "full")
FRAME_CODES = ("after-block-0", "input")


@dataclasses.dataclass(frozen=True)
class VideoDiTSpec(DiTSpec):
    """A DiTSpec (the spatial patch p is the variant's) plus the clip's: num_frames and input_size are the default
    clip shape (for sampling); the weights take any other."""
    num_frames: int = 8
    temporal_patch: int = 1  # pt: frames per token
    attention: str = "factorised"  # or "full": every block over all the clip's tokens
    frame_code: str = "after-block-0"  # where the frames' 1-D code enters: after block 0 (Latte) or at the "input"

    kind = "video-dit"

    def __post_init__(self):
        super().__post_init__()
        if self.attention not in ATTENTION:
            raise ValueError(f"unknown attention {self.attention!r}; choose one of: {', '.join(ATTENTION)}")
        if self.frame_code not in FRAME_CODES:
            raise ValueError(f"unknown frame_code {self.frame_code!r}; choose one of: {', '.join(FRAME_CODES)}")
        self.check_clip(self.num_frames, self.input_size, self.input_size)

    def check_clip(self, frames, height, width):
        """A clear error for a clip shape that does not cut into pt x p x p patches."""
        pt, p = self.temporal_patch, self.config.patch_size
        if frames % pt or height % p or width % p or min(frames, height, width) < 1:
            raise ValueError(f"a clip of {frames} frames of {height} x {width} does not cut into {pt} x {p} x {p} "
                             f"patches: give a frame count divisible by {pt} and sizes divisible by {p}")


def param_shapes(spec):
    """name -> shape: DiT's names, the patch embedding a Conv3d weight (D, C, pt, p, p), no pos_embed (computed)."""
    s = VideoDiTSpec.of(spec)
    cfg = s.config
    D, p, pt, C = cfg.hidden_size, cfg.patch_size, s.temporal_patch, s.in_channels
    shapes = embedder_shapes(s)
    del shapes["pos_embed"]
    shapes["x_embedder.proj.weight"] = (D, C, pt, p, p)
    for i in range(cfg.depth):
        shapes.update(attention_mlp_shapes(f"blocks.{i}.", cfg))
        shapes.update(linear_shapes(f"blocks.{i}.adaLN_modulation.1.", 6 * D, D))
    shapes.update(linear_shapes("final_layer.linear.", pt * p * p * s.out_channels, D))
    shapes.update(linear_shapes("final_layer.adaLN_modulation.1.", 2 * D, D))
    return shapes


# ----------------------------------------------------------------------------------------------
# 3-D patches: a pt x p x p patch flattened in (c, pt, p_row, p_col) order, the Conv3d weight's; tokens ordered
# (frame, row, col). The output side uses (pt, p_row, p_col, c), channel fastest, as DiT's unpatchify.
# ----------------------------------------------------------------------------------------------
def patchify3d(x, pt, p):
    """(N, C, F, H, W) -> (N, F/pt, (H/p)(W/p), C pt p p)."""
    N, C, F, H, W = x.shape
    f, h, w = F // pt, H // p, W // p
    x = x.reshape(N, C, f, pt, h, p, w, p).transpose(0, 2, 4, 6, 1, 3, 5, 7)  # (N, f, h, w, C, pt, p, p)
    return x.reshape(N, f, h * w, C * pt * p * p)


def patchify3d_backward(dtokens, shape, pt, p):
    """The adjoint of patchify3d (a permutation): (N, f, S, C pt p p) -> (N, C, F, H, W)."""
    N, C, F, H, W = shape
    f, h, w = F // pt, H // p, W // p
    d = dtokens.reshape(N, f, h, w, C, pt, p, p).transpose(0, 4, 1, 5, 2, 6, 3, 7)
    return d.reshape(shape)


def unpatchify3d(y, pt, p, C, f, h, w):
    """(N, f h w, pt p p C) -> (N, C, f pt, h p, w p)."""
    N = y.shape[0]
    y = y.reshape(N, f, h, w, pt, p, p, C).transpose(0, 7, 1, 4, 2, 5, 3, 6)  # (N, C, f, pt, h, p, w, p)
    return y.reshape(N, C, f * pt, h * p, w * p)


def unpatchify3d_backward(dout, pt, p):
    """The adjoint of unpatchify3d: (N, C, F, H, W) -> (N, f h w, pt p p C)."""
    N, C, F, H, W = dout.shape
    f, h, w = F // pt, H // p, W // p
    d = dout.reshape(N, C, f, pt, h, p, w, p).transpose(0, 2, 4, 6, 3, 5, 7, 1)  # (N, f, h, w, pt, p, p, C)
    return d.reshape(N, f * h * w, pt * p * p * C)


@functools.lru_cache(maxsize=32)
def grid_code(dim, h, w):
    """(h w, dim) float64: the 2-D sin-cos table of one frame's h x w grid (Latte's pos_embed), the same in every
    frame."""
    return get_2d_sincos_pos_embed(dim, (h, w))


@functools.lru_cache(maxsize=32)
def frame_code(dim, f):
    """(f, 1, dim) float64: the 1-D sin-cos code of each frame's index 0 .. f-1 (Latte's temp_embed), the same at every
    position of the frame."""
    return get_1d_sincos_pos_embed(dim, np.arange(f))[:, None]


# ----------------------------------------------------------------------------------------------
# The two reshuffles: a clip's tokens (N, f, S, D) as sequences of one frame, or of one position
# ----------------------------------------------------------------------------------------------
def to_frames(h):
    """(N, f, S, D) -> (N f, S, D): each frame a sequence (a view)."""
    N, f, S, D = h.shape
    return h.reshape(N * f, S, D)


def to_positions(h):
    """(N, f, S, D) -> (N S, f, D): each spatial position across the frames a sequence (a copy)."""
    N, f, S, D = h.shape
    return get_xp(h).ascontiguousarray(h.transpose(0, 2, 1, 3)).reshape(N * S, f, D)


def from_positions(h, N):
    """(N S, f, D) -> (N, f, S, D), the inverse of to_positions (and its adjoint: a permutation)."""
    NS, f, D = h.shape
    return get_xp(h).ascontiguousarray(h.reshape(N, NS // N, f, D).transpose(0, 2, 1, 3))


class VideoCache(NamedTuple):
    shape: tuple  # x's (N, C, F, H, W)
    patch: Any  # LinearCache of the patch embedding
    t_embedder: Any
    y_embedder: Any
    c_silu: Any
    blocks: list  # BlockCache per block
    final: Any


class VideoDiT(DiT):
    """The spatio-temporal DiT (module docstring), with DiT's calls:

        model = VideoDiT("mini/4", num_frames=8, input_size=16, in_channels=1, num_classes=10)
        out, cache = model.forward(x, t, y, train=True)   # x (N, C, F, H, W) -> (N, C_out, F, H, W)
        grads = model.backward(dout, cache)
    """

    Spec = VideoDiTSpec
    FROZEN = ()
    CLI_NAME = "video"
    OPTIONS = ("temporal_patch", "attention")
    DATA = ("clips",)

    def param_shapes(self):
        return param_shapes(self.spec)

    def gmacs(self, frames=None, size=None):
        """Forward multiply-accumulates per clip, in billions, at a clip shape (default: the spec's)."""
        s, cfg, D, p = self.spec, self.config, self.config.hidden_size, self.patch_size
        pt = s.temporal_patch
        f, S = (frames or s.num_frames) // pt, ((size or s.input_size) // p) ** 2
        if s.attention == "full":
            blocks = block_macs(cfg, f * S)
        else:  # per pair of blocks: f sequences of S tokens, S sequences of f tokens
            blocks = (f * block_macs(cfg, S) + S * block_macs(cfg, f)) / 2
        rows = 1 if s.attention == "full" else (f + S) / 2  # the adaLN regression runs once per sequence
        embed = f * S * s.in_channels * pt * p * p * D + FREQ_DIM * D + D * D
        final = f * S * D * pt * p * p * self.out_channels + 2 * D * D
        return (embed + cfg.depth * (blocks + rows * 6 * D * D) + final) / 1e9

    def sample_shape(self, n, frames=None, size=None):
        """(n, C, F, H, W): clips of `frames` frames of size x size (default: the spec's num_frames, input_size)."""
        s = self.spec
        shape = (n, s.in_channels, frames or s.num_frames, size or s.input_size, size or s.input_size)
        s.check_clip(*shape[2:])
        return shape

    # -- the command line ------------------------------------------------------------------------
    @classmethod
    def add_options(cls, ap):
        ap.add_argument("--temporal-patch", type=positive_int, default=1,
                        help="--model video: frames per token (pt of the 3-D patches)")
        ap.add_argument("--attention", choices=ATTENTION, default="factorised",
                        help="--model video: factorised (spatial and temporal blocks in turn, Latte) or full 3-D "
                             "attention")

    @classmethod
    def spec_from_options(cls, args, data):
        """Sized to the clips: the default clip is the longest of the frame buckets at the largest size."""
        p, pt = get_config(args.variant).patch_size, args.temporal_patch
        if bad := [s for s in data.sizes if s % p]:
            raise ValueError(f"--variant {args.variant}: patch {p} does not divide the frame size "
                             f"{' '.join(map(str, bad))}; choose sizes that are multiples of {p}")
        if bad := [f for f in data.frames if f % pt]:
            raise ValueError(f"--temporal-patch {pt} does not divide the frame count {' '.join(map(str, bad))}; "
                             f"choose --frames that are multiples of {pt}")
        return dataclasses.replace(super().spec_from_options(args, data), num_frames=max(data.frames),
                                   temporal_patch=pt, attention=args.attention)

    # -- forward / backward ----------------------------------------------------------------------
    def check_inputs(self, x, t, y):
        check_array("x", x, ("N", self.in_channels, "F", "H", "W"), self, what=" (a batch of clips)")
        self.spec.check_clip(*x.shape[2:])
        check_array("t", t, (x.shape[0],), self, kinds="iuf")
        self.check_labels(y, x.shape[0])

    def forward(self, x, t, y, train=False, force_drop_ids=None, rng=None, cache=True):
        """x (N, C, F, H, W), t (N,), y (N,) -> (out (N, C_out, F, H, W), cache); label dropout as DiT.forward."""
        self.check_inputs(x, t, y)
        P, xp, pt, p = self.params, self.xp, self.spec.temporal_patch, self.patch_size
        N, _, F, H, W = x.shape
        f, h, w = F // pt, H // p, W // p
        D = self.config.hidden_size
        tokens, patch_cache = linear_forward(patchify3d(x, pt, p), P["x_embedder.proj.weight"].reshape(D, -1),
                                             P["x_embedder.proj.bias"])  # (N, f, S, D)
        latte = self.spec.frame_code == "after-block-0"
        grid, frames = (to_device(a.astype(self.dtype), xp) for a in (grid_code(D, h, w), frame_code(D, f)))
        tokens += grid if latte else grid + frames  # (S, D) or (f, S, D) over (N, f, S, D)
        temb, yemb, t_cache, y_cache = self.embed_conditions(t, y, train, force_drop_ids, rng)  # as DiT's
        c_act, c_silu_cache = silu_forward(temb + yemb)  # (N, D)
        c_frames, c_positions = xp.repeat(c_act, f, axis=0), xp.repeat(c_act, h * w, axis=0)
        blocks = []
        for i in range(self.depth):
            prefix = f"blocks.{i}."
            if self.spec.attention == "full":
                seq, block_cache = block_forward(tokens.reshape(N, f * h * w, D), c_act, P, prefix, self.num_heads)
                tokens = seq.reshape(N, f, h * w, D)
            elif i % 2 == 0:  # spatial
                seq, block_cache = block_forward(to_frames(tokens), c_frames, P, prefix, self.num_heads)
                tokens = seq.reshape(N, f, h * w, D)
            else:  # temporal
                seq, block_cache = block_forward(to_positions(tokens), c_positions, P, prefix, self.num_heads)
                tokens = from_positions(seq, N)
            if i == 0 and latte:  # Latte's x = x + temp_embed: a constant, so the backward passes dtokens through
                tokens = tokens + frames  # (f, 1, D) over (N, f, S, D)
            if cache:
                blocks.append(block_cache)
        out, final_cache = final_layer_forward(tokens.reshape(N, f * h * w, D), c_act, *take(P, "", FINAL))
        out = unpatchify3d(out, pt, p, self.out_channels, f, h, w)
        if not cache:
            return out, None
        return out, VideoCache(x.shape, patch_cache, t_cache, y_cache, c_silu_cache, blocks, final_cache)

    def backward(self, dout, cache, return_dx=False, release=False):
        """dout (N, C_out, F, H, W) -> grads (and dx with return_dx), as DiT.backward."""
        grads, xp, pt, p = {}, get_xp(dout), self.spec.temporal_patch, self.patch_size
        N, _, F, H, W = cache.shape
        f, S, D = F // pt, (H // p) * (W // p), self.config.hidden_size
        dseq, dc_act, *dfinal = final_layer_backward(unpatchify3d_backward(dout, pt, p), cache.final)
        grads.update(named("", FINAL, dfinal))
        dtokens = dseq.reshape(N, f, S, D)
        dc_frames = xp.zeros((N * f, D), dtype=dout.dtype)  # c's gradient through the spatial blocks' copies
        dc_positions = xp.zeros((N * S, D), dtype=dout.dtype)  # and through the temporal blocks'
        for i in reversed(range(self.depth)):
            prefix = f"blocks.{i}."
            if self.spec.attention == "full":
                dseq, dc = block_backward(dtokens.reshape(N, f * S, D), cache.blocks[i], prefix, grads)
                dc_act = dc_act + dc
                dtokens = dseq.reshape(N, f, S, D)
            elif i % 2 == 0:
                dseq, dc = block_backward(to_frames(dtokens), cache.blocks[i], prefix, grads)
                dc_frames = dc_frames + dc
                dtokens = dseq.reshape(N, f, S, D)
            else:
                dseq, dc = block_backward(to_positions(dtokens), cache.blocks[i], prefix, grads)
                dc_positions = dc_positions + dc
                dtokens = from_positions(dseq, N)
            if release:
                cache.blocks[i] = None
        # c was repeated per frame and per position: its gradient is the sum over the copies
        dc_act = dc_act + dc_frames.reshape(N, f, D).sum(axis=1) + dc_positions.reshape(N, S, D).sum(axis=1)
        dc = silu_backward(dc_act, cache.c_silu)
        self.embed_conditions_backward(dc, dc, cache.t_embedder, cache.y_embedder, grads)
        dpatches, dw, db = linear_backward(dtokens, cache.patch)
        grads["x_embedder.proj.weight"] = dw.reshape(self.params["x_embedder.proj.weight"].shape)
        grads["x_embedder.proj.bias"] = db
        grads = {k: grads[k] for k in self.trainable()}
        if return_dx:
            return grads, patchify3d_backward(dpatches, cache.shape, pt, p)
        return grads
