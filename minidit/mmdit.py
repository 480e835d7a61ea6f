"""Stable Diffusion 3's MM-DiT (diffusers' SD3Transformer2DModel) with a hand-written backward pass.

Two token streams, the image's and the text's, each with its own weights, meet in one softmax attention per block:

    x (N, C, H, W) --patch conv p, + the centre crop of pos_embed--> image tokens (N, T, D),  T = (H/p)(W/p)
    context (N, L, J) --context_embedder (Linear)------------------> text tokens (N, L, D)
    t (N,)  --sinusoid(256)--> Linear -> SiLU -> Linear \
                                                         +--> c (N, D);  every modulation reads silu(c)
    pooled (N, P) --> Linear -> SiLU -> Linear ---------/
    num_layers x joint block (image, text, c); the last block's text stream is pre-only
    norm_out (LayerNorm, modulated by c) -> proj_out -> unpatchify --> (N, out_channels, H, W)

One joint block (diffusers' JointTransformerBlock with JointAttnProcessor2_0), for each stream s in (x, ctx) with its
own weights (norm1 / attn.qkv / to_out.0 / ff for the image, norm1_context / attn.add_qkv / to_add_out / ff_context
for the text):

    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = Linear(silu(c)).chunk(6)    AdaLayerNormZero
    h_s = LN(s) * (1 + scale_msa) + shift_msa                                      LayerNorm without affine, eps 1e-6
    q_s, k_s, v_s = heads of h_s W_qkv^T + b;  q_s, k_s = RMSNorm(q_s), RMSNorm(k_s) per head  (qk_norm="rms_norm")
    [y_x | y_ctx] = softmax(q k^T / sqrt(hs)) v   over the tokens [x | ctx] of both streams (queries and keys)
    s = s + gate_msa * Linear(y_s);   s = s + gate_mlp * FF(LN(s) * (1 + scale_mlp) + shift_mlp)    FF: GELU(tanh), 4D

The last block's text stream is "context_pre_only": its modulation is AdaLayerNormContinuous (Linear(silu(c)) to 2D,
chunked **scale, shift**), it supplies keys and values to the image's attention and nothing else: no to_add_out, no
ff_context, no norm2_context, and its output is discarded. norm_out is AdaLayerNormContinuous as well: the chunks are
[scale | shift], the reverse of DiT's final layer ([shift | scale], minidit.layers.final_layer_forward), so the final
layer is written out here with adaln_forward rather than reordering diffusers' weights.

Parameters: one flat dict named as diffusers' state_dict, with one exception: each stream's q, k, v projections are
stored fused, [q | k | v] rows, so that minidit.layers.qkv_forward applies:

    transformer_blocks.{i}.attn.qkv.{weight,bias}      (3D, D), (3D,)  = attn.to_q, attn.to_k, attn.to_v stacked
    transformer_blocks.{i}.attn.add_qkv.{weight,bias}  (3D, D), (3D,)  = attn.add_q_proj, add_k_proj, add_v_proj

Every other name is diffusers' own (pos_embed.proj, time_text_embed.timestep_embedder.linear_1, ..., norm_out.linear,
proj_out); to_diffusers_state_dict / from_diffusers_state_dict split and stack q, k, v and rename nothing else, so a
diffusers checkpoint loads by name. `pos_embed.pos_embed` (1, M*M, D), M = pos_embed_max_size, is a persistent
buffer in diffusers (in its state_dict, requires_grad False): here it is a frozen parameter, stored, loaded and saved,
never given a gradient. A fresh table is diffusers' (sd3_pos_embed, bit for bit in float32): the grid positions are
i / (M / base_size) with base_size = sample_size // patch_size, so it is DiT's integer-grid table
(minidit.layers.get_2d_sincos_pos_embed) only when base_size = M.

Where this departs from diffusers (the numerical points measured in tests/test_sd3_diffusers.py):

  * RMSNorm: diffusers computes mean(x^2) in float32 whatever the input dtype; here it is computed in the input
    dtype. Identical in float32; in a float64 diffusers model the qk norm is therefore only float32-accurate.
  * The timestep sinusoid is minidit's timestep_embedding, which is diffusers' Timesteps(256, flip_sin_to_cos=True,
    downscale_freq_shift=0) (cos first, freqs exp(-ln(10000) i / 128), float32, then cast to the model's dtype); the
    float32 exp/sin/cos of numpy and torch may differ in the last place.
  * The last block's text queries are not computed into the attention (diffusers computes them and discards the
    result): the same output; the gradients of their rows of add_qkv and of norm_added_q are exactly zero, in both.
  * Not implemented, refused with an error: dual_attention_layers (SD3.5's MMDiT-X attn2), qk_norm other than None /
    "rms_norm", pos_embed_max_size=None, inputs whose H or W is not a multiple of patch_size (diffusers' conv drops
    the remainder and returns a smaller output). Not offered: skip_layers, ControlNet residuals,
    joint_attention_kwargs (IP-Adapter), LoRA scales.
  * Initialisation: the distributions of PyTorch's defaults, which diffusers keeps (every Linear and the patch conv:
    weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)); RMSNorm weights 1; pos_embed the fixed sin-cos table), drawn
    from numpy with `seed`: the same distributions, not the same numbers. No zero init (this is not adaLN-Zero).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import numpy as np

from .layers import (
    FREQ_DIM, LinearCache, SiLUCache, adaln_backward, adaln_forward, adaln_zero_mlp_backward, adaln_zero_mlp_forward,
    attend_backward, attend_forward, chunks, get_1d_sincos_pos_embed, linear_backward, linear_forward, merge_heads,
    mlp_backward, mlp_forward, patch_embed_backward, patch_embed_forward, qkv_backward, qkv_forward, rmsnorm_backward,
    rmsnorm_forward, silu_backward, silu_forward, split_heads, timestep_embedder_backward, timestep_embedder_forward,
    unpatchify_backward, unpatchify_grid,
)
from .contract import Model, Spec, check_array
from .params import LINEAR, linear_shapes, named, take
from .xp import get_xp

QK_NORMS = (None, "rms_norm")


@dataclasses.dataclass(frozen=True)
class MMDiTSpec(Spec):
    """Every argument of diffusers' SD3Transformer2DModel, under its config.json name and with its default (the
    defaults describe no released checkpoint; SD3-medium is num_layers=24, num_attention_heads=24,
    caption_projection_dim=1536, pos_embed_max_size=192). `MMDiTSpec.of(config)` reads a config.json dict."""
    sample_size: int = 128  # the training latent side: sets the pos_embed base size sample_size // patch_size
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096  # the width of the text encoders' token embeddings (context)
    caption_projection_dim: int = 1152  # must equal num_attention_heads * attention_head_dim
    pooled_projection_dim: int = 2048  # the width of the pooled text embedding
    out_channels: Any = 16  # None: in_channels, as diffusers
    pos_embed_max_size: int = 96  # M: the pos_embed table is M x M patches, each image uses its centre crop
    dual_attention_layers: tuple = ()  # SD3.5's MMDiT-X: refused (not implemented)
    qk_norm: Any = None  # None or "rms_norm"

    kind = "mmdit"  # the model family, as checkpoints name it (a class attribute, not a field)

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))  # JSON gives a list
        self.check()

    def check(self):
        """Clear errors for a spec this implementation cannot build."""
        if self.dual_attention_layers:
            raise ValueError(f"dual_attention_layers={list(self.dual_attention_layers)}: SD3.5's MMDiT-X dual "
                             "attention (a second, image-only attention attn2 in those blocks) is not implemented; "
                             "only dual_attention_layers=() (SD3, SD3.5-large) is")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={self.qk_norm!r} is not implemented; choose None or 'rms_norm' (SD3.5)")
        inner = self.num_attention_heads * self.attention_head_dim
        if self.caption_projection_dim != inner:
            raise ValueError(f"caption_projection_dim={self.caption_projection_dim} must equal num_attention_heads * "
                             f"attention_head_dim = {self.num_attention_heads} * {self.attention_head_dim} = {inner}: "
                             "both streams share one attention width")
        if self.pos_embed_max_size is None:
            raise ValueError("pos_embed_max_size=None (a non-persistent pos_embed recomputed per image size) is not "
                             "implemented; SD3 checkpoints set it (96, 192, 384)")
        if inner % 4:
            raise ValueError(f"num_attention_heads * attention_head_dim = {inner} must be divisible by 4 for the 2-D "
                             "sin-cos pos_embed")
        for name in ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                     "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "pos_embed_max_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.sample_size < self.patch_size:
            raise ValueError(f"sample_size {self.sample_size} is smaller than patch_size {self.patch_size}: the "
                             "pos_embed base size sample_size // patch_size would be 0")
        if self.out_channels is not None and (not isinstance(self.out_channels, (int, np.integer))
                                              or self.out_channels < 1):
            raise ValueError(f"out_channels must be a positive integer or None, got {self.out_channels!r}")

    @classmethod
    def dict_fields(cls, d):
        """A checkpoint's to_dict(), or a diffusers config (config.json, or a model's .config: keys starting with "_"
        are diffusers' bookkeeping and ignored)."""
        return {k: v for k, v in super().dict_fields(d).items() if not k.startswith("_")}

    @property
    def inner_dim(self):
        """D: the width of both token streams."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self):
        """The output channels (out_channels, or in_channels when it is None)."""
        return self.in_channels if self.out_channels is None else self.out_channels


# ----------------------------------------------------------------------------------------------
# Parameter names and shapes
# ----------------------------------------------------------------------------------------------
POS = "pos_embed.pos_embed"
PATCH = "pos_embed.proj.weight pos_embed.proj.bias"
TIME = " ".join(f"time_text_embed.timestep_embedder.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias"))
TEXT = " ".join(f"time_text_embed.text_embedder.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias"))
CONTEXT = "context_embedder.weight context_embedder.bias"
FF = "net.0.proj.weight net.0.proj.bias net.2.weight net.2.bias"
QK_NORM_NAMES = ("attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k")


def param_shapes(spec, **overrides):
    """name -> shape of every parameter, in diffusers' state_dict order (q, k, v fused: attn.qkv where attn.to_q is,
    attn.add_qkv where attn.add_k_proj is)."""
    s = MMDiTSpec.of(spec, **overrides)
    D, p, hs, M = s.inner_dim, s.patch_size, s.attention_head_dim, s.pos_embed_max_size
    shapes = {POS: (1, M * M, D), "pos_embed.proj.weight": (D, s.in_channels, p, p), "pos_embed.proj.bias": (D,),
              **linear_shapes("time_text_embed.timestep_embedder.linear_1.", D, FREQ_DIM),
              **linear_shapes("time_text_embed.timestep_embedder.linear_2.", D, D),
              **linear_shapes("time_text_embed.text_embedder.linear_1.", D, s.pooled_projection_dim),
              **linear_shapes("time_text_embed.text_embedder.linear_2.", D, D),
              **linear_shapes("context_embedder.", D, s.joint_attention_dim)}
    for i in range(s.num_layers):
        b, pre_only = f"transformer_blocks.{i}.", i == s.num_layers - 1
        shapes.update(linear_shapes(b + "norm1.linear.", 6 * D, D))
        shapes.update(linear_shapes(b + "norm1_context.linear.", (2 if pre_only else 6) * D, D))
        if s.qk_norm:
            shapes.update({b + "attn.norm_q.weight": (hs,), b + "attn.norm_k.weight": (hs,)})
        shapes.update(linear_shapes(b + "attn.qkv.", 3 * D, D))
        shapes.update(linear_shapes(b + "attn.add_qkv.", 3 * D, D))  # the pre-only block keeps its q rows, as diffusers
        shapes.update(linear_shapes(b + "attn.to_out.0.", D, D))
        if not pre_only:
            shapes.update(linear_shapes(b + "attn.to_add_out.", D, D))
        if s.qk_norm:
            shapes.update({b + "attn.norm_added_q.weight": (hs,), b + "attn.norm_added_k.weight": (hs,)})
        shapes.update(linear_shapes(b + "ff.net.0.proj.", 4 * D, D))
        shapes.update(linear_shapes(b + "ff.net.2.", D, 4 * D))
        if not pre_only:
            shapes.update(linear_shapes(b + "ff_context.net.0.proj.", 4 * D, D))
            shapes.update(linear_shapes(b + "ff_context.net.2.", D, 4 * D))
    shapes.update(linear_shapes("norm_out.linear.", 2 * D, D))
    shapes.update(linear_shapes("proj_out.", p * p * s.out_dim, D))
    return shapes


def sd3_pos_embed(embed_dim, max_size, base_size, interpolation_scale=1.0):
    """diffusers' PatchEmbed buffer for SD3, as float64 numpy (max_size**2, embed_dim) holding float32 values.

    Grid position i of the max_size x max_size table is i / (max_size / base_size) / interpolation_scale, computed in
    float32 as diffusers does (base_size = sample_size // patch_size: an integer grid only when base_size = max_size);
    token n sits at (row, col) = (n // max_size, n % max_size); the first D/2 dims encode the column, the last D/2
    the row, each half [sin(pos omega), cos(pos omega)] with omega_k = 10000^(-k / (D/4)) in float64; the table is then
    rounded to float32, as diffusers registers it (`.float()`)."""
    pos = np.arange(max_size, dtype=np.float32) / np.float32(max_size / base_size) / np.float32(interpolation_scale)
    rows, cols = np.meshgrid(pos.astype(np.float64), pos.astype(np.float64), indexing="ij")  # each (M, M)
    table = np.concatenate([get_1d_sincos_pos_embed(embed_dim // 2, cols.ravel()),
                            get_1d_sincos_pos_embed(embed_dim // 2, rows.ravel())], axis=1)
    return table.astype(np.float32).astype(np.float64)


def init_params(spec, seed):
    """PyTorch's default initialisation (which diffusers keeps), on the host in float64: every Linear and the patch
    conv U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias (fan_in: every weight axis after the first; the
    fused q, k, v rows each have fan_in D, so one bound covers them), RMSNorm weights 1, the fixed pos_embed."""
    s = MMDiTSpec.of(spec)
    shapes = param_shapes(s)
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in shapes.items():
        if name == POS:
            params[name] = sd3_pos_embed(s.inner_dim, s.pos_embed_max_size, s.sample_size // s.patch_size)[None]
        elif name.endswith(tuple(n + ".weight" for n in QK_NORM_NAMES)):
            params[name] = np.ones(shape)
        else:
            weight = shapes[name[:-len("bias")] + "weight"] if name.endswith(".bias") else shape
            bound = 1.0 / math.sqrt(math.prod(weight[1:]))
            params[name] = rng.uniform(-bound, bound, size=shape)
    return params


# ----------------------------------------------------------------------------------------------
# diffusers' state_dict <-> minidit's: split or stack q, k, v; nothing else renamed
# ----------------------------------------------------------------------------------------------
# fused name -> diffusers' members in [q | k | v] order, and the order diffusers' state_dict lists them
SPLITS = {"attn.qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), (0, 1, 2)),
          "attn.add_qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), (1, 2, 0))}
_MEMBER = re.compile(r"^(transformer_blocks\.\d+\.)(attn\.(?:to_[qkv]|add_[qkv]_proj))\.(weight|bias)$")


def _host(v):
    """A torch tensor (duck-typed: no torch import) -> numpy; arrays pass through."""
    return v.detach().cpu().numpy() if hasattr(v, "detach") else v


def to_diffusers_state_dict(params):
    """minidit's parameters -> diffusers' SD3Transformer2DModel state_dict names and order (arrays, not tensors):
    attn.qkv and attn.add_qkv split into their q, k, v rows; every other entry (pos_embed.pos_embed included) as is."""
    out = {}
    for name, v in params.items():
        m = re.match(r"^(transformer_blocks\.\d+\.)(attn\.(?:add_)?qkv)\.(weight|bias)$", name)
        if not m:
            out[name] = v
            continue
        block, fused, kind = m.groups()
        if kind == "bias":
            continue  # written with the weight, in diffusers' order (each member's weight, then its bias)
        members, order = SPLITS[fused]
        w, b = params[block + fused + ".weight"], params[block + fused + ".bias"]
        D = w.shape[0] // 3
        for j in order:
            out[f"{block}{members[j]}.weight"] = w[j * D:(j + 1) * D]
            out[f"{block}{members[j]}.bias"] = b[j * D:(j + 1) * D]
    return out


def from_diffusers_state_dict(state):
    """A diffusers SD3Transformer2DModel state_dict (torch tensors or arrays) -> minidit's parameter dict (numpy):
    to_q, to_k, to_v stacked into attn.qkv and add_q_proj, add_k_proj, add_v_proj into attn.add_qkv, where the first
    of them stood; every other entry as is. Load it with MMDiT.load_state_dict, which checks every name and shape."""
    dual = sorted(k for k in state if ".attn2." in k)
    if dual:
        raise ValueError(f"this state_dict has dual attention layers ({dual[0]}, ...): SD3.5's MMDiT-X is not "
                         "implemented")
    out = {}
    for name, v in state.items():
        m = _MEMBER.match(name)
        if not m:
            out[name] = _host(v)
            continue
        block, member, _ = m.groups()
        fused = "attn.qkv" if member.startswith("attn.to_") else "attn.add_qkv"
        if block + fused + ".weight" in out:
            continue
        for kind in ("weight", "bias"):
            keys = [f"{block}{mem}.{kind}" for mem in SPLITS[fused][0]]
            missing = [k for k in keys if k not in state]
            if missing:
                raise ValueError(f"state_dict has {name} but not {', '.join(missing)}: q, k, v come together")
            parts = [np.asarray(_host(state[k])) for k in keys]
            out[f"{block}{fused}.{kind}"] = np.concatenate(parts, axis=0)
    return out


# ----------------------------------------------------------------------------------------------
# Joint attention: qkv_forward per stream (+ RMSNorm of q and k per head), one attend_forward over [x | ctx],
# one output projection per stream (tests/test_layers.py::test_the_pieces_compose_a_joint_attention)
# ----------------------------------------------------------------------------------------------
class JointAttentionCache(NamedTuple):
    qkv: LinearCache  # image stream
    add_qkv: LinearCache  # text stream
    norms: dict  # qk_norm only: "norm_q", "norm_k", "norm_added_q" (not when pre_only), "norm_added_k" -> RMSNormCache
    attend: Any  # AttendCache over the T + S keys
    to_out: LinearCache
    to_add_out: Any  # LinearCache, None in a pre-only block
    T: int  # image tokens
    pre_only: bool


def joint_attention_forward(hx, hc, P, prefix, num_heads, qk_norm, pre_only):
    """hx (N, T, D) image tokens, hc (N, S, D) text tokens -> out_x (N, T, D), out_c (N, S, D) (None when pre_only).

    q_s, k_s, v_s = heads of h_s W_s^T + b_s (each (N, NH, T_s, hs)), RMS-normed per head when qk_norm;
    y = softmax(q k^T / sqrt(hs)) v with q, k, v the two streams' concatenated along the tokens, [x | ctx];
    out_x = merge(y_x) W_to_out^T + b,  out_c = merge(y_ctx) W_to_add_out^T + b.
    pre_only: the text queries are left out (their output would be discarded); its keys and values still count."""
    xp, T = get_xp(hx), hx.shape[1]
    a = prefix + "attn."
    (qx, kx, vx), qkv_x = qkv_forward(hx, *take(P, a + "qkv.", LINEAR), num_heads)
    (qc, kc, vc), qkv_c = qkv_forward(hc, *take(P, a + "add_qkv.", LINEAR), num_heads)
    norms = {}
    if qk_norm:
        qx, norms["norm_q"] = rmsnorm_forward(qx, P[a + "norm_q.weight"])
        kx, norms["norm_k"] = rmsnorm_forward(kx, P[a + "norm_k.weight"])
        if not pre_only:
            qc, norms["norm_added_q"] = rmsnorm_forward(qc, P[a + "norm_added_q.weight"])
        kc, norms["norm_added_k"] = rmsnorm_forward(kc, P[a + "norm_added_k.weight"])

    def cat(u, w):  # (N, NH, T, hs), (N, NH, S, hs) -> (N, NH, T + S, hs): diffusers' order, image first
        return xp.concatenate([u, w], axis=2)

    y, attend_cache = attend_forward(qx if pre_only else cat(qx, qc), cat(kx, kc), cat(vx, vc))
    out_x, to_out = linear_forward(merge_heads(y[:, :, :T]), *take(P, a + "to_out.0.", LINEAR))
    out_c = to_add_out = None
    if not pre_only:
        out_c, to_add_out = linear_forward(merge_heads(y[:, :, T:]), *take(P, a + "to_add_out.", LINEAR))
    return out_x, out_c, JointAttentionCache(qkv_x, qkv_c, norms, attend_cache, to_out, to_add_out, T, pre_only)


def joint_attention_backward(dout_x, dout_c, cache, prefix, grads):
    """Writes the attention's parameter gradients into `grads`; returns dhx, dhc."""
    xp, T, a = get_xp(dout_x), cache.T, prefix + "attn."
    NH = cache.attend.q.shape[1]
    dy, *d = linear_backward(dout_x, cache.to_out)
    grads.update(named(a + "to_out.0.", LINEAR, d))
    dy = split_heads(dy, NH)  # (N, NH, T, hs)
    if not cache.pre_only:
        dyc, *d = linear_backward(dout_c, cache.to_add_out)
        grads.update(named(a + "to_add_out.", LINEAR, d))
        dy = xp.concatenate([dy, split_heads(dyc, NH)], axis=2)  # (N, NH, T + S, hs)
    dq, dk, dv = attend_backward(dy, cache.attend)
    dqx, dkx, dvx, dkc, dvc = dq[:, :, :T], dk[:, :, :T], dv[:, :, :T], dk[:, :, T:], dv[:, :, T:]
    dqc = xp.zeros_like(dkc) if cache.pre_only else dq[:, :, T:]  # pre-only: the text queries were not used
    if cache.norms:
        n = cache.norms
        dqx, grads[a + "norm_q.weight"] = rmsnorm_backward(dqx, n["norm_q"])
        dkx, grads[a + "norm_k.weight"] = rmsnorm_backward(dkx, n["norm_k"])
        if cache.pre_only:
            grads[a + "norm_added_q.weight"] = xp.zeros_like(n["norm_added_k"].w)
        else:
            dqc, grads[a + "norm_added_q.weight"] = rmsnorm_backward(dqc, n["norm_added_q"])
        dkc, grads[a + "norm_added_k.weight"] = rmsnorm_backward(dkc, n["norm_added_k"])
    dhx, *d = qkv_backward(dqx, dkx, dvx, cache.qkv)
    grads.update(named(a + "qkv.", LINEAR, d))
    dhc, *d = qkv_backward(dqc, dkc, dvc, cache.add_qkv)
    grads.update(named(a + "add_qkv.", LINEAR, d))
    return dhx, dhc


# ----------------------------------------------------------------------------------------------
# The joint block (JointTransformerBlock.forward): per stream DiT's adaLN-Zero block, the attention shared; each
# stream's second half is minidit.layers.adaln_zero_mlp_forward, as in DiT's block
# ----------------------------------------------------------------------------------------------
class StreamCache(NamedTuple):
    """One stream's modulation and branches around the shared attention."""
    modulation: LinearCache  # norm1.linear / norm1_context.linear, input silu(c) (N, D)
    norm1: Any  # AdaLNCache
    mlp: Any  # AdaLNZeroMLPCache (the attention's gated residual, then ff); None for the pre-only text stream


class JointBlockCache(NamedTuple):
    x: StreamCache
    ctx: StreamCache
    attn: JointAttentionCache


def block_forward(x, ctx, c_act, P, prefix, num_heads, qk_norm, pre_only):
    """x (N, T, D), ctx (N, S, D), c_act = silu(c) (N, D) -> x (N, T, D), ctx (N, S, D) (None when pre_only), cache."""
    mod, mod_x = linear_forward(c_act, *take(P, prefix + "norm1.linear.", LINEAR))  # (N, 6D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks(mod, 6)  # AdaLayerNormZero's order
    hx, norm1_x = adaln_forward(x, shift_msa, scale_msa)
    cmod, mod_c = linear_forward(c_act, *take(P, prefix + "norm1_context.linear.", LINEAR))  # (N, 6D) or (N, 2D)
    if pre_only:  # AdaLayerNormContinuous: [scale | shift]
        c_scale, c_shift = chunks(cmod, 2)
        hc, norm1_c = adaln_forward(ctx, c_shift, c_scale)
    else:
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = chunks(cmod, 6)
        hc, norm1_c = adaln_forward(ctx, c_shift_msa, c_scale_msa)
    ax, ac, attn = joint_attention_forward(hx, hc, P, prefix, num_heads, qk_norm, pre_only)
    x, mlp_x = adaln_zero_mlp_forward(x, ax, gate_msa, shift_mlp, scale_mlp, gate_mlp, *take(P, prefix + "ff.", FF))
    if pre_only:  # the text stream's output is discarded
        ctx = mlp_c = None
    else:
        ctx, mlp_c = adaln_zero_mlp_forward(ctx, ac, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp,
                                            *take(P, prefix + "ff_context.", FF))
    return x, ctx, JointBlockCache(StreamCache(mod_x, norm1_x, mlp_x), StreamCache(mod_c, norm1_c, mlp_c), attn)


def block_backward(dx, dctx, cache, prefix, grads):
    """Backward of block_forward (dctx None for the pre-only block): writes the block's parameter gradients into
    `grads`; returns dx, dctx, dc_act."""
    xp = get_xp(dx)
    pre_only = cache.attn.pre_only
    dx, dax, dgate_msa, dshift_mlp, dscale_mlp, dgate_mlp, *d = adaln_zero_mlp_backward(dx, cache.x.mlp)
    grads.update(named(prefix + "ff.", FF, d))
    dac = None
    if not pre_only:
        dctx, dac, c_dgate_msa, c_dshift_mlp, c_dscale_mlp, c_dgate_mlp, *d = adaln_zero_mlp_backward(
            dctx, cache.ctx.mlp)
        grads.update(named(prefix + "ff_context.", FF, d))
    dhx, dhc = joint_attention_backward(dax, dac, cache.attn, prefix, grads)
    dh, dshift_msa, dscale_msa = adaln_backward(dhx, cache.x.norm1)
    dx = dx + dh
    dmod = xp.concatenate([dshift_msa, dscale_msa, dgate_msa, dshift_mlp, dscale_mlp, dgate_mlp], axis=1)
    dc_act, *d = linear_backward(dmod, cache.x.modulation)
    grads.update(named(prefix + "norm1.linear.", LINEAR, d))
    dh, c_dshift_msa, c_dscale_msa = adaln_backward(dhc, cache.ctx.norm1)
    if pre_only:  # the text stream's only use in this block is its keys and values
        dctx = dh
        dcmod = xp.concatenate([c_dscale_msa, c_dshift_msa], axis=1)  # [scale | shift]
    else:
        dctx = dctx + dh
        dcmod = xp.concatenate([c_dshift_msa, c_dscale_msa, c_dgate_msa, c_dshift_mlp, c_dscale_mlp, c_dgate_mlp],
                               axis=1)
    dc_act_c, *d = linear_backward(dcmod, cache.ctx.modulation)
    grads.update(named(prefix + "norm1_context.linear.", LINEAR, d))
    return dx, dctx, dc_act + dc_act_c


class MMDiTCache(NamedTuple):
    patch: Any  # PatchEmbedCache
    t_embedder: Any  # MLPCache of the timestep embedder
    text_embedder: Any  # MLPCache of the pooled-text projection (PixArtAlphaTextProjection, act_fn="silu")
    c_silu: SiLUCache  # of c = temb + pooled projection
    context: LinearCache  # context_embedder
    blocks: list  # one JointBlockCache per block
    norm_out_modulation: LinearCache
    norm_out: Any  # AdaLNCache
    proj_out: LinearCache


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class MMDiT(Model):
    """diffusers' SD3Transformer2DModel, forward and hand-written backward.

        model = MMDiT(MMDiTSpec(num_layers=2, ...), seed=0)       # or MMDiT(config_dict), MMDiT(num_layers=2, ...)
        out, cache = model.forward(x, t, context, pooled)          # (N, C, H, W), (N,), (N, L, J), (N, P)
        grads, d = model.backward(dout, cache, return_dx=True)     # d: dict(x=, context=, pooled=)
        model.load_state_dict(from_diffusers_state_dict(sd3.state_dict()))
    """

    Spec = MMDiTSpec
    FROZEN = (POS,)  # a persistent buffer in diffusers: in the state_dict, never trained
    DATA = ()  # it reads text-encoder outputs: minidit.captions.CaptionMMDiT is the one the commands train
    LEARNS_SIGMA = False
    learn_sigma = False
    condition_dropout_prob = 0.0  # SD3's transformer drops no condition: its text encoders' caller does

    def param_shapes(self):
        return param_shapes(self.spec)

    def init_params(self, seed):
        return init_params(self.spec, seed)

    def check_conditions(self, y):
        """minidit.sample has no conditions for it: it reads a text encoder's outputs."""
        raise ValueError("an MMDiT reads a text encoder's outputs (context, pooled), not class labels: call "
                         "MMDiT.forward(x, t, context, pooled) directly, or train a CaptionMMDiT (--model mmdit)")

    def conditions(self, *args, **kwargs):
        self.check_conditions(None)

    # -- forward / backward ----------------------------------------------------------------------
    def check_inputs(self, x, t, context, pooled):
        """Clear errors for inputs of the wrong shape, dtype or backend (before any deep traceback)."""
        s = self.spec
        p, M = s.patch_size, s.pos_embed_max_size
        check_array("x", x, ("N", s.in_channels, "H", "W"), self)
        N, _, H, W = x.shape
        if H % p or W % p or not (p <= H <= M * p and p <= W <= M * p):
            raise ValueError(f"x's height and width must be multiples of the patch size {p} between {p} and "
                             f"pos_embed_max_size * patch_size = {M * p}, got {H} x {W}")
        check_array("t", t, (N,), self, kinds="iuf", what=" (one timestep per image)")
        check_array("context", context, (N, "L", s.joint_attention_dim), self, what=" (L >= 1 text tokens)")
        if context.shape[1] < 1:
            raise ValueError(f"context must have L >= 1 text tokens, got shape {tuple(context.shape)}")
        check_array("pooled", pooled, (N, s.pooled_projection_dim), self)

    def pos_embed_crop(self, h, w):
        """The centre h x w crop of the M x M table (diffusers' cropped_pos_embed): (1, h*w, D), rows
        top = (M - h) // 2 on, columns left = (M - w) // 2 on, row-major."""
        M, D = self.spec.pos_embed_max_size, self.spec.inner_dim
        top, left = (M - h) // 2, (M - w) // 2
        table = self.params[POS].reshape(1, M, M, D)
        return table[:, top:top + h, left:left + w].reshape(1, h * w, D)

    def forward(self, x, t, context, pooled, train=False, cache=True):
        """x (N, C, H, W) float, t (N,) timesteps (rectified flow's 1000 t, float allowed), context (N, L, J) the text
        tokens, pooled (N, P) the pooled text embedding -> (out (N, out_channels, H, W), cache).

        `train` is accepted for the model contract (minidit.contract) and changes nothing (SD3's transformer has no dropout).
        cache=False (sampling): no activations kept for a backward pass; the returned cache is None."""
        self.check_inputs(x, t, context, pooled)
        P, s = self.params, self.spec
        p = s.patch_size
        gh, gw = x.shape[2] // p, x.shape[3] // p
        h, patch_cache = patch_embed_forward(x, *take(P, "", PATCH), p)  # (N, T, D)
        h += self.pos_embed_crop(gh, gw)
        temb, t_cache = timestep_embedder_forward(t, *take(P, "", TIME))  # (N, D)
        pemb, text_cache = mlp_forward(pooled, *take(P, "", TEXT), activation="silu")  # (N, D): Linear-SiLU-Linear
        # every modulation (AdaLayerNormZero, AdaLayerNormContinuous) starts with SiLU(c): computed once here
        c_act, c_silu = silu_forward(temb + pemb)
        ctx, ctx_cache = linear_forward(context, *take(P, "", CONTEXT))  # (N, L, D)
        blocks = []
        for i in range(s.num_layers):
            h, ctx, block_cache = block_forward(h, ctx, c_act, P, f"transformer_blocks.{i}.", s.num_attention_heads,
                                                s.qk_norm, pre_only=i == s.num_layers - 1)
            if cache:
                blocks.append(block_cache)
        mod, mod_cache = linear_forward(c_act, *take(P, "norm_out.linear.", LINEAR))  # (N, 2D)
        scale, shift = chunks(mod, 2)  # AdaLayerNormContinuous: [scale | shift], not DiT's [shift | scale]
        h, norm_cache = adaln_forward(h, shift, scale)
        h, proj_cache = linear_forward(h, *take(P, "proj_out.", LINEAR))  # (N, T, p*p*C_out)
        out = unpatchify_grid(h, p, s.out_dim, gh, gw)
        if not cache:
            return out, None
        return out, MMDiTCache(patch_cache, t_cache, text_cache, c_silu, ctx_cache, blocks, mod_cache, norm_cache,
                               proj_cache)

    def backward(self, dout, cache, return_dx=False, release=False):
        """dout (N, out_channels, H, W) -> grads: name -> gradient for every trainable parameter, in parameter order
        (with return_dx=True: (grads, dict(x=dx, context=dcontext, pooled=dpooled))). release=True drops each block's
        activations from `cache` once its backward is done, as DiT.backward does; the cache cannot be used again."""
        xp, grads = self.xp, {}
        dh = unpatchify_backward(dout, self.spec.patch_size)
        dh, *d = linear_backward(dh, cache.proj_out)
        grads.update(named("proj_out.", LINEAR, d))
        dh, dshift, dscale = adaln_backward(dh, cache.norm_out)
        dc_act, *d = linear_backward(xp.concatenate([dscale, dshift], axis=1), cache.norm_out_modulation)
        grads.update(named("norm_out.linear.", LINEAR, d))
        dctx = None  # the last block's text output is discarded
        for i in reversed(range(self.spec.num_layers)):
            dh, dctx, dc_i = block_backward(dh, dctx, cache.blocks[i], f"transformer_blocks.{i}.", grads)
            if release:
                cache.blocks[i] = None
            dc_act += dc_i  # c feeds every block: its gradients add up
        dcontext, *d = linear_backward(dctx, cache.context)
        grads.update(named("", CONTEXT, d))
        dc = silu_backward(dc_act, cache.c_silu)  # c = temb + pooled projection: both receive dc
        dpooled, *d = mlp_backward(dc, cache.text_embedder)
        grads.update(named("", TEXT, d))
        grads.update(named("", TIME, timestep_embedder_backward(dc, cache.t_embedder)))
        dx, *d = patch_embed_backward(dh, cache.patch)  # pos_embed is frozen: no gradient
        grads.update(named("", PATCH, d))
        grads = {k: grads[k] for k in self.trainable()}
        return (grads, dict(x=dx, context=dcontext, pooled=dpooled)) if return_dx else grads
