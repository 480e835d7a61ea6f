"""The paper's other three ways of feeding the timestep and class to the blocks (Section 3.2, Table 4, Figure 5).

DiT itself (minidit.model) is adaLN-Zero. This module holds the designs it was compared with, built from the same
pieces and the same embedders; `python -m minidit.train --block adaln|cross-attention|in-context` picks one. Each is
one class, from its parameter shapes to its backward pass, and DESIGNS names them:

    adaln            AdaLN           shift and scale regressed from c = t + y, no gates
    cross-attention  CrossAttention  a cross-attention layer after self-attention, attending to the 2 tokens [t, y]
    in-context       InContext       t and y prepended to the sequence as 2 extra tokens

ConditioningDiT runs any of them. Only the final linear (and the final adaLN of "adaln") starts at zero.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from .layers import (
    AdaLNCache, AttendCache, AttentionCache, LayerNormCache, LinearCache, MLPCache, adaln_backward, adaln_forward,
    attend_backward, attend_forward, attention_backward, attention_forward, chunks, final_layer_backward,
    final_layer_forward, layernorm_backward, layernorm_forward, linear_backward, linear_forward, merge_heads,
    mlp_backward, mlp_forward, silu_backward, silu_forward, split_heads, unpatchify, unpatchify_backward,
)
from .model import (
    ATTN, FINAL, MLP, DiT, DiTSpec, attention_mlp_shapes, block_macs, embedder_macs, embedder_shapes, init_params,
)
from .params import LINEAR, linear_shapes, named, take
from .xp import get_xp

CROSS = "q.weight q.bias kv.weight kv.bias proj.weight proj.bias"


@dataclasses.dataclass(frozen=True)
class ConditioningDiTSpec(DiTSpec):
    """A DiTSpec plus the design that feeds t and y to the blocks."""
    block: str = "adaln"

    kind = "dit-conditioning"

    def __post_init__(self):
        super().__post_init__()
        if self.block not in DESIGNS:
            raise ValueError(f"unknown block type {self.block!r}; choose one of: {', '.join(DESIGNS)} (DiT's own "
                             f"adaLN-Zero is minidit.model.DiT)")


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
# The three designs: one class each, with the same methods
#
#     block_shapes(prefix, cfg), block_macs(cfg, T)   one block's parameters; its MACs per image on T patch tokens
#     final_shapes(spec), final_macs(spec)            the final layer's
#     condition_forward(h, temb, yemb) -> h, cond, cache        how t and y (N, D) enter the patch tokens h and cond,
#     condition_backward(dh, dcond, cache) -> dh, dtemb, dyemb  what every block and the final layer read
#     block_forward(x, cond, P, prefix, num_heads) -> x, cache
#     block_backward(dout, cache, prefix, grads) -> dx, dcond  (the parameter gradients are written into grads)
#     final_forward(h, cond, P) -> out (N, T, p*p*C_out), cache
#     final_backward(dout, cache, grads) -> dh, dcond
#
# dcond is None where nothing reads cond. The blocks without adaLN use LayerNorm without affine parameters (like
# DiT's); their final layer is LayerNorm + Linear (the paper: "adaptive if using adaLN").
# ----------------------------------------------------------------------------------------------
class AdaLNBlockCache(NamedTuple):
    modulation: LinearCache  # adaLN_modulation.1, whose input is silu(c) (N, D)
    norm1: AdaLNCache  # LayerNorm, then modulate with shift1, scale1
    attn: AttentionCache
    norm2: AdaLNCache
    mlp: MLPCache


class AdaLN:
    """Shift and scale regressed from c = t + y, no gates; cond = silu(c) (N, D), read by every block and by DiT's
    adaptive final layer.

        shift1, scale1, shift2, scale2 = Linear(silu(c))
        x = x + attn(modulate(LN(x), shift1, scale1));  x = x + mlp(modulate(LN(x), shift2, scale2))
    """

    def block_shapes(self, prefix, cfg):
        D = cfg.hidden_size
        return {**attention_mlp_shapes(prefix, cfg), **linear_shapes(prefix + "adaLN_modulation.1.", 4 * D, D)}

    def block_macs(self, cfg, T):
        return block_macs(cfg, T) + cfg.hidden_size * 4 * cfg.hidden_size  # + the adaLN regression, once per image

    def final_shapes(self, spec):
        D, p = spec.config.hidden_size, spec.config.patch_size
        return {**linear_shapes("final_layer.linear.", p * p * spec.out_channels, D),
                **linear_shapes("final_layer.adaLN_modulation.1.", 2 * D, D)}

    def final_macs(self, spec):
        D, p = spec.config.hidden_size, spec.config.patch_size
        return spec.num_patches * D * p * p * spec.out_channels + D * 2 * D

    def condition_forward(self, h, temb, yemb):
        c_act, c_silu_cache = silu_forward(temb + yemb)  # (N, D): every adaLN_modulation starts with this SiLU
        return h, c_act, c_silu_cache

    def condition_backward(self, dh, dc_act, c_silu_cache):
        dc = silu_backward(dc_act, c_silu_cache)
        return dh, dc, dc  # c = temb + yemb, so both receive dc

    def block_forward(self, x, c_act, P, prefix, num_heads):
        mod, mod_cache = linear_forward(c_act, *take(P, prefix + "adaLN_modulation.1.", LINEAR))  # (N, 4D)
        shift1, scale1, shift2, scale2 = chunks(mod, 4)
        h, norm1_cache = adaln_forward(x, shift1, scale1)
        h, attn_cache = attention_forward(h, *take(P, prefix, ATTN), num_heads)
        x = x + h
        h, norm2_cache = adaln_forward(x, shift2, scale2)
        h, mlp_cache = mlp_forward(h, *take(P, prefix, MLP))
        x = x + h
        return x, AdaLNBlockCache(mod_cache, norm1_cache, attn_cache, norm2_cache, mlp_cache)

    def block_backward(self, dout, cache, prefix, grads):
        dh, *dmlp = mlp_backward(dout, cache.mlp)
        grads.update(named(prefix, MLP, dmlp))
        dh, dshift2, dscale2 = adaln_backward(dh, cache.norm2)
        dx = dout + dh  # the residual path plus the branch
        dh, *dattn = attention_backward(dx, cache.attn)
        grads.update(named(prefix, ATTN, dattn))
        dh, dshift1, dscale1 = adaln_backward(dh, cache.norm1)
        dmod = get_xp(dout).concatenate([dshift1, dscale1, dshift2, dscale2], axis=1)
        dc_act, *dlin = linear_backward(dmod, cache.modulation)  # (N, 4D) -> (N, D)
        grads.update(named(prefix + "adaLN_modulation.1.", LINEAR, dlin))
        return dx + dh, dc_act

    def final_forward(self, h, c_act, P):
        return final_layer_forward(h, c_act, *take(P, "", FINAL))

    def final_backward(self, dout, cache, grads):
        dh, dc_act, *dfinal = final_layer_backward(dout, cache)
        grads.update(named("", FINAL, dfinal))
        return dh, dc_act


class PlainFinalCache(NamedTuple):
    norm: LayerNormCache
    linear: LinearCache


class PlainFinalLayer:
    """The final layer of the designs without adaLN: LayerNorm, then Linear to the p*p*C_out values of each patch."""

    def final_shapes(self, spec):
        D, p = spec.config.hidden_size, spec.config.patch_size
        return linear_shapes("final_layer.linear.", p * p * spec.out_channels, D)

    def final_macs(self, spec):
        D, p = spec.config.hidden_size, spec.config.patch_size
        return spec.num_patches * D * p * p * spec.out_channels

    def final_forward(self, h, cond, P):
        h, norm_cache = layernorm_forward(h)
        h, linear_cache = linear_forward(h, *take(P, "final_layer.linear.", LINEAR))
        return h, PlainFinalCache(norm_cache, linear_cache)

    def final_backward(self, dout, cache, grads):
        dh, *dlin = linear_backward(dout, cache.linear)
        grads.update(named("final_layer.linear.", LINEAR, dlin))
        return layernorm_backward(dh, cache.norm), None


class CrossAttentionBlockCache(NamedTuple):
    norm1: LayerNormCache
    attn: AttentionCache
    norm_cross: LayerNormCache
    cross: CrossAttentionCache
    norm2: LayerNormCache
    mlp: MLPCache


class CrossAttention(PlainFinalLayer):
    """A cross-attention layer after self-attention, attending to the 2 tokens cond = [t, y] (N, 2, D); no adaLN.

        x = x + attn(LN(x));  x = x + cross_attn(LN(x), [t, y]);  x = x + mlp(LN(x))
    """

    def block_shapes(self, prefix, cfg):
        D = cfg.hidden_size
        return {**attention_mlp_shapes(prefix, cfg), **linear_shapes(prefix + "cross_attn.q.", D, D),
                **linear_shapes(prefix + "cross_attn.kv.", 2 * D, D),
                **linear_shapes(prefix + "cross_attn.proj.", D, D)}

    def block_macs(self, cfg, T):
        D = cfg.hidden_size  # + q and proj per token, k v of the 2 condition tokens, T x 2 attention
        return block_macs(cfg, T) + 2 * T * D * D + 2 * D * 2 * D + 2 * T * 2 * D

    def condition_forward(self, h, temb, yemb):
        return h, get_xp(h).stack([temb, yemb], axis=1), None  # (N, 2, D): the tokens every block attends to

    def condition_backward(self, dh, dcond, cache):
        return dh, dcond[:, 0], dcond[:, 1]

    def block_forward(self, x, cond, P, prefix, num_heads):
        h, norm1_cache = layernorm_forward(x)
        h, attn_cache = attention_forward(h, *take(P, prefix, ATTN), num_heads)
        x = x + h
        h, norm_cross_cache = layernorm_forward(x)
        h, cross_cache = cross_attention_forward(h, cond, *take(P, prefix + "cross_attn.", CROSS), num_heads)
        x = x + h
        h, norm2_cache = layernorm_forward(x)
        h, mlp_cache = mlp_forward(h, *take(P, prefix, MLP))
        x = x + h
        return x, CrossAttentionBlockCache(norm1_cache, attn_cache, norm_cross_cache, cross_cache, norm2_cache,
                                           mlp_cache)

    def block_backward(self, dout, cache, prefix, grads):
        dh, *dmlp = mlp_backward(dout, cache.mlp)
        grads.update(named(prefix, MLP, dmlp))
        dx = dout + layernorm_backward(dh, cache.norm2)  # the residual path plus the branch
        dh, dcond, *dcross = cross_attention_backward(dx, cache.cross)
        grads.update(named(prefix + "cross_attn.", CROSS, dcross))
        dx = dx + layernorm_backward(dh, cache.norm_cross)
        dh, *dattn = attention_backward(dx, cache.attn)
        grads.update(named(prefix, ATTN, dattn))
        return dx + layernorm_backward(dh, cache.norm1), dcond


class InContextBlockCache(NamedTuple):
    norm1: LayerNormCache
    attn: AttentionCache
    norm2: LayerNormCache
    mlp: MLPCache


class InContext(PlainFinalLayer):
    """t and y prepended to the sequence as 2 extra tokens, dropped before the final layer; no adaLN, no cond.

        x = [t, y, x];  x = x + attn(LN(x));  x = x + mlp(LN(x))
    """

    def block_shapes(self, prefix, cfg):
        return attention_mlp_shapes(prefix, cfg)

    def block_macs(self, cfg, T):
        return block_macs(cfg, T + 2)  # the 2 condition tokens ride along

    def condition_forward(self, h, temb, yemb):
        return get_xp(h).concatenate([temb[:, None], yemb[:, None], h], axis=1), None, None  # (N, 2 + T, D)

    def condition_backward(self, dh, dcond, cache):
        return dh[:, 2:], dh[:, 0], dh[:, 1]

    def block_forward(self, x, cond, P, prefix, num_heads):
        h, norm1_cache = layernorm_forward(x)
        h, attn_cache = attention_forward(h, *take(P, prefix, ATTN), num_heads)
        x = x + h
        h, norm2_cache = layernorm_forward(x)
        h, mlp_cache = mlp_forward(h, *take(P, prefix, MLP))
        x = x + h
        return x, InContextBlockCache(norm1_cache, attn_cache, norm2_cache, mlp_cache)

    def block_backward(self, dout, cache, prefix, grads):
        dh, *dmlp = mlp_backward(dout, cache.mlp)
        grads.update(named(prefix, MLP, dmlp))
        dx = dout + layernorm_backward(dh, cache.norm2)  # the residual path plus the branch
        dh, *dattn = attention_backward(dx, cache.attn)
        grads.update(named(prefix, ATTN, dattn))
        return dx + layernorm_backward(dh, cache.norm1), None

    def final_forward(self, h, cond, P):
        return super().final_forward(h[:, 2:], cond, P)  # the condition tokens are dropped before decoding

    def final_backward(self, dout, cache, grads):
        dh, dcond = super().final_backward(dout, cache, grads)
        xp = get_xp(dh)
        return xp.concatenate([xp.zeros_like(dh[:, :2]), dh], axis=1), dcond  # the dropped tokens get no gradient


DESIGNS = {"adaln": AdaLN(), "cross-attention": CrossAttention(), "in-context": InContext()}


# ----------------------------------------------------------------------------------------------
# Shapes and FLOPs of every design
# ----------------------------------------------------------------------------------------------
def param_shapes(spec, **overrides):
    """name -> shape of every parameter of a design, in the official order:
    the same names as DiT for what they share, cross_attn.{q,kv,proj} for the cross-attention layer."""
    s = ConditioningDiTSpec.of(spec, **overrides)
    design, shapes = DESIGNS[s.block], embedder_shapes(s)
    for i in range(s.config.depth):
        shapes.update(design.block_shapes(f"blocks.{i}.", s.config))
    shapes.update(design.final_shapes(s))
    return shapes


def forward_macs(spec, **overrides):
    """Multiply-accumulates per image of a design, counted as minidit.model.forward_macs counts them."""
    s = ConditioningDiTSpec.of(spec, **overrides)
    design = DESIGNS[s.block]
    return embedder_macs(s) + s.config.depth * design.block_macs(s.config, s.num_patches) + design.final_macs(s)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class ConditioningCache(NamedTuple):
    patch: Any
    t_embedder: Any
    y_embedder: Any
    condition: Any  # the design's condition_forward cache (adaln: SiLUCache of c = t + y; else None)
    blocks: list  # one of the design's block caches per block
    final: Any


class ConditioningDiT(DiT):
    """A DiT whose blocks receive t and y by one of the paper's other designs; the same embedders, parameter names,
    initialisation (except that only the final layer starts at zero), forward and backward signatures as DiT.

        model = ConditioningDiT("S/2", block="in-context", input_size=32, in_channels=4, num_classes=1000)
    """

    Spec = ConditioningDiTSpec
    OPTIONS = ("block",)

    def param_shapes(self):
        return param_shapes(self.spec)

    def init_params(self, seed):
        return init_params(self.param_shapes(), seed, zero_names=("final_layer.",))

    def gmacs(self):
        return forward_macs(self.spec) / 1e9

    design = property(lambda self: DESIGNS[self.spec.block])  # its shapes, blocks and final layer

    def describe(self):
        return f"{super().describe()} ({self.spec.block} blocks)"

    @classmethod
    def add_options(cls, ap):
        ap.add_argument("--block", choices=("adaln-zero", *DESIGNS), default="adaln-zero",
                        help="--model dit: how t and the class reach the blocks, the paper's four designs (Table 4): "
                             "adaln-zero is DiT itself, the others minidit.conditioning")

    @classmethod
    def chosen_by(cls, args):
        return args.model == DiT.CLI_NAME and args.block != "adaln-zero"

    @classmethod
    def spec_from_options(cls, args, data):
        return dataclasses.replace(super().spec_from_options(args, data), block=args.block)

    def forward(self, x, t, y, train=False, force_drop_ids=None, rng=None, cache=True):
        """As DiT.forward."""
        P, design = self.params, self.design
        h, temb, yemb, embed_caches = self.embed(x, t, y, train, force_drop_ids, rng)
        h, cond, cond_cache = design.condition_forward(h, temb, yemb)
        blocks = []
        for i in range(self.depth):
            h, block_cache = design.block_forward(h, cond, P, f"blocks.{i}.", self.num_heads)
            if cache:
                blocks.append(block_cache)
        h, final_cache = design.final_forward(h, cond, P)  # (N, T, p*p*C_out)
        out = unpatchify(h, self.patch_size, self.out_channels)
        return out, (ConditioningCache(*embed_caches, cond_cache, blocks, final_cache) if cache else None)

    def backward(self, dout, cache, return_dx=False, release=False):
        """As DiT.backward."""
        design, grads = self.design, {}
        dh = unpatchify_backward(dout, self.patch_size)
        dh, dcond = design.final_backward(dh, cache.final, grads)
        for i in reversed(range(self.depth)):
            dh, dcond_i = design.block_backward(dh, cache.blocks[i], f"blocks.{i}.", grads)
            if release:
                cache.blocks[i] = None
            if dcond_i is not None:  # cond feeds every block: its gradients add up
                dcond = dcond_i if dcond is None else dcond + dcond_i
        dh, dtemb, dyemb = design.condition_backward(dh, dcond, cache.condition)
        dx = self.embed_backward(dh, dtemb, dyemb, (cache.patch, cache.t_embedder, cache.y_embedder), grads)
        grads = {k: grads[k] for k in self.trainable()}  # official order
        return (grads, dx) if return_dx else grads

