"""minidit's DPM-Solver++(2M) (Diffusion.dpm_solver_sample_loop) against diffusers' DPMSolverMultistepScheduler with
the same model function and the same timesteps (torch extra; skipped without torch and diffusers).

The scheduler is configured as DiT's diffusion: linear betas 1e-4 .. 0.02 over 1000 steps, epsilon prediction, the
learned-range variance half of the output ignored, algorithm "dpmsolver++", order 2, midpoint, final sigma 0, the
"linspace" timestep spacing. With variance_type "learned_range" diffusers keeps the first 3 output channels as eps
(hard-coded for 3-channel pixel models), where minidit keeps the first C (the input's): the test uses C = 3, and with 4
latent channels diffusers would mix a variance channel into eps. diffusers keeps its sigmas and the sample in float32 inside `step`, so the trajectories
agree to float32 rounding of the trajectory's scale, not to float64's.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from minidit.diffusion import Diffusion  # noqa: E402


def model_fn(x, t):
    """A deterministic stand-in for a network: eps depends on x and t nonlinearly; the variance half is zeros."""
    N = x.shape[0]
    flat = x.reshape(N, -1)
    W = np.random.default_rng(0).standard_normal((flat.shape[1], flat.shape[1])) * 0.3
    eps = (np.tanh(flat @ W.T) * (np.asarray(t, dtype=np.float64)[:, None] / 1000.0) + 0.05 * flat).reshape(x.shape)
    return np.concatenate([eps, np.zeros_like(eps)], axis=1)


@pytest.mark.parametrize("steps", [5, 10, 20, 50])
def test_dpm_solver_matches_diffusers(steps):
    noise = np.random.default_rng(1).standard_normal((3, 3, 4, 4))  # 3 channels: see the module docstring
    d = Diffusion(str(steps))
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", algorithm_type="dpmsolver++",
        solver_order=2, solver_type="midpoint", prediction_type="epsilon", variance_type="learned_range",
        lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace")
    sched.set_timesteps(steps)
    np.testing.assert_array_equal(sched.timesteps.numpy(), d.dpm_solver_timesteps())  # the same timesteps
    x = torch.from_numpy(noise.copy())
    for t in sched.timesteps:
        out = torch.from_numpy(model_fn(x.numpy().astype(np.float64), np.full(len(noise), int(t))))
        x = sched.step(out, t, x).prev_sample
    ref = x.numpy()
    ours = d.sample(model_fn, noise, None, sampler="dpm++2m")
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"{steps} steps: max |minidit - diffusers| / max |diffusers| = {rel:.1e}")
    assert rel < 1e-5
