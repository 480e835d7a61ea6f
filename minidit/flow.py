"""Rectified flow, as Stable Diffusion 3 trains and samples it, with the loss gradient written by hand.

SD3's convention (sd3-ref sd3_impls.py ModelSamplingDiscreteFlow; diffusers FlowMatchEulerDiscreteScheduler):

  path              x_t = (1 - t) x_0 + t eps,   t in [0, 1],  t = 0 is data, t = 1 is noise      (a straight line)
  target            the velocity  v = dx_t/dt = eps - x_0        (the model predicts it; no learned-sigma half)
  loss              L = mean over every element of (v_hat - (eps - x_0))^2,   dL/dv_hat = 2 (v_hat - v) / (N C H W)
  training times    logit-normal: t = sigmoid(u), u ~ N(m, s), m = 0, s = 1 (SD3's default), or uniform on (0, 1)
  network time      the DiT sees 1000 t through its sinusoidal timestep embedding (SD3: sigma * 1000)
  denoised          x0_hat = x_t - t v_hat                       (so guidance on v is guidance on x0_hat)
  sampling          the ODE dx/dt = v from t = 1 (noise) to t = 0 (data) on a grid t_0 = 1 > t_1 > ... > t_n = 0:
                      Euler  x <- x + (t_next - t) v(x, t)
                      Heun   x' = x + (t_next - t) v(x, t);  x <- x + (t_next - t) (v(x, t) + v(x', t_next)) / 2
                             (the last step, to t = 0, is an Euler step, as k-diffusion's sample_heun)
  time shift        t' = a t / (1 + (a - 1) t) on the sampling grid (a = 1: none; SD3 uses 3 at 1024 px): more of
                    the steps where the noise is large

Other codebases use other conventions (SiT: t = 0 is noise and the target is data - noise; Open-Sora 1.2: the target
is x_0 - eps); minidit follows SD3's.

As an objective it has the methods train.py, sample.py and the checkpoint code rely on, as minidit.diffusion.Diffusion:
    t = flow.sample_t(n, rng);  x_t = flow.q_sample(x0, t, noise);  t_model = flow.model_time(t)
    loss, terms, dout = flow.training_loss(model_output, x0, t, noise)
    x0 = flow.for_sampling(50).sample(model_fn, noise, rng, sampler="euler")      model_fn(x_t, t_model)
"""
from __future__ import annotations

import copy

import numpy as np

from .xp import get_xp

TIME_SAMPLING = ("logit-normal", "uniform")


def _per_sample(t, x):
    """t (N,) as x's module and dtype, shaped (N, 1, 1, ...) to broadcast against x."""
    xp = get_xp(x)
    return xp.asarray(t).astype(x.dtype).reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def shift_time(t, shift):
    """SD3's resolution shift t' = a t / (1 + (a - 1) t): a > 1 moves every t towards 1 (noise); t = 0, 1 stay."""
    return shift * t / (1.0 + (shift - 1.0) * t)


class RectifiedFlow:
    """SD3's rectified-flow objective for any minidit model whose output has the input's channels."""

    kind = "flow"
    SAMPLERS = ("euler", "heun")

    def __init__(self, time_sampling="logit-normal", logit_mean=0.0, logit_std=1.0, shift=1.0, num_steps=50):
        if time_sampling not in TIME_SAMPLING:
            raise ValueError(f"unknown time sampling {time_sampling!r}; choose one of {', '.join(TIME_SAMPLING)}")
        if not logit_std > 0 or not shift > 0:
            raise ValueError(f"logit_std and shift must be > 0, got {logit_std} and {shift}")
        if int(num_steps) < 1:
            raise ValueError(f"sampling needs at least 1 step, got {num_steps}")
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, float(logit_mean), float(logit_std)
        self.shift, self.num_steps = float(shift), int(num_steps)
        self.learn_sigma = False  # the output is the velocity alone

    def spec(self):
        """The constructor arguments, JSON-able, with "kind" (what a checkpoint stores)."""
        return {"kind": self.kind, "time_sampling": self.time_sampling, "logit_mean": self.logit_mean,
                "logit_std": self.logit_std, "shift": self.shift, "num_steps": self.num_steps}

    # -- training ------------------------------------------------------------------------------------
    def sample_t(self, n, rng):
        """n training times in (0, 1) from a numpy Generator: sigmoid(N(m, s)) or U(0, 1), float64 on the host."""
        if self.time_sampling == "uniform":
            return rng.uniform(0.0, 1.0, size=n)
        return 1.0 / (1.0 + np.exp(-rng.normal(self.logit_mean, self.logit_std, size=n)))

    def model_time(self, t):
        """What the network is given for time t (an array on any device, or a number): 1000 t (SD3's sigma * 1000),
        so DiT's sinusoid sees the same range as under DDPM."""
        return 1000.0 * t

    def q_sample(self, x_start, t, noise):
        """x_t = (1 - t) x_0 + t eps."""
        assert noise.shape == x_start.shape
        s = _per_sample(t, x_start)
        return (1.0 - s) * x_start + s * noise

    def training_loss(self, model_output, x_start, t, noise):
        """Loss, per-sample terms and d(loss)/d(model_output) for a velocity prediction at x_t = q_sample(x_start, t,
        noise). model_output (N, C, H, W) like x_start. Returns (loss 0-d array, {"mse", "loss"} (N,) each, dout)."""
        xp = get_xp(model_output, x_start)
        if model_output.shape != x_start.shape:
            raise ValueError(f"rectified flow needs an output shaped like the input {tuple(x_start.shape)} (the "
                             f"velocity alone; train with --no-learn-sigma), got {tuple(model_output.shape)}")
        diff = model_output - (noise - x_start)  # v_hat - v
        mse = (diff * diff).mean(axis=tuple(range(1, diff.ndim)))  # (N,)
        loss = xp.asarray(mse.mean())
        dout = diff * (2.0 / diff.size)
        return loss, {"mse": mse, "loss": mse}, dout.astype(model_output.dtype, copy=False)

    # -- sampling ------------------------------------------------------------------------------------
    def for_sampling(self, num_sampling_steps):
        """The same flow with `num_sampling_steps` steps on its sampling grid."""
        other = copy.copy(self)
        other.num_steps = int(num_sampling_steps)
        if other.num_steps < 1:
            raise ValueError(f"sampling needs at least 1 step, got {num_sampling_steps}")
        return other

    def timesteps(self):
        """The sampling grid 1 = t_0 > t_1 > ... > t_n = 0: n + 1 evenly spaced times, shifted (float64, host)."""
        return shift_time(np.linspace(1.0, 0.0, self.num_steps + 1), self.shift)

    def sample(self, model_fn, noise, rng=None, sampler="euler", eta=0.0, clip_denoised=False, progress=False):
        """x_0 from x_1 = noise by integrating dx/dt = v with Euler or Heun steps; model_fn(x_t, t_model) -> v_hat.

        clip_denoised clamps x0_hat = x_t - t v_hat to [-1, 1] (pixel data) before each step; rng and eta are unused
        (the ODE is deterministic), accepted so that every objective samples through the same call."""
        if sampler not in self.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} for rectified flow; choose one of "
                             f"{', '.join(self.SAMPLERS)}")
        xp = get_xp(noise)
        times = self.timesteps()
        steps = range(self.num_steps)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"{sampler} ({self.num_steps} steps)")

        def velocity(x, t):
            v = model_fn(x, xp.full((x.shape[0],), self.model_time(t), dtype=x.dtype))
            if clip_denoised and t > 0:  # v = (x - x0_hat) / t with x0_hat clamped
                v = (x - xp.clip(x - t * v, -1.0, 1.0)) / t
            return v

        x = noise
        for i in steps:
            t, t_next = float(times[i]), float(times[i + 1])
            v = velocity(x, t)
            if sampler == "heun" and t_next > 0:
                x_pred = x + (t_next - t) * v
                v = 0.5 * (v + velocity(x_pred, t_next))
            x = x + (t_next - t) * v
        return x
