"""The fused CUDA kernels (minidit.cuda_kernels) against their array-code references, on a GPU.

Each @fused function is called twice on the same CuPy arrays: as dispatched (the kernel) and as
``f.reference`` (the composed array code NumPy runs). Skipped without CuPy and a CUDA device.
"""
import numpy as np
import pytest

from conftest import require_backend
from minidit import layers as L
from minidit.xp import set_fused_kernels
from minidit.optim import adamw_update, ema_update

TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-11, atol=1e-12)}
# last-axis lengths: one element, under a warp, not a multiple of 32, DiT widths, a long attention row
ROW_SHAPES = [(3, 1), (5, 7), (2, 9, 33), (4, 16, 384), (2, 3, 1152), (1, 2, 4100)]
DTYPES = [np.float32, np.float64]


@pytest.fixture(scope="module")
def cp():
    return require_backend("cupy")


def check_close(name, got, want, dtype, atol=None):
    got, want = got.get(), want.get()
    assert got.shape == want.shape and got.dtype == want.dtype == dtype, (name, got.shape, want.shape, got.dtype)
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    print(f"{name}: max abs diff {err:.3e}")
    tol = dict(TOL[dtype], **({} if atol is None else {"atol": atol}))
    np.testing.assert_allclose(got, want, err_msg=name, **tol)


def randn(cp, shape, dtype, scale=1.0, seed=0):
    return cp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, dtype=dtype)


def test_kernels_run_only_when_enabled(cp):
    x = randn(cp, (4, 8), np.float32)
    previous = set_fused_kernels(False)
    try:
        y_ref, _ = L.gelu_forward(x)
    finally:
        set_fused_kernels(previous)
    y, _ = L.gelu_forward(x)
    check_close("gelu via dispatch, kernels off vs on", y, y_ref, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_layernorm(cp, shape, dtype):
    x = randn(cp, shape, dtype, scale=3.0) + 2.0  # a non-zero mean, so the centring matters
    dxhat = randn(cp, shape, dtype, seed=1)
    xhat, rstd = L.layernorm(x, 1e-6)
    xhat_ref, rstd_ref = L.layernorm.reference(x, 1e-6)
    check_close("layernorm xhat", xhat, xhat_ref, dtype)
    check_close("layernorm rstd", rstd, rstd_ref, dtype)
    cache, cache_ref = L.LayerNormCache(xhat, rstd), L.LayerNormCache(xhat_ref, rstd_ref)
    check_close("layernorm dx", L.layernorm_backward(dxhat, cache), L.layernorm_backward.reference(dxhat, cache_ref),
                dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_softmax(cp, shape, dtype):
    s = randn(cp, shape, dtype, scale=30.0)  # large logits: the max shift must hold exp in range
    da = randn(cp, shape, dtype, seed=1)
    a = L.softmax(s)
    a_ref = L.softmax.reference(s)
    check_close("softmax a", a, a_ref, dtype)
    check_close("softmax ds", L.softmax_backward(da, a), L.softmax_backward.reference(da, a_ref), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rowwise_kernels_read_strided_views(cp, dtype):
    x = randn(cp, (6, 40, 24), dtype).transpose(0, 2, 1)  # (6, 24, 40), last axis not contiguous
    check_close("softmax of a view", L.softmax(x), L.softmax.reference(x), dtype)
    check_close("layernorm of a view", L.layernorm(x, 1e-6)[0], L.layernorm.reference(x, 1e-6)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 5), (300, 7), (4, 65, 33), (2, 256, 384)])
def test_sum_rows(cp, shape, dtype):
    x = randn(cp, shape, dtype)
    atol = TOL[dtype]["atol"] * shape[-2] ** 0.5 * 10  # sums in another order: rounding grows like sqrt(M)
    check_close("sum_rows", L.sum_rows(x), L.sum_rows.reference(x), dtype, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu(cp, dtype):
    x = randn(cp, (3, 17, 96), dtype, scale=3.0)
    dy = randn(cp, x.shape, dtype, seed=1)
    y, cache = L.gelu_forward(x)
    check_close("gelu y", y, L.gelu.reference(x), dtype)
    assert cache.x is x  # the cache is the input alone; both backwards recompute tanh
    check_close("gelu dx", L.gelu_backward(dy, cache), L.gelu_backward.reference(dy, cache), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_modulate_and_gated_residual(cp, dtype):
    x, h = randn(cp, (3, 10, 48), dtype), randn(cp, (3, 10, 48), dtype, seed=1)
    a, b = randn(cp, (3, 48), dtype, seed=2), randn(cp, (3, 48), dtype, seed=3)
    check_close("modulate", L.modulate(x, a, b), L.modulate.reference(x, a, b), dtype)
    check_close("gated residual", L.gated_residual(x, a, h), L.gated_residual.reference(x, a, h), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep", [1.0, 1.0 - 1e-3 * 0.05])
def test_adamw_and_ema_updates(cp, dtype, keep):
    state = [randn(cp, (64, 33), dtype, seed=s) for s in range(3)]  # p, m, v (v made positive below)
    state[2] = state[2] ** 2 * 1e-3
    fused_state, ref_state = [a.copy() for a in state], [a.copy() for a in state]
    for t in range(1, 4):
        g = randn(cp, (64, 33), dtype, scale=0.1, seed=10 + t)
        args = (keep, 1e-3 / (1 - 0.9**t), (1 - 0.999**t) ** 0.5, 0.9, 0.999, 1e-8)
        adamw_update(fused_state[0], g, *fused_state[1:], *args)
        adamw_update.reference(ref_state[0], g, *ref_state[1:], *args)
    for name, got, want in zip("pmv", fused_state, ref_state):
        check_close(f"adamw {name}", got, want, dtype)
    e, e_ref, p = state[1].copy(), state[1].copy(), state[0]
    ema_update(e, p, 0.999)
    ema_update.reference(e_ref, p, 0.999)
    check_close("ema", e, e_ref, dtype)


def test_dit_training_step_fused_vs_reference(cp):
    """A whole float32 step of a DiT at random parameters: the loss and every gradient, kernels on vs off."""
    from minidit.diffusion import Diffusion
    from minidit.model import DiT

    rng = np.random.default_rng(0)
    model = DiT("mini/4", input_size=16, in_channels=4, num_classes=10, seed=0, backend="cupy")
    for name, p in model.params.items():  # random parameters: at the adaLN-Zero init most gradients are zero
        p[...] = cp.asarray(rng.standard_normal(p.shape) * 0.05, dtype=p.dtype)
    diffusion = Diffusion("")
    x0 = cp.asarray(rng.standard_normal((8, 4, 16, 16)), dtype=cp.float32)
    noise = cp.asarray(rng.standard_normal((8, 4, 16, 16)), dtype=cp.float32)
    t, y = cp.asarray(rng.integers(0, 1000, 8)), cp.asarray(rng.integers(0, 10, 8))

    def step():
        out, cache = model.forward(diffusion.q_sample(x0, t, noise), t, y)
        loss, _, dout = diffusion.training_loss(out, x0, t, noise)
        return float(loss), model.backward(dout, cache)

    loss, grads = step()
    previous = set_fused_kernels(False)
    try:
        loss_ref, grads_ref = step()
    finally:
        set_fused_kernels(previous)
    print(f"loss fused {loss:.7f} reference {loss_ref:.7f}")
    assert abs(loss - loss_ref) <= 1e-5 * abs(loss_ref)
    for name, g_ref in grads_ref.items():
        scale = float(cp.abs(g_ref).max()) + 1e-12
        err = float(cp.abs(grads[name] - g_ref).max())
        assert err <= 1e-4 * scale, (name, err, scale)
