"""Every DiT operation as a pair of pure functions (the CS231n contract):

    out, cache = op_forward(inputs...)       cache: a small NamedTuple of what backward needs
    grads...   = op_backward(dout, cache)    gradients of the loss w.r.t. each input, in input order

No state lives anywhere else, so two forwards followed by two backwards are fine. Every function takes
its array module from its inputs (`get_xp`), so the same code runs on NumPy and CuPy, and every
backward is checked against central differences in float64 in tests/test_layers.py.

Functions marked @fused also have a fused CUDA kernel (minidit.cuda_kernels) that CuPy runs instead, one pass
over memory in place of several; the code here is the reference, which NumPy runs and the kernels are tested against.

Shapes: N batch, T tokens, D hidden size, NH heads, hs = D / NH head size, p patch size, C channels.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

from .backend import fused, get_xp, to_device

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
def layernorm_forward(x, eps=1e-6):
    """x (..., D) -> xhat (..., D); biased variance, eps = 1e-6 as in DiT."""
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)
    rstd = 1.0 / (var + eps) ** 0.5
    xhat = xc * rstd
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
# adaLN modulate: out = x * (1 + scale) + shift, with shift, scale (N, D) broadcast over the T tokens
# ----------------------------------------------------------------------------------------------
class ModulateCache(NamedTuple):
    x: Array  # (N, T, D)
    scale: Array  # (N, D)


@fused
def modulate_forward(x, shift, scale):
    """x (N, T, D), shift (N, D), scale (N, D) -> (N, T, D)."""
    out = x * (1 + scale[:, None, :])
    out += shift[:, None, :]
    return out, ModulateCache(x, scale)


def modulate_backward(dout, cache):
    """dx = dout (1 + scale),   dshift = sum_T dout,   dscale = sum_T dout * x."""
    x, scale = cache
    dx = dout * (1 + scale[:, None, :])
    dshift = sum_rows(dout)
    dscale = sum_rows(dout * x)
    return dx, dshift, dscale


# ----------------------------------------------------------------------------------------------
# Gated residual (the "Zero" of adaLN-Zero): out = x + gate * y, gate (N, D) broadcast over tokens
# ----------------------------------------------------------------------------------------------
class GateCache(NamedTuple):
    gate: Array  # (N, D)
    y: Array  # (N, T, D) the branch output


@fused
def gated_residual_forward(x, gate, y):
    """x, y (N, T, D), gate (N, D) -> x + gate[:, None] * y."""
    return x + gate[:, None, :] * y, GateCache(gate, y)


def gated_residual_backward(dout, cache):
    """dx = dout,   dgate = sum_T dout * y,   dy = dout * gate."""
    gate, y = cache
    dgate = sum_rows(dout * y)
    dy = dout * gate[:, None, :]
    return dout, dgate, dy


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
def gelu_forward(x):
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    y = _gelu_tanh(x)  # y = 0.5 x (1 + th), in place
    y += 1
    y *= x
    y *= 0.5
    return y, GELUCache(x)


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
def softmax_forward(s):
    """Softmax over the last axis, shifted by the row max for stability. Returns (a, a): a is its own cache."""
    xp = get_xp(s)
    a = s - s.max(axis=-1, keepdims=True)
    xp.exp(a, out=a)
    a /= a.sum(axis=-1, keepdims=True)
    return a, a


@fused
def softmax_backward(da, a):
    """The softmax Jacobian is diag(a) - a a^T, so ds = a * (da - sum(da * a))  (sum over the last axis)."""
    ds = da * a
    ds -= a * ds.sum(axis=-1, keepdims=True)
    return ds


# ----------------------------------------------------------------------------------------------
# Multi-head attention. Self-attention (timm's Attention): qkv = x W_qkv^T + b laid out [q | k | v], each
# split into NH contiguous heads; a = softmax(q k^T / sqrt(hs)); y = a v; heads concatenated; out = proj(y).
# Cross-attention (the paper's cross-attention block): the same, with k and v computed from other tokens.
# ----------------------------------------------------------------------------------------------
def attend_forward(q, k, v):
    """Scaled dot-product attention of every head: q (N, NH, T, hs), k and v (N, NH, S, hs) -> y (N, NH, T, hs).

    a = softmax(q k^T / sqrt(hs)) over the S keys (N, NH, T, S);  y = a v.   Returns y, a.
    """
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(0, 1, 3, 2)  # (N, NH, T, S) scores; q scaled first, as timm does
    a, _ = softmax_forward(s)
    return a @ v, a


def attend_backward(dy, q, k, v, a):
    """Returns dq, dk, dv of attend_forward.

    y = a v            ->  da = dy v^T,   dv = a^T dy
    a = softmax(s)     ->  ds = a * (da - sum(da * a))
    s = q k^T / sqrt(hs) -> dq = ds k / sqrt(hs),   dk = ds^T q / sqrt(hs)
    """
    scale = q.shape[-1] ** -0.5  # applied to the (.., hs) products, which are smaller than ds when T, S > hs
    dv = a.transpose(0, 1, 3, 2) @ dy  # (N, NH, S, hs)
    ds = softmax_backward(dy @ v.transpose(0, 1, 3, 2), a)  # (N, NH, T, S), the gradient of the unscaled q k^T
    dq = ds @ k
    dq *= scale
    dk = ds.transpose(0, 1, 3, 2) @ q
    dk *= scale
    return dq, dk, dv


def split_heads(x, num_heads):
    """(N, T, D) -> (N, NH, T, hs), contiguous: each head is read by two batched matmuls, and CuPy would copy a
    strided operand at every one of them."""
    N, T, D = x.shape
    return get_xp(x).ascontiguousarray(x.reshape(N, T, num_heads, D // num_heads).transpose(0, 2, 1, 3))


def merge_heads(x):
    """(N, NH, T, hs) -> (N, T, D): the heads side by side, as the projection reads them."""
    N, NH, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(N, T, NH * hs)


class AttentionCache(NamedTuple):
    qkv: LinearCache  # input x (N, T, D) and W_qkv
    q: Array  # (N, NH, T, hs)
    k: Array  # (N, NH, T, hs)
    v: Array  # (N, NH, T, hs)
    a: Array  # (N, NH, T, T) attention probabilities
    proj: LinearCache  # heads concatenated (N, T, D) and W_proj


def attention_forward(x, w_qkv, b_qkv, w_proj, b_proj, num_heads):
    """Multi-head self-attention (timm's Attention, fused qkv laid out [q | k | v]): x (N, T, D) -> (N, T, D)."""
    N, T, D = x.shape
    hs = D // num_heads
    qkv, c_qkv = linear_forward(x, w_qkv, b_qkv)  # (N, T, 3D)
    qkv = qkv.reshape(N, T, 3, num_heads, hs).transpose(2, 0, 3, 1, 4)  # (3, N, NH, T, hs)
    q, k, v = get_xp(x).ascontiguousarray(qkv)  # each (N, NH, T, hs), contiguous as in split_heads
    y, a = attend_forward(q, k, v)
    out, c_proj = linear_forward(merge_heads(y), w_proj, b_proj)  # (N, T, D)
    return out, AttentionCache(c_qkv, q, k, v, a, c_proj)


def attention_backward(dout, cache):
    """Returns dx, dW_qkv, db_qkv, dW_proj, db_proj."""
    c_qkv, q, k, v, a, c_proj = cache
    xp = get_xp(dout)
    N, NH, T, hs = q.shape
    dy, dw_proj, db_proj = linear_backward(dout, c_proj)  # (N, T, D)
    dqkv = xp.empty((N, T, 3, NH, hs), dtype=dout.dtype)  # the [q | k | v] layout of the qkv output
    dqkv_heads = dqkv.transpose(2, 0, 3, 1, 4)  # (3, N, NH, T, hs) view into dqkv
    dqkv_heads[0], dqkv_heads[1], dqkv_heads[2] = attend_backward(split_heads(dy, NH), q, k, v, a)
    dx, dw_qkv, db_qkv = linear_backward(dqkv.reshape(N, T, 3 * NH * hs), c_qkv)
    return dx, dw_qkv, db_qkv, dw_proj, db_proj


class CrossAttentionCache(NamedTuple):
    q_lin: LinearCache  # input x (N, T, D) and W_q
    kv_lin: LinearCache  # input ctx (N, S, D) and W_kv
    q: Array  # (N, NH, T, hs)
    k: Array  # (N, NH, S, hs)
    v: Array  # (N, NH, S, hs)
    a: Array  # (N, NH, T, S)
    proj: LinearCache


def cross_attention_forward(x, ctx, w_q, b_q, w_kv, b_kv, w_proj, b_proj, num_heads):
    """Multi-head cross-attention: the T tokens of x query the S tokens of ctx. x (N, T, D), ctx (N, S, D) -> (N, T, D).

    q = x W_q^T + b_q;   [k | v] = ctx W_kv^T + b_kv;   out = proj(attend(q, k, v))   (heads as in self-attention)
    """
    N, S, D = ctx.shape
    q, c_q = linear_forward(x, w_q, b_q)  # (N, T, D)
    kv, c_kv = linear_forward(ctx, w_kv, b_kv)  # (N, S, 2D)
    kv = kv.reshape(N, S, 2, num_heads, D // num_heads).transpose(2, 0, 3, 1, 4)  # (2, N, NH, S, hs)
    q, (k, v) = split_heads(q, num_heads), get_xp(x).ascontiguousarray(kv)
    y, a = attend_forward(q, k, v)
    out, c_proj = linear_forward(merge_heads(y), w_proj, b_proj)
    return out, CrossAttentionCache(c_q, c_kv, q, k, v, a, c_proj)


def cross_attention_backward(dout, cache):
    """Returns dx, dctx, dW_q, db_q, dW_kv, db_kv, dW_proj, db_proj."""
    N, NH, S, hs = cache.k.shape
    dy, dw_proj, db_proj = linear_backward(dout, cache.proj)
    dq, dk, dv = attend_backward(split_heads(dy, NH), cache.q, cache.k, cache.v, cache.a)
    dx, dw_q, db_q = linear_backward(merge_heads(dq), cache.q_lin)
    dkv = get_xp(dout).stack([dk, dv]).transpose(1, 3, 0, 2, 4).reshape(N, S, 2 * NH * hs)  # [k | v] layout
    dctx, dw_kv, db_kv = linear_backward(dkv, cache.kv_lin)
    return dx, dctx, dw_q, db_q, dw_kv, db_kv, dw_proj, db_proj


# ----------------------------------------------------------------------------------------------
# MLP (timm's Mlp, ratio 4): fc2(gelu(fc1(x)))
# ----------------------------------------------------------------------------------------------
class MLPCache(NamedTuple):
    fc1: LinearCache
    gelu: GELUCache
    fc2: LinearCache


def mlp_forward(x, w1, b1, w2, b2):
    """x (N, T, D) -> fc1 (N, T, 4D) -> GELU -> fc2 (N, T, D)."""
    h, c1 = linear_forward(x, w1, b1)
    h, cg = gelu_forward(h)
    out, c2 = linear_forward(h, w2, b2)
    return out, MLPCache(c1, cg, c2)


def mlp_backward(dout, cache):
    """Returns dx, dW1, db1, dW2, db2."""
    dh, dw2, db2 = linear_backward(dout, cache.fc2)
    dh = gelu_backward(dh, cache.gelu)
    dx, dw1, db1 = linear_backward(dh, cache.fc1)
    return dx, dw1, db1, dw2, db2


# ----------------------------------------------------------------------------------------------
# Patches. A p x p patch is flattened in (c, ph, pw) order, matching the Conv2d weight (D, C, p, p);
# tokens are in row-major order (token n = row * w + col). The output side (unpatchify) uses the
# official (p_row, p_col, c) order instead: channel fastest.
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
    out, c = linear_forward(patchify(x, p), w.reshape(D, -1), b)
    return out, PatchEmbedCache(c, x.shape, p)


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


# ----------------------------------------------------------------------------------------------
# Embeddings of the conditioning
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
    """Sinusoidal embedding of integer timesteps (GLIDE/ADM), computed in float32 as the official code.

    freqs_i = exp(-ln(max_period) i / half), i < half = dim // 2;   emb = [cos(t freqs), sin(t freqs)]
    (cos first), a zero column appended when dim is odd. t (N,) -> (N, dim). No gradient: t is an integer.
    """
    xp = get_xp(t)
    half = dim // 2
    freqs = _timestep_frequencies(xp, half, max_period)  # (half,)
    args = t.astype(xp.float32)[:, None] * freqs[None]  # (N, half)
    emb = xp.concatenate([xp.cos(args), xp.sin(args)], axis=-1)
    if dim % 2:
        emb = xp.concatenate([emb, xp.zeros_like(emb[:, :1])], axis=-1)
    return emb


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


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Fixed 2-D sin-cos positional embedding (MAE), float64 numpy, shape (grid_size**2, embed_dim).

    Token n sits at (row, col) = (n // g, n % g). The first D/2 dims encode the column, the last D/2 the
    row; each half is [sin(pos * omega), cos(pos * omega)] with omega_k = 10000^(-k / (D/4)), k < D/4.
    """
    assert embed_dim % 4 == 0, "the 2-D sin-cos embedding needs a hidden size divisible by 4"
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                             indexing="ij")  # each (g, g)

    def emb_1d(dim, pos):  # pos (M,) -> (M, dim)
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))  # (dim/2,)
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([emb_1d(embed_dim // 2, cols.ravel()), emb_1d(embed_dim // 2, rows.ravel())], axis=1)
