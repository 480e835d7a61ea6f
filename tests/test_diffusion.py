"""Tests of minidit.diffusion against the official DiT diffusion (facebookresearch/DiT diffusion/: docs/dit-facts.md).

Reference figures come from the facts file; gradients are checked by central differences in float64.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from minidit.diffusion import (
    Diffusion,
    cfg_model_fn,
    discretized_gaussian_log_likelihood,
    get_beta_schedule,
    space_timesteps,
)
from minidit.gradcheck import numerical_grad, rel_error


@pytest.fixture(scope="module")
def d1000():
    return Diffusion("")


# ----------------------------------------------------------------------------------------------------
# schedule, posterior, respacing


def test_linear_schedule_reference_values(d1000):
    betas = get_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, rel=1e-12) and betas[-1] == pytest.approx(0.02, rel=1e-12)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    # other T keep the same ab range: scale 1000 / T
    assert get_beta_schedule("linear", 250)[0] == pytest.approx(4e-4)
    d = d1000
    assert d.num_timesteps == 1000
    assert np.allclose(d.betas, betas, rtol=1e-10, atol=0)  # recomputed from ab, equal up to rounding
    assert d.alphas_cumprod[999] == pytest.approx(4.035829765e-05, rel=1e-9)
    assert math.sqrt(d.alphas_cumprod[999]) == pytest.approx(0.0063528181, rel=1e-8)
    assert d.alphas_cumprod_prev[0] == 1.0
    assert np.log(d.betas[0]) == pytest.approx(-9.21034037, rel=1e-8)
    assert np.allclose(d.sqrt_recip_alphas_cumprod ** 2 * d.alphas_cumprod, 1.0)
    assert np.allclose(d.sqrt_recipm1_alphas_cumprod ** 2, 1.0 / d.alphas_cumprod - 1.0)


def test_cosine_schedule_follows_squared_cosine():
    T = 100
    betas = get_beta_schedule("squaredcos_cap_v2", T)
    assert np.array_equal(betas, get_beta_schedule("cosine", T))
    assert betas.max() <= 0.999 and betas.min() > 0
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    ab = np.cumprod(1 - betas)
    # ab_t = f((t+1)/T) / f(0) until the 0.999 cap acts (only at the very end)
    expect = np.array([f((t + 1) / T) / f(0) for t in range(T)])
    assert np.allclose(ab[:-1], expect[:-1], rtol=1e-10)
    with pytest.raises(ValueError):
        get_beta_schedule("quadratic", T)


def test_posterior_reference_values(d1000):
    d = d1000
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_variance[1] == pytest.approx(5.45318766e-05, rel=1e-8)
    assert d.posterior_log_variance_clipped[0] == pytest.approx(-9.81672514, rel=1e-9)
    assert d.posterior_log_variance_clipped[1] == pytest.approx(-9.81672514, rel=1e-9)
    assert d.posterior_mean_coef1[0] == 1.0 and d.posterior_mean_coef2[0] == 0.0
    assert d.posterior_mean_coef1[999] == pytest.approx(1.2835149e-04, rel=1e-7)
    assert d.posterior_mean_coef2[999] == pytest.approx(0.98994868, rel=1e-8)


def test_posterior_is_bayes_rule(d1000):
    """q(x_{t-1}|x_t,x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(ab_{t-1}) x_0, 1-ab_{t-1}): precision-weighted."""
    d = d1000
    t = np.arange(1, 1000)
    a, b, abp = 1 - d.betas[t], d.betas[t], d.alphas_cumprod_prev[t]
    prec = a / b + 1 / (1 - abp)
    assert np.allclose(d.posterior_variance[t], 1 / prec, rtol=1e-9)
    assert np.allclose(d.posterior_mean_coef2[t], np.sqrt(a) / b / prec, rtol=1e-9)  # coefficient of x_t
    assert np.allclose(d.posterior_mean_coef1[t], np.sqrt(abp) / (1 - abp) / prec, rtol=1e-9)  # of x_0
    assert np.allclose(d.posterior_log_variance_clipped[1:], np.log(d.posterior_variance[1:]))


def test_space_timesteps_official_sets():
    s250 = sorted(space_timesteps(1000, "250"))
    assert len(s250) == 250 and s250[:3] == [0, 4, 8] and s250[-5:] == [983, 987, 991, 995, 999]
    s50 = sorted(space_timesteps(1000, "50"))
    assert len(s50) == 50 and s50[:6] == [0, 20, 41, 61, 82, 102] and s50[-3:] == [958, 979, 999]
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert space_timesteps(1000, [1000]) == set(range(1000))
    assert space_timesteps(1000, "1") == {0}
    # sections: 300 steps as 10 + 15 + 20 over three parts of 100. The second part's stride 99/14 is summed step
    # by step as in the official respace.py, so the 8th offset is round(49.4999...) = 49, not round(7*99/14) = 50.
    s = space_timesteps(300, "10,15,20")
    assert s == space_timesteps(300, [10, 15, 20])
    assert len(s) == 45
    assert sorted(x for x in s if x < 100) == list(range(0, 100, 11))
    assert 149 in s and 150 not in s
    assert sorted(x for x in s if x >= 200)[::19] == [200, 299]
    # uneven split: 10 steps in 3 parts -> sizes 4, 3, 3
    assert space_timesteps(10, [2, 2, 2]) == {0, 3, 4, 6, 7, 9}
    with pytest.raises(ValueError):
        space_timesteps(100, "ddim33")  # no integer stride gives exactly 33 steps
    with pytest.raises(ValueError):
        space_timesteps(10, [11])


def test_respaced_schedule(d1000):
    d = Diffusion("250")
    assert d.num_timesteps == 250
    assert d.timestep_map.dtype == np.int64
    assert list(d.timestep_map[:3]) == [0, 4, 8] and list(d.timestep_map[-3:]) == [991, 995, 999]
    assert np.all(np.diff(d.timestep_map) > 0)
    for i, ref in [(0, 1e-4), (1, 5.99066e-4), (2, 9.17603e-4), (249, 0.0775193)]:
        assert d.betas[i] == pytest.approx(ref, rel=1e-5)
    # ab' at the kept steps is the base ab exactly
    assert np.allclose(d.alphas_cumprod, d1000.alphas_cumprod[d.timestep_map], rtol=1e-12)
    # the posterior of the respaced chain uses the respaced betas
    assert d.posterior_variance[1] == pytest.approx(d.betas[1] * (1 - d.alphas_cumprod[0]) / (1 - d.alphas_cumprod[1]))
    assert np.array_equal(Diffusion(None).timestep_map, np.arange(1000))
    assert np.array_equal(d1000.timestep_map, np.arange(1000))
    assert Diffusion("ddim50").num_timesteps == 50


# ----------------------------------------------------------------------------------------------------
# forward process and p_mean_variance


def test_q_sample_formula(d1000):
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 3, 2, 2, 2))
    t = np.array([0, 999, 123])
    xt = d1000.q_sample(x0, t, noise)
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t][:, None, None, None]
    assert np.allclose(xt, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise, rtol=1e-12, atol=1e-14)
    xt32 = d1000.q_sample(x0.astype(np.float32), t, noise.astype(np.float32))
    assert xt32.dtype == np.float32 and np.allclose(xt32, xt, atol=1e-6)
    # respaced: index i is original step timestep_map[i]
    d = Diffusion("250")
    assert np.allclose(d.q_sample(x0, np.array([0, 249, 1]), noise), d1000.q_sample(x0, np.array([0, 999, 4]), noise))


def test_p_mean_variance_learned_range(d1000):
    d = d1000
    rng = np.random.default_rng(1)
    N, C = 3, 2
    x_t = rng.standard_normal((N, C, 2, 2))
    eps = rng.standard_normal((N, C, 2, 2))
    t = np.array([0, 1, 700])
    lo = d.posterior_log_variance_clipped[t][:, None, None, None]
    hi = np.log(d.betas[t])[:, None, None, None]
    for v, expect in [(-1.0, lo), (1.0, hi), (0.0, (lo + hi) / 2), (3.0, 2 * hi - lo)]:  # v is not clamped
        out = d.p_mean_variance(np.concatenate([eps, np.full_like(eps, v)], 1), x_t, t)
        assert np.allclose(out["log_variance"], expect + 0 * x_t)
        assert np.allclose(out["variance"], np.exp(expect) + 0 * x_t)
    ab = d.alphas_cumprod[t][:, None, None, None]
    x0 = (x_t - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    assert np.allclose(out["pred_xstart"], x0)
    c1, c2 = d.posterior_mean_coef1[t][:, None, None, None], d.posterior_mean_coef2[t][:, None, None, None]
    assert np.allclose(out["mean"], c1 * x0 + c2 * x_t)
    clipped = d.p_mean_variance(np.concatenate([eps, eps], 1), x_t, t, clip_denoised=True)
    assert np.allclose(clipped["pred_xstart"], np.clip(x0, -1, 1))
    assert np.allclose(clipped["mean"], c1 * np.clip(x0, -1, 1) + c2 * x_t)


def test_p_mean_variance_fixed_large():
    d = Diffusion("", learn_sigma=False)
    x = np.zeros((2, 1, 1, 1))
    out = d.p_mean_variance(x, x, np.array([0, 5]))
    assert out["variance"][0].item() == pytest.approx(d.posterior_variance[1])  # beta_0 replaced by bt_1
    assert out["variance"][1].item() == pytest.approx(d.betas[5])
    with pytest.raises(AssertionError):
        d.p_mean_variance(np.zeros((2, 2, 1, 1)), x, np.array([0, 5]))  # no variance channels without learn_sigma


# ----------------------------------------------------------------------------------------------------
# training loss: values


def test_loss_smoke_values_at_init(d1000):
    """Zero model output (DiT at init), x_0 ~ N(0, 1): facts 3.7 give mse ~ 1, vb ~ 1.97 / 0.63 / ~0.01 at t = 0 / 1 / 500, 999."""
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((16, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((16, 4, 8, 8)).astype(np.float32)
    out = np.zeros((16, 8, 8, 8), np.float32)
    vb = {}
    for t in [0, 1, 500, 999]:
        loss, terms, _ = d1000.training_loss(out, x0, np.full(16, t), noise)
        assert abs(float(terms["mse"].mean()) - 1.0) < 0.05
        assert float(loss) == pytest.approx(float((terms["mse"] + terms["vb"]).mean()), rel=1e-6)
        vb[t] = float(terms["vb"].mean())
    # KL / NLL in bits: forgetting the / ln 2 gives 1.38 and 0.44 here
    assert vb[0] == pytest.approx(1.97, abs=0.06)
    assert vb[1] == pytest.approx(0.63, abs=0.03)
    assert 0.003 < vb[500] < 0.02 and 0.003 < vb[999] < 0.03


def test_vb_is_zero_at_the_true_posterior(d1000):
    """eps = the true noise and v = -1 give mu_theta = mu_tilde and log s2 = log bt: KL = 0 for t > 0."""
    rng = np.random.default_rng(2)
    x0, noise = rng.standard_normal((2, 3, 2, 4, 4))
    t = np.array([1, 400, 999])
    _, terms, _ = d1000.training_loss(np.concatenate([noise, -np.ones_like(noise)], 1), x0, t, noise)
    assert np.allclose(terms["vb"], 0.0, atol=1e-9) and np.allclose(terms["mse"], 0.0)
    _, terms, _ = d1000.training_loss(np.concatenate([noise, np.ones_like(noise)], 1), x0, t, noise)
    # any other variance costs something: ~ (log beta_t - log bt_t)^2 / 4, which shrinks to ~1e-13 bits at t = 999
    assert np.all(terms["vb"] > 0) and np.all(terms["vb"][:2] > 1e-7)


def test_decoder_nll_against_exact_normal_cdf(d1000):
    """At t = 0 with eps = noise, mu_theta = x_0; compare with the bin probability under the exact normal CDF."""
    Phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    x0 = np.array([0.3, -0.999, -1.0, 1.0]).reshape(4, 1, 1, 1)
    noise = np.random.default_rng(3).standard_normal(x0.shape)
    v = np.full_like(x0, 0.4)
    _, terms, _ = d1000.training_loss(np.concatenate([noise, v], 1), x0, np.zeros(4, int), noise)
    lo, hi = d1000.posterior_log_variance_clipped[0], np.log(d1000.betas[0])
    sigma = math.exp(0.5 * (0.7 * hi + 0.3 * lo))
    z = (1 / 255) / sigma
    expect = [
        -math.log2(Phi(z) - Phi(-z)),  # interior bin
        -math.log2(Phi(z) - Phi(-z)),  # -0.999 is not below -0.999: still the interior formula
        -math.log2(Phi(z)),  # lowest bin: (-inf, x + 1/255]
        -math.log2(1 - Phi(-z)),  # highest bin: [x - 1/255, inf)
    ]
    # the tanh CDF approximation is good to ~1e-3 relative here
    assert np.allclose(terms["vb"], expect, rtol=2e-3)
    assert terms["vb"][2] < terms["vb"][0]


# ----------------------------------------------------------------------------------------------------
# training loss: gradients by finite differences (float64)


def _loss_frozen(d, mo, x0, t, noise, C):
    """Mean loss with eps feeding vb as a constant: mse(mo) + vb([eps0 | v(mo)]), eps0 fixed at mo's current eps."""
    eps0 = mo[:, :C].copy()

    def f():
        _, terms, _ = d.training_loss(mo, x0, t, noise)
        if not d.learn_sigma:
            return terms["mse"].mean()
        _, terms_vb, _ = d.training_loss(np.concatenate([eps0, mo[:, C:]], 1), x0, t, noise)
        return terms["mse"].mean() + terms_vb["vb"].mean()

    return f


def _make_case(seed, N, C, H, W, learn_sigma, t_kind, offset):
    rng = np.random.default_rng(seed)
    # x_0 in [-1.2, 1.2] with some values pinned on and around the edges of the discretized likelihood
    x0 = rng.uniform(-1.2, 1.2, (N, C, H, W))
    edges = np.array([-1.05, -1.0, -0.9995, -0.998, 0.998, 0.9995, 1.0, 1.05])
    mask = rng.random(x0.shape) < 0.4
    x0[mask] = rng.choice(edges, size=mask.sum())
    noise = rng.standard_normal(x0.shape)
    # eps near the true noise keeps mu_theta within a few sigma of x_0 at t = 0, where the bin probabilities are not
    # so small that finite differences drown in cancellation
    eps = noise + offset * rng.standard_normal(x0.shape)
    parts = [eps, rng.uniform(-1.5, 1.5, x0.shape)] if learn_sigma else [eps]
    mo = np.concatenate(parts, 1)
    t = {"zero": np.zeros(N, int), "small": rng.integers(1, 20, N), "mid": rng.integers(20, 200, N),
         "any": rng.integers(0, 1000, N)}[t_kind]
    return mo, x0, t, noise


def _vb_frozen(d, mo, x0, t, noise, C):
    """Mean vb as a function of the variance channels only (eps fixed at mo's current eps)."""
    eps0 = mo[:, :C].copy()
    return lambda: d.training_loss(np.concatenate([eps0, mo[:, C:]], 1), x0, t, noise)[1]["vb"].mean()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    N=st.integers(1, 3),
    C=st.integers(1, 3),
    HW=st.integers(1, 4),
    learn_sigma=st.booleans(),
    t_kind=st.sampled_from(["zero", "small", "mid", "any"]),
    offset=st.floats(0.05, 1.0),
)
def test_training_loss_gradient(d1000, seed, N, C, HW, learn_sigma, t_kind, offset):
    d = d1000 if learn_sigma else Diffusion("", learn_sigma=False)
    mo, x0, t, noise = _make_case(seed, N, C, HW, HW, learn_sigma, t_kind, offset)
    loss, terms, dout = d.training_loss(mo, x0, t, noise)
    assert dout.shape == mo.shape and dout.dtype == np.float64
    assert float(loss) == pytest.approx(float(terms["loss"].mean()))
    num = numerical_grad(_loss_frozen(d, mo, x0, t, noise, C), mo)
    assert rel_error(dout, num) < 1e-6
    if learn_sigma and t_kind != "any":
        # The variance channels alone, against finite differences of vb alone: their gradient is far smaller than
        # the eps channels'. Past t ~ 200 it is so small (log beta_t - log bt_t -> 0) that central differences of
        # the KL, which cancels O(1) terms down to O(dlogvar^2), stop resolving it: see the next test.
        num_v = numerical_grad(_vb_frozen(d, mo, x0, t, noise, C), mo, h=1e-5)
        assert rel_error(dout[:, C:], num_v[:, C:]) < 2e-5


@pytest.mark.parametrize("t", [300, 500, 999])
def test_variance_gradient_at_large_t(d1000, t):
    """Large t: step v so that log s2 moves by 1e-6 (dlogvar/dv = (log beta_t - log bt_t)/2 is ~4e-7 at t = 999)."""
    C = 2
    mo, x0, _, noise = _make_case(t, 1, C, 2, 2, True, "zero", 0.3)
    tt = np.array([t])
    _, _, dout = d1000.training_loss(mo, x0, tt, noise)
    k = (np.log(d1000.betas[t]) - d1000.posterior_log_variance_clipped[t]) / 2
    num = numerical_grad(_vb_frozen(d1000, mo, x0, tt, noise, C), mo, h=1e-6 / k)
    assert np.abs(dout[:, C:]).max() > 0
    assert rel_error(dout[:, C:], num[:, C:]) < 1e-2


def test_training_loss_gradient_decoder_all_branches(d1000):
    """t = 0 with x_0 below -0.999, above 0.999 and in between, each branch contributing a nonzero gradient."""
    N, C, H, W = 2, 3, 4, 4
    mo, x0, t, noise = _make_case(7, N, C, H, W, True, "zero", 0.5)
    low, high = x0 < -0.999, x0 > 0.999
    mid = ~(low | high)
    assert low.sum() >= 5 and high.sum() >= 5 and mid.sum() >= 5
    _, _, dout = d1000.training_loss(mo, x0, t, noise)
    num = numerical_grad(_loss_frozen(d1000, mo, x0, t, noise, C), mo)
    dv, nv = dout[:, C:], num[:, C:]
    for branch in (low, high, mid):
        assert np.abs(dv[branch]).max() > 1e-6
        assert rel_error(dv[branch], nv[branch]) < 1e-6
    assert rel_error(dout, num) < 1e-7


def test_vb_gradient_reaches_only_variance_channels(d1000):
    """Frozen mean: the eps channels get exactly the mse gradient, though vb does depend on eps."""
    N, C, H, W = 2, 2, 3, 3
    for t_kind in ["zero", "small"]:
        mo, x0, t, noise = _make_case(11, N, C, H, W, True, t_kind, 0.5)
        _, _, dout = d1000.training_loss(mo, x0, t, noise)
        eps = mo[:, :C]
        assert np.allclose(dout[:, :C], 2 * (eps - noise) / eps.size, rtol=1e-12, atol=0)
        # unfrozen, vb would pass a gradient of this size into eps: the test above is not vacuous
        vb_grad = numerical_grad(lambda: d1000.training_loss(mo, x0, t, noise)[1]["vb"].mean(), mo)
        assert np.abs(vb_grad[:, :C]).max() > 1e-3 * np.abs(dout[:, :C]).max()
        assert rel_error(vb_grad[:, C:], dout[:, C:]) < 1e-6  # vb is the only term on v


def test_no_vb_without_learn_sigma():
    d = Diffusion("", learn_sigma=False)
    rng = np.random.default_rng(5)
    x0, noise, eps = rng.standard_normal((3, 2, 3, 2, 2))
    loss, terms, dout = d.training_loss(eps, x0, np.array([0, 10]), noise)
    assert set(terms) == {"mse", "loss"}
    assert np.allclose(terms["loss"], ((eps - noise) ** 2).mean(axis=(1, 2, 3)))
    assert np.allclose(dout, 2 * (eps - noise) / eps.size)


def test_training_loss_keeps_float32(d1000):
    rng = np.random.default_rng(6)
    x0, noise = rng.standard_normal((2, 2, 2, 4, 4)).astype(np.float32)
    mo = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    t = np.array([0, 300])
    loss, terms, dout = d1000.training_loss(mo, x0, t, noise)
    assert loss.dtype == np.float32 and loss.shape == ()
    assert all(v.dtype == np.float32 and v.shape == (2,) for v in terms.values())
    assert dout.dtype == np.float32 and dout.shape == mo.shape
    loss64, _, dout64 = d1000.training_loss(mo.astype(np.float64), x0.astype(np.float64), t, noise.astype(np.float64))
    assert float(loss) == pytest.approx(float(loss64), rel=1e-4)
    assert rel_error(dout, dout64) < 1e-4


def test_discretized_likelihood_gradient_direct():
    """d logp / d log_scale of the helper itself, per branch, with means and scales across the useful range."""
    rng = np.random.default_rng(8)
    x = np.array([-1.0, -1.0, 0.2, 0.2, 1.0, 1.0, -0.5, 0.999])
    means = x + np.array([0.01, -0.02, 0.005, -0.03, 0.02, -0.01, 0.0, 0.004])
    log_scales = np.log(rng.uniform(0.004, 0.02, x.shape))
    _, g = discretized_gaussian_log_likelihood(x, means, log_scales)
    num = numerical_grad(lambda: discretized_gaussian_log_likelihood(x, means, log_scales)[0].sum(), log_scales)
    assert rel_error(g, num) < 1e-7


# ----------------------------------------------------------------------------------------------------
# samplers


def _noise_model(eps_true, learn_sigma, v=0.0):
    """A model that always predicts the given noise (and a constant variance value)."""
    def model_fn(x, t):
        return np.concatenate([eps_true, np.full_like(eps_true, v)], 1) if learn_sigma else eps_true
    return model_fn


def test_ddim_eta0_recovers_x0_from_true_noise(d1000):
    """x_T = q_sample(x_0, T, eps) and a model that predicts eps: DDIM (eta 0) stays on that line and returns x_0."""
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 2, 3, 4, 4))
    for resp in ["50", "ddim25", ""]:
        d = Diffusion(resp, learn_sigma=False)
        xT = d.q_sample(x0, np.full(2, d.num_timesteps - 1), eps)
        out = d.ddim_sample_loop(_noise_model(eps, False), xT, np.random.default_rng(1))
        assert np.abs(out - x0).max() < 1e-8, resp
    # float32 stays float32 and is close
    d = Diffusion("50")
    xT = d.q_sample(x0, np.full(2, 49), eps).astype(np.float32)
    out = d.ddim_sample_loop(_noise_model(eps.astype(np.float32), True), xT, np.random.default_rng(1))
    assert out.dtype == np.float32 and np.abs(out - x0).max() < 1e-3
    # eta > 0 adds noise at the intermediate steps, so the same run no longer lands on x_0
    out = d.ddim_sample_loop(_noise_model(eps, True), xT.astype(np.float64), np.random.default_rng(1), eta=1.0)
    assert np.abs(out - x0).max() > 1e-3


def test_p_sample_loop_point_mass_and_timesteps(d1000):
    """Data = a point mass at x_0 and the exact eps for it: every step's x0_hat is x_0, and the last step
    (t = 0: coef1 = 1, coef2 = 0, no noise) returns x_0 exactly. Noise added at t = 0 would show at ~7e-3."""
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 2, 2, 2))
    d = Diffusion("25")
    base = d1000.alphas_cumprod
    seen = []

    def model_fn(x, t_model):
        seen.append(t_model.copy())
        assert t_model.dtype == np.int64 and t_model.shape == (3,)
        ab = base[t_model][:, None, None, None]  # the model sees original steps
        eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
        return np.concatenate([eps, rng.uniform(-1, 1, x.shape)], 1)

    out = d.p_sample_loop(model_fn, rng.standard_normal(x0.shape), np.random.default_rng(1))
    assert np.abs(out - x0).max() < 1e-9
    assert [int(s[0]) for s in seen] == list(d.timestep_map[::-1])
    assert all((s == s[0]).all() for s in seen)
    assert int(seen[0][0]) == 999 and int(seen[-1][0]) == 0


def test_p_sample_loop_draws_noise_every_step():
    class CountingRng:
        def __init__(self):
            self.calls, self.rng = [], np.random.default_rng(0)

        def standard_normal(self, shape, dtype=np.float64):
            self.calls.append((shape, dtype))
            return self.rng.standard_normal(shape, dtype=dtype)

    d = Diffusion("10")
    x = np.zeros((2, 1, 2, 2), np.float32)
    r = CountingRng()
    out = d.p_sample_loop(_noise_model(np.zeros_like(x), True), x, r)
    assert len(r.calls) == 10 and all(c == ((2, 1, 2, 2), np.float32) for c in r.calls)
    assert out.dtype == np.float32
    r = CountingRng()
    d.ddim_sample_loop(_noise_model(np.zeros_like(x), True), x, r)
    assert len(r.calls) == 10


def test_progress_bar_changes_nothing():
    d = Diffusion("4")
    x = np.random.default_rng(0).standard_normal((1, 1, 2, 2))
    model = _noise_model(0.5 * x, True, v=0.3)
    a = d.p_sample_loop(model, x, np.random.default_rng(1), progress=True)
    b = d.p_sample_loop(model, x, np.random.default_rng(1), progress=False)
    assert np.array_equal(a, b)
    a = d.ddim_sample_loop(model, x, np.random.default_rng(1), progress=True)
    assert np.array_equal(a, d.ddim_sample_loop(model, x, np.random.default_rng(1)))


def test_samplers_reproduce_gaussian_data():
    """Data x_0 ~ N(0, 0.5^2) per element, with the exact E[eps | x_t] = sqrt(1-ab) x_t / (ab s^2 + 1 - ab):
    1000-step DDPM (learned range at v = -1, and fixed large) and DDIM (eta 0 and 1) all give std ~ 0.5.
    A sampler that skips the noise or uses the wrong variance or eps sign lands far away (0.0-0.3 or > 0.7)."""
    s = 0.5
    base = Diffusion("").alphas_cumprod

    def oracle(learn_sigma):
        def model_fn(x, t_model):
            ab = base[t_model][:, None, None, None]
            eps = np.sqrt(1 - ab) * x / (ab * s * s + 1 - ab)
            return np.concatenate([eps, -np.ones_like(x)], 1) if learn_sigma else eps
        return model_fn

    noise = np.random.default_rng(0).standard_normal((16, 4, 8, 8))
    runs = {
        "ddpm learned": Diffusion("").p_sample_loop(oracle(True), noise, np.random.default_rng(1)),
        "ddpm fixed": Diffusion("", learn_sigma=False).p_sample_loop(oracle(False), noise, np.random.default_rng(1)),
        "ddim eta 0": Diffusion("").ddim_sample_loop(oracle(True), noise, np.random.default_rng(1)),
        "ddim eta 1": Diffusion("").ddim_sample_loop(oracle(True), noise, np.random.default_rng(1), eta=1.0),
    }
    for name, out in runs.items():
        assert abs(out.std() - s) < 0.025, (name, out.std())
        assert abs(out.mean()) < 0.03, (name, out.mean())


def test_respaced_samplers_land_on_the_data_with_the_exact_denoiser():
    """Data = 5 images (uniform mixture) and the exact posterior mean E[x_0 | x_t] as the model: respaced DDPM
    (learned range) and DDIM with clipping must each end on one of the images, not between them. This is the
    sampler half of "does training give digits?": with a perfect network the samplers are exact."""
    rng = np.random.default_rng(0)
    data = np.sign(rng.standard_normal((5, 2 * 4 * 4)))  # (K, C*H*W), pixels +-1 like binary images
    base = Diffusion("").alphas_cumprod

    def model_fn(x, t_model):
        ab = base[t_model][:, None]  # (N, 1)
        xf = x.reshape(len(x), -1)  # (N, P)
        logw = -((xf[:, None] - np.sqrt(ab)[:, :, None] * data[None]) ** 2).sum(-1) / (2 * (1 - ab))  # (N, K)
        w = np.exp(logw - logw.max(1, keepdims=True))
        x0 = (w / w.sum(1, keepdims=True)) @ data  # (N, P) posterior mean
        eps = ((xf - np.sqrt(ab) * x0) / np.sqrt(1 - ab)).reshape(x.shape)
        return np.concatenate([eps, np.zeros_like(eps)], 1)  # v = 0: the middle of the learned range

    noise = rng.standard_normal((12, 2, 4, 4))
    d = Diffusion("50")
    for name, out in [("ddpm", d.p_sample_loop(model_fn, noise, np.random.default_rng(1), clip_denoised=True)),
                      ("ddim", d.ddim_sample_loop(model_fn, noise, np.random.default_rng(1), clip_denoised=True)),
                      ("dpm++2m", Diffusion("20").sample(model_fn, noise, None, sampler="dpm++2m")),
                      ("dpm++2m 10", Diffusion("10").sample(model_fn, noise, None, sampler="dpm++2m"))]:
        dist = ((out.reshape(12, 1, -1) - data[None]) ** 2).mean(-1).min(1)  # (12,) to the nearest image
        assert dist.max() < 1e-4, (name, dist)


def test_dpm_solver_is_second_order_on_gaussian_data():
    """Data N(0, s^2) per element and the exact eps: the probability-flow ODE maps x_T to s x_T / sqrt(ab_T s^2 + 1 -
    ab_T) exactly. From 10 to 80 steps DDIM's error (first order) falls 8x (2x per doubling), DPM-Solver++(2M)'s
    about 130x (measured: 0.22, 0.054, 0.0042, 0.0017; second order, with a first-order last step whose size depends
    on the rounding of the grid), and DPM-Solver++ is the more accurate at every step count (24x at 80 steps)."""
    s = 0.5
    base = Diffusion("").alphas_cumprod

    def model_fn(x, t_model):
        ab = base[t_model][:, None, None, None]
        return np.sqrt(1 - ab) * x / (ab * s * s + 1 - ab)

    noise = np.random.default_rng(0).standard_normal((8, 1, 4, 4))
    rng = np.random.default_rng(1)  # DDIM draws noise even at eta = 0 (times zero)
    # the ODE solution from the solver's first visited step t = 999: x_t = sqrt(ab) x0 + sqrt(1-ab) eps is Gaussian
    # with variance ab s^2 + 1 - ab, and the flow maps it to x0 = s x_t / sqrt(ab s^2 + 1 - ab)
    exact = s * noise / np.sqrt(base[999] * s * s + 1 - base[999])
    err = {}
    for n in (10, 20, 40, 80):
        err["dpm", n] = np.abs(Diffusion(str(n)).sample(model_fn, noise, None, sampler="dpm++2m") - exact).max()
        err["ddim", n] = np.abs(Diffusion(str(n), learn_sigma=False).ddim_sample_loop(model_fn, noise, rng)
                                - exact).max()
    for n in (10, 20, 40):
        assert 1.8 < err["ddim", n] / err["ddim", 2 * n] < 2.2, err  # first order
    assert err["dpm", 10] / err["dpm", 80] > 50 and err["ddim", 10] / err["ddim", 80] < 10, err
    assert all(err["dpm", n] < err["ddim", n] for n in (10, 20, 40, 80)) and err["dpm", 80] < err["ddim", 80] / 10, err



# ----------------------------------------------------------------------------------------------------
# classifier-free guidance


def _fake_forward(calls):
    """A deterministic, dtype-keeping 'network' whose output depends on x, t and the label (so cond != uncond)."""
    def forward(x, t, y):
        calls.append((x.copy(), t.copy(), y.copy()))
        C = x.shape[1]
        b = lambda a: a.astype(x.dtype)[:, None, None, None]  # (2N,) -> (2N, 1, 1, 1)
        base = 0.1 * x * b(1 + 0.01 * (y % 7)) + b(1e-4 * t)  # (2N, C, H, W)
        null_bump = b(y == 1000) * (0.1 * np.arange(2 * C, dtype=x.dtype))[None, :, None, None]
        return np.concatenate([base, base], 1) + null_bump  # (2N, 2C, H, W)
    return forward


def test_cfg_model_fn():
    rng = np.random.default_rng(0)
    N, C = 3, 4
    x = rng.standard_normal((N, C, 2, 2))
    t = np.array([7, 7, 7], np.int64)
    y = np.array([1, 5, 999])
    calls = []
    forward = _fake_forward(calls)
    full = forward(np.concatenate([x, x]), np.concatenate([t, t]), np.concatenate([y, [1000] * N]))
    cond, uncond = full[:N], full[N:]
    calls.clear()

    for g, scale in [(None, 4.0), (3, 1.5), (C, 0.0)]:
        out = cfg_model_fn(forward, y, 1000, scale, guide_channels=g)(x, t)
        assert len(calls) == 1  # one forward on the doubled batch
        xx, tt, yy = calls.pop()
        assert np.array_equal(xx, np.concatenate([x, x])) and np.array_equal(tt, np.concatenate([t, t]))
        assert np.array_equal(yy, np.concatenate([y, [1000] * N]))
        gc = C if g is None else g  # None: every eps channel (x_t has C channels)
        assert out.shape == (N, 2 * C, 2, 2)
        assert np.allclose(out[:, :gc], uncond[:, :gc] + scale * (cond[:, :gc] - uncond[:, :gc]))
        assert np.array_equal(out[:, gc:], cond[:, gc:])  # unguided channels keep the conditional values
        assert not np.allclose(out[:, :gc], cond[:, :gc]) or scale == 1.0
    # scale 1 is the conditional forward
    out = cfg_model_fn(forward, y, 1000, 1.0)(x, t)
    assert np.allclose(out, cond)
    # float32 in, float32 out
    out32 = cfg_model_fn(forward, y, 1000, 4.0)(x.astype(np.float32), t)
    assert out32.dtype == np.float32


def test_cfg_inside_sampler():
    """cfg_model_fn plugs into the loops: the network sees a doubled batch of original timesteps."""
    calls = []
    d = Diffusion("5")
    fn = cfg_model_fn(_fake_forward(calls), np.array([3, 4]), 1000, 2.0, guide_channels=3)
    out = d.p_sample_loop(fn, np.zeros((2, 4, 2, 2), np.float32), np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == (2, 4, 2, 2) and np.isfinite(out).all()
    assert [int(c[1][0]) for c in calls] == list(d.timestep_map[::-1])
    assert all(c[0].shape[0] == 4 and c[1].dtype == np.int64 for c in calls)


def test_fewer_than_two_steps_is_a_clear_error():
    with pytest.raises(ValueError, match="keeps 1 step"):
        Diffusion("1")
