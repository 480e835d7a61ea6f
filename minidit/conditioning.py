"""The paper's other three ways of feeding the timestep and class to the blocks (Section 3.2, Table 4, Figure 5).

DiT itself (minidit.model) is adaLN-Zero. This module holds the designs it was compared with, built from the same
pieces and the same embedders; `python -m minidit.train --block adaln|cross-attention|in-context` picks one:

    adaln            shift and scale regressed from c = t + y, no gates, the regression initialised like any linear
                         shift1, scale1, shift2, scale2 = Linear(silu(c))
                         x = x + attn(modulate(LN(x), shift1, scale1));  x = x + mlp(modulate(LN(x), shift2, scale2))
    cross-attention  a cross-attention layer after self-attention, attending to the 2 tokens [t, y]; no adaLN
                         x = x + attn(LN(x));  x = x + cross_attn(LN(x), [t, y]);  x = x + mlp(LN(x))
    in-context       t and y appended to the sequence as 2 extra tokens, dropped after the last block; no adaLN
                         x = x + attn(LN(x));  x = x + mlp(LN(x))

The blocks without adaLN use LayerNorm without affine parameters (like DiT's), and their final layer is LayerNorm +
Linear (the paper: "adaptive if using adaLN"). Only the final linear (and the final adaLN of "adaln") starts at zero.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import model
from .layers import (
    AttendCache, LinearCache, adaln_backward, adaln_forward, attend_backward, attend_forward, attention_backward,
    attention_forward, chunks, final_layer_backward, final_layer_forward, layernorm_backward, layernorm_forward,
    linear_backward, linear_forward, merge_heads, mlp_backward, mlp_forward, silu_backward, silu_forward,
    split_heads, unpatchify, unpatchify_backward,
)
from .model import (
    ATTN, BLOCK_TYPES, FINAL, MLP, DiT, DiTSpec, attention_mlp_shapes, block_macs, embedder_macs, embedder_shapes,
    init_params,
)
from .params import LINEAR, linear_shapes, named, take
from .xp import get_xp

CROSS = "q.weight q.bias kv.weight kv.bias proj.weight proj.bias"


# ----------------------------------------------------------------------------------------------
# Cross-attention: the T tokens of x query the S tokens of ctx
# ----------------------------------------------------------------------------------------------
class CrossAttentionCache(NamedTuple):
    q: LinearCache  # input x (N, T, D) and W_q
    kv: LinearCache  # input ctx (N, S, D) and W_kv
    attend: AttendCache
    proj: LinearCache


def cross_attention_forward(x, ctx, w_q, b_q, w_kv, b_kv, w_proj, b_proj, num_heads):
    """x (N, T, D), ctx (N, S, D) -> (N, T, D).

    q = x W_q^T + b_q;   [k | v] = ctx W_kv^T + b_kv;   out = proj(attend(q, k, v))   (heads as in self-attention)
    """
    N, S, D = ctx.shape
    q, q_cache = linear_forward(x, w_q, b_q)  # (N, T, D)
    kv, kv_cache = linear_forward(ctx, w_kv, b_kv)  # (N, S, 2D)
    kv = kv.reshape(N, S, 2, num_heads, D // num_heads).transpose(2, 0, 3, 1, 4)  # (2, N, NH, S, hs)
    k, v = get_xp(x).ascontiguousarray(kv)
    y, attend_cache = attend_forward(split_heads(q, num_heads), k, v)
    out, proj_cache = linear_forward(merge_heads(y), w_proj, b_proj)
    return out, CrossAttentionCache(q_cache, kv_cache, attend_cache, proj_cache)


def cross_attention_backward(dout, cache):
    """Returns dx, dctx, dW_q, db_q, dW_kv, db_kv, dW_proj, db_proj."""
    N, NH, S, hs = cache.attend.k.shape
    dy, dw_proj, db_proj = linear_backward(dout, cache.proj)
    dq, dk, dv = attend_backward(split_heads(dy, NH), cache.attend)
    dx, dw_q, db_q = linear_backward(merge_heads(dq), cache.q)
    dkv = get_xp(dout).stack([dk, dv]).transpose(1, 3, 0, 2, 4).reshape(N, S, 2 * NH * hs)  # [k | v] layout
    dctx, dw_kv, db_kv = linear_backward(dkv, cache.kv)
    return dx, dctx, dw_q, db_q, dw_kv, db_kv, dw_proj, db_proj


# ----------------------------------------------------------------------------------------------
# Shapes and FLOPs of the three designs
# ----------------------------------------------------------------------------------------------
def param_shapes(spec, **overrides):
    """name -> shape of every parameter of a design (adaln-zero: minidit.model.param_shapes), in the official order:
    the same names as DiT for what they share, cross_attn.{q,kv,proj} for the cross-attention layer."""
    s = DiTSpec.of(spec, **overrides)
    if s.block == "adaln-zero":
        return model.param_shapes(s)
    cfg = s.config
    D, p = cfg.hidden_size, cfg.patch_size
    shapes = embedder_shapes(s)
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        shapes.update(attention_mlp_shapes(b, cfg))
        if s.block == "cross-attention":
            shapes.update({**linear_shapes(b + "cross_attn.q.", D, D), **linear_shapes(b + "cross_attn.kv.", 2 * D, D),
                           **linear_shapes(b + "cross_attn.proj.", D, D)})
        if s.block == "adaln":
            shapes.update(linear_shapes(b + "adaLN_modulation.1.", 4 * D, D))
    shapes.update(linear_shapes("final_layer.linear.", p * p * s.out_channels, D))
    if s.block == "adaln":
        shapes.update(linear_shapes("final_layer.adaLN_modulation.1.", 2 * D, D))
    return shapes


def forward_macs(spec, **overrides):
    """Multiply-accumulates per image of a design, counted as minidit.model.forward_macs counts them."""
    s = DiTSpec.of(spec, **overrides)
    if s.block == "adaln-zero":
        return model.forward_macs(s)
    cfg, T = s.config, s.num_patches
    D, p = cfg.hidden_size, cfg.patch_size
    per_block = block_macs(cfg, T + 2 if s.block == "in-context" else T)  # in-context: 2 more tokens
    if s.block == "adaln":
        per_block += D * 4 * D  # the adaLN regression, once per image
    if s.block == "cross-attention":  # q and proj per token, k v of the 2 condition tokens, T x 2 attention
        per_block += 2 * T * D * D + 2 * D * 2 * D + 2 * T * 2 * D
    final = T * D * p * p * s.out_channels + (D * 2 * D if s.block == "adaln" else 0)
    return embedder_macs(s) + cfg.depth * per_block + final


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------
class BlockCache(NamedTuple):
    modulation: Any  # adaln: LinearCache of adaLN_modulation.1 (input silu(c)); else None
    norm1: Any  # adaln: AdaLNCache; else LayerNormCache
    attn: Any
    norm_cross: Any  # cross-attention: LayerNormCache and CrossAttentionCache; else None
    cross: Any
    norm2: Any
    mlp: Any


def block_forward(x, cond, P, prefix, num_heads, block):
    """One block of a design. x (N, T, D); cond: silu(c) (N, D) for adaln, the condition tokens [t, y] (N, 2, D) for
    cross-attention, None for in-context (whose condition tokens are part of x)."""
    mod_cache = norm_cross_cache = cross_cache = None
    if block == "adaln":
        mod, mod_cache = linear_forward(cond, *take(P, prefix + "adaLN_modulation.1.", LINEAR))  # (N, 4D)
        shift1, scale1, shift2, scale2 = chunks(mod, 4)
        h, norm1_cache = adaln_forward(x, shift1, scale1)
    else:
        h, norm1_cache = layernorm_forward(x)
    h, attn_cache = attention_forward(h, *take(P, prefix, ATTN), num_heads)
    x = x + h
    if block == "cross-attention":
        h, norm_cross_cache = layernorm_forward(x)
        h, cross_cache = cross_attention_forward(h, cond, *take(P, prefix + "cross_attn.", CROSS), num_heads)
        x = x + h
    h, norm2_cache = adaln_forward(x, shift2, scale2) if block == "adaln" else layernorm_forward(x)
    h, mlp_cache = mlp_forward(h, *take(P, prefix, MLP))
    x = x + h
    return x, BlockCache(mod_cache, norm1_cache, attn_cache, norm_cross_cache, cross_cache, norm2_cache, mlp_cache)


def block_backward(dout, cache, prefix, grads, block):
    """Backward of block_forward: writes the block's parameter gradients into `grads`; returns dx, dcond (the gradient
    of cond: d silu(c) (N, D), d[t, y] (N, 2, D), or None for in-context)."""
    dh, *dmlp = mlp_backward(dout, cache.mlp)
    grads.update(named(prefix, MLP, dmlp))
    if block == "adaln":
        dh, dshift2, dscale2 = adaln_backward(dh, cache.norm2)
    else:
        dh = layernorm_backward(dh, cache.norm2)
    dx = dout + dh  # the residual path plus the branch
    dcond = None
    if block == "cross-attention":
        dh, dcond, *dcross = cross_attention_backward(dx, cache.cross)
        grads.update(named(prefix + "cross_attn.", CROSS, dcross))
        dx = dx + layernorm_backward(dh, cache.norm_cross)
    dh, *dattn = attention_backward(dx, cache.attn)
    grads.update(named(prefix, ATTN, dattn))
    if block == "adaln":
        dh, dshift1, dscale1 = adaln_backward(dh, cache.norm1)
        dmod = get_xp(dout).concatenate([dshift1, dscale1, dshift2, dscale2], axis=1)
        dcond, *dlin = linear_backward(dmod, cache.modulation)  # (N, 4D) -> (N, D)
        grads.update(named(prefix + "adaLN_modulation.1.", LINEAR, dlin))
    else:
        dh = layernorm_backward(dh, cache.norm1)
    return dx + dh, dcond


class PlainFinalCache(NamedTuple):
    norm: Any  # LayerNormCache
    linear: LinearCache


class ConditioningCache(NamedTuple):
    patch: Any
    t_embedder: Any
    y_embedder: Any
    c_silu: Any  # adaln: SiLUCache of c = t + y; else None
    blocks: list
    final: Any  # adaln: FinalLayerCache; else PlainFinalCache


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class ConditioningDiT(DiT):
    """A DiT whose blocks receive t and y by one of the paper's other designs; the same embedders, parameter names,
    initialisation (except that only the final layer starts at zero), forward and backward signatures as DiT.

        model = ConditioningDiT("S/2", block="in-context", input_size=32, in_channels=4, num_classes=1000)
    """

    BLOCKS = BLOCK_TYPES[1:]

    def __init__(self, variant="S/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
                 class_dropout_prob=0.1, seed=0, dtype=np.float32, backend="numpy", block="adaln"):
        super().__init__(variant, input_size, in_channels, num_classes, learn_sigma, class_dropout_prob, seed, dtype,
                         backend, block)

    def param_shapes(self):
        return param_shapes(self.spec)

    def init_params(self, seed):
        return init_params(self.param_shapes(), seed, zero_names=("final_layer.",))

    def gmacs(self):
        return forward_macs(self.spec) / 1e9

    def forward(self, x, t, y, train=False, force_drop_ids=None, rng=None, cache=True):
        """As DiT.forward."""
        P, xp, block = self.params, self.xp, self.block
        h, temb, yemb, embed_caches = self.embed(x, t, y, train, force_drop_ids, rng)
        c_act = c_silu_cache = cond = None
        if block == "adaln":
            c_act, c_silu_cache = silu_forward(temb + yemb)  # (N, D)
            cond = c_act
        elif block == "cross-attention":
            cond = xp.stack([temb, yemb], axis=1)  # (N, 2, D): the tokens every block attends to
        else:  # in-context: [t, y, patches...] (N, 2 + T, D)
            h = xp.concatenate([temb[:, None], yemb[:, None], h], axis=1)
        blocks = []
        for i in range(self.depth):
            h, block_cache = block_forward(h, cond, P, f"blocks.{i}.", self.num_heads, block)
            if cache:
                blocks.append(block_cache)
        if block == "in-context":
            h = h[:, 2:]  # the condition tokens are dropped before decoding
        if block == "adaln":
            h, final_cache = final_layer_forward(h, c_act, *take(P, "", FINAL))
        else:
            h, norm_cache = layernorm_forward(h)
            h, lin_cache = linear_forward(h, *take(P, "final_layer.linear.", LINEAR))
            final_cache = PlainFinalCache(norm_cache, lin_cache)
        out = unpatchify(h, self.patch_size, self.out_channels)
        return out, (ConditioningCache(*embed_caches, c_silu_cache, blocks, final_cache) if cache else None)

    def backward(self, dout, cache, return_dx=False, release=False):
        """As DiT.backward."""
        xp, block, grads = self.xp, self.block, {}
        dh = unpatchify_backward(dout, self.patch_size)
        if block == "adaln":
            dh, dcond, *dfinal = final_layer_backward(dh, cache.final)  # dcond: d silu(c)
            grads.update(named("", FINAL, dfinal))
        else:
            dh, *dlin = linear_backward(dh, cache.final.linear)
            grads.update(named("final_layer.linear.", LINEAR, dlin))
            dh, dcond = layernorm_backward(dh, cache.final.norm), None
        if block == "in-context":  # the dropped condition tokens get no gradient from the final layer
            dh = xp.concatenate([xp.zeros_like(dh[:, :2]), dh], axis=1)
        for i in reversed(range(self.depth)):
            dh, dcond_i = block_backward(dh, cache.blocks[i], f"blocks.{i}.", grads, block)
            if release:
                cache.blocks[i] = None
            if dcond_i is not None:  # the condition feeds every block: its gradients add up
                dcond = dcond_i if dcond is None else dcond + dcond_i
        if block == "adaln":
            dtemb = dyemb = silu_backward(dcond, cache.c_silu)  # c = temb + yemb, so both receive dc
        elif block == "cross-attention":
            dtemb, dyemb = dcond[:, 0], dcond[:, 1]
        else:
            dtemb, dyemb, dh = dh[:, 0], dh[:, 1], dh[:, 2:]
        dx = self.embed_backward(dh, dtemb, dyemb, (cache.patch, cache.t_embedder, cache.y_embedder), grads)
        grads = {k: grads[k] for k in self.trainable()}  # official order
        return (grads, dx) if return_dx else grads


def build(spec, seed=0, dtype=np.float32, backend="numpy"):
    """The model a DiTSpec describes: DiT for adaln-zero, ConditioningDiT for the other designs."""
    s = DiTSpec.of(spec)
    cls = DiT if s.block == "adaln-zero" else ConditioningDiT
    return cls.from_spec(s, seed=seed, dtype=dtype, backend=backend)
