"""Every operation of a diffusion transformer as a pair of pure functions (the CS231n contract):

    out, cache = op_forward(inputs...)       cache: a small NamedTuple of what backward needs
    grads...   = op_backward(dout, cache)    gradients of the loss w.r.t. each input, in input order

No state lives anywhere else, so two forwards followed by two backwards are fine. Every function takes
its array module from its inputs (`get_xp`), so the same code runs on NumPy and CuPy, and every
backward is checked against central differences in float64 in tests/test_layers.py.

These are the pieces models compose: the ops (linear, LayerNorm, softmax, ...), the sublayers built from them
(attention in three steps: qkv_forward -> attend_forward -> linear_forward, the MLP, adaLN modulation, the gated
residual, adaLN-Zero's MLP half), and DiT's embedders and final layer. A model never copies them: MM-DiT runs
qkv_forward on each of its streams, one attend_forward over both and adaln_zero_mlp_forward on each; a video DiT
reshapes its tokens and calls attention_forward; a dynamic-width DiT passes sliced weights, or masks (head_mask,
hidden_mask) that switch off heads and hidden units.

Functions marked @fused return arrays only and also have a fused CUDA kernel (minidit.cuda_kernels) that CuPy runs
instead, one pass over memory in place of several; the code here is the reference, which NumPy runs and the kernels
are tested against. The caches are built here, never by a kernel.

Shapes: N batch, T tokens, D hidden size, NH heads, hs = D / NH head size, p patch size, C channels.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

from .xp import fused, get_xp, to_device

Array = Any  # numpy.ndarray or cupy.ndarray


# ----------------------------------------------------------------------------------------------
# Sums over rows, the reduction behind every bias-like gradient
# ----------------------------------------------------------------------------------------------
@fused
def sum_rows(x):
    """x (..., M, K) -> (..., K): the sum over the second-to-last axis (on CuPy: a ones-vector matmul, which
    cuBLAS runs ~10x faster than CuPy's reduction over a non-contiguous axis)."""
    return x.sum(axis=-2)


# ----------------------------------------------------------------------------------------------
# Linear: y = x W^T + b       (W is (out, in), as PyTorch stores it)
# ----------------------------------------------------------------------------------------------
class LinearCache(NamedTuple):
    x: Array  # (..., in) the input
    w: Array  # (out, in) the weight


def linear_forward(x, w, b):
    """x (..., in), w (out, in), b (out,) -> y (..., out).

    The leading axes are flattened so that BLAS sees one (M, in) @ (in, out) product rather than a
    loop of small ones; w.T is a view, and BLAS reads it transposed without a copy."""
    y = x.reshape(-1, x.shape[-1]) @ w.T  # (M, out), M = product of the leading axes
    y += b
    return y.reshape(*x.shape[:-1], w.shape[0]), LinearCache(x, w)


def linear_backward(dy, cache):
    """dx = dy W,   dW = dy^T x (summed over all leading axes),   db = sum dy."""
    x, w = cache
    x2 = x.reshape(-1, x.shape[-1])  # (M, in)
    dy2 = dy.reshape(-1, dy.shape[-1])  # (M, out)
    dx = (dy2 @ w).reshape(x.shape)  # (..., in)
    dw = dy2.T @ x2  # (out, in)
    db = sum_rows(dy2)  # (out,)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# LayerNorm without affine parameters, over the last axis:  xhat = (x - mu) / sqrt(var + eps)
# ----------------------------------------------------------------------------------------------
class LayerNormCache(NamedTuple):
    xhat: Array  # (..., D) normalised input (this is also the output)
    rstd: Array  # (..., 1) 1 / sqrt(var + eps)


@fused
def layernorm(x, eps):
    """x (..., D) -> xhat (..., D), rstd (..., 1); biased variance."""
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)
    rstd = 1.0 / (var + eps) ** 0.5
    return xc * rstd, rstd


def layernorm_forward(x, eps=1e-6):
    """x (..., D) -> xhat (..., D); eps = 1e-6 as in DiT."""
    xhat, rstd = layernorm(x, eps)
    return xhat, LayerNormCache(xhat, rstd)


@fused
def layernorm_backward(dxhat, cache):
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), means over the last axis.

    From xhat_i = (x_i - mu) * rstd: differentiating through mu gives the -mean(dxhat) term and
    through rstd (d rstd / dx_i = -rstd^2 xhat_i / D) the -xhat * mean(dxhat * xhat) term.
    """
    xhat, rstd = cache
    mean_dxhat = dxhat.mean(axis=-1, keepdims=True)
    mean_dxhat_xhat = (dxhat * xhat).mean(axis=-1, keepdims=True)
    return (dxhat - mean_dxhat - xhat * mean_dxhat_xhat) * rstd


# ----------------------------------------------------------------------------------------------
# adaLN: out = LN(x) * (1 + scale) + shift, with shift, scale (N, D) regressed from the condition and broadcast
# over the T tokens. The regression itself is a Linear on silu(c) whose output is cut into chunks (shift, scale,
# gate, ...), each (N, D).
# ----------------------------------------------------------------------------------------------
class ModulateCache(NamedTuple):
    x: Array  # (N, T, D)
    scale: Array  # (N, D)


@fused
def modulate(x, shift, scale):
    """x (N, T, D), shift (N, D), scale (N, D) -> x * (1 + scale) + shift, (N, T, D)."""
    out = x * (1 + scale[:, None, :])
    out += shift[:, None, :]
    return out


def modulate_forward(x, shift, scale):
    return modulate(x, shift, scale), ModulateCache(x, scale)


def modulate_backward(dout, cache):
    """dx = dout (1 + scale),   dshift = sum_T dout,   dscale = sum_T dout * x."""
    x, scale = cache
    dx = dout * (1 + scale[:, None, :])
    dshift = sum_rows(dout)
    dscale = sum_rows(dout * x)
    return dx, dshift, dscale


class AdaLNCache(NamedTuple):
    norm: LayerNormCache
    modulate: ModulateCache


def adaln_forward(x, shift, scale):
    """modulate(LN(x), shift, scale): DiT's `modulate(self.norm1(x), shift_msa, scale_msa)`. (N, T, D) -> (N, T, D)."""
    h, norm_cache = layernorm_forward(x)
    h, modulate_cache = modulate_forward(h, shift, scale)
    return h, AdaLNCache(norm_cache, modulate_cache)


def adaln_backward(dout, cache):
    """Returns dx, dshift, dscale."""
    dh, dshift, dscale = modulate_backward(dout, cache.modulate)
    return layernorm_backward(dh, cache.norm), dshift, dscale


def chunks(a, n):
    """(N, n*D) -> n views (N, D): torch's `a.chunk(n, dim=1)`. The backward is concatenate(grads, axis=1)."""
    D = a.shape[1] // n
    return [a[:, i * D:(i + 1) * D] for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Gated residual (the "Zero" of adaLN-Zero): out = x + gate * y, gate (N, D) broadcast over tokens
# ----------------------------------------------------------------------------------------------
class GateCache(NamedTuple):
    gate: Array  # (N, D)
    y: Array  # (N, T, D) the branch output


@fused
def gated_residual(x, gate, y):
    """x, y (N, T, D), gate (N, D) -> x + gate[:, None] * y."""
    return x + gate[:, None, :] * y


def gated_residual_forward(x, gate, y):
    return gated_residual(x, gate, y), GateCache(gate, y)


def gated_residual_backward(dout, cache):
    """dx = dout,   dgate = sum_T dout * y,   dy = dout * gate."""
    gate, y = cache
    dgate = sum_rows(dout * y)
    dy = dout * gate[:, None, :]
    return dout, dgate, dy


# ----------------------------------------------------------------------------------------------
# Group mask (Dynamic DiT's gates): out = x * m, m (N, G) one value per example and group of C / G contiguous channels,
# broadcast over the T tokens
# ----------------------------------------------------------------------------------------------
class GroupMaskCache(NamedTuple):
    x: Array  # (N, T, C) the input
    mask: Array  # (N, G)


def expand_groups(mask, width):
    """(N, G) -> (N, 1, width): each value repeated over its width / G contiguous channels."""
    return get_xp(mask).repeat(mask, width // mask.shape[1], axis=1)[:, None, :]


def group_mask_forward(x, mask):
    """x (N, T, C), mask (N, G) -> x * expand_groups(mask) (N, T, C)."""
    return x * expand_groups(mask, x.shape[-1]), GroupMaskCache(x, mask)


def group_mask_backward(dout, cache):
    """dx = dout * m (expanded),   dm_g = sum over the tokens and the group's channels of dout * x."""
    x, mask = cache
    N, G = mask.shape
    dx = dout * expand_groups(mask, x.shape[-1])
    dmask = sum_rows(dout * x).reshape(N, G, -1).sum(axis=2)  # (N, C) -> (N, G, C / G) -> (N, G)
    return dx, dmask


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------
class SiLUCache(NamedTuple):
    x: Array
    s: Array  # sigmoid(x)


def silu_forward(x):
    """silu(x) = x * sigmoid(x); sigmoid written as (1 + tanh(x/2)) / 2, which never overflows."""
    xp = get_xp(x)
    s = 0.5 * (1 + xp.tanh(0.5 * x))
    return x * s, SiLUCache(x, s)


def silu_backward(dy, cache):
    """d silu / dx = s + x s (1 - s) = s (1 + x (1 - s))."""
    x, s = cache
    return dy * s * (1 + x * (1 - s))


GELU_C = math.sqrt(2 / math.pi)  # sqrt(2/pi) of the tanh approximation
GELU_A = 0.044715


class GELUCache(NamedTuple):
    x: Array  # the input alone: the backward recomputes tanh(u) (one more pass there, one array fewer kept per MLP)


def _gelu_tanh(x):
    """th = tanh(u),  u = sqrt(2/pi) (x + 0.044715 x^3) = x (C + C A x^2), built in one new buffer."""
    th = x * x
    th *= GELU_C * GELU_A
    th += GELU_C
    th *= x
    return get_xp(x).tanh(th, out=th)


@fused
def gelu(x):
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    y = _gelu_tanh(x)  # y = 0.5 x (1 + th), in place
    y += 1
    y *= x
    y *= 0.5
    return y


def gelu_forward(x):
    return gelu(x), GELUCache(x)


@fused
def gelu_backward(dy, cache):
    """d/dx = 0.5 (1 + th) + 0.5 x (1 - th^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    x = cache.x
    th = _gelu_tanh(x)
    g = x * x  # g = 0.5 C x (1 + 3 A x^2) (1 - th^2), built in place
    g *= 3 * GELU_A
    g += 1
    g *= x
    g *= 0.5 * GELU_C
    sech2 = th * th  # 1 - th^2
    get_xp(x).subtract(1, sech2, out=sech2)
    g *= sech2
    th += 1  # + 0.5 (1 + th)
    th *= 0.5
    g += th
    g *= dy
    return g


@fused
def softmax(s):
    """Softmax over the last axis, shifted by the row max for stability. The probabilities are their own cache."""
    xp = get_xp(s)
    a = s - s.max(axis=-1, keepdims=True)
    xp.exp(a, out=a)
    a /= a.sum(axis=-1, keepdims=True)
    return a


@fused
def softmax_backward(da, a):
    """The softmax Jacobian is diag(a) - a a^T, so ds = a * (da - sum(da * a))  (sum over the last axis)."""
    ds = da * a
    ds -= a * ds.sum(axis=-1, keepdims=True)
    return ds


# ----------------------------------------------------------------------------------------------
# Multi-head attention (timm's Attention), in three steps that other models recombine:
#   qkv_forward     q, k, v = heads of x W_qkv^T + b, laid out [q | k | v], NH contiguous heads each
#   attend_forward  y = softmax(q k^T / sqrt(hs)) v           over any key set (self, joint, cross)
#   linear_forward  out = merge_heads(y) W_proj^T + b
# ----------------------------------------------------------------------------------------------
def split_heads(x, num_heads):
    """(N, T, D) -> (N, NH, T, hs), contiguous: each head is read by two batched matmuls, and CuPy would copy a
    strided operand at every one of them."""
    N, T, D = x.shape
    return get_xp(x).ascontiguousarray(x.reshape(N, T, num_heads, D // num_heads).transpose(0, 2, 1, 3))


def merge_heads(x):
    """(N, NH, T, hs) -> (N, T, D): the heads side by side, as the projection reads them."""
    N, NH, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(N, T, NH * hs)


def qkv_forward(x, w, b, num_heads):
    """x (N, T, D), w (3D', D), b (3D',) -> q, k, v each (N, NH, T, hs) with D' = NH hs, and the cache.

    The fused projection is laid out [q | k | v] (timm), each split into NH contiguous heads."""
    N, T, _ = x.shape
    qkv, lin_cache = linear_forward(x, w, b)  # (N, T, 3D')
    qkv = qkv.reshape(N, T, 3, num_heads, -1).transpose(2, 0, 3, 1, 4)  # (3, N, NH, T, hs)
    q, k, v = get_xp(x).ascontiguousarray(qkv)  # each (N, NH, T, hs), contiguous as in split_heads
    return (q, k, v), lin_cache


def qkv_backward(dq, dk, dv, cache):
    """dq, dk, dv (N, NH, T, hs) -> dx, dw, db of qkv_forward."""
    N, NH, T, hs = dq.shape
    dqkv = get_xp(dq).empty((N, T, 3, NH, hs), dtype=dq.dtype)  # the [q | k | v] layout of the projection
    heads = dqkv.transpose(2, 0, 3, 1, 4)  # (3, N, NH, T, hs) view into dqkv
    heads[0], heads[1], heads[2] = dq, dk, dv
    return linear_backward(dqkv.reshape(N, T, 3 * NH * hs), cache)


class AttendCache(NamedTuple):
    q: Array  # (N, NH, T, hs)
    k: Array  # (N, NH, S, hs)
    v: Array  # (N, NH, S, hs)
    a: Array  # (N, NH, T, S) attention probabilities


def attend_forward(q, k, v):
    """Scaled dot-product attention of every head: q (N, NH, T, hs), k and v (N, NH, S, hs) -> y (N, NH, T, hs).

    a = softmax(q k^T / sqrt(hs)) over the S keys (N, NH, T, S);  y = a v.
    """
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(0, 1, 3, 2)  # (N, NH, T, S) scores; q scaled first, as timm does
    a = softmax(s)
    return a @ v, AttendCache(q, k, v, a)


def attend_backward(dy, cache):
    """Returns dq, dk, dv of attend_forward.

    y = a v            ->  da = dy v^T,   dv = a^T dy
    a = softmax(s)     ->  ds = a * (da - sum(da * a))
    s = q k^T / sqrt(hs) -> dq = ds k / sqrt(hs),   dk = ds^T q / sqrt(hs)
    """
    q, k, v, a = cache
    scale = q.shape[-1] ** -0.5  # applied to the (.., hs) products, which are smaller than ds when T, S > hs
    dv = a.transpose(0, 1, 3, 2) @ dy  # (N, NH, S, hs)
    ds = softmax_backward(dy @ v.transpose(0, 1, 3, 2), a)  # (N, NH, T, S), the gradient of the unscaled q k^T
    dq = ds @ k
    dq *= scale
    dk = ds.transpose(0, 1, 3, 2) @ q
    dk *= scale
    return dq, dk, dv


class AttentionCache(NamedTuple):
    qkv: LinearCache  # input x (N, T, D) and W_qkv
    attend: AttendCache
    mask: Any  # GroupMaskCache of the head mask; None without one
    proj: LinearCache  # heads concatenated (N, T, D) and W_proj


def attention_forward(x, w_qkv, b_qkv, w_proj, b_proj, num_heads, head_mask=None):
    """Multi-head self-attention: x (N, T, D) -> proj(attend(qkv(x))) (N, T, D_out).

    head_mask (N, NH), optional: each head's output multiplied by its example's value before proj (Dynamic DiT's head
    gates); a head's hs channels are contiguous in merge_heads(y), so it is a group mask with NH groups."""
    (q, k, v), qkv_cache = qkv_forward(x, w_qkv, b_qkv, num_heads)
    y, attend_cache = attend_forward(q, k, v)
    h = merge_heads(y)  # (N, T, D)
    mask_cache = None
    if head_mask is not None:
        h, mask_cache = group_mask_forward(h, head_mask)
    out, proj_cache = linear_forward(h, w_proj, b_proj)
    return out, AttentionCache(qkv_cache, attend_cache, mask_cache, proj_cache)


def attention_backward(dout, cache):
    """Returns dx, dW_qkv, db_qkv, dW_proj, db_proj, and dhead_mask (N, NH) when the forward had a head mask."""
    dh, dw_proj, db_proj = linear_backward(dout, cache.proj)
    if cache.mask is not None:
        dh, dhead_mask = group_mask_backward(dh, cache.mask)
    dq, dk, dv = attend_backward(split_heads(dh, cache.attend.q.shape[1]), cache.attend)
    dx, dw_qkv, db_qkv = qkv_backward(dq, dk, dv, cache.qkv)
    grads = dx, dw_qkv, db_qkv, dw_proj, db_proj
    return grads if cache.mask is None else (*grads, dhead_mask)


# ----------------------------------------------------------------------------------------------
# Two-layer MLP: fc2(act(fc1(x))). GELU (tanh) in the blocks (timm's Mlp, ratio 4); SiLU in DiT's timestep embedder
# and SD3's pooled-text projection (Linear -> SiLU -> Linear)
# ----------------------------------------------------------------------------------------------
ACTIVATIONS = {"gelu": (gelu_forward, gelu_backward), "silu": (silu_forward, silu_backward)}


class MLPCache(NamedTuple):
    fc1: LinearCache
    act: Any  # GELUCache or SiLUCache
    mask: Any  # GroupMaskCache of the hidden mask; None without one
    fc2: LinearCache
    activation: str  # "gelu" or "silu"


def mlp_forward(x, w1, b1, w2, b2, activation="gelu", hidden_mask=None):
    """x (..., D) -> fc1 (..., H) -> activation -> fc2 (..., D_out).

    hidden_mask (N, G), optional, with x (N, T, D): the hidden units multiplied after the activation, each of the G
    values over H / G contiguous units (Dynamic DiT's group gates)."""
    h, fc1_cache = linear_forward(x, w1, b1)
    h, act_cache = ACTIVATIONS[activation][0](h)
    mask_cache = None
    if hidden_mask is not None:
        h, mask_cache = group_mask_forward(h, hidden_mask)
    out, fc2_cache = linear_forward(h, w2, b2)
    return out, MLPCache(fc1_cache, act_cache, mask_cache, fc2_cache, activation)


def mlp_backward(dout, cache):
    """Returns dx, dW1, db1, dW2, db2, and dhidden_mask (N, G) when the forward had a hidden mask."""
    dh, dw2, db2 = linear_backward(dout, cache.fc2)
    if cache.mask is not None:
        dh, dhidden_mask = group_mask_backward(dh, cache.mask)
    dh = ACTIVATIONS[cache.activation][1](dh, cache.act)
    dx, dw1, db1 = linear_backward(dh, cache.fc1)
    grads = dx, dw1, db1, dw2, db2
    return grads if cache.mask is None else (*grads, dhidden_mask)


# ----------------------------------------------------------------------------------------------
# adaLN-Zero's MLP half: what a block does with its attention's output (the second half of DiTBlock.forward),
# shared by DiT's block and by each token stream of MM-DiT's joint block:
#     x = x + gate_msa * attn_out
#     x = x + gate_mlp * mlp(modulate(LN(x), shift_mlp, scale_mlp))
# ----------------------------------------------------------------------------------------------
class AdaLNZeroMLPCache(NamedTuple):
    gate1: GateCache  # gate_msa and the attention's output
    norm2: AdaLNCache  # LayerNorm, then modulate with shift_mlp, scale_mlp
    mlp: MLPCache
    gate2: GateCache  # gate_mlp and the MLP's output


def adaln_zero_mlp_forward(x, attn_out, gate_msa, shift_mlp, scale_mlp, gate_mlp, w1, b1, w2, b2, hidden_mask=None):
    """x, attn_out (N, T, D), the four modulations (N, D) each, the GELU MLP's weights -> x (N, T, D), cache.
    hidden_mask (N, G), optional: mlp_forward's."""
    x, gate1_cache = gated_residual_forward(x, gate_msa, attn_out)
    h, norm2_cache = adaln_forward(x, shift_mlp, scale_mlp)
    h, mlp_cache = mlp_forward(h, w1, b1, w2, b2, hidden_mask=hidden_mask)
    x, gate2_cache = gated_residual_forward(x, gate_mlp, h)
    return x, AdaLNZeroMLPCache(gate1_cache, norm2_cache, mlp_cache, gate2_cache)


def adaln_zero_mlp_backward(dout, cache):
    """Returns dx, dattn_out, dgate_msa, dshift_mlp, dscale_mlp, dgate_mlp, dW1, db1, dW2, db2, and dhidden_mask when
    the forward had a hidden mask."""
    dx, dgate_mlp, dh = gated_residual_backward(dout, cache.gate2)
    dh, *dmlp = mlp_backward(dh, cache.mlp)
    dh, dshift_mlp, dscale_mlp = adaln_backward(dh, cache.norm2)
    dx = dx + dh  # the residual path plus the branch
    dx, dgate_msa, dattn_out = gated_residual_backward(dx, cache.gate1)
    return dx, dattn_out, dgate_msa, dshift_mlp, dscale_mlp, dgate_mlp, *dmlp


# ----------------------------------------------------------------------------------------------
# Patches. A p x p patch is flattened in (c, ph, pw) order, matching the Conv2d weight (D, C, p, p);
# tokens are in row-major order (token n = row * w + col). The output side (unpatchify) uses the
# official (p_row, p_col, c) order instead: channel fastest.
# These reshuffles are permutations: their backward is the inverse permutation, which needs the shapes and no
# activation, so the backward takes those shapes (p, and C, H, W where the gradient alone does not tell them) in
# place of a cache that would hold only them.
# ----------------------------------------------------------------------------------------------
def patchify(x, p):
    """(N, C, H, W) -> (N, T, C*p*p), T = (H/p)(W/p)."""
    N, C, H, W = x.shape
    h, w = H // p, W // p
    x = x.reshape(N, C, h, p, w, p).transpose(0, 2, 4, 1, 3, 5)  # (N, h, w, C, p, p)
    return x.reshape(N, h * w, C * p * p)


def patchify_backward(dtokens, C, H, W, p):
    """The exact inverse permutation of patchify: (N, T, C*p*p) -> (N, C, H, W)."""
    N = dtokens.shape[0]
    h, w = H // p, W // p
    d = dtokens.reshape(N, h, w, C, p, p).transpose(0, 3, 1, 4, 2, 5)  # (N, C, h, p, w, p)
    return d.reshape(N, C, H, W)


class PatchEmbedCache(NamedTuple):
    lin: LinearCache
    shape: tuple  # (N, C, H, W) of the input
    p: int


def patch_embed_forward(x, w, b, p):
    """Conv2d(C, D, kernel=p, stride=p) as patchify + matmul: x (N, C, H, W), w (D, C, p, p) -> (N, T, D)."""
    D = w.shape[0]
    out, lin_cache = linear_forward(patchify(x, p), w.reshape(D, -1), b)
    return out, PatchEmbedCache(lin_cache, x.shape, p)


def patch_embed_backward(dout, cache):
    """Returns dx (N, C, H, W), dw (D, C, p, p), db (D,)."""
    dtok, dw, db = linear_backward(dout, cache.lin)
    N, C, H, W = cache.shape
    return patchify_backward(dtok, C, H, W, cache.p), dw.reshape(-1, C, cache.p, cache.p), db


def unpatchify(x, p, C):
    """(N, T, p*p*C) -> (N, C, H, W), each token's vector ordered (p_row, p_col, c); square grid."""
    N, T, _ = x.shape
    h = w = math.isqrt(T)
    x = x.reshape(N, h, w, p, p, C).transpose(0, 5, 1, 3, 2, 4)  # (N, C, h, p_row, w, p_col)
    return x.reshape(N, C, h * p, w * p)


def unpatchify_backward(dout, p):
    """The inverse permutation: (N, C, H, W) -> (N, T, p*p*C)."""
    N, C, H, W = dout.shape
    h, w = H // p, W // p
    d = dout.reshape(N, C, h, p, w, p).transpose(0, 2, 4, 3, 5, 1)  # (N, h, w, p_row, p_col, C)
    return d.reshape(N, h * w, p * p * C)


def get_1d_sincos_pos_embed(dim, pos):
    """Fixed 1-D sin-cos embedding of positions pos (M,) -> (M, dim), float64 numpy:
    [sin(pos * omega), cos(pos * omega)] with omega_k = 10000^(-k / (dim/2)), k < dim/2."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))  # (dim/2,)
    out = np.outer(np.asarray(pos, dtype=np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Fixed 2-D sin-cos positional embedding (MAE), float64 numpy, shape (h*w, embed_dim) for grid_size = g
    (h = w = g) or (h, w).

    Token n sits at (row, col) = (n // w, n % w). The first D/2 dims encode the column, the last D/2 the
    row, each with get_1d_sincos_pos_embed (omega_k = 10000^(-k / (D/4)), k < D/4).
    """
    assert embed_dim % 4 == 0, "the 2-D sin-cos embedding needs a hidden size divisible by 4"
    h, w = (grid_size, grid_size) if np.ndim(grid_size) == 0 else grid_size
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    return np.concatenate([get_1d_sincos_pos_embed(embed_dim // 2, cols.ravel()),
                           get_1d_sincos_pos_embed(embed_dim // 2, rows.ravel())], axis=1)


# ----------------------------------------------------------------------------------------------
# Embeddings of the conditioning: the timestep embedder and the label table
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _timestep_frequencies(xp, half, max_period):
    """freqs_i = exp(-ln(max_period) i / half) in float32, computed once with numpy's exp and kept on xp.

    Computed on the host so that every backend multiplies t by the same numbers: a GPU's float32 exp may differ by
    one unit in the last place, which t * freqs turns into ~6e-5 at t = 999 (measured on an H200 with CuPy).
    """
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half)
    return to_device(freqs.astype(np.float32), xp)


def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal embedding of timesteps (GLIDE/ADM), computed in float32 as the official code.

    freqs_i = exp(-ln(max_period) i / half), i < half = dim // 2;   emb = [cos(t freqs), sin(t freqs)]
    (cos first), a zero column appended when dim is odd. t (N,) -> (N, dim). No gradient: t is an input.
    """
    xp = get_xp(t)
    half = dim // 2
    freqs = _timestep_frequencies(xp, half, max_period)  # (half,)
    args = t.astype(xp.float32)[:, None] * freqs[None]  # (N, half)
    emb = xp.concatenate([xp.cos(args), xp.sin(args)], axis=-1)
    if dim % 2:
        emb = xp.concatenate([emb, xp.zeros_like(emb[:, :1])], axis=-1)
    return emb


FREQ_DIM = 256  # size of the sinusoidal timestep embedding (DiT's frequency_embedding_size)


def timestep_embedder_forward(t, w1, b1, w2, b2):
    """DiT's TimestepEmbedder: t (N,) -> sinusoid (N, 256) -> Linear -> SiLU -> Linear -> (N, D), in w1's dtype.
    The cache is the MLP's (MLPCache)."""
    h = timestep_embedding(t, w1.shape[1]).astype(w1.dtype, copy=False)
    return mlp_forward(h, w1, b1, w2, b2, activation="silu")


def timestep_embedder_backward(dout, cache):
    """Returns dW1, db1, dW2, db2 (t gets no gradient)."""
    return mlp_backward(dout, cache)[1:]


class EmbeddingCache(NamedTuple):
    labels: Array  # (N,) int
    num_rows: int


def embedding_forward(labels, table):
    """Row lookup: labels (N,) int, table (K, D) -> (N, D)."""
    return table[labels], EmbeddingCache(labels, table.shape[0])


def embedding_backward(dout, cache):
    """dtable = onehot(labels)^T dout: (K, N) @ (N, D).

    A matmul instead of a scatter-add: it sums repeated labels correctly and deterministically on
    both backends (`table[idx] += v` silently drops duplicates; np.add.at does not exist in CuPy).
    """
    xp = get_xp(dout)
    onehot = (cache.labels[:, None] == xp.arange(cache.num_rows)[None, :]).astype(dout.dtype)  # (N, K)
    return onehot.T @ dout


# ----------------------------------------------------------------------------------------------
# DiT's final layer: shift, scale = Linear(silu(c)) (no gate); out = Linear(adaLN(x, shift, scale))
# ----------------------------------------------------------------------------------------------
class FinalLayerCache(NamedTuple):
    modulation: LinearCache  # input silu(c) (N, D)
    adaln: AdaLNCache
    linear: LinearCache


def final_layer_forward(x, c_act, w_mod, b_mod, w, b):
    """x (N, T, D), c_act = silu(c) (N, D) -> (N, T, p*p*C_out); the modulation's output is [shift | scale]."""
    mod, mod_cache = linear_forward(c_act, w_mod, b_mod)  # (N, 2D)
    shift, scale = chunks(mod, 2)
    h, adaln_cache = adaln_forward(x, shift, scale)
    out, lin_cache = linear_forward(h, w, b)
    return out, FinalLayerCache(mod_cache, adaln_cache, lin_cache)


def final_layer_backward(dout, cache):
    """Returns dx, dc_act, dW_mod, db_mod, dW, db."""
    dh, dw, db = linear_backward(dout, cache.linear)
    dx, dshift, dscale = adaln_backward(dh, cache.adaln)
    dc_act, dw_mod, db_mod = linear_backward(get_xp(dout).concatenate([dshift, dscale], axis=1), cache.modulation)
    return dx, dc_act, dw_mod, db_mod, dw, db


# ----------------------------------------------------------------------------------------------
# RMSNorm with a learned weight, over the last axis (SD3's qk norm):  y = x * rsqrt(mean(x^2) + eps) * w
# ----------------------------------------------------------------------------------------------
class RMSNormCache(NamedTuple):
    xhat: Array  # (..., D) x * rstd, before the weight
    rstd: Array  # (..., 1) 1 / sqrt(mean(x^2) + eps)
    w: Array  # (D,) the weight


def rmsnorm_forward(x, w, eps=1e-6):
    """x (..., D), w (D,) -> y (..., D):  xhat = x / sqrt(mean(x^2) + eps) (mean over the last axis),  y = xhat * w.

    No centring and no bias (diffusers' RMSNorm with elementwise_affine=True, bias=False)."""
    rstd = 1.0 / ((x * x).mean(axis=-1, keepdims=True) + eps) ** 0.5
    xhat = x * rstd
    return xhat * w, RMSNormCache(xhat, rstd, w)


def rmsnorm_backward(dy, cache):
    """Returns dx, dw.

    dw = sum over every leading axis of dy * xhat;  with g = dy * w (the gradient of xhat),
    dx = rstd * (g - xhat * mean(g * xhat)):  from xhat_i = x_i rstd and d rstd / dx_j = -rstd^3 x_j / D.
    """
    xhat, rstd, w = cache
    D = xhat.shape[-1]
    dw = sum_rows((dy * xhat).reshape(-1, D))
    g = dy * w
    return (g - xhat * (g * xhat).mean(axis=-1, keepdims=True)) * rstd, dw


def unpatchify_grid(x, p, C, h, w):
    """(N, h*w, p*p*C) -> (N, C, h*p, w*p) for an h x w grid of tokens (row-major), each token's vector ordered
    (p_row, p_col, c) as in unpatchify, which is the square case; the backward is unpatchify_backward."""
    N = x.shape[0]
    x = x.reshape(N, h, w, p, p, C).transpose(0, 5, 1, 3, 2, 4)  # (N, C, h, p_row, w, p_col)
    return x.reshape(N, C, h * p, w * p)
