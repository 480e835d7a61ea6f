"""Fused CUDA kernels for the CuPy backend: one pass over memory where the array code makes several.

Each function here is registered with ``@kernel_for(reference)`` as the kernel of a readable array-code twin of the
same name and signature (in minidit.layers or minidit.optim), marked ``xp.fused``: NumPy and the strict test backend
always run that reference; CuPy runs the kernel below unless fused kernels are switched off
(``MINIDIT_FUSED_KERNELS=0`` in the environment, or ``xp.set_fused_kernels(False)``). Importing this module registers
them (``backend.get_backend("cupy")`` does). Kernels return arrays and read caches; the caches are built in layers.
tests/test_cuda_kernels.py checks every kernel against its reference on a GPU, in float32 and float64. The formulas
are written next to the references; here only how.

Why they pay: on a GPU the composed array code is bound by memory traffic, not arithmetic. The tanh-GELU
forward, for example, is six elementwise passes over the (N, T, 4D) activation in array code and one here.

Three kinds:
  * elementwise (cupy.ElementwiseKernel): GELU, modulate, the gated residual, the AdamW and EMA updates; the
    type T is float or double, taken from the arrays;
  * row-wise (cupy.RawModule, one warp of 32 threads per row of the last axis, the row's sums and maxima reduced
    with warp shuffles): LayerNorm and softmax, forward and backward. Rows are read from global memory a second
    (third) time rather than held in registers, so any row length works;
  * one that is not a kernel of ours: sum_rows, the bias-gradient reduction, as a matmul with a ones vector.
"""
from __future__ import annotations

import functools
import inspect

import cupy as cp
import numpy as np

from . import layers, optim
from .layers import GELU_A, GELU_C
from .xp import KERNELS


def kernel_for(reference):
    """Register the decorated function as the CuPy kernel of `reference` (a @fused function): same name and the
    same signature, checked here, so a kernel cannot drift from the code it replaces."""
    def register(kernel):
        want, got = inspect.signature(reference.reference), inspect.signature(kernel)
        if kernel.__name__ != reference.__name__ or want != got:
            raise TypeError(f"kernel {kernel.__name__}{got} does not match its reference {reference.__name__}{want}")
        KERNELS[reference.__name__] = kernel
        return kernel

    return register

# ----------------------------------------------------------------------------------------------
# elementwise kernels
# ----------------------------------------------------------------------------------------------
_gelu_fwd = cp.ElementwiseKernel(
    "T x", "T y",
    f"T th = tanh((T){GELU_C!r} * (x + (T){GELU_A!r} * x * x * x)); y = (T)0.5 * x * ((T)1 + th);",
    "minidit_gelu_fwd")

_gelu_bwd = cp.ElementwiseKernel(
    "T dy, T x", "T dx",
    f"T th = tanh((T){GELU_C!r} * (x + (T){GELU_A!r} * x * x * x));"
    f" dx = dy * ((T)0.5 * ((T)1 + th)"
    f" + (T){0.5 * GELU_C!r} * x * ((T)1 + (T){3 * GELU_A!r} * x * x) * ((T)1 - th * th));",
    "minidit_gelu_bwd")

_modulate = cp.ElementwiseKernel(
    "T x, T shift, T scale", "T y", "y = x * ((T)1 + scale) + shift", "minidit_modulate")

_gated_residual = cp.ElementwiseKernel(
    "T x, T gate, T h", "T y", "y = x + gate * h", "minidit_gated_residual")

_adamw = cp.ElementwiseKernel(
    "T g, T keep, T b1, T b2, T bc2_sqrt, T eps, T step_size", "T p, T m, T v",
    """
    p *= keep;
    m += ((T)1 - b1) * (g - m);
    v = b2 * v + ((T)1 - b2) * (g * g);
    p -= step_size * (m / (sqrt(v) / bc2_sqrt + eps));
    """,
    "minidit_adamw")

_ema = cp.ElementwiseKernel("T p, T d", "T e", "e = d * (e - p) + p", "minidit_ema")


@kernel_for(layers.gelu)
def gelu(x):
    return _gelu_fwd(x)


@kernel_for(layers.gelu_backward)
def gelu_backward(dy, cache):
    return _gelu_bwd(dy, cache.x)


@kernel_for(layers.modulate)
def modulate(x, shift, scale):
    return _modulate(x, shift[:, None, :], scale[:, None, :])


@kernel_for(layers.gated_residual)
def gated_residual(x, gate, y):
    return _gated_residual(x, gate[:, None, :], y)


@kernel_for(layers.sum_rows)
def sum_rows(x):
    ones = cp.ones((*x.shape[:-2], 1, x.shape[-2]), dtype=x.dtype)  # (..., 1, M)
    return (ones @ x)[..., 0, :]


@kernel_for(optim.adamw_update)
def adamw_update(p, g, m, v, keep, step_size, bc2_sqrt, b1, b2, eps):
    dt = p.dtype.type
    _adamw(g, dt(keep), dt(b1), dt(b2), dt(bc2_sqrt), dt(eps), dt(step_size), p, m, v)


@kernel_for(optim.ema_update)
def ema_update(e, p, d):
    _ema(p, p.dtype.type(d), e)


# ----------------------------------------------------------------------------------------------
# row-wise kernels: one warp per row of length n; `rows` rows, contiguous
# ----------------------------------------------------------------------------------------------
_ROWWISE_SOURCE = r"""
#define WARP_SUM(x)  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o)
#define WARP_MAX(x)  for (int o = 16; o > 0; o /= 2) { T y_ = __shfl_xor_sync(0xffffffffu, x, o); x = y_ > x ? y_ : x; }
#define ROW_SETUP                                                                   \
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  \
    int lane = threadIdx.x % 32;                                                    \
    if (row >= rows) return;                                                        \
    long long base = row * n;

// xhat = (x - mean) / sqrt(var + eps), var biased; rstd[row] = 1 / sqrt(var + eps)
extern "C" __global__ void layernorm_fwd(const T* x, T* xhat, T* rstd, T eps, long long rows, int n) {
    ROW_SETUP
    T s = 0;
    for (int i = lane; i < n; i += 32) s += x[base + i];
    WARP_SUM(s);
    T mu = s / n;
    T q = 0;
    for (int i = lane; i < n; i += 32) { T d = x[base + i] - mu; q += d * d; }
    WARP_SUM(q);
    T r = (T)1 / SQRT(q / n + eps);
    for (int i = lane; i < n; i += 32) xhat[base + i] = (x[base + i] - mu) * r;
    if (lane == 0) rstd[row] = r;
}

// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
extern "C" __global__ void layernorm_bwd(const T* dxhat, const T* xhat, const T* rstd, T* dx,
                                         long long rows, int n) {
    ROW_SETUP
    T a = 0, b = 0;
    for (int i = lane; i < n; i += 32) { T g = dxhat[base + i]; a += g; b += g * xhat[base + i]; }
    WARP_SUM(a);
    WARP_SUM(b);
    a /= n;
    b /= n;
    T r = rstd[row];
    for (int i = lane; i < n; i += 32) dx[base + i] = (dxhat[base + i] - a - xhat[base + i] * b) * r;
}

// a = exp(s - max s) / sum exp(s - max s)
extern "C" __global__ void softmax_fwd(const T* s, T* a, long long rows, int n) {
    ROW_SETUP
    T m = s[base];
    for (int i = lane; i < n; i += 32) m = s[base + i] > m ? s[base + i] : m;
    WARP_MAX(m);
    T z = 0;
    for (int i = lane; i < n; i += 32) { T e = EXP(s[base + i] - m); a[base + i] = e; z += e; }
    WARP_SUM(z);
    T inv = (T)1 / z;
    for (int i = lane; i < n; i += 32) a[base + i] *= inv;
}

// ds = a * (da - sum(da * a))
extern "C" __global__ void softmax_bwd(const T* da, const T* a, T* ds, long long rows, int n) {
    ROW_SETUP
    T dot = 0;
    for (int i = lane; i < n; i += 32) dot += da[base + i] * a[base + i];
    WARP_SUM(dot);
    for (int i = lane; i < n; i += 32) ds[base + i] = a[base + i] * (da[base + i] - dot);
}
"""

_WARPS_PER_BLOCK = 8
_CTYPES = {np.dtype(np.float32): "typedef float T;\n#define EXP expf\n#define SQRT sqrtf\n",
           np.dtype(np.float64): "typedef double T;\n#define EXP exp\n#define SQRT sqrt\n"}


@functools.lru_cache(maxsize=None)
def _rowwise_module(dtype):
    """The row-wise kernels compiled for one dtype (T = float or double); compiled once per process."""
    if dtype not in _CTYPES:
        raise TypeError(f"the fused row-wise kernels support float32 and float64, not {dtype}")
    return cp.RawModule(code=_CTYPES[dtype] + _ROWWISE_SOURCE)


def _launch(name, x, *args):
    """Run row-wise kernel `name` over the rows of x's last axis with arguments (*args, rows, n)."""
    rows, n = x.size // x.shape[-1], x.shape[-1]
    kernel = _rowwise_module(x.dtype).get_function(name)
    grid = ((rows + _WARPS_PER_BLOCK - 1) // _WARPS_PER_BLOCK,)
    kernel(grid, (32 * _WARPS_PER_BLOCK,), (*args, np.int64(rows), np.int32(n)))


@kernel_for(layers.layernorm)
def layernorm(x, eps):
    x = cp.ascontiguousarray(x)
    xhat = cp.empty_like(x)
    rstd = cp.empty((*x.shape[:-1], 1), dtype=x.dtype)
    _launch("layernorm_fwd", x, x, xhat, rstd, x.dtype.type(eps))
    return xhat, rstd


@kernel_for(layers.layernorm_backward)
def layernorm_backward(dxhat, cache):
    dxhat = cp.ascontiguousarray(dxhat)
    dx = cp.empty_like(dxhat)
    _launch("layernorm_bwd", dxhat, dxhat, cache.xhat, cache.rstd, dx)
    return dx


@kernel_for(layers.softmax)
def softmax(s):
    s = cp.ascontiguousarray(s)
    a = cp.empty_like(s)
    _launch("softmax_fwd", s, s, a)
    return a


@kernel_for(layers.softmax_backward)
def softmax_backward(da, a):
    da = cp.ascontiguousarray(da)
    ds = cp.empty_like(da)
    _launch("softmax_bwd", da, da, a, ds)
    return ds
