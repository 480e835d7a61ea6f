"""Gaussian diffusion as DiT trains and samples it, with the loss gradient written by hand.

DiT reuses the diffusion code of ADM / IDDPM (Nichol & Dhariwal 2021, "Improved DDPM"). What it uses:

  forward process   q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I),   ab_t = prod_{s<=t} (1 - beta_s)
  posterior         q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, bt_t I)                  (DDPM eq. 6-7)
                    bt_t = beta_t (1 - ab_{t-1}) / (1 - ab_t)
                    c1_t = beta_t sqrt(ab_{t-1}) / (1 - ab_t),   c2_t = (1 - ab_{t-1}) sqrt(alpha_t) / (1 - ab_t)
  network output    (N, 2C, H, W) = [eps | v]: predicted noise and a variance interpolation value
  model variance    log s2_t = frac log(beta_t) + (1 - frac) log(bt_t),   frac = (v + 1) / 2     (IDDPM eq. 15)
  model mean        x0_hat = sqrt(1/ab_t) x_t - sqrt(1/ab_t - 1) eps,   mu = c1_t x0_hat + c2_t x_t
  loss              L = mean_n [ mse_n + vb_n ]                                            (IDDPM L_hybrid)
                    mse_n = mean_{C,H,W} (noise - eps)^2
                    vb_n  = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) / ln 2     for t > 0 (bits per dim)
                          = -log p(x_0 | x_1) / ln 2 (discretized Gaussian)      for t = 0
                    vb sees eps as a constant ("frozen mean"), so it trains only the variance channels v.

Time indices: a ``Diffusion`` may keep only some of the 1000 steps ("respacing", ``timestep_respacing="250"``).
All tables are indexed by the respaced index i = 0 .. num_timesteps-1; the network is called with the original
step ``timestep_map[i]``. With ``timestep_respacing=""`` every step is kept and the two coincide.

Dtypes: the schedule tables are float64 numpy arrays on the host. Per call, the entries for the batch's
timesteps are gathered and cast to the input's dtype (``_extract``), so float32 inputs give float32 results
(as the official code does) and float64 inputs give float64 results (for gradient checks).
Every function takes its array module from its inputs, so the same code runs on NumPy and CuPy.
"""
from __future__ import annotations

import math

import numpy as np

from .xp import get_xp, to_numpy

LN2 = math.log(2.0)
BIN = 1.0 / 255.0  # half-width of a pixel bin for data in [-1, 1]
LOG_EPS = 1e-12  # probabilities are clamped here before the log (as the official code)


# ----------------------------------------------------------------------------------------------------
# schedules and respacing (host side, float64 numpy)


def get_beta_schedule(name: str, T: int) -> np.ndarray:
    """Betas beta_0..beta_{T-1} (float64) of a named schedule.

    "linear":  linspace(1e-4, 0.02, T) scaled by 1000/T, so that any T spans the same ab range as T = 1000.
    "cosine" / "squaredcos_cap_v2":  ab(s) = cos^2(pi/2 (s + 0.008)/1.008),  beta_i = min(1 - ab((i+1)/T)/ab(i/T), 0.999)
    """
    if name == "linear":
        scale = 1000.0 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if name in ("cosine", "squaredcos_cap_v2"):
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
        return np.array(betas, dtype=np.float64)
    raise ValueError(f"unknown beta schedule {name!r}; choose 'linear' or 'cosine'")


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """The original steps kept by a respacing, e.g. "250" -> {0, 4, 8, ..., 995, 999}.

    section_counts: "a,b,c" or [a, b, c]: the T steps are cut into len(sections) equal parts (the first T % len
    parts one step longer), and part k keeps section_counts[k] steps evenly spread over it, first and last included:
    offsets round(0), round(s), round(s + s), ... with the float stride s = (size - 1)/(count - 1), summed step by
    step as the official respace.py does (the running sum can round differently from round(k * s) at exact halves).
    "ddimN": the integer stride i for which range(0, T, i) has exactly N elements (the DDIM paper's striding).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {want} of {num_timesteps} steps with an integer stride")
        section_counts = [int(c) for c in section_counts.split(",")]

    n_sections = len(section_counts)
    size_per, extra = divmod(num_timesteps, n_sections)
    kept, start = [], 0
    for k, count in enumerate(section_counts):
        size = size_per + (1 if k < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        offset = 0.0
        for _ in range(count):
            kept.append(start + round(offset))
            offset += stride
        start += size
    return set(kept)


# ----------------------------------------------------------------------------------------------------
# elementwise pieces of the variational bound, each with the derivative the loss gradient needs


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats.

    KL = 0.5 (-1 + lv2 - lv1 + e^(lv1 - lv2) + (m1 - m2)^2 e^(-lv2))
    """
    xp = get_xp(mean1, logvar1, mean2, logvar2)
    return 0.5 * (-1.0 + logvar2 - logvar1 + xp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * xp.exp(-logvar2))


def normal_kl_dlogvar2(mean1, logvar1, mean2, logvar2):
    """d KL / d lv2 = 0.5 (1 - e^(lv1 - lv2) - (m1 - m2)^2 e^(-lv2))."""
    xp = get_xp(mean1, logvar1, mean2, logvar2)
    return 0.5 * (1.0 - xp.exp(logvar1 - logvar2) - (mean1 - mean2) ** 2 * xp.exp(-logvar2))


_K = math.sqrt(2.0 / math.pi)


def approx_standard_normal_cdf(u):
    """Phi(u) ~= 0.5 (1 + tanh(k (u + 0.044715 u^3))),  k = sqrt(2/pi); returns (Phi, dPhi/du).

    dPhi/du = 0.5 (1 - tanh^2) k (1 + 3 * 0.044715 u^2)   (the derivative of the approximation, not the exact pdf)
    """
    xp = get_xp(u)
    th = xp.tanh(_K * (u + 0.044715 * (u * u * u)))  # u * u * u: NumPy's u ** 3 calls pow() per element
    cdf = 0.5 * (1.0 + th)
    dcdf = 0.5 * (1.0 - th * th) * _K * (1.0 + 3 * 0.044715 * u * u)
    return cdf, dcdf


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(bin of x) under N(means, e^(2 log_scales)), bins of half-width 1/255 on [-1, 1]; returns (logp, dlogp/dlog_scales).

    With z_pm = (x - mu +- 1/255) / sigma:
        x < -0.999 :  logp = log Phi(z_+)              (the lowest bin reaches -inf)
        x >  0.999 :  logp = log (1 - Phi(z_-))        (the highest bin reaches +inf)
        otherwise  :  logp = log (Phi(z_+) - Phi(z_-))
    each probability clamped below at 1e-12 before the log (zero gradient where the clamp acts).
    Since z = (x - mu +- 1/255) e^(-log_scale), dz/dlog_scale = -z.
    """
    xp = get_xp(x, means, log_scales)
    centered = x - means
    inv_std = xp.exp(-log_scales)
    z_plus = inv_std * (centered + BIN)
    z_min = inv_std * (centered - BIN)
    cdf_plus, dcdf_plus = approx_standard_normal_cdf(z_plus)
    cdf_min, dcdf_min = approx_standard_normal_cdf(z_min)
    # d Phi(z_+)/d log_scale = -z_+ Phi'(z_+), and likewise for z_-
    dplus = -z_plus * dcdf_plus
    dmin = -z_min * dcdf_min

    p_low = cdf_plus  # x < -0.999
    p_high = 1.0 - cdf_min  # x > 0.999
    p_mid = cdf_plus - cdf_min
    dp_low, dp_high, dp_mid = dplus, -dmin, dplus - dmin

    def log_clamped(p, dp):
        # log(max(p, eps)) and its derivative dp / p where p >= eps, else 0
        pc = xp.maximum(p, LOG_EPS)
        return xp.log(pc), xp.where(p >= LOG_EPS, dp / pc, 0.0)

    lp_low, g_low = log_clamped(p_low, dp_low)
    lp_high, g_high = log_clamped(p_high, dp_high)
    lp_mid, g_mid = log_clamped(p_mid, dp_mid)
    low, high = x < -0.999, x > 0.999
    log_probs = xp.where(low, lp_low, xp.where(high, lp_high, lp_mid))
    dlog_probs = xp.where(low, g_low, xp.where(high, g_high, g_mid))
    return log_probs, dlog_probs.astype(log_probs.dtype, copy=False)


def _mean_flat(a):
    """Mean over all axes but the batch axis: (N, ...) -> (N,)."""
    return a.mean(axis=tuple(range(1, a.ndim)))


def _nonzero(t, x):
    """[t != 0] as x's dtype, shaped (N, 1, 1, ...) against x: the last step adds no noise."""
    xp = get_xp(x)
    return (xp.asarray(t) != 0).astype(x.dtype).reshape((x.shape[0],) + (1,) * (x.ndim - 1))


# ----------------------------------------------------------------------------------------------------


class Diffusion:
    """The DiT diffusion: linear schedule, epsilon prediction, learned-range variance, MSE + vb loss.

    Matches ``create_diffusion(timestep_respacing, noise_schedule, learn_sigma, diffusion_steps)`` of the official
    repo with its defaults (use_kl=False, sigma_small=False, predict_xstart=False, rescale_learned_sigmas=False).
    learn_sigma=False uses the fixed "large" variance beta_t (beta at t = 0 replaced by bt_1) and the MSE loss only.

    As an objective (what train.py, sample.py and bench.py rely on; rectified flow has the same methods):
        t = diffusion.sample_t(n, rng)                             training times, here uniform integers
        x_t = diffusion.q_sample(x_start, t, noise)
        loss, terms, dout = diffusion.training_loss(model_output, x_start, t, noise)
        x0 = diffusion.for_sampling(250).sample(model_fn, noise, rng, sampler="ddpm")
        diffusion.spec()                                           what a checkpoint stores to rebuild it
    """

    kind = "ddpm"
    SAMPLERS = ("ddpm", "ddim", "dpm++2m")

    def __init__(self, timestep_respacing="", learn_sigma=True, noise_schedule="linear", diffusion_steps=1000):
        self.learn_sigma = learn_sigma
        self.noise_schedule = noise_schedule
        self.original_num_steps = diffusion_steps

        # which original steps to keep; "" / None keeps them all (one section of diffusion_steps steps)
        if timestep_respacing is None or timestep_respacing == "":
            timestep_respacing = [diffusion_steps]
        elif isinstance(timestep_respacing, int):
            timestep_respacing = str(timestep_respacing)
        kept = space_timesteps(diffusion_steps, timestep_respacing)
        if len(kept) < 2:  # the clipped posterior log-variance at t = 0 borrows the value at t = 1
            raise ValueError(f"respacing {timestep_respacing!r} keeps {len(kept)} step(s); sampling needs at least 2")

        # respaced betas: beta'_i = 1 - ab[s_i] / ab[s_{i-1}] (ab before the first kept step = 1),
        # so ab'_i = ab[s_i] exactly. The official code always does this, even when it keeps every step.
        base_alphas_cumprod = np.cumprod(1.0 - get_beta_schedule(noise_schedule, diffusion_steps))
        betas, timestep_map, last = [], [], 1.0
        for s, ab in enumerate(base_alphas_cumprod):
            if s in kept:
                betas.append(1.0 - ab / last)
                last = ab
                timestep_map.append(s)
        self.timestep_map = np.array(timestep_map, dtype=np.int64)  # (T',) original step of each index
        self._device_tables = {}  # (id of a host table, backend) -> (table, its device copy): see _table_on
        self._set_tables(np.array(betas, dtype=np.float64))

    def spec(self):
        """The constructor arguments of the full (un-respaced) process, JSON-able, with "kind"."""
        return {"kind": self.kind, "learn_sigma": self.learn_sigma, "noise_schedule": self.noise_schedule,
                "diffusion_steps": self.original_num_steps}

    def for_sampling(self, num_sampling_steps):
        """The same process respaced to `num_sampling_steps` steps (the official create_diffusion(str(steps)))."""
        return Diffusion(str(num_sampling_steps), learn_sigma=self.learn_sigma, noise_schedule=self.noise_schedule,
                         diffusion_steps=self.original_num_steps)

    def sample_t(self, n, rng):
        """n training timesteps, uniform over 0 .. num_timesteps-1 (official: torch.randint), from a numpy Generator."""
        return rng.integers(0, self.num_timesteps, size=n)

    def model_time(self, t):
        """Indices t (N,) -> the original steps the network is called with (t itself without respacing), on t's
        device."""
        return self._table_on(self.timestep_map, get_xp(t))[t]

    def _set_tables(self, betas):
        """All per-step float64 tables (DDPM / IDDPM notation in comments)."""
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.betas = betas
        self.num_timesteps = T = len(betas)
        alphas = 1.0 - betas
        ab = np.cumprod(alphas)  # ab_t
        self.alphas_cumprod = ab
        self.alphas_cumprod_prev = np.append(1.0, ab[:-1])  # ab_{t-1}, with ab_{-1} = 1
        assert self.alphas_cumprod_prev.shape == (T,)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(ab)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ab)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ab)  # x0 = sqrt(1/ab) x_t - sqrt(1/ab - 1) eps
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ab - 1.0)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - ab)  # bt_t, 0 at t = 0
        # log bt_t with bt_0 = 0 replaced by bt_1, so the log is finite
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - ab)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - ab)

        # model variance: learned range is [log bt_t, log beta_t]; fixed "large" is beta_t with beta_0 -> bt_1
        self.log_betas = np.log(betas)
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

    # -- gathering ------------------------------------------------------------------------------------

    def _extract(self, table, t, x):
        """table[t] as an array of x's module and dtype, shaped (N, 1, 1, ...) to broadcast against x."""
        xp = get_xp(x)
        t = xp.asarray(t)
        vals = self._table_on(table, xp)[t].astype(x.dtype)  # gather in float64, then cast (like _extract_into_tensor)
        return vals.reshape(t.shape + (1,) * (x.ndim - t.ndim))

    def _table_on(self, table, xp):
        """A host table on xp's device, copied once and reused: a copy per call would be a host -> device transfer
        (on CuPy, one that waits for the device) a dozen times per training step."""
        if xp is np:
            return table
        key = (id(table), xp.__name__)
        hit = self._device_tables.get(key)
        if hit is None or hit[0] is not table:  # keyed by identity; the host table is kept so its id stays unique
            hit = self._device_tables[key] = (table, xp.asarray(table))
        return hit[1]

    def _split_output(self, model_output, x):
        """(N, 2C, H, W) -> eps, v  (learn_sigma) or (N, C, H, W) -> eps, None."""
        C = x.shape[1]
        if self.learn_sigma:
            assert model_output.shape == (x.shape[0], 2 * C) + x.shape[2:], (model_output.shape, x.shape)
            return model_output[:, :C], model_output[:, C:]
        assert model_output.shape == x.shape, (model_output.shape, x.shape)
        return model_output, None

    # -- forward process and posterior ----------------------------------------------------------------

    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) noise     (DDPM eq. 4; t = 0 is one step of noise)."""
        assert noise.shape == x_start.shape
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        var = self._extract(self.posterior_variance, t, x_t)
        log_var = self._extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, var, log_var

    def predict_xstart_from_eps(self, x_t, t, eps):
        """x0_hat = sqrt(1/ab_t) x_t - sqrt(1/ab_t - 1) eps."""
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """eps = (sqrt(1/ab_t) x_t - x0_hat) / sqrt(1/ab_t - 1)."""
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    # -- reverse process ------------------------------------------------------------------------------

    def _model_log_variance(self, v, t, x):
        """Model log-variance (N, C, H, W) and, for learn_sigma, d logvar / d v (per sample, (N, 1, 1, 1)).

        learned range: log s2 = frac max_log + (1 - frac) min_log,  frac = (v + 1)/2,  v not clamped
                       d log s2 / dv = (max_log - min_log) / 2
        """
        xp = get_xp(x)
        if v is None:
            log_var = self._extract(self.fixed_large_log_variance, t, x) * xp.ones_like(x)
            return log_var, None
        min_log = self._extract(self.posterior_log_variance_clipped, t, x)  # log bt_t
        max_log = self._extract(self.log_betas, t, x)  # log beta_t
        frac = (v + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
        return log_var, (max_log - min_log) / 2.0

    def p_mean_variance(self, model_output, x_t, t, clip_denoised=False):
        """Mean and variance of p(x_{t-1} | x_t) from the network output at (x_t, t).

        Returns dict(mean, variance, log_variance, pred_xstart), each shaped like x_t.
        clip_denoised clamps x0_hat to [-1, 1] (the DiT scripts sample with clip_denoised=False).
        """
        xp = get_xp(model_output, x_t)
        eps, v = self._split_output(model_output, x_t)
        log_var, _ = self._model_log_variance(v, t, x_t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = xp.clip(pred_xstart, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return dict(mean=mean, variance=xp.exp(log_var), log_variance=log_var, pred_xstart=pred_xstart)

    # -- training loss --------------------------------------------------------------------------------

    def training_loss(self, model_output, x_start, t, noise):
        """Loss, per-sample terms and d(loss)/d(model_output) for a network output at x_t = q_sample(x_start, t, noise).

        model_output: (N, 2C, H, W) = [eps | v] with learn_sigma, else (N, C, H, W)
        t: (N,) int respaced indices.  Returns (loss, terms, dout):
          loss  0-d array = mean_n terms["loss"]
          terms dict of (N,) arrays: "mse", "vb" (learn_sigma only), "loss" = mse + vb
          dout  d loss / d model_output, shape and dtype of model_output
        """
        xp = get_xp(model_output, x_start)
        N = x_start.shape[0]
        D = int(np.prod(x_start.shape[1:]))  # elements per sample that mean_flat averages over (C*H*W)
        x_t = self.q_sample(x_start, t, noise)
        eps, v = self._split_output(model_output, x_t)
        terms = {}

        # mse_n = mean_{CHW} (noise - eps)^2   ->   d L / d eps = 2 (eps - noise) / (N D)
        diff = eps - noise
        terms["mse"] = _mean_flat(diff ** 2)
        deps = diff * (2.0 / (N * D))

        if v is None:
            terms["loss"] = terms["mse"]
            dout = deps
        else:
            # vb with the mean frozen: mu_theta depends on eps only (a constant here), the log-variance on v only.
            true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
            log_var, dlogvar_dv = self._model_log_variance(v, t, x_t)
            pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
            model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)

            # t > 0: KL(q || p_theta) in bits per dim
            kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, log_var)) / LN2
            dkl = normal_kl_dlogvar2(true_mean, true_log_var, model_mean, log_var) / LN2  # d(kl_n * D)/d logvar

            # t = 0: -log p(x_0 | x_1) in bits per dim, log_scale = logvar / 2
            logp, dlogp = discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * log_var)
            nll = -_mean_flat(logp) / LN2
            dnll = -0.5 * dlogp / LN2  # d(nll_n * D)/d logvar

            at_zero = xp.asarray(t) == 0  # (N,)
            terms["vb"] = xp.where(at_zero, nll, kl)
            terms["loss"] = terms["mse"] + terms["vb"]
            dvb_dlogvar = xp.where(at_zero.reshape((N,) + (1,) * (x_t.ndim - 1)), dnll, dkl)
            dv = dvb_dlogvar * dlogvar_dv * (1.0 / (N * D))  # chain through logvar = frac max + (1 - frac) min
            dout = xp.concatenate([deps, dv], axis=1)

        loss = xp.asarray(xp.mean(terms["loss"]))
        return loss, terms, dout.astype(model_output.dtype, copy=False)

    # -- samplers -------------------------------------------------------------------------------------

    def _model_timesteps(self, i, x):
        """Respaced index i -> (t, t_model): (N,) int64 arrays on x's module; t_model = timestep_map[t]."""
        t = get_xp(x).full((x.shape[0],), i, dtype=np.int64)
        return t, self.model_time(t)

    def _indices(self, progress):
        """num_timesteps-1 .. 0, wrapped in a tqdm bar when progress is set."""
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is an optional nicety
                print(f"sampling {self.num_timesteps} steps (install tqdm for a progress bar)")
                return indices
            return tqdm(indices)
        return indices

    def p_sample(self, model_output, x, t, rng, clip_denoised=False):
        """One DDPM step: x_{t-1} = mu + [t != 0] exp(log s2 / 2) z,  z ~ N(0, I) (drawn even at t = 0)."""
        xp = get_xp(x)
        out = self.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
        z = rng.standard_normal(x.shape, dtype=x.dtype)
        return out["mean"] + _nonzero(t, x) * xp.exp(0.5 * out["log_variance"]) * z

    def p_sample_loop(self, model_fn, noise, rng, clip_denoised=False, progress=False):
        """Ancestral sampling from x_T = noise down to x_0; model_fn(x_t, t_model) -> network output."""
        x = noise
        for i in self._indices(progress):
            t, t_model = self._model_timesteps(i, x)
            x = self.p_sample(model_fn(x, t_model), x, t, rng, clip_denoised=clip_denoised)
        return x

    def ddim_sample(self, model_output, x, t, rng, eta=0.0, clip_denoised=False):
        """One DDIM step (Song et al. 2021, eq. 12), x_t -> x_{t-1} with ab' = ab_{t-1}:

            eps   = (sqrt(1/ab) x_t - x0_hat) / sqrt(1/ab - 1)     (re-derived from the possibly clipped x0_hat)
            sigma = eta sqrt((1 - ab')/(1 - ab)) sqrt(1 - ab/ab')
            x_{t-1} = sqrt(ab') x0_hat + sqrt(1 - ab' - sigma^2) eps + [t != 0] sigma z
        """
        xp = get_xp(x)
        out = self.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        ab = self._extract(self.alphas_cumprod, t, x)
        ab_prev = self._extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * xp.sqrt((1.0 - ab_prev) / (1.0 - ab)) * xp.sqrt(1.0 - ab / ab_prev)
        z = rng.standard_normal(x.shape, dtype=x.dtype)
        mean = out["pred_xstart"] * xp.sqrt(ab_prev) + xp.sqrt(1.0 - ab_prev - sigma ** 2) * eps
        return mean + _nonzero(t, x) * sigma * z

    def ddim_sample_loop(self, model_fn, noise, rng, eta=0.0, clip_denoised=False, progress=False):
        """DDIM sampling from x_T = noise down to x_0 (eta = 0: deterministic); model_fn(x_t, t_model)."""
        x = noise
        eta = float(eta)
        for i in self._indices(progress):
            t, t_model = self._model_timesteps(i, x)
            x = self.ddim_sample(model_fn(x, t_model), x, t, rng, eta=eta, clip_denoised=clip_denoised)
        return x

    def dpm_solver_timesteps(self):
        """The num_timesteps original steps DPM-Solver++ visits: diffusers' "linspace" spacing over the whole schedule,
        round(linspace(0, T - 1, n + 1)) from the top, without the last (0): e.g. n = 20 -> 999, 949, ..., 50."""
        T = self.original_num_steps
        return np.linspace(0, T - 1, self.num_timesteps + 1).round()[::-1][:-1].astype(np.int64)

    def dpm_solver_sample_loop(self, model_fn, noise, clip_denoised=False, progress=False):
        """DPM-Solver++(2M) (Lu et al. 2022, multistep, data prediction), as diffusers' DPMSolverMultistepScheduler
        (algorithm_type "dpmsolver++", solver_order 2, midpoint, final sigma 0) computes it, in num_timesteps steps.

        With sig_t = sqrt((1 - ab_t) / ab_t), alpha_t = 1 / sqrt(1 + sig_t^2), sigma_t = sig_t alpha_t and
        lambda_t = log alpha_t - log sigma_t (the half log-SNR), at each visited step s -> t (h = lambda_t - lambda_s):
            x0_s   = (x - sigma_s eps) / alpha_s                      the data prediction (eps: the first C channels)
            D      = x0_s                                             first step: first order (DPM-Solver++ 1)
            D      = x0_s + (x0_s - x0_prev) / (2 r),  r = h_prev / h  later steps: second order, multistep
            x_t    = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) D
        and the last step, to sigma = 0, is first order: x_0 = x0_s. No noise is drawn: the solver is deterministic.
        The coefficients are float64 on the host and enter as Python floats, so float32 samples stay float32.
        """
        ab = np.cumprod(1.0 - get_beta_schedule(self.noise_schedule, self.original_num_steps))
        steps = self.dpm_solver_timesteps()
        sig = np.append(np.sqrt((1.0 - ab[steps]) / ab[steps]), 0.0)  # (n + 1,), the last one 0
        alpha = 1.0 / np.sqrt(1.0 + sig ** 2)
        sigma = sig * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # +inf at sigma = 0 (never used in a difference)
        xp = get_xp(noise)
        C = noise.shape[1]
        x, x0_prev = noise, None
        loop = range(self.num_timesteps)  # i = 0 .. n-1: from the noisiest visited step down
        if progress:
            from tqdm.auto import tqdm

            loop = tqdm(loop, desc=f"dpm++2m ({self.num_timesteps} steps)")
        for i in loop:
            eps = model_fn(x, xp.full((x.shape[0],), steps[i], dtype=np.int64))[:, :C]  # learned sigma ignored
            x0 = (x - float(sigma[i]) * eps) / float(alpha[i])
            if clip_denoised:
                x0 = xp.clip(x0, -1.0, 1.0)
            if sig[i + 1] == 0:  # the last step: lambda = inf, e^-h = 0, x_t = alpha_t x0 = x0
                x = x0
            else:
                h = lam[i + 1] - lam[i]
                D = x0 if x0_prev is None else x0 + (x0 - x0_prev) * float(0.5 * h / (lam[i] - lam[i - 1]))
                x = float(sigma[i + 1] / sigma[i]) * x - float(alpha[i + 1] * np.expm1(-h)) * D
            x0_prev = x0
        return x

    def sample(self, model_fn, noise, rng, sampler="ddpm", eta=0.0, clip_denoised=False, progress=False):
        """x_0 from x_T = noise with one of SAMPLERS (the loops above); model_fn(x_t, t_model) -> network output."""
        if sampler == "ddpm":
            return self.p_sample_loop(model_fn, noise, rng, clip_denoised=clip_denoised, progress=progress)
        if sampler == "ddim":
            return self.ddim_sample_loop(model_fn, noise, rng, eta=eta, clip_denoised=clip_denoised, progress=progress)
        if sampler == "dpm++2m":
            return self.dpm_solver_sample_loop(model_fn, noise, clip_denoised=clip_denoised, progress=progress)
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(self.SAMPLERS)}")


# ----------------------------------------------------------------------------------------------------
# classifier-free guidance


def cfg_model_fn(forward, y, null_label, cfg_scale, guide_channels=None):
    """Wrap forward(x, t, y) into model_fn(x_t, t) with classifier-free guidance (Ho & Salimans 2022).

    For a state x_t of batch N, the network runs once on the doubled batch
        out = forward([x_t; x_t], [t; t], [y; null ... null])                  (2N, C_out, H, W)
        cond, uncond = out[:N], out[N:]
        guided[:, :g] = uncond[:, :g] + s (cond[:, :g] - uncond[:, :g])        g = guide_channels
        guided[:, g:] = cond[:, g:]                                            (N, C_out, H, W)
    guide_channels=None guides every eps channel, g = x_t.shape[1] (the model's in_channels); the variance
    channels that follow are never guided. guide_channels=3 reproduces the official DiT's forward_with_cfg,
    which for exact reproducibility of the released checkpoints' numbers guides only channels 0..2 of the 4
    latent channels. The official sampler runs a doubled 2N state and each half keeps its own unguided channels;
    only the conditional half is kept at the end, so returning the conditional values for our N samples is
    what it computes for the samples it keeps. cfg_scale = 1 gives exactly the conditional output.
    null_label: the null class (an int), or one null condition as an array of y's per-sample shape (a caption model's
    all-padding token ids (L,)), repeated for the N samples.
    """
    s = float(cfg_scale)
    null_is_array = np.ndim(to_numpy(null_label)) > 0
    built = {}  # the null batch, made once per sampling loop: a host null condition is not uploaded every step

    def model_fn(x_t, t):
        xp = get_xp(x_t)
        N = x_t.shape[0]
        y_arr = xp.asarray(y)
        x_in = xp.concatenate([x_t, x_t], axis=0)  # (2N, C, H, W)
        t_in = xp.concatenate([t, t], axis=0)  # (2N,)
        if "null" not in built:
            if null_is_array:  # one null condition (e.g. an all-padding caption (L,)) for every sample
                built["null"] = xp.broadcast_to(xp.asarray(null_label, dtype=y_arr.dtype), y_arr.shape)
            else:
                built["null"] = xp.full((N,), null_label, dtype=y_arr.dtype)
        y_in = xp.concatenate([y_arr, built["null"]], axis=0)  # (2N,) or (2N, ...)
        out = forward(x_in, t_in, y_in)  # (2N, C_out, H, W)
        cond, uncond = out[:N], out[N:]
        g = x_t.shape[1] if guide_channels is None else guide_channels
        guided = uncond[:, :g] + s * (cond[:, :g] - uncond[:, :g])
        return xp.concatenate([guided, cond[:, g:]], axis=1)

    return model_fn
