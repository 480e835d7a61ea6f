"""Rectified flow (minidit.flow, SD3's convention): the path, the loss and its gradient in float64, the time
densities and shift, the Euler and Heun samplers against the exact velocity field of a small data set, and the
objective through train -> checkpoint -> sample."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minidit import train as train_mod
from minidit.checkpoint import load
from minidit.flow import RectifiedFlow, shift_time
from minidit.gradcheck import numerical_grad, rel_error
from minidit.sample import main as sample_main

seeds = st.integers(0, 2**31 - 1)


def test_the_path_is_a_straight_line_from_data_to_noise():
    rf = RectifiedFlow()
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((3, 2, 4, 4)), rng.standard_normal((3, 2, 4, 4))
    t = np.array([0.0, 0.25, 1.0])
    x_t = rf.q_sample(x0, t, eps)
    np.testing.assert_array_equal(x_t[0], x0[0])  # t = 0 is data
    np.testing.assert_allclose(x_t[1], 0.75 * x0[1] + 0.25 * eps[1], rtol=1e-15)
    np.testing.assert_array_equal(x_t[2], eps[2])  # t = 1 is noise
    # the velocity d x_t / dt is eps - x0 everywhere on the line
    h = 1e-6
    dx = (rf.q_sample(x0, t[1:2].repeat(3) + h, eps) - rf.q_sample(x0, t[1:2].repeat(3) - h, eps)) / (2 * h)
    np.testing.assert_allclose(dx, eps - x0, rtol=1e-8, atol=1e-8)


@given(seed=seeds, N=st.integers(1, 3), C=st.integers(1, 3), S=st.integers(1, 3))
def test_loss_value_and_gradient_in_float64(seed, N, C, S):
    rf = RectifiedFlow()
    rng = np.random.default_rng(seed)
    x0, eps, out = (rng.standard_normal((N, C, S, S)) for _ in range(3))
    t = rf.sample_t(N, rng)
    loss, terms, dout = rf.training_loss(out, x0, t, eps)
    assert float(loss) == pytest.approx(float(np.mean((out - (eps - x0)) ** 2)), rel=1e-14)
    np.testing.assert_allclose(terms["mse"], ((out - (eps - x0)) ** 2).reshape(N, -1).mean(1), rtol=1e-14)
    num = numerical_grad(lambda: rf.training_loss(out, x0, t, eps)[0], out)
    assert rel_error(dout, num, floor=1e-3) < 1e-7
    assert dout.dtype == out.dtype


def test_loss_refuses_a_learned_sigma_output():
    rf = RectifiedFlow()
    with pytest.raises(ValueError, match="--no-learn-sigma"):
        rf.training_loss(np.zeros((1, 4, 2, 2)), np.zeros((1, 2, 2, 2)), np.array([0.5]), np.zeros((1, 2, 2, 2)))


def test_time_densities_and_the_shift():
    rng = np.random.default_rng(0)
    t = RectifiedFlow().sample_t(200_000, rng)
    assert 0 < t.min() and t.max() < 1
    assert abs(np.median(t) - 0.5) < 0.01  # sigmoid(N(0, 1)): symmetric about 1/2
    assert abs(np.mean((t > 0.25) & (t < 0.75)) - 0.7317) < 0.01  # P(|N(0,1)| < logit(0.75) = 1.0986)
    u = RectifiedFlow(time_sampling="uniform").sample_t(200_000, rng)
    assert abs(u.mean() - 0.5) < 0.01 and abs(np.mean(u < 0.1) - 0.1) < 0.01
    s = np.linspace(0, 1, 11)
    np.testing.assert_array_equal(shift_time(s, 1.0), s)
    assert shift_time(0.5, 3.0) == pytest.approx(0.75) and shift_time(1.0, 3.0) == 1.0 and shift_time(0.0, 3.0) == 0
    grid = RectifiedFlow(shift=3.0, num_steps=4).timesteps()
    assert grid[0] == 1.0 and grid[-1] == 0.0 and np.all(np.diff(grid) < 0)
    np.testing.assert_allclose(grid, shift_time(np.linspace(1, 0, 5), 3.0))
    assert RectifiedFlow().model_time(0.25) == 250.0  # the network sees 1000 t, as SD3's sigma * 1000
    with pytest.raises(ValueError, match="unknown time sampling"):
        RectifiedFlow(time_sampling="mode")


def exact_velocity(points):
    """The velocity field of the flow whose data is `points` (K, D) equally weighted: v(x, t) = (x - E[x0 | x_t]) / t,
    E[x0 | x_t] = sum_k w_k x_k with w_k proportional to exp(-|x - (1 - t) x_k|^2 / (2 t^2))."""
    def v(x, t_model):
        t = float(t_model[0]) / 1000.0
        flat = x.reshape(len(x), -1)
        d2 = ((flat[:, None, :] - (1 - t) * points[None]) ** 2).sum(-1)  # (N, K)
        w = np.exp(-(d2 - d2.min(1, keepdims=True)) / (2 * t * t))
        x0 = (w / w.sum(1, keepdims=True)) @ points
        return ((flat - x0) / t).reshape(x.shape)
    return v


def test_samplers_land_on_the_data_with_the_exact_velocity():
    """With the exact velocity field of 5 points, Euler and Heun carry noise onto the data points, every point
    reached by some of the samples; a single point is reached from anywhere (the field is linear in x)."""
    rng = np.random.default_rng(0)
    points = rng.uniform(-1, 1, size=(5, 8))
    noise = rng.standard_normal((200, 2, 2, 2))
    for sampler in ("euler", "heun"):
        x = RectifiedFlow(num_steps=20).sample(exact_velocity(points), noise, sampler=sampler).reshape(200, -1)
        d = np.sqrt(((x[:, None] - points[None]) ** 2).sum(-1))  # (200, 5)
        assert d.min(1).max() < 1e-6, sampler
        assert np.bincount(d.argmin(1), minlength=5).min() >= 10, sampler  # no point is lost
    one = RectifiedFlow(num_steps=3, shift=3.0).sample(exact_velocity(points[:1]), noise, sampler="euler")
    np.testing.assert_allclose(one.reshape(200, -1), np.broadcast_to(points[:1], (200, 8)), atol=1e-12)


def test_heun_is_second_order_on_gaussian_data():
    """For data N(mu, s^2) per dimension the probability-flow ODE maps noise x_1 to mu + s x_1 exactly. The exact
    field is v(x, t) = E[eps - x0 | x_t] = (t - (1 - t) s^2) (x - (1 - t) mu) / var_t - mu, var_t = (1 - t)^2 s^2
    + t^2. Euler's error falls like 1/n, Heun's like 1/n^2."""
    mu, s = 0.7, 0.3
    noise = np.random.default_rng(1).standard_normal((16, 1, 2, 2))

    def v(x, t_model):
        t = float(t_model[0]) / 1000.0
        var = (1 - t) ** 2 * s * s + t * t
        return (t - (1 - t) * s * s) * (x - (1 - t) * mu) / var - mu

    err = {(sampler, n): np.abs(RectifiedFlow(num_steps=n).sample(v, noise, sampler=sampler) - (mu + s * noise)).max()
           for sampler in ("euler", "heun") for n in (10, 20, 40)}
    assert err["heun", 40] < 3e-3 and err["heun", 40] < err["euler", 40] / 10, err  # (measured: 2.2e-3, 3.8e-2)
    assert 1.6 < err["euler", 20] / err["euler", 40] < 2.5, err  # first order
    assert 3.0 < err["heun", 20] / err["heun", 40] < 5.5, err  # second order


def test_clip_denoised_keeps_the_prediction_in_range():
    far = np.full((1, 8), 5.0)  # data outside [-1, 1]: clipping the denoised estimate pulls the samples inside
    x = RectifiedFlow(num_steps=10).sample(exact_velocity(far), np.zeros((4, 2, 2, 2)), clip_denoised=True)
    assert np.abs(x).max() <= 1.0 + 1e-12


FAST = ["--variant", "mini/4", "--batch-size", "4", "--log-every", "1", "--sample-steps", "2", "--objective", "flow"]


def test_train_and_sample_with_rectified_flow(tmp_path, capsys):
    run = str(tmp_path / "f")
    train_mod.main(FAST + ["--steps", "3", "--out", run, "--time-sampling", "uniform"])
    model, objective, meta = load(run)
    assert isinstance(objective, RectifiedFlow) and objective.time_sampling == "uniform"
    assert model.learn_sigma is False and model.out_channels == model.in_channels == 1
    assert meta["args"]["objective"] == "flow"
    grids = {}
    for sampler, shift in (("euler", "1"), ("heun", "1"), ("euler", "3")):
        npz = tmp_path / f"{sampler}{shift}.npz"
        sample_main(["--ckpt", run, "--class-labels", "1", "2", "--num-sampling-steps", "4", "--sampler", sampler,
                     "--shift", shift, "--out", str(tmp_path / "g.png"), "--npz", str(npz)])
        grids[sampler, shift] = np.load(npz)["arr_0"]
    assert grids["euler", "1"].shape == (2, 16, 16, 1)
    assert not np.array_equal(grids["euler", "1"], grids["heun", "1"])
    assert not np.array_equal(grids["euler", "1"], grids["euler", "3"])
    train_mod.main(["--resume", run, "--steps", "4"])  # resuming keeps the objective
    assert load(run)[2]["step"] == 4 and isinstance(load(run)[1], RectifiedFlow)


def test_flow_option_errors(tmp_path):
    with pytest.raises(SystemExit, match="--learn-sigma is for --objective ddpm"):
        train_mod.main(FAST + ["--steps", "1", "--learn-sigma", "--out", str(tmp_path / "a")])
    ddpm = str(tmp_path / "d")
    train_mod.main(FAST[:-2] + ["--steps", "1", "--out", ddpm, "--no-final-samples"])
    with pytest.raises(SystemExit, match="--shift is for rectified-flow models"):
        sample_main(["--ckpt", ddpm, "--shift", "3", "--out", str(tmp_path / "g.png")])
    with pytest.raises(SystemExit, match="unknown sampler 'euler'"):
        sample_main(["--ckpt", ddpm, "--sampler", "euler", "--num-sampling-steps", "2",
                     "--out", str(tmp_path / "g.png")])
